"""The synthetic world where a clip has its own look (data.clip_nuisance): a same-clip reference carries its clip's
grade and halo, a cross-clip one another clip's (statistics over many clips, fixed seeds); strength 0 is the world
before; the metrics that see a look or a halo pasted score 0 on the target, 1 on the pasted, between on a blend."""

import numpy as np
import pytest
from scipy import ndimage

from kaleido_jax.data import nuisance
from kaleido_jax.data import synthetic
from kaleido_jax.eval import metrics

SIZE = dict(num_identities=12, heldout_identities=2, num_frames=5, height=64, width=64, max_subjects=2,
            refs_per_subject=1)


def _source(pairing, strength=1.0, split='train', clips=48, seed=0, size=64):
  return synthetic.SyntheticSource(num_clips=clips, split=split, pairing=pairing, clip_nuisance=strength, seed=seed,
                                   **dict(SIZE, height=size, width=size))


def _grade_of(ref, ident):
  """The grade whose colours best explain a reference's inner pixels: each pixel's distance to the segment between
  the identity's two colours under that grade (a soft-focus clip blurs the pattern into their mixtures), the median
  over pixels (robust to grain and to another subject's edge)."""
  solid = np.any(ref < 240, axis=-1)
  inner = ndimage.binary_erosion(solid, iterations=8)  # away from the halo and the cut-out's edge
  px = ref[inner].astype(np.float32)
  best, best_err = None, np.inf
  for name, (gains, offset) in nuisance.GRADES.items():
    a, b = (np.clip(np.asarray(c, np.float32) * gains + offset, 0, 255) for c in (ident['colour'], ident['colour2']))
    u = np.clip(((px - a) @ (b - a)) / max(float((b - a) @ (b - a)), 1e-6), 0, 1)
    err = np.median(np.linalg.norm(px - (a + u[:, None] * (b - a)), axis=-1))
    if err < best_err:
      best, best_err = name, err
  return best


def _halo_distance(ref, clip, slot, frame):
  """Distance of a reference's halo colour (its cut-out's third ring from the edge: inside a halo of 3 px or more;
  the outer two are blended with the white canvas by the resize) to the target clip's background just around the
  subject in `frame`, in 0..255 levels summed over channels."""
  solid = np.any(ref < 240, axis=-1)
  ring = ndimage.binary_erosion(solid, iterations=2) & ~ndimage.binary_erosion(solid, iterations=3)
  masks = clip['masks'][frame]
  around = ndimage.binary_dilation(masks[slot], iterations=4) & ~masks.any(0)
  background = clip['video'][frame][around].astype(np.float32).mean(0)
  return float(np.abs(ref[ring].astype(np.float32).mean(0) - background).sum())


def test_strength_zero_is_the_world_before_and_the_look_changes_nothing_else():
  plain, looked = _source('cross', 0.0, clips=8), _source('cross', 1.0, clips=8)
  for a, b in zip(plain.set.plans, looked.set.plans):
    assert a['look'] is None and b['look'] is not None
    assert np.array_equal(a['ids'], b['ids']) and str(a['subjects']) == str(b['subjects'])
    assert str(a['bg']) == str(b['bg'])
  r0, r1 = plain[3], looked[3]
  assert r1['caption'].startswith(r0['caption'][:-1]) and r1['caption'] != r0['caption']
  assert ' light, in ' in r1['caption'] and r1['caption'].endswith(' focus.')
  # The same plans rendered with no look: exactly the world without it (the old numbers stay reproducible).
  p = dict(looked.set.plans[3], look=None)
  again = synthetic.render_plan(p, looked.set.table, 5, 64, 64)['video']
  assert np.array_equal(again, synthetic.render_plan(plain.set.plans[3], plain.set.table, 5, 64, 64)['video'])


