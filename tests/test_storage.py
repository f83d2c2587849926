"""Storage: a `gs://` workdir on a GCS server on loopback (tests/gcs.py) holds the checkpoints, events and
tokenizer and resumes bitwise; the workdir lock; bad storage input is one line, exit 2."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kaleido_jax import storage
from tests import gcs as gcs_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def gcs():
  with gcs_lib.emulator() as g:
    yield g


def test_a_second_trainer_is_refused_by_name_and_a_dead_ones_lock_is_taken_over(tmp_path):
  first = storage.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(storage.StorageError, match=r'in use by a trainer on .*pid %d' % os.getpid()):
    storage.WorkdirLock(str(tmp_path)).acquire()
  # A killed run's lock: its process is gone (same host) -> stale at once.
  held = json.loads((tmp_path / 'train.lock').read_text())
  (tmp_path / 'train.lock').write_text(json.dumps({**held, 'pid': 2 ** 22 + 12345, 'nonce': 'dead'}))
  second = storage.WorkdirLock(str(tmp_path)).acquire()
  assert second.took_over['nonce'] == 'dead'
  first.release()  # not its lock any more: left alone
  assert json.loads((tmp_path / 'train.lock').read_text())['nonce'] == second.nonce
  second.release()
  assert not (tmp_path / 'train.lock').exists()
  # Another host's lock is stale only when not refreshed for stale_after seconds.
  (tmp_path / 'train.lock').write_text(json.dumps({'host': 'elsewhere', 'pid': 1, 'nonce': 'n',
                                                    'heartbeat': time.time() - 60, 'started': time.time() - 60}))
  with pytest.raises(storage.StorageError, match='elsewhere'):
    storage.WorkdirLock(str(tmp_path), stale_after=900).acquire()
  assert storage.WorkdirLock(str(tmp_path), stale_after=30).acquire().took_over['host'] == 'elsewhere'


def test_bucket_paths_and_bad_storage(gcs, tmp_path):
  d = storage.check_writable_dir(f'gs://{gcs.bucket}/a/b')
  (d / 'x.txt').write_text('hi')
  assert gcs.list('a/') == ['a/b/x.txt'] and not os.path.exists('gs:')
  with pytest.raises(storage.StorageError, match=r"bucket 'no-such-bucket-x' does not exist"):
    storage.check_writable_dir('gs://no-such-bucket-x/run')
  with pytest.raises(storage.StorageError, match='is a file, not a directory'):
    storage.check_writable_dir(f'gs://{gcs.bucket}/a/b/x.txt')
  (tmp_path / 'f').write_text('')
  with pytest.raises(storage.StorageError, match='is a file'):
    storage.check_writable_dir(str(tmp_path / 'f'))


def _train(workdir, steps, env, cwd):
  cmd = [sys.executable, '-m', 'kaleido_jax.main', '--config', os.path.join(REPO, 'configs', 'demo.py'), '--mode',
         'train', '--workdir', workdir, f'--config.train.num_steps={steps}', '--config.train.checkpoint_every=2',
         '--config.train.log_every=1', '--config.data.batch_size=2', '--config.mesh.data=1',
         '--config.model.num_layers=1']
  return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
                                 XLA_FLAGS='--xla_force_host_platform_device_count=1', **env))


def _bucket_params(run):
  """(last step, its saved state) read back from the bucket, on this process's first device."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpts = storage.path(run) / 'checkpoints'
  step = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  state = ckpts / str(step) / 'state'
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as c:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          c.metadata(state).item_metadata.tree)
    return step, c.restore(state, target)


