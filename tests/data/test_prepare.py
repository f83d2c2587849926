"""The construction pipeline: every filter drops its crafted bad clip, the report adds up, pairing is
cross-clip, the output is a readable TFDS ArrayRecord dataset, and a rerun resumes."""

import json
import os
import shutil

import numpy as np
import pytest

from kaleido_jax import config as config_lib
from kaleido_jax.data import filters
from kaleido_jax.data import prepare
from kaleido_jax.data import synthetic
from kaleido_jax.data import tfds_builder

F, H, W = 9, 48, 48


def _cfg():
  c = config_lib.base_config().data
  c.num_frames, c.height, c.width = F, H, W
  c.num_identities, c.heldout_identities, c.max_subjects = 6, 1, 2
  p = c.prepare
  p.min_frames, p.min_height, p.min_width = F, 40, 40
  p.synth_per_clip, p.shard_size = 1, 4
  return c


def _good_set(n=6):
  return synthetic.SyntheticSet(num_clips=n, num_identities=6, heldout_identities=1, split='train',
                                num_frames=F, height=H, width=W, seed=0, max_subjects=2)


def _blur(video):
  from PIL import Image
  return np.stack([np.asarray(Image.fromarray(f).resize((6, 6), Image.BILINEAR).resize((W, H), Image.BILINEAR))
                   for f in video])


def _bad_clips(base):
  """name -> (video, masks, expected reason) crafted from one good clip."""
  v, m = base['video'], base['masks']
  rng = np.random.default_rng(0)
  small = np.zeros_like(m)
  small[:, :, 20:22, 20:22] = True
  large = np.ones_like(m)
  trunc = np.zeros_like(m)
  trunc[:, :, 10:30, 0:12] = True
  return {
      'lowres': (v[:, ::2, ::2], m[:, :, ::2, ::2], 'low_resolution'),
      'short': (v[:4], m[:4], 'too_short'),
      'blurry': (_blur(v), m, 'blurry'),
      'static': (np.repeat(v[:1], F, 0), m, 'static'),
      'shaky': (rng.integers(0, 256, v.shape, dtype=np.uint8), m, 'shaky'),
      'tiny': (v, small, 'subject_too_small'),
      'huge': (v, large, 'subject_too_large'),
      'truncated': (v, trunc, 'subject_truncated'),
  }


@pytest.mark.parametrize('name', ['lowres', 'short', 'blurry', 'static', 'shaky', 'tiny', 'huge', 'truncated'])
def test_each_filter_drops_its_bad_clip(name):
  base = _good_set(1).clip(0)
  assert filters.check_clip(base['video'], base['masks'], _cfg().prepare) is None
  v, m, reason = _bad_clips(base)[name]
  assert filters.check_clip(v, m, _cfg().prepare) == reason


def test_near_duplicate_hash():
  s = _good_set(2)
  a, b = s.clip(0)['video'], s.clip(1)['video']
  d = filters.Deduplicator(4)
  d.add(filters.video_hash(a))
  assert d.is_duplicate(filters.video_hash(np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)))
  assert not d.is_duplicate(filters.video_hash(b))


def write_inputs(inp: str) -> dict[str, str]:
  """Good clips, each filter's bad clip, a duplicate, a corrupt file, a box-annotated clip and a broken json
  line under `inp`; returns {clip: the reason it must be dropped}."""
  s = _good_set(6)
  lines, expected = [], {}
  for i in range(len(s)):
    c = s.clip(i)
    lines.append(synthetic.write_example(inp, f'good{i}', c['video'], c['masks'], c['subject_ids'], c['caption']))
  base = s.clip(0)
  for name, (v, m, reason) in _bad_clips(base).items():
    lines.append(synthetic.write_example(inp, name, v, m, base['subject_ids'], base['caption']))
    expected[name] = reason
  lines.append(synthetic.write_example(inp, 'dupe', base['video'], base['masks'], base['subject_ids'],
                                       base['caption']))
  with open(os.path.join(inp, 'corrupt.mp4'), 'wb') as f:
    f.write(b'not a video at all')
  lines.append(dict(video='corrupt.mp4', caption='x', subjects=[dict(id=0, index=0)], masks='none.npz'))
  expected['corrupt'] = 'unreadable'
  boxes = np.zeros((F, 1, 4))
  boxes[:] = [8, 8, 30, 30]
  other = _good_set(8).clip(7)
  lines.append(synthetic.write_example(inp, 'boxed', other['video'], None, other['subject_ids'][:1],
                                       other['caption'], boxes=boxes))
  with open(os.path.join(inp, 'annotations.jsonl'), 'w') as f:
    for l in lines:
      f.write(json.dumps(l) + '\n')
    f.write('{broken json\n')
  return expected


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('prep')
  inp, out = str(root / 'in'), str(root / 'out')
  expected = write_inputs(inp)
  cfg = _cfg()
  report = prepare.prepare(cfg, output_dir=out, input_dir=inp, seed=0, verbose=False)
  return cfg, inp, out, report, expected


def test_report_counts_add_up_and_reasons_match(prepared):
  cfg, _, _, r, expected = prepared
  assert r['input'] == 6 + len(expected) + 3  # good + bad + dupe + boxed + broken json line
  assert r['input'] == r['kept'] + sum(r['dropped'].values())
  for name, reason in expected.items():
    assert r['dropped_clips'].get(name) == reason, (name, r['dropped_clips'].get(name))
  assert r['dropped_clips'][f"line_{r['input'] - 1}"] == 'unreadable'
  # Of two identical clips exactly one (the later name) is dropped as a near-duplicate.
  assert r['dropped_clips'].get('good0') == 'near_duplicate' and 'dupe' not in r['dropped_clips']
  assert 'boxed' not in r['dropped_clips'] and r['dropped']['near_duplicate'] == 1
  assert r['examples'] == r['kept'] * (1 + cfg.prepare.synth_per_clip)
  assert r['synthesised'] == r['examples'] - r['kept']


