"""`prepare` on Apache Beam (data.prepare.engine='beam'): on the DirectRunner with two worker processes it
writes the examples the local engine writes (same keys, same bytes) and the same report counts, on annotated
clips and on raw videos; a run that fails part-way resumes from the per-clip caches; bad settings are one line."""

import json
import os

import numpy as np
import pytest

from kaleido_jax.data import prepare
from kaleido_jax.data.prepare import clips
from kaleido_jax.data import synthetic
from kaleido_jax.data import tfds_builder
from tests.data import test_prepare
from tests.data import test_raw_video

pytest.importorskip('apache_beam')

TWO_WORKERS = '--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing'
# What may differ between engines: timings, where the files are, how TFDS cut the shards, which engine ran.
RUN_ONLY = ('seconds', 'clips_per_s', 'stage_seconds', 'dataset_dir', 'grounded', 'num_shards', 'engine',
            'resumed_clips')


def _beam(cfg, beam_args=TWO_WORKERS):
  cfg = cfg.copy_and_resolve_references()
  cfg.prepare.engine, cfg.prepare.beam_args = 'beam', beam_args
  return cfg


def _by_key(out):
  src = tfds_builder.open_source(out, 'train')
  exs = [src[i] for i in range(len(src))]
  return {str(ex['clip_id']): ex for ex in exs}


def _assert_same(out_a, report_a, out_b, report_b):
  assert {k: v for k, v in report_a.items() if k not in RUN_ONLY} == \
      {k: v for k, v in report_b.items() if k not in RUN_ONLY}
  a, b = _by_key(out_a), _by_key(out_b)
  assert sorted(a) == sorted(b) and len(a) == report_a['examples']
  for key, ex in a.items():
    assert set(ex) == set(b[key])
    for field, value in ex.items():
      if isinstance(value, np.ndarray):
        assert value.dtype == b[key][field].dtype
        np.testing.assert_array_equal(value, b[key][field], err_msg=f'{key}/{field}')
      else:
        assert value == b[key][field], (key, field)


@pytest.fixture(scope='module')
def annotated(tmp_path_factory):
  root = tmp_path_factory.mktemp('beam')
  inp = str(root / 'in')
  test_prepare.write_inputs(inp)
  cfg = test_prepare._cfg()  # pylint: disable=protected-access
  local = prepare.prepare(cfg, output_dir=str(root / 'local'), input_dir=inp, seed=0, verbose=False)
  return cfg, inp, root, local


def test_two_workers_write_what_the_local_engine_writes(annotated):
  cfg, inp, root, local = annotated
  out = str(root / 'beam')
  r = prepare.prepare(_beam(cfg), output_dir=out, input_dir=inp, seed=0, verbose=False)
  assert r['engine'] == 'beam' and local['engine'] == 'local'
  assert r['input'] == r['kept'] + sum(r['dropped'].values()) and r['dropped']['near_duplicate'] == 1
  assert r['num_shards'] == len([f for f in os.listdir(r['dataset_dir']) if '.array_record-' in f]) >= 1
  _assert_same(str(root / 'local'), local, out, r)
  again = prepare.prepare(_beam(cfg), output_dir=out, input_dir=inp, seed=0, verbose=False)
  assert again['resumed'] == 'complete'