def _assert_same_state(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  (s1, x), (s2, y) = a, b
  assert s1 == s2
  assert len(jax.tree.leaves(x)) == len(jax.tree.leaves(y)) > 0
  for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.slow
def test_demo_trains_into_a_bucket_and_resumes_bitwise(gcs, tmp_path):
  # `--mode train --workdir gs://...` as a user runs it: checkpoints, TensorBoard events and the tokenizer land in
  # the bucket, no local folder named `gs:` appears, the workdir lock is released at the end.
  run = f'gs://{gcs.bucket}/run'
  p = _train(run, 2, gcs.env, str(tmp_path))
  assert p.returncode == 0, p.stderr[-3000:]
  objects = gcs.list('run/')
  assert any(o.startswith('run/checkpoints/2/state/') for o in objects), objects[:20]
  assert 'run/checkpoints/2/data/process_0-of-1.json' in objects and 'run/tokenizer/spiece.model' in objects
  assert any('events.out.tfevents' in o for o in objects)
  assert not os.path.exists(tmp_path / 'gs:') and 'run/train.lock' not in objects
  # The rerun resumes from the bucket (step 2: parameters, optimizer, data position) to the very parameters of
  # an uninterrupted 4-step run.
  p = _train(run, 4, gcs.env, str(tmp_path))
  assert p.returncode == 0, p.stderr[-3000:]
  log = p.stdout + p.stderr
  assert 'train step 3/4' in log and 'train step 1/4' not in log, log[-2000:]
  ref = f'gs://{gcs.bucket}/ref'
  p = _train(ref, 4, gcs.env, str(tmp_path))
  assert p.returncode == 0, p.stderr[-3000:]
  resumed, straight = _bucket_params(run), _bucket_params(ref)
  assert resumed[0] == 4
  _assert_same_state(resumed, straight)
  assert not os.path.exists(tmp_path / 'gs:')


def test_the_lock_stays_fresh_between_steps_on_its_own_heartbeat(tmp_path):
  # A run that loads and compiles for longer than stale_after (no step, no log) keeps its lock: a thread
  # refreshes it every stale_after / 6 s; released, the thread stops and the lock is gone.
  lock = storage.WorkdirLock(str(tmp_path), stale_after=1.2).acquire()
  first = json.loads((tmp_path / 'train.lock').read_text())['heartbeat']
  time.sleep(2.5)
  assert json.loads((tmp_path / 'train.lock').read_text())['heartbeat'] > first + 1.5
  with pytest.raises(storage.StorageError, match='in use by a trainer'):
    storage.WorkdirLock(str(tmp_path), stale_after=1.2).acquire()
  lock.release()
  assert not (tmp_path / 'train.lock').exists() and lock._beat is None
  time.sleep(0.5)
  assert not (tmp_path / 'train.lock').exists()  # no beat after the release writes it back


def test_a_refused_lock_stops_every_process_of_a_multi_host_run_with_one_line(tmp_path):
  # Process 0 takes the lock; the others learn its verdict before any other collective: both exit 2, one line
  # each, no traceback and no hang in a collective the refused process 0 never enters.
  from tests.train.test_loop import _free_port
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'train.lock').write_text(json.dumps({'host': 'elsewhere', 'pid': 1, 'nonce': 'n',
                                               'heartbeat': time.time() + 600, 'started': time.time()}))
  port = _free_port()
  cmd = [sys.executable, '-m', 'kaleido_jax.main', '--config', os.path.join(REPO, 'configs', 'demo.py'), '--mode',
         'train', '--workdir', str(busy), '--config.train.num_steps=2', '--config.mesh.data=2']
  procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
                            env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
                                     XLA_FLAGS='--xla_force_host_platform_device_count=1',
                                     JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
                                     JAX_PROCESS_ID=str(i))) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=180)
    assert p.returncode == 2 and 'Traceback' not in err, err[-2000:]
    lines = [l for l in err.splitlines() if l.startswith('error:')]
    assert len(lines) == 1 and 'is in use by a trainer on elsewhere' in lines[0], err[-2000:]
  assert json.loads((busy / 'train.lock').read_text())['host'] == 'elsewhere'  # the holder's lock untouched


def test_bad_bucket_and_locked_workdir_are_one_line_exit_2(gcs, tmp_path):
  p = _train('gs://no-such-bucket-y/run', 2, gcs.env, str(tmp_path))
  assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  assert p.stderr.strip().splitlines()[-1].startswith("error: workdir 'gs://no-such-bucket-y/run': bucket")
  lock = storage.WorkdirLock(str(tmp_path / 'busy')).acquire() if os.makedirs(tmp_path / 'busy') is None else None
  try:
    p = _train(str(tmp_path / 'busy'), 2, {}, str(tmp_path))
    assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
    assert 'is in use by a trainer' in p.stderr.strip().splitlines()[-1]
  finally:
    lock.release()


def _bucket_steps(gcs, name):
  # Listed through the JSON API on each call: gcsfs caches directory listings within a process.
  # A step counts once orbax has committed it: on GCS (no atomic rename) that is commit_success.txt.
  done = {o.split('/')[2] for o in gcs.list(f'{name}/checkpoints/') if o.endswith('/commit_success.txt')}
  return sorted(int(n) for n in done if n.isdigit())


