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
# tests/parallel/test_mesh.py checks tensor and context across hosts on pod layouts.)
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
  shards = [(o['shard'][0], o['shard'][1], tuple(o['shard'][2])) for o in outs]
  want = [(0, 2, (0, 1, 2, 3))] * 2 + [(1, 2, (4, 5, 6, 7))] * 2  # (index, count, rows) of batch 8
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


def _launch_slice(workdir, out, args):
  """Two processes of 4 CPU devices standing in for a v5p-16 (2 hosts x 4 chips), in its device order."""
  port = _free_port()
  env = lambda i: {'XLA_FLAGS': '--xla_force_host_platform_device_count=4',
                   'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(i)}
  return [_worker(dict(args, workdir=workdir, out=out, slice='v5p:2x2x2'), env(i)) for i in range(2)]


@pytest.mark.slow
@pytest.mark.skipif(__import__('importlib').util.find_spec('libtpu') is None, reason='needs libtpu (test extra)')
def test_v5p_16_order_kills_right_after_checkpoints_resume_bitwise_across_epochs(tmp_path):
  # fsdp 8 over two hosts whose chips alternate along fsdp (as on a real v5p-16): host 0 feeds rows 0, 2, 4, 6.
  # The pipeline input (read_threads 2, the encoders in the input loop), 16 clips per host: an epoch every 4 steps.
  # Both processes SIGKILLed right after checkpoint 2, then after 6; the resumed runs end bitwise the
  # uninterrupted one.
  args = dict(train=dict(num_steps=10, checkpoint_every=2, log_every=2, input='pipeline'),
              mesh=dict(data=1, fsdp=8), data=dict(num_clips=32, read_threads=2))
  ref, ref_out = str(tmp_path / 'ref'), str(tmp_path / 'ref.json')
  _finish(_launch_slice(ref, ref_out, args))
  outs = _outs(ref_out, 2)
  assert [(o['shard'][0], o['shard'][1], tuple(o['shard'][2])) for o in outs] == [(0, 2, (0, 2, 4, 6)),
                                                                                  (1, 2, (1, 3, 5, 7))]
  wd, out = str(tmp_path / 'run'), str(tmp_path / 'run.json')
  for kill_after in (2, 6):
    procs = _launch_slice(wd, out, args)
    t = time.time()
    while kill_after not in _steps(wd):
      assert all(q.poll() is None for q in procs), [q.stdout.read()[-3000:] for q in procs]
      assert time.time() - t < 300, 'timed out waiting for a checkpoint'
      time.sleep(0.01)
    for q in procs:
      q.kill()
    for q in procs:
      q.wait()
  _finish(_launch_slice(wd, out, args))
  (s1, a), (s2, b) = _final_params(ref), _final_params(wd)
  assert s1 == s2 == 10
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_data_shards_follow_the_mesh_on_one_process():
  devices = jax.devices()[:8]
  cfg = kcfg.base_config().mesh
  cfg.update(data=2, fsdp=2, context=2, tensor=1)
  mesh = mesh_lib.make_mesh(cfg, devices)
  assert inputs.data_shards(mesh, 8) == {0: inputs.DataShard(0, 1, tuple(range(8)))}  # one process holds every row
  mesh = mesh_lib.make_mesh(kcfg.base_config().mesh, devices[:1])
  assert inputs.data_shards(mesh, 3) == {0: inputs.DataShard(0, 1, (0, 1, 2))}


def test_shard_seeds_differ_between_shards_and_agree_within_a_group():
  a, a2, b = inputs.DataShard(0, 2, (0, 1, 2, 3)), inputs.DataShard(0, 2, (0, 1, 2, 3)), inputs.DataShard(1, 2, (4, 5, 6, 7))
  assert inputs.shard_seed(7, a) == inputs.shard_seed(7, a2) != inputs.shard_seed(7, b)
  assert inputs.shard_seed(7, inputs.DataShard(0, 1, tuple(range(8)))) == 7  # one shard keeps the config's seed
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


