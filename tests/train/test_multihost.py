"""Several processes (jax.distributed on localhost, gloo) as several hosts of a pod: the batch rows each
process feeds come from the mesh (context spanning processes included), a SIGTERM to one process has every
process save the same step and exit 0, and the resumed run is bitwise the uninterrupted one."""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from kaleido_jax import config as kcfg
from kaleido_jax.train import inputs
from kaleido_jax.parallel import mesh as mesh_lib
from tests.train.common import tiny_config
from tests.train.test_loop import _final_params, _free_port, _steps, _worker

# 4 devices; 4 processes x 1 device: context spans processes. (A mesh whose tensor axis spans processes takes the
# same path: data_shards groups processes by the batch rows their devices hold, whichever axis splits a row;
# test_data_shards_on_pod_layouts checks tensor across hosts on pod layouts.)
CONTEXT = dict(data=2, context=2)
TRAIN = dict(num_steps=8, checkpoint_every=2, log_every=1)


def _launch(n, workdir, out, sleep=0.0, mesh=CONTEXT):
  port = _free_port()
  env = lambda i: {'XLA_FLAGS': f'--xla_force_host_platform_device_count={4 // n}',
                   'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': str(n),
                   'JAX_PROCESS_ID': str(i)}
  return [_worker(dict(workdir=workdir, train=TRAIN, mesh=mesh, out=out, sleep=sleep), env(i)) for i in range(n)]


def _finish(procs, timeout=300):
  logs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]


def _outs(out, n):
  return [json.load(open(out if i == 0 else f'{out}.{i}')) for i in range(n)]