@pytest.mark.slow
def test_two_processes_share_a_bucket_workdir_through_kill_and_preemption(gcs, tmp_path):
  # Two hosts of a pod (jax.distributed on localhost, gloo) with one gs:// workdir: the only storage hosts share.
  from tests.train.test_loop import _free_port, _worker  # pylint: disable=g-import-not-at-top
  from tests.train.test_multihost import CONTEXT, _finish, _outs  # pylint: disable=g-import-not-at-top
  train = dict(num_steps=24, checkpoint_every=2, log_every=1)

  def _launch(workdir, out, sleep=0.0):
    port = _free_port()
    return [_worker(dict(workdir=workdir, train=train, mesh=CONTEXT, out=out, sleep=sleep),
                    {'XLA_FLAGS': '--xla_force_host_platform_device_count=2', 'JAX_COORDINATOR_ADDRESS':
                     f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(i)}) for i in range(2)]

  ref, run = f'gs://{gcs.bucket}/two-ref', f'gs://{gcs.bucket}/two'
  _finish(_launch(ref, str(tmp_path / 'ref.json')))
  # Each host feeds the batch rows its devices hold: (index, count, rows) of the global batch of 8.
  assert [tuple(o['shard']) for o in _outs(str(tmp_path / 'ref.json'), 2)] == [(0, 2, [0, 1, 2, 3]),
                                                                                 (1, 2, [4, 5, 6, 7])]
  # SIGKILL both processes at a random moment after the first checkpoint: no handler runs, no final save.
  out = str(tmp_path / 'run.json')
  procs = _launch(run, out, sleep=0.3)
  t = time.time()
  while not _bucket_steps(gcs, 'two') and time.time() - t < 240:
    assert all(q.poll() is None for q in procs), [q.stdout.read()[-3000:] for q in procs]
    time.sleep(0.1)
  time.sleep(np.random.default_rng().uniform(0.0, 1.0))
  for q in procs:
    q.kill()
  for q in procs:
    q.wait()
  killed_at = max(_bucket_steps(gcs, 'two'))
  assert 2 <= killed_at <= 6
  # Restart (the dead run's lock is taken over), then a SIGTERM to one host: both save the same step and exit 0.
  procs = _launch(run, out, sleep=0.3)
  t = time.time()
  while max(_bucket_steps(gcs, 'two')) <= killed_at and time.time() - t < 240:
    assert all(q.poll() is None for q in procs), [q.communicate()[0][-3000:] for q in procs]
    time.sleep(0.1)
  procs[-1].send_signal(signal.SIGTERM)
  logs = [q.communicate(timeout=300)[0] for q in procs]
  assert [q.returncode for q in procs] == [0, 0], [log[-3000:] for log in logs]
  assert 'took over the lock of a dead run' in logs[0], logs[0][-3000:]
  outs = _outs(out, 2)
  assert all(o['preempted'] for o in outs) and outs[0]['step'] == outs[1]['step'], outs
  stopped = outs[0]['step']
  assert killed_at < stopped == max(_bucket_steps(gcs, 'two'))
  assert [o for o in gcs.list(f'two/checkpoints/{stopped}/data/') if o.endswith('.json')] == [
      f'two/checkpoints/{stopped}/data/process_{i}-of-2.json' for i in range(2)]
  # Resume to the end: bitwise the uninterrupted run; nothing was written to a local `gs:` folder.
  _finish(_launch(run, out))
  _assert_same_state(_bucket_params(run), _bucket_params(ref))
  assert _bucket_params(run)[0] == train['num_steps'] and 'two/train.lock' not in gcs.list('two/')
  assert not os.path.exists(os.path.join(REPO, 'gs:'))


