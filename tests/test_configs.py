"""Every shipped config validates as shipped on the slice it names; the AOT tool refuses what the trainer would."""

import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import time

import jax
import pytest

from kaleido_jax import config as kcfg
from kaleido_jax import pipeline as pipe_lib
from kaleido_jax.train import inputs
from kaleido_jax.train import loop
from kaleido_jax.parallel import mesh as mesh_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason='libtpu not installed (pip install "jax[tpu]==<jax version>")')


def _load(name):
  return importlib.import_module(f'configs.{name}')


def test_every_config_names_where_it_runs():
  # A TPU config names its slice (TPU_SLICE); the demo runs on this machine's devices.
  for name in CONFIGS:
    module = _load(name)
    assert hasattr(module, 'TPU_SLICE') or module.get_config().mode == 'demo', name


@needs_libtpu
@pytest.mark.parametrize('name', CONFIGS)
def test_config_validates_as_shipped_on_its_slice(name):
  from kaleido_jax.tools import aot
  module = _load(name)
  config = module.get_config()
  if not hasattr(module, 'TPU_SLICE'):  # the demo: this machine
    loop.validate(config, jax.device_count())
    return
  devices = aot.topology_devices(module.TPU_SLICE)
  if config.mode == 'sample' or name.endswith('_sample'):
    mesh_lib.mesh_shape(config.mesh, len(devices))
    s = config.sample
    pipe_lib.check_request(config, ['a prompt'], [config.model.max_refs], s.num_frames, s.height, s.width)
  else:
    loop.validate(config, len(devices))
    shards = inputs.data_shards(mesh_lib.make_mesh(config.mesh, devices), config.data.batch_size)
    assert len(shards) == len({d.process_index for d in devices})  # every host of the slice feeds rows


def test_trainer_refuses_what_it_refused_before():
  # The rule the shipped configs now meet: batch divisible by data * fsdp.
  config = _load('kaleido_14b').get_config()
  config.data.batch_size = 3
  with pytest.raises(kcfg.ConfigError, match=r'data.batch_size=3 must be divisible by data\*fsdp=4'):
    loop.validate(config, 4)


@needs_libtpu
def test_aot_refuses_a_batch_the_trainer_would_refuse_in_one_line_before_compiling():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  t0 = time.time()
  p = subprocess.run([sys.executable, '-m', 'kaleido_jax.tools.aot', '--config', 'configs/kaleido_14b.py',
                      '--topology', 'v5p:2x2x1', '--config.data.batch_size=3'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  print(f'refused in {time.time() - t0:.1f} s')
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [l for l in p.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and 'data.batch_size=3 must be divisible by data*fsdp=4' in lines[0]
  assert 'Traceback' not in p.stderr and p.stdout == ''


@needs_libtpu
@pytest.mark.slow
def test_aot_compiles_the_demo_batch_the_trainer_feeds():
  # The demo's subject-balanced loss needs `subject_weight` and its encoders add `empty_text_embedding`: the
  # tool compiles the batch the configured input yields (it once ended in a KeyError here).
  from kaleido_jax.tools import aot
  from kaleido_jax.train import inputs
  config = _load('demo').get_config()
  config.data.batch_size = 4
  r = aot.analyse(config, 'v5p:2x2x1')
  spec = inputs.batch_spec(config)
  assert {'subject_weight', 'empty_text_embedding', 'ref_latents'} <= set(spec)
  assert r['batch'] == 4 and r['fits']