@pytest.mark.slow
# Two processes on one workdir, the same flow with a SIGKILL first, run against a bucket in
# tests/test_storage.py::test_two_processes_share_a_bucket_workdir_through_kill_and_preemption.
def test_sigterm_to_one_process_saves_one_step_everywhere_and_resumes_bitwise(tmp_path, n=4, mesh=CONTEXT):
  # One process on 4 devices: the reference losses of this mesh.
  one = str(tmp_path / 'one.json')
  p = _worker(dict(workdir=str(tmp_path / 'one'), train=TRAIN, mesh=mesh, out=one),
              {'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  _finish([p])
  # n processes, uninterrupted: each feeds the rows the mesh gives it (n = 4: processes 0, 1 hold the
  # two context halves of data row block 0, so they load the same shard).
  ref_wd, ref_out = str(tmp_path / 'ref'), str(tmp_path / 'ref.json')
  _finish(_launch(n, ref_wd, ref_out, mesh=mesh))
  outs = _outs(ref_out, n)
  shards = [tuple(o['shard']) for o in outs]
  want = [(0, 2, 0, 4), (0, 2, 0, 4), (1, 2, 4, 8), (1, 2, 4, 8)]  # (index, count, start, stop) of batch 8
  assert shards == want
  np.testing.assert_allclose(outs[0]['losses'], json.load(open(one))['losses'], rtol=1e-5)
  # SIGTERM to the last process only, mid-run.
  wd, out = str(tmp_path / 'run'), str(tmp_path / 'run.json')
  procs = _launch(n, wd, out, sleep=0.3, mesh=mesh)
  t = time.time()
  while not _steps(wd) and time.time() - t < 240:
    assert all(q.poll() is None for q in procs), [q.stdout.read()[-3000:] for q in procs]
    time.sleep(0.05)
  procs[-1].send_signal(signal.SIGTERM)
  _finish(procs)
  outs = _outs(out, n)
  assert all(o['preempted'] for o in outs) and len({o['step'] for o in outs}) == 1, outs
  stopped = outs[0]['step']
  assert 2 <= stopped < TRAIN['num_steps'] and max(_steps(wd)) == stopped
  data_dir = os.path.join(wd, 'checkpoints', str(stopped), 'data')
  assert sorted(f for f in os.listdir(data_dir) if f.endswith('.json')) == [
      f'process_{i}-of-{n}.json' for i in range(n)]  # every process saved that step
  # Restart: resumes from the preempted step to the end, bitwise the uninterrupted run.
  _finish(_launch(n, wd, out, mesh=mesh))
  assert _outs(out, n)[0]['step'] == TRAIN['num_steps']
  (s1, a), (s2, b) = _final_params(ref_wd), _final_params(wd)
  assert s1 == s2 == TRAIN['num_steps']
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_data_shards_follow_the_mesh_on_one_process():
  devices = jax.devices()[:8]
  cfg = kcfg.base_config().mesh
  cfg.update(data=2, fsdp=2, context=2, tensor=1)
  mesh = mesh_lib.make_mesh(cfg, devices)
  assert inputs.data_shards(mesh, 8) == {0: inputs.DataShard(0, 1, 0, 8)}  # one process holds every row
  mesh = mesh_lib.make_mesh(kcfg.base_config().mesh, devices[:1])
  assert inputs.data_shards(mesh, 3) == {0: inputs.DataShard(0, 1, 0, 3)}


def test_shard_seeds_differ_between_shards_and_agree_within_a_group():
  a, a2, b = inputs.DataShard(0, 2, 0, 4), inputs.DataShard(0, 2, 0, 4), inputs.DataShard(1, 2, 4, 8)
  assert inputs.shard_seed(7, a) == inputs.shard_seed(7, a2) != inputs.shard_seed(7, b)
  assert inputs.shard_seed(7, inputs.DataShard(0, 1, 0, 8)) == 7  # one shard keeps the config's seed
  config = tiny_config()
  config.train.input = 'pipeline'
  config.data.update(source='synthetic', batch_size=8, num_frames=5, height=32, width=32, read_threads=1,
                     prefetch=1, num_clips=32)
  config.diffusion.text_dropout = 0.0
  first = lambda s: next(inputs.make_input(config, seed=3, shard=s))
  x, x2, y = first(a), first(a2), first(b)
  for k in ('video_latents', 'ref_latents', 'text_embedding'):  # one group, one stream
    np.testing.assert_array_equal(x[k], x2[k])
  assert x['video_latents'].shape[0] == 4  # the shard's rows [0, 4)
  assert not np.array_equal(x['video_latents'], y['video_latents'])  # other records


@pytest.mark.skipif(__import__('importlib').util.find_spec('libtpu') is None, reason='needs libtpu (test extra)')
@pytest.mark.parametrize('topology,mesh,batch,want', [
    # v5p-16: 2 hosts x 4 chips. tensor over all 8 chips spans both hosts: both feed the one row.
    ('v5p:2x2x2', dict(tensor=8), 1, [(0, 1, 0, 1)] * 2),
    ('v5p:2x2x2', dict(fsdp=2, tensor=4), 2, [(0, 2, 0, 1), (1, 2, 1, 2)]),
    # v6e-16: 4 hosts x 4 chips. context 8 spans two hosts: hosts 0, 1 feed rows [0, 2), hosts 2, 3 rows [2, 4).
    ('v6e:4x4', dict(fsdp=2, context=8), 4, [(0, 2, 0, 2)] * 2 + [(1, 2, 2, 4)] * 2),
    ('v6e:4x4', dict(data=4, fsdp=4), 16, [(i, 4, 4 * i, 4 * i + 4) for i in range(4)]),
])
def test_data_shards_on_pod_layouts(topology, mesh, batch, want):
  from kaleido_jax.tools import aot
  devices = aot.topology_devices(topology)
  cfg = kcfg.base_config().mesh
  cfg.update(dict(dict(data=1, fsdp=1, context=1, tensor=1), **mesh))
  shards = inputs.data_shards(mesh_lib.make_mesh(cfg, devices), batch)
  assert [tuple(shards[p]) for p in sorted(shards)] == want


@pytest.mark.skipif(__import__('importlib').util.find_spec('libtpu') is None, reason='needs libtpu (test extra)')
def test_a_mesh_that_interleaves_hosts_within_the_batch_is_refused_by_name():
  from kaleido_jax.tools import aot
  devices = aot.topology_devices('v5p:2x2x2')
  by_host = [[d for d in devices if d.process_index == h] for h in (0, 1)]
  interleaved = [d for pair in zip(*by_host) for d in pair]  # host 0, host 1, host 0, ...
  mesh = jax.sharding.Mesh(np.asarray(interleaved).reshape(1, 8, 1, 1), mesh_lib.MESH_AXES)
  with pytest.raises(kcfg.ConfigError, match=r'gives process 0 batch rows \[0, 2, 4, 6\] of 8, not one aligned'):
    inputs.data_shards(mesh, 8)
