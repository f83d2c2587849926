"""AOT fit check: compile the real train step for abstract TPU devices (needs libtpu, no TPU)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from kaleido_jax.tools import aot
from tests.train.common import tiny_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                reason='libtpu not installed (pip install "jax[tpu]==<jax version>")')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_aot_compiles_sharded_step_for_tpu_slice():
  config = tiny_config(real_dit=True)
  config.mesh.update(data=1, fsdp=2, tensor=2)
  config.data.batch_size = 2  # one sample per data-parallel shard: the tool compiles the configured batch
  r = aot.analyse(config, 'v5p:2x2x1')
  table = aot.format_table(r)
  print(table)
  assert r['chips'] == 4 and r['mesh'] == {'data': 1, 'fsdp': 2, 'context': 1, 'tensor': 2}
  assert r['batch'] == 2  # the config's batch, validated as --mode train would
  assert r['args'] > 0 and r['temp'] > 0 and r['xla_flops'] > 0
  # The traced census counts what the step runs (the attention kernel's backward recomputes its scores), so it
  # is at least the analytic model count; XLA's figure is labelled as the per-loop-body count it is.
  assert r['analytic_flops_per_chip'] <= r['census_flops_per_chip'] < 1.5 * r['analytic_flops_per_chip']
  assert 'counts each loop body once' in table and 'headroom' in table
  assert r['capacity'] == 95 * aot.GIB and r['fits']
  assert 'per-chip HBM' in table and table.splitlines()[-1] == 'fits'
  # The verdict follows the numbers.
  assert aot.format_table(dict(r, total=2 * r['capacity'], fits=False)).splitlines()[-1] == 'does not fit'


def test_aot_compiles_for_two_slices_with_data_over_dcn():
  from kaleido_jax.parallel import mesh as mesh_lib
  config = tiny_config(real_dit=True)
  config.mesh.update(data=2, fsdp=2, tensor=2)  # dcn_data=-1 (default): the two slices split data
  config.data.batch_size = 4
  devices = aot.topology_devices('v5e:2x2', num_slices=2)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
  r = aot.analyse(config, 'v5e:2x2', num_slices=2)
  assert r['topology'] == '2 x v5e:2x2' and r['chips'] == 8 and r['fits']
  assert r['mesh'] == {'data': 2, 'fsdp': 2, 'context': 1, 'tensor': 2}


def test_aot_cli_prints_table(tmp_path):
  cfg = tmp_path / 'cfg.py'
  cfg.write_text('from tests.train.common import tiny_config\n\ndef get_config():\n  return tiny_config()\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  p = subprocess.run([sys.executable, '-m', 'kaleido_jax.tools.aot', '--config', str(cfg), '--topology',
                      'v6e:2x2'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'topology v6e:2x2 (4 chips)' in p.stdout and 'capacity    32.00 GiB' in p.stdout
  assert p.stdout.strip().splitlines()[-1] in ('fits', 'does not fit')


@pytest.mark.parametrize('context_parallel', ['ulysses', 'ring'])
def test_aot_context_parallel_offloaded_step_compiles_for_tpu(context_parallel):
  # What the 720p row uses, small: one sample over 4 chips split on context, weights sharded over context,
  # splash per device (attention 'auto' on a TPU mesh), block inputs offloaded to host memory.
  config = tiny_config(real_dit=True)
  config.model.update(remat_policy='offload', context_parallel=context_parallel)
  config.mesh.update(data=1, fsdp=1, context=4, tensor=1)
  r = aot.analyse(config, 'v5p:2x2x1', batch_size=1)
  print(aot.format_table(r))
  assert r['fits'] and r['mesh']['context'] == 4 and r['batch'] == 1
  assert r['host_temp'] > 0  # the block inputs really live in host memory between forward and backward


def _tiny_sample_config(quantization='int8'):
  from tests.sampling_common import tiny_config as tiny_sampling_config
  config = tiny_sampling_config('wan')
  config.model.update(quantization=quantization, text_dim=32)
  config.text_encoder.update(vocab_size=320, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                             quantization='int8')
  config.sample.update(num_frames=9, height=32, width=32)
  return config


def test_aot_sample_step_compiles_one_chip_and_a_sharded_slice():
  # One chip (v5e:1x1 needs chips_per_host_bounds=(1, 1, 1)) with int8 weights; then the guidance branches
  # over data and the tokens over context on v6e-8, as the 720p row of bench/sample.py --aot.
  config = _tiny_sample_config()
  r = aot.analyse_sample(config, 'v5e:1x1')
  table = aot.format_sample_table(r)
  print(table)
  assert r['chips'] == 1 and set(r['rows']) == {'dit', 'umt5', 'vae'} and r['branches'] == 3
  assert all(row['total'] >= row['weights'] > 0 for row in r['rows'].values())
  assert '(int8)' in r['rows']['dit']['what'] and r['fits'] and table.splitlines()[-1] == 'fits'
  assert r['one_shot'] <= r['resident']  # the one-shot plan never holds more than everything resident
  config.mesh.update(data=2, context=4)
  config.model.context_parallel = 'ring'  # 2 heads: ulysses would need heads % context == 0
  config.sample.text_encoder_device = 'host'  # umT5 off the chip: no umT5 program
  r8 = aot.analyse_sample(config, 'v6e:2x4')
  assert r8['chips'] == 8 and r8['mesh']['context'] == 4 and set(r8['rows']) == {'dit', 'vae'}
  # Weights are split over context (the `embed` rule): a quarter per chip of the one-chip bytes, roughly.
  assert r8['rows']['dit']['weights'] < 0.6 * r['rows']['dit']['weights']