@pytest.mark.slow
def test_prepare_from_bucket_to_bucket_on_both_engines_and_train_from_the_bucket(gcs, tmp_path):
  # Raw videos in a bucket -> shards in a bucket, on the local engine and on Beam (two DirectRunner worker
  # processes, no shared disk used): the same examples as a local run from local files.
  from kaleido_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from kaleido_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from tests.data import test_beam, test_raw_video  # pylint: disable=g-import-not-at-top
  inp = str(tmp_path / 'in')
  synthetic.export_raw_videos(inp, num_videos=3, shots_per_video=2, num_identities=5, heldout_identities=1,
                              num_frames=17, height=test_raw_video.H, width=test_raw_video.W)
  (tmp_path / 'in' / 'broken.mp4').write_bytes(b'\x00' * 100)
  raw = f'gs://{gcs.bucket}/raw'
  for rel in storage.walk_files(inp):
    storage.upload(os.path.join(inp, rel), storage.join(raw, rel))
  local_cfg = test_raw_video._cfg(inp)  # pylint: disable=protected-access
  cfg = test_raw_video._cfg(raw)  # pylint: disable=protected-access
  assert cfg.prepare.captions == f'{raw}/captions.jsonl'
  local = str(tmp_path / 'local')
  a = prepare.prepare(local_cfg, output_dir=local, input_dir=inp, verbose=False)
  outs = {'gs-local': f'gs://{gcs.bucket}/out-local', 'gs-beam': f'gs://{gcs.bucket}/out-beam'}
  b = prepare.prepare(cfg, output_dir=outs['gs-local'], input_dir=raw, verbose=False)
  c = prepare.prepare(test_beam._beam(cfg), output_dir=outs['gs-beam'], input_dir=raw, verbose=False)  # pylint: disable=protected-access
  assert c['engine'] == 'beam' and b['videos'] == c['videos'] == 4 and b['dropped_clips']['broken'] == 'unreadable'
  grounded = open(a['grounded']).read().replace(local, 'OUT')
  same_input = lambda r, d: dict(r, errors={k: v.replace(d, 'IN') for k, v in r['errors'].items()})
  for name, r in (('gs-local', b), ('gs-beam', c)):
    test_beam._assert_same(local, same_input(a, inp), outs[name], same_input(r, raw))  # pylint: disable=protected-access
    objects = gcs.list(outs[name].split('/', 3)[3] + '/')
    assert any('.array_record-' in o for o in objects) and not any('incomplete' in o for o in objects), objects
    assert storage.read_text(r['grounded']).replace(outs[name], 'OUT') == grounded
  assert not os.path.exists(os.path.join(REPO, 'gs:')) and not os.path.exists('gs:')
  # The trainer reads the bucket's shards (copied to this host: array_record reads local files only).
  run, copies = f'gs://{gcs.bucket}/train-from-bucket', str(tmp_path / 'copies')
  tokenizer = f'gs://{gcs.bucket}/umt5/spiece.model'  # the sentencepiece model from a bucket too
  storage.upload(synthetic.train_caption_tokenizer(str(tmp_path / 'spiece.model')), tokenizer)
  H, F = test_raw_video.H, test_raw_video.F
  p = subprocess.run(
      [sys.executable, '-m', 'kaleido_jax.main', '--config', os.path.join(REPO, 'configs', 'demo.py'), '--mode',
       'train', '--workdir', run, '--config.train.num_steps=2', '--config.train.log_every=1',
       '--config.data.source=tfds', f'--config.data.data_dir={outs["gs-beam"]}', f'--config.data.local_data_dir={copies}',
       f'--config.data.num_frames={F}', f'--config.data.height={H}', f'--config.data.width={H}',
       '--config.data.batch_size=2', '--config.mesh.data=1', '--config.model.num_layers=1',
       '--config.diffusion.subject_loss_weight=0', f'--config.text_encoder.tokenizer_path={tokenizer}'],
      capture_output=True, text=True, cwd=str(tmp_path), timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO, XLA_FLAGS='--xla_force_host_platform_device_count=1'))
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'train step 2/2' in p.stdout + p.stderr
  assert os.listdir(os.path.join(copies, gcs.bucket, 'out-beam', 'kaleido_s2v', '1.0.0'))
  assert _bucket_params(run)[0] == 2


@pytest.mark.slow
def test_a_bucket_without_credentials_or_network_is_one_line_exit_2(tmp_path):
  # Outside the emulator (none of its variables): the production clients, no credentials and no route to Cloud
  # Storage on this machine. One line naming the workdir and where credentials come from; nothing written.
  env = {k: v for k, v in os.environ.items() if k not in gcs_lib.Emulator('', '').env}
  p = subprocess.run([sys.executable, '-m', 'kaleido_jax.main', '--config', os.path.join(REPO, 'configs', 'demo.py'),
                      '--mode', 'train', '--workdir', 'gs://kaleido-no-credentials/run', '--config.train.num_steps=1'],
                     capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                     env=dict(env, JAX_PLATFORMS='cpu', PYTHONPATH=REPO))
  assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: workdir 'gs://kaleido-no-credentials/run'") and 'gcloud auth' in last, last
  assert os.listdir(tmp_path) == []
