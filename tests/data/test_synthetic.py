"""The synthetic set: determinism, split disjointness, cross-pairing provenance, consistent identities."""

import json
import os

import numpy as np
import pytest

from kaleido_jax.data import synthetic

KW = dict(num_clips=24, num_identities=12, heldout_identities=3, num_frames=5, height=32, width=32,
          max_subjects=4)


def _source(split='train', seed=0, **kw):
  return synthetic.SyntheticSource(**dict(KW, **kw), split=split, seed=seed)


def test_same_seed_same_bytes_other_seed_differs():
  a, b, c = _source(seed=3), _source(seed=3), _source(seed=4)
  for i in (0, 5):
    ra, rb, rc = a[i], b[i], c[i]
    for k in ('video', 'refs', 'subject_ids', 'ref_slots', 'ref_clip_ids', 'ref_frames'):
      assert ra[k].tobytes() == rb[k].tobytes(), k
    assert ra['caption'] == rb['caption']
    assert ra['video'].tobytes() != rc['video'].tobytes()


def test_heldout_identities_disjoint_from_train():
  tr, ho = _source('train'), _source('heldout')
  ids_tr = {int(i) for p in tr.set.plans for i in p['ids']}
  ids_ho = {int(i) for p in ho.set.plans for i in p['ids']}
  assert ids_tr and ids_ho and not ids_tr & ids_ho
  assert ids_ho <= set(range(KW['num_identities'] - KW['heldout_identities'], KW['num_identities']))


def test_cross_pairing_never_picks_the_target_clip():
  src = _source()
  for i in range(len(src)):
    r = src[i]
    assert len(r['refs']) == len(r['ref_slots']) >= len(r['subject_ids']) >= 1
    assert set(r['ref_slots'].tolist()) == set(range(len(r['subject_ids'])))  # every subject has a reference
    for slot, c, f in zip(r['ref_slots'], r['ref_clip_ids'], r['ref_frames']):
      sid = r['subject_ids'][slot]
      if c >= 0:
        assert c != i
        assert sid in src.set.plans[c]['ids']
        assert 0 <= f < KW['num_frames']
      else:  # fallback only when no other clip holds the identity
        assert src.set.clips_of[int(sid)] == [i]


def test_identity_colours_and_masks_consistent():
  s = synthetic.SyntheticSet(**KW, split='train', seed=1)
  for i in range(6):
    c = s.clip(i)
    assert c['video'].shape == (5, 32, 32, 3) and c['video'].dtype == np.uint8
    assert c['masks'].shape == (5, len(c['subject_ids']), 32, 32)
    assert not (c['masks'] & ~c['full_masks']).any()
    for k, sid in enumerate(c['subject_ids']):
      ident = s.table[int(sid)]
      px = c['video'][c['masks'][:, k]]
      ok = (px == ident['colour']).all(-1) | (px == ident['colour2']).all(-1)
      assert ok.all(), (i, k)
      assert ident['name'] in c['caption']


def test_identities_are_distinct_and_recur_across_clips():
  t = synthetic.identity_table(40, seed=0)
  keys = {(x['shape'], x['pattern'], tuple(x['colour']), tuple(x['colour2'])) for x in t}
  assert len(keys) == 40
  s = synthetic.SyntheticSet(**KW, split='train', seed=0)
  assert np.mean([len(v) > 1 for v in s.clips_of.values()]) > 0.8


def test_export_writes_prepare_input(tmp_path):
  path = synthetic.export_clips(str(tmp_path), split='train', seed=0, **dict(KW, num_clips=3))
  lines = [json.loads(l) for l in open(path)]
  assert len(lines) == 3
  for l in lines:
    assert os.path.exists(tmp_path / l['video']) and os.path.exists(tmp_path / l['masks'])
    assert l['subjects'] and l['caption']


def test_background_styles_keep_the_subjects_and_grey_is_flat():
  kw = dict(num_clips=6, num_identities=12, heldout_identities=3, split='train', num_frames=5, height=32,
            width=32, max_subjects=3, occluder_prob=0.0)
  sets = {b: synthetic.SyntheticSet(**kw, background=b) for b in synthetic.BACKGROUNDS}
  for i in range(6):
    clips = {b: s.clip(i) for b, s in sets.items()}
    ref = clips['procedural']
    for b, c in clips.items():  # the style draws no random numbers: same subjects, masks and captions
      assert np.array_equal(c['masks'], ref['masks']) and c['caption'] == ref['caption'], b
      inside = ref['full_masks'].any(1)
      assert np.array_equal(c['video'][inside], ref['video'][inside]), b
    outside = ~ref['full_masks'].any(1)
    assert (clips['grey']['video'][outside] == 200).all()
    plain_bg = clips['plain']['video'][outside]
    assert (plain_bg == plain_bg[:1]).all()  # one flat colour per clip ...
    assert ref['video'][outside].std(0).min() > 1  # ... the procedural one is not


