"""`--mode sample --prompts FILE`: one video per request, bad requests recorded, resumable, the same video
whichever chip or host makes it (8 CPU devices and 2 processes against one device), a SIGKILL loses nothing."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from kaleido_jax import batch
from kaleido_jax.cli import main as cli_main
from tests.sampling_common import tiny_config, write_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prompt_file(tmp_path, n_good=3):
  a = write_reference(str(tmp_path / 'a.png'))
  b = write_reference(str(tmp_path / 'b.png'), colour=(30, 30, 200))
  lines = [f'A red square moves right {i}.@@a.png' if i % 2 else f'Two squares meet {i}.@@a.png@@b.png'
           for i in range(n_good)]
  lines += ['# a comment', '', '@@a.png', 'A missing image.@@nope.png', 'Too many.@@a.png@@b.png@@a.png']
  path = tmp_path / 'set.txt'
  path.write_text('\n'.join(lines) + '\n')
  del a, b
  return str(path)


def test_requests_read_both_formats_and_name_their_problems(tmp_path):
  reqs = batch.read_requests(_prompt_file(tmp_path), base_seed=10, max_refs=2)
  assert [r.name for r in reqs] == ['00000', '00001', '00002', '00003', '00004', '00005']
  assert [r.seed for r in reqs] == [10, 11, 12, 13, 14, 15] and len(reqs[0].refs) == 2
  assert [r.error.split(' ')[0] for r in reqs[3:]] == ['empty', 'reference', '3']
  assert not any(r.error for r in reqs[:3])
  manifest = tmp_path / 'set.json'
  manifest.write_text(json.dumps([{'prompt': 'x', 'refs': ['a.png'], 'seed': 7, 'name': 'cat/1'},
                                  {'prompt': 'y', 'refs': ['a.png'], 'name': 'cat/1'}]))
  reqs = batch.read_requests(str(manifest), max_refs=3)
  assert (reqs[0].name, reqs[0].seed) == ('cat_1', 7) and 'used by an earlier request' in reqs[1].error
  with pytest.raises(batch.PromptSetError, match='no such file'):
    batch.read_requests(str(tmp_path / 'none.txt'))


def test_batch_mode_makes_each_request_once_records_errors_and_resumes(tmp_path, capsys):
  config = tiny_config(checkpoint='random', prompts=_prompt_file(tmp_path), output=str(tmp_path / 'out'))
  config.mesh.update(data=-1, fsdp=8)  # this test's 8 devices: one group (the equality over groups is the slow test)
  out = cli_main.run_mode('sample', config, str(tmp_path / 'w'))
  m = json.load(open(tmp_path / 'out' / 'manifest.json'))
  assert (m['done'], m['error'], m['pending']) == (3, 3, 0) == (out['stats']['made'], out['stats']['errors'], 0)
  assert [e['status'] for e in m['requests']] == ['done'] * 3 + ['error'] * 3
  assert m['requests'][4]['error'].startswith('reference image') and m['requests'][3]['error'] == 'empty prompt'
  assert sorted(f for f in os.listdir(tmp_path / 'out') if f.endswith('.mp4')) == ['00000.mp4', '00001.mp4',
                                                                                  '00002.mp4']
  before = {f: os.path.getmtime(tmp_path / 'out' / f) for f in ('00000.mp4', '00001.mp4', '00002.mp4')}
  again = cli_main.run_mode('sample', config, str(tmp_path / 'w'))
  assert again['stats']['made'] == 0 and again['stats']['skipped'] == 3
  assert before == {f: os.path.getmtime(tmp_path / 'out' / f) for f in before}
  assert 'videos made' in capsys.readouterr().out


def _run(args, env_extra, **kw):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO, **env_extra)
  cmd = [sys.executable, '-m', 'kaleido_jax.main', '--config', os.path.join(REPO, 'tests', 'sampling_config.py'),
         '--mode', 'sample', '--checkpoint', 'random'] + args
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                          **kw)


def _videos(out_dir):
  """name -> (sha256 of the file, decoded frames) of every video."""
  from kaleido_jax.data.prepare import clips
  return {f: (hashlib.sha256(open(os.path.join(out_dir, f), 'rb').read()).hexdigest(),
              clips.read_video(os.path.join(out_dir, f)))
          for f in sorted(os.listdir(out_dir)) if f.endswith('.mp4') and not f.startswith('.')}


@pytest.mark.slow
def test_sixteen_prompts_over_eight_devices_and_two_hosts_equal_one_device_and_survive_sigkill(tmp_path):
  prompts = _prompt_file(tmp_path, n_good=16)
  one_dev = {'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  # One device, killed halfway (SIGKILL: no handler), then rerun to the end.
  one = str(tmp_path / 'one')
  p = _run(['--prompts', prompts, '--out', one, '--workdir', str(tmp_path / 'w1')], one_dev,
           start_new_session=True)
  t = time.time()
  while len([f for f in os.listdir(os.path.join(one, 'records'))] if os.path.isdir(os.path.join(one, 'records'))
            else []) < 8 and time.time() - t < 400:
    assert p.poll() is None, p.stdout.read()[-3000:]
    time.sleep(0.2)
  os.killpg(p.pid, signal.SIGKILL)
  p.wait()
  first = {f: os.path.getmtime(os.path.join(one, f)) for f in os.listdir(one)
           if f.endswith('.mp4') and not f.startswith('.')}
  assert 8 <= len(first) < 16
  p = _run(['--prompts', prompts, '--out', one, '--workdir', str(tmp_path / 'w1')], one_dev)
  assert p.wait(timeout=600) == 0, p.stdout.read()[-3000:]
  assert all(os.path.getmtime(os.path.join(one, f)) == m for f, m in first.items())  # nothing redone
  assert not [f for f in os.listdir(one) if 'partial' in f]  # the killed run's temporaries are gone
  # Eight devices: eight groups of one chip, one process.
  eight = str(tmp_path / 'eight')
  p = _run(['--prompts', prompts, '--out', eight, '--workdir', str(tmp_path / 'w8')],
           {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert p.wait(timeout=600) == 0, p.stdout.read()[-3000:]
  # Two processes (jax.distributed, gloo) of two devices each: four groups over two hosts.
  two = str(tmp_path / 'two')
  from tests.train.test_loop import _free_port
  port = _free_port()
  procs = [_run(['--prompts', prompts, '--out', two, '--workdir', str(tmp_path / f'w2{i}')],
                {'XLA_FLAGS': '--xla_force_host_platform_device_count=2', 'JAX_COORDINATOR_ADDRESS':
                 f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(i)}) for i in range(2)]
  logs = [q.communicate(timeout=600)[0] for q in procs]
  assert all(q.returncode == 0 for q in procs), [log[-2000:] for log in logs]
  a, b, c = _videos(one), _videos(eight), _videos(two)
  assert len(a) == 16 and a.keys() == b.keys() == c.keys()
  for name in a:
    np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)
    np.testing.assert_array_equal(a[name][1], c[name][1], err_msg=name)
    assert a[name][0] == b[name][0] == c[name][0], name  # the same bytes
  for d in (one, eight, two):
    m = json.load(open(os.path.join(d, 'manifest.json')))
    assert (m['done'], m['error']) == (16, 3)
    made_by = [json.load(open(os.path.join(d, 'records', f))) for f in os.listdir(os.path.join(d, 'records'))]
    assert len(made_by) == 19 and len({r['name'] for r in made_by}) == 19  # no video twice


def test_exported_sampler_runs_the_same_batch_and_eval_scores_the_directory(tmp_path, capsys):
  from kaleido_jax import exported
  from kaleido_jax import pipeline
  from kaleido_jax.data.prepare import clips
  prompts = _prompt_file(tmp_path)
  config = tiny_config(checkpoint='random', prompts=prompts, output=str(tmp_path / 'direct'))
  config.mesh.update(data=-1, fsdp=8)
  cli_main.run_mode('sample', config, str(tmp_path / 'w'))
  pipe = pipeline.S2VPipeline.from_config(config, workdir=str(tmp_path / 'w'), checkpoint='random')
  from kaleido_jax import export
  art = export.export_sampler(pipe, str(tmp_path / 'art'), platforms=('cpu',))
  out = exported.run_prompt_set(exported.ExportedSampler(art), prompts, str(tmp_path / 'exp'),
                                seed=int(config.sample.seed))
  assert (out['manifest']['done'], out['manifest']['error']) == (3, 3)
  for name in ('00000.mp4', '00001.mp4', '00002.mp4'):  # the same videos up to uint8 rounding and mp4 coding
    a = clips.read_video(str(tmp_path / 'direct' / name)).astype(np.float32)
    b = clips.read_video(str(tmp_path / 'exp' / name)).astype(np.float32)
    assert a.shape == b.shape and np.abs(a - b).mean() < 1.0, np.abs(a - b).mean()
  config.eval.samples_dir = str(tmp_path / 'direct')
  res = cli_main.run_mode('eval', config, str(tmp_path / 'w'))
  assert res['num_videos'] == 3 and [r['name'] for r in res['per_video']] == ['00000', '00001', '00002']
  assert 0.0 <= res['means'][next(iter(res['means']))]['subject_presence'] <= 1.0
  assert (tmp_path / 'direct' / 'eval' / 'eval.json').exists()


def opens2v_benchmark(root, prompts=None):
  """A folder laid out as OpenS2V-Eval ships it: `Images/...` and an Open-Domain style JSON keyed by id."""
  os.makedirs(os.path.join(root, 'Images', 'singleobject', 'cup'))
  os.makedirs(os.path.join(root, 'Images', 'multiobject'))
  write_reference(os.path.join(root, 'Images', 'singleobject', 'cup', '52.png'))
  write_reference(os.path.join(root, 'Images', 'multiobject', '1.png'), colour=(30, 30, 200))
  bench = {
      'singleobj_1': {'img_paths': ['Images/singleobject/cup/52.png'], 'prompt': 'A red square moves right.',
                      'synthesis_flag': 'wrong', 'class_label': ['Cup']},
      'multiobject_1': {'img_paths': ['Images/singleobject/cup/52.png', 'Images/multiobject/1.png'],
                        'prompt': 'Two squares meet.', 'synthesis_flag': 'wrong', 'class_label': ['Cup', 'Box']},
      'singlehuman_1': {'img_paths': ['../outside.png'], 'prompt': 'A man walks.', 'class_label': ['Man']},
      'multihuman_1': {'img_paths': ['Images/multiobject/1.png'] * 5, 'prompt': 'Five people.',
                       'class_label': ['Man'] * 5},
  }
  if prompts:
    bench = {k: dict(v, prompt=prompts.get(k, v['prompt'])) for k, v in bench.items()}
  path = os.path.join(root, 'Open-Domain_Eval.json')
  with open(path, 'w') as f:
    json.dump(bench, f)
  return path


def test_opens2v_eval_json_as_the_benchmark_ships_it_makes_id_mp4s(tmp_path):
  # The benchmark's own file: ids -> img_paths relative to the benchmark folder (given as sample.prompts_root, here
  # the JSON sits elsewhere), up to 5 references; each id's video is <id>.mp4; a path leading outside the root and
  # more references than the model takes are those ids' errors, the rest are made.
  root = str(tmp_path / 'OpenS2V-Eval')
  path = opens2v_benchmark(root)
  moved = tmp_path / 'elsewhere' / 'Open-Domain_Eval.json'
  moved.parent.mkdir()
  os.replace(path, moved)
  (tmp_path / 'outside.png').write_bytes(open(os.path.join(root, 'Images', 'multiobject', '1.png'), 'rb').read())
  reqs = batch.read_requests(str(moved), max_refs=2, root=root)
  assert [r.name for r in reqs] == ['singleobj_1', 'multiobject_1', 'singlehuman_1', 'multihuman_1']
  assert reqs[1].refs[1] == os.path.join(root, 'Images', 'multiobject', '1.png') and reqs[1].labels == ['Cup', 'Box']
  assert 'outside the benchmark root' in reqs[2].error and reqs[3].error.startswith('5 references, at most 2')
  config = tiny_config(checkpoint='random', prompts=str(moved), output=str(tmp_path / 'out'))
  config.sample.prompts_root = root
  config.mesh.update(data=-1, fsdp=8)
  out = cli_main.run_mode('sample', config, str(tmp_path / 'w'))
  assert (out['stats']['made'], out['stats']['errors']) == (2, 2)
  assert sorted(f for f in os.listdir(tmp_path / 'out') if f.endswith('.mp4')) == ['multiobject_1.mp4',
                                                                                  'singleobj_1.mp4']
  record = json.load(open(tmp_path / 'out' / 'records' / 'multiobject_1.json'))
  assert record['class_label'] == ['Cup', 'Box'] and record['status'] == 'done'
  with pytest.raises(batch.PromptSetError, match='no such directory'):
    batch.read_requests(str(moved), root=str(tmp_path / 'missing'))