def test_encoders_run_on_the_workers(annotated, tmp_path):
  cfg, inp, root, _ = annotated
  H, W = cfg.height, cfg.width
  enc = lambda v: v.reshape(v.shape[0], H // 8, 8, W // 8, 8, 3).mean((2, 4))
  txt = lambda s: np.full((4, 8), len(s), np.float32)
  kw = dict(input_dir=inp, seed=0, verbose=False, video_encoder=enc, text_encoder=txt)
  a = prepare.prepare(cfg, output_dir=str(tmp_path / 'local'), **kw)
  b = prepare.prepare(_beam(cfg), output_dir=str(tmp_path / 'beam'), **kw)
  _assert_same(str(tmp_path / 'local'), a, str(tmp_path / 'beam'), b)
  ex = next(iter(_by_key(str(tmp_path / 'beam')).values()))
  assert ex['video_latents'].shape == (cfg.num_frames, H // 8, W // 8, 3) and ex['text_embedding'].shape == (4, 8)


@pytest.mark.slow
def test_raw_videos_on_two_workers(tmp_path):
  inp = str(tmp_path / 'in')
  synthetic.export_raw_videos(inp, num_videos=4, shots_per_video=2, num_identities=6, heldout_identities=1,
                              num_frames=17, height=test_raw_video.H, width=test_raw_video.W)
  (tmp_path / 'in' / 'broken.mp4').write_bytes(b'\x00' * 100)
  cfg = test_raw_video._cfg(inp)  # pylint: disable=protected-access
  a = prepare.prepare(cfg, output_dir=str(tmp_path / 'local'), input_dir=inp, verbose=False)
  b = prepare.prepare(_beam(cfg), output_dir=str(tmp_path / 'beam'), input_dir=inp, verbose=False)
  assert b['videos'] == 5 and b['dropped_clips']['broken'] == 'unreadable' and 'broken' in b['errors']
  _assert_same(str(tmp_path / 'local'), a, str(tmp_path / 'beam'), b)
  # The workers' stage seconds reach the report (summed over workers; the TFDS write itself is Beam's).
  assert {'decode', 'grounding', 'filters', 'cut-outs', 'synthesis', 'pairing'} <= set(b['stage_seconds']), b
  with open(a['grounded']) as f, open(b['grounded']) as g:  # the same lines, masks under each run's own dir
    assert f.read().replace(str(tmp_path / 'local'), 'OUT') == g.read().replace(str(tmp_path / 'beam'), 'OUT')


def test_a_failed_run_resumes_from_the_per_clip_caches(annotated, tmp_path, monkeypatch):
  """A worker that dies part-way fails the pipeline; the rerun reuses every clip cached before it died."""
  cfg, inp, root, local = annotated
  real, calls = clips.process_clip, []

  def die_on_fifth(*a, **k):
    calls.append(a[0]['video'])
    if len(calls) == 5:
      raise RuntimeError('worker killed')
    return real(*a, **k)

  monkeypatch.setattr(clips, 'process_clip', die_on_fifth)
  out = str(tmp_path / 'out')
  in_process = '--runner=DirectRunner'  # one process, so the patched stage is the one that runs
  with pytest.raises(Exception, match='worker killed'):
    prepare.prepare(_beam(cfg, in_process), output_dir=out, input_dir=inp, seed=0, verbose=False)
  assert not os.path.exists(os.path.join(out, 'report.json'))
  monkeypatch.setattr(clips, 'process_clip', real)
  r = prepare.prepare(_beam(cfg, in_process), output_dir=out, input_dir=inp, seed=0, verbose=False)
  assert r['resumed_clips'] == 4
  _assert_same(str(root / 'local'), local, out, r)


def test_nothing_kept_is_one_clear_error(tmp_path):
  inp = str(tmp_path / 'in')
  os.makedirs(inp)
  with open(os.path.join(inp, 'annotations.jsonl'), 'w') as f:
    f.write(json.dumps(dict(video='missing.mp4', caption='x', subjects=[])) + '\n')
  with pytest.raises(ValueError, match='no clip survived the filters'):
    prepare.prepare(_beam(test_prepare._cfg(), '--runner=DirectRunner'),  # pylint: disable=protected-access
                    output_dir=str(tmp_path / 'out'), input_dir=inp, verbose=False)


@pytest.mark.parametrize('beam_args, named', [('--runner=NoSuchRunner', 'NoSuchRunner'),
                                               ('--direct_num_workers=two', 'direct_num_workers')])
def test_bad_beam_args_are_one_line(tmp_path, beam_args, named):
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  p = subprocess.run([sys.executable, '-m', 'kaleido_jax.main', '--mode=prepare', '--config=configs/demo.py',
                      f'--workdir={tmp_path}', '--config.data.prepare.engine=beam',
                      f'--config.data.prepare.beam_args={beam_args}'],
                     capture_output=True, text=True, timeout=300, env=env)
  assert p.returncode == 2, p.stderr[-2000:]
  assert 'beam_args' in p.stderr and named in p.stderr and 'Traceback' not in p.stderr
  assert not os.listdir(tmp_path)  # nothing started