def test_same_clip_pairing_cuts_references_from_the_target_itself():
  cross, same = _source(), _source(pairing='same_clip')
  for i in range(6):
    a, b = cross[i], same[i]
    assert (a['ref_clip_ids'] != i).all() and (b['ref_clip_ids'] == i).all()
    np.testing.assert_array_equal(a['video'], b['video'])  # only the references change
    assert set(b['ref_slots']) == set(range(len(b['subject_ids'])))
    # Each reference is the cut-out of the target's own subject in one of its frames.
    clip = same.set.clip(i)
    for ref, slot, frame in zip(b['refs'], b['ref_slots'], b['ref_frames']):
      np.testing.assert_array_equal(ref, synthetic.cutout(clip['video'][frame], clip['masks'][frame, slot],
                                                          (32, 32), same.margin))


def test_synthesis_rerenders_the_target_but_not_the_references():
  plain, synth = _source(), _source(synthesis=True)
  a, b = plain[2], synth[2]
  assert not np.array_equal(a['video'], b['video'])
  np.testing.assert_array_equal(a['refs'], b['refs'])
  np.testing.assert_array_equal(b['video'], synth[2]['video'])  # deterministic per index
  held = synthetic.SyntheticSource(num_clips=4, num_identities=12, heldout_identities=4, split='heldout',
                                   num_frames=5, height=16, width=16, synthesis=False)
  assert held[0]['video'].shape == (5, 16, 16, 3)


def test_heldout_of_another_seed_drops_lookalikes_of_the_trained_seed():
  n, h = 240, 24
  seen = {t['name'] for t in synthetic.identity_table(n, 0)[:n - h]}
  plain = synthetic.SyntheticSet(num_clips=1, num_identities=n, heldout_identities=h, split='heldout', num_frames=2,
                                 height=8, width=8, seed=1)
  clean = synthetic.SyntheticSet(num_clips=1, num_identities=n, heldout_identities=h, split='heldout', num_frames=2,
                                 height=8, width=8, seed=1, exclude_seed=0)
  overlap = [i for i in plain.pool if plain.table[int(i)]['name'] in seen]
  assert overlap and len(clean.pool) == len(plain.pool) - len(overlap)  # seed 1 shares 4 of its 24 with seed 0
  assert not [i for i in clean.pool if clean.table[int(i)]['name'] in seen]


def test_subject_weight_balances_subjects_and_pools_to_latents():
  from kaleido_jax import encoders
  masks = np.zeros((5, 2, 8, 8), bool)
  masks[:, 0, :4, :4] = True   # 80 px over the clip
  masks[:, 1, 6:, 6:] = True   # 20 px
  w = synthetic.subject_weight(masks)
  assert w[0, 0, 0] == pytest.approx(50 / 80) and w[0, 7, 7] == pytest.approx(50 / 20) and w[0, 5, 0] == 0
  # Each subject's pixels carry the same total.
  assert w[:, :4, :4].sum() == pytest.approx(w[:, 6:, 6:].sum())
  tiny = masks.copy()
  tiny[:, 1] = False
  tiny[0, 1, 7, 7] = True
  assert synthetic.subject_weight(tiny).max() == synthetic.MAX_SUBJECT_WEIGHT
  # Pixel codec (no temporal compression) and a Wan-style causal grid (frame 0, then groups of 4).
  x = np.arange(5 * 8 * 8, dtype=np.float32).reshape(1, 5, 8, 8)
  np.testing.assert_allclose(encoders.pool_to_latents(x, (5, 4, 4))[0, :, 0, 0], x[0, :, :2, :2].mean((1, 2)))
  pooled = encoders.pool_to_latents(x, (2, 2, 2))
  np.testing.assert_allclose(pooled[0, 0, 0, 0], x[0, 0, :4, :4].mean())
  np.testing.assert_allclose(pooled[0, 1, 0, 0], x[0, 1:5, :4, :4].mean())
  rec = _source()[0]
  assert rec['subject_weight'].shape == rec['video'].shape[:3] and rec['subject_weight'].max() > 0


_EXPORT = """
import sys
from kaleido_jax.data import synthetic
synthetic.export_clips(sys.argv[1], num_clips=6, num_identities=8, heldout_identities=1, split='train',
                       num_frames=17, height=128, width=128, seed=0)
"""


@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity') or len(os.sched_getaffinity(0)) < 2,
                    reason='needs two CPUs to run the exporter on one and on two')
def test_the_exported_files_are_the_same_bytes_on_one_cpu_and_on_two(tmp_path):
  # x264 takes its thread count from the CPUs a process may use, and its output depends on it: before #38 every
  # mp4 differed between a 1-CPU and a 2-CPU run of the same seed (at 128 px; x264 threads less on smaller frames).
  # A process pinned to one CPU is the twin of a smaller machine.
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS='cpu')
  one, two = tmp_path / 'one', tmp_path / 'two'
  subprocess.run([sys.executable, '-c', _EXPORT, str(one)], env=env, check=True, timeout=300,
                 preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
  subprocess.run([sys.executable, '-c', _EXPORT, str(two)], env=env, check=True, timeout=300)
  names = sorted(os.listdir(one))
  assert names == sorted(os.listdir(two)) and sum(n.endswith('.mp4') for n in names) == 6
  differ = [n for n in names if (one / n).read_bytes() != (two / n).read_bytes()]
  assert not differ, differ