def test_output_is_cross_paired_tfds(prepared):
  cfg, _, out, r, _ = prepared
  src = tfds_builder.open_source(out, 'train')
  assert len(src) == r['examples']
  n_refs = {'cross': 0, 'far_frame': 0}
  for i in range(len(src)):
    ex = src[i]
    assert ex['video'].shape == (F, H, W, 3) and ex['video'].dtype == np.uint8
    assert ex['refs'].shape[1:] == (H, W, 3) and len(ex['refs']) == len(ex['ref_slots'])
    assert set(ex['ref_slots'].tolist()) == set(range(len(ex['subject_ids'])))
    key = ex['clip_id'].decode() if isinstance(ex['clip_id'], bytes) else str(ex['clip_id'])
    target = key.split('~')[0]
    ops = json.loads(ex['synthesis'])
    pairs = json.loads(ex['pairing'])
    assert [p['slot'] for p in pairs] == ex['ref_slots'].tolist()
    for slot in set(ex['ref_slots'].tolist()):  # candidates of one subject come from distinct clips
      clips = [p['clip'] for p in pairs if p['slot'] == slot]
      assert len(clips) == len(set(clips)) <= cfg.prepare.refs_per_subject
    for p in pairs:
      n_refs[p['mode']] += 1
      assert p['subject_id'] == int(ex['subject_ids'][p['slot']])
      if p['mode'] == 'cross':
        assert p['clip'] != target
        assert p['clip'] not in r['dropped_clips']
    if '~' in key:
      assert 'background' in ops and 'colour' in ops
  assert n_refs == r['references'] and n_refs['cross'] > 0


def test_rerun_resumes(prepared):
  cfg, inp, out, r, _ = prepared
  again = prepare.prepare(cfg, output_dir=out, input_dir=inp, seed=0, verbose=False)
  assert again['resumed'] == 'complete' and again['examples'] == r['examples']
  # An interrupted run (shards and report gone, per-clip cache kept) resumes from the cache.
  out2 = out + '_interrupted'
  keys = os.listdir(os.path.join(out, '_work'))
  assert len(keys) == 1  # the caches of these settings
  work = os.path.join('_work', keys[0])
  shutil.copytree(os.path.join(out, work), os.path.join(out2, work))
  os.remove(os.path.join(out2, work, 'good3.npz'))
  r2 = prepare.prepare(cfg, output_dir=out2, input_dir=inp, seed=0, verbose=False)
  assert r2['resumed_clips'] == r['input'] - 2  # all but the deleted clip and the broken json line
  assert r2['dropped_clips'] == r['dropped_clips'] and r2['examples'] == r['examples']
  assert not [f for f in os.listdir(os.path.join(out2, work)) if '.tmp' in f]
  # Other settings (a stricter blur filter) do not reuse these caches: every clip is made again.
  stricter = cfg.copy_and_resolve_references()
  stricter.prepare.min_blur_var += 1.0
  out3 = out + '_stricter'
  shutil.copytree(os.path.join(out, '_work'), os.path.join(out3, '_work'))
  assert prepare.prepare(stricter, output_dir=out3, input_dir=inp, seed=0, verbose=False)['resumed_clips'] == 0


def test_precomputed_latents_through_encoders(tmp_path, prepared):
  cfg, inp, _, r, _ = prepared
  enc = lambda v: v.reshape(v.shape[0], H // 8, 8, W // 8, 8, 3).mean((2, 4))
  txt = lambda s: np.full((4, 8), len(s), np.float32)
  r2 = prepare.prepare(cfg, output_dir=str(tmp_path), input_dir=inp, seed=0, verbose=False,
                       video_encoder=enc, text_encoder=txt)
  ex = tfds_builder.open_source(str(tmp_path), 'train')[0]
  assert ex['video_latents'].shape == (F, H // 8, W // 8, 3)
  assert ex['ref_latents'].shape[1:] == (1, H // 8, W // 8, 3)[1:]
  np.testing.assert_allclose(ex['video_latents'], enc(ex['video'].astype(np.float32) / 127.5 - 1), atol=1e-6)
  assert ex['text_embedding'].shape == (4, 8)
  assert r2['examples'] == r['examples']


def test_command_line_entry(tmp_path):
  import subprocess
  import sys
  cfg = tmp_path / 'tiny.py'
  cfg.write_text(
      'from kaleido_jax import config\n'
      'def get_config():\n'
      '  c = config.base_config()\n'
      f'  c.data.num_frames, c.data.height, c.data.width = {F}, {H}, {W}\n'
      '  c.data.num_clips, c.data.num_identities, c.data.heldout_identities, c.data.max_subjects = 6, 6, 1, 2\n'
      f'  c.data.prepare.min_frames, c.data.prepare.min_height, c.data.prepare.min_width = {F}, 40, 40\n'
      '  return c\n')
  out = tmp_path / 'out'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.getcwd())
  p = subprocess.run([sys.executable, '-m', 'kaleido_jax.main', '--mode', 'prepare', f'--config={cfg}',
                      f'--config.data.prepare.output_dir={out}'], capture_output=True, text=True, timeout=300,
                     env=env)
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'examples written' in p.stdout
  report = json.load(open(out / 'report.json'))
  assert report['input'] == 6 == report['kept'] + sum(report['dropped'].values())
  assert len(tfds_builder.open_source(str(out), 'train')) == report['examples']