def test_a_same_clip_reference_carries_its_clips_grade_and_halo_a_cross_clip_one_does_not():
  same, cross = _source('same_clip', size=128), _source('cross', size=128)
  table = same.set.table
  hits = {'same': [], 'cross_own': [], 'cross_source': []}
  halo = {'same': [], 'cross': []}
  for i in range(len(same)):
    plan = same.set.plans[i]
    a, b = same[i], cross[i]
    for refs, slots, srcs, key in ((a['refs'], a['ref_slots'], a['ref_clip_ids'], 'same'),
                                   (b['refs'], b['ref_slots'], b['ref_clip_ids'], 'cross')):
      for ref, slot, src, frame in zip(refs, slots, srcs, a['ref_frames']):  # at the same-clip cut-out's frame
        if src < 0:
          continue  # a far-frame fallback: the clip's own cut-out
        grade = _grade_of(ref, table[int(plan['ids'][slot])])
        px = nuisance.halo_px(same.set.plans[int(src)]['look'], 128)
        clip = same.set.clip(i)
        if key == 'same':
          hits['same'].append(grade == plan['look']['grade'])
        else:
          hits['cross_own'].append(grade == plan['look']['grade'])
          hits['cross_source'].append(grade == same.set.plans[int(src)]['look']['grade'])
        if px >= 3:  # a halo of 3 px or more: the cut-out's third ring is in it
          halo[key].append(_halo_distance(ref, clip, slot, frame))
  rate = {k: float(np.mean(v)) for k, v in hits.items()}
  # Measured (48 clips at 128 px, seed 0, 75 references each): same-clip 1.00 on its clip's grade; cross-clip 1.00 on
  # its source clip's and 0.21 on the target clip's (chance: one in five grades).
  assert rate['same'] >= 0.9 and rate['cross_source'] >= 0.9 and rate['cross_own'] <= 0.45, rate
  assert len(hits['same']) >= 40 and len(hits['cross_own']) >= 40
  # The halo is the reference's own clip's background: near the target's for same-clip, far for cross-clip
  # (measured medians 23 and 143 levels summed over channels).
  assert np.median(halo['same']) < 0.4 * np.median(halo['cross']), (np.median(halo['same']),
                                                                     np.median(halo['cross']))


def test_held_out_requests_are_cross_paired_in_the_world_with_looks():
  held = synthetic.make_source(_config(), 'heldout')
  for i in range(len(held)):
    rec = held[i]
    assert np.all((rec['ref_clip_ids'] != i))


def _config():
  from kaleido_jax import config as kcfg
  return kcfg.data_config(num_identities=12, heldout_identities=3, heldout_clips=12, num_frames=5, height=64,
                          width=64, max_subjects=2, clip_nuisance=1.0, pairing='same_clip')


def test_the_paste_metrics_score_zero_one_and_the_blend():
  held = synthetic.make_source(_config(), 'heldout')
  found = 0
  for i in range(len(held)):
    rec = held[i]
    slots = list(range(len(rec['subject_ids'])))
    picks = [int(np.nonzero(rec['ref_slots'] == s)[0][0]) for s in slots]
    srcs = [int(rec['ref_clip_ids'][p]) for p in picks]
    truth = synthetic.clip_truth(held.set, i)
    paste = synthetic.pasted_look(held.set, i, srcs)
    target, pasted, masks = truth['target'], paste['look_pasted'], truth['masks']
    if np.abs(pasted.astype(int) - target).max() < 20:
      continue  # every reference's clip has this clip's look: nothing to paste
    found += 1
    blend = (0.3 * (target / 127.5 - 1) + 0.7 * (pasted / 127.5 - 1)).astype(np.float32)
    assert metrics.look_paste_rate(target, target, pasted, masks) == 0.0
    assert metrics.look_paste_rate(pasted, target, pasted, masks) == pytest.approx(1.0, abs=1e-6)
    assert metrics.look_paste_rate(blend, target, pasted, masks) == pytest.approx(0.7, abs=1e-3)
    # The halo: the band around each subject filled with its reference's halo colour is 1, the target 0.
    refs = (np.asarray(rec['refs'])[picks].astype(np.float32) / 127.5 - 1)
    px = paste['halo_px']
    if not np.any(px >= 1):
      continue
    t = target.astype(np.float32) / 127.5 - 1
    haloed = t.copy()
    anyone = masks.any(1)
    for k, (ref, w) in enumerate(zip(refs, px)):
      colour = metrics._halo_colour(ref, int(w)) if w else None  # pylint: disable=protected-access
      if colour is None:
        continue
      for f in range(len(t)):
        haloed[f][ndimage.binary_dilation(masks[f, k], iterations=int(w)) & ~anyone[f]] = colour
    assert metrics.halo_paste_rate(t, refs, t, masks, px) == 0.0
    assert metrics.halo_paste_rate(haloed, refs, t, masks, px) == pytest.approx(1.0, abs=1e-6)
    assert metrics.halo_paste_rate(0.5 * t + 0.5 * haloed, refs, t, masks, px) == pytest.approx(0.5, abs=1e-3)
  assert found >= 4
