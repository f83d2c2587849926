"""The paper-claim metrics on crafted synthetic videos whose answer is known.

Each video is rendered by the synthetic set's own renderer from a hand-made plan, so the truth (masks, poses,
motions) is exact: the real clip, a pasted reference, a vanished subject, a duplicated subject, a subject moving
the wrong way or spinning the other way.
"""

import copy

import numpy as np
import pytest

from kaleido_jax.data import synthetic
from kaleido_jax.eval import metrics
from kaleido_jax.eval import tracking

SIZE, FRAMES = 32, 5
TABLE = synthetic.identity_table(240, 0)
# Two identities that share no colour: a plain blue hexagon and a teal cross checkered with purple.
A, B = next(i for i, t in enumerate(TABLE) if t['name'] == 'blue hexagon'), 20


def _subject(motion, p0, p1=None, s0=0.25, s1=None, spin=0.0, amp=0.0, rot=0.0):
  p0 = np.asarray(p0, float)
  return dict(motion=motion, p0=p0, p1=p0.copy() if p1 is None else np.asarray(p1, float), s0=s0,
              s1=s0 if s1 is None else s1, rot=rot, spin=spin, amp=amp, phase=0.0)


def _plan(ids, subjects):
  bg = dict(c0=np.full(3, 200.0), c1=np.full(3, 200.0), angle=0.0, freq=np.ones(2), amp=0.0, pan=np.zeros(2),
            noise_seed=0, plain=True)
  return dict(index=0, split='heldout', ids=np.asarray(ids, np.int32), subjects=subjects, bg=bg, occluder=None)


def _float(x):
  return np.asarray(x, np.float32) / 127.5 - 1.0


def _refs(plan):
  """One cut-out per subject from a frame of a different pose (its own clip's middle frame, recentred)."""
  r = synthetic.render_plan(plan, TABLE, FRAMES, SIZE, SIZE)
  return np.stack([_float(synthetic.cutout(r['video'][2], r['masks'][2, k], (SIZE, SIZE), 0.1))
                   for k in range(len(plan['ids']))])


def _video(plan):
  return _float(synthetic.render_plan(plan, TABLE, FRAMES, SIZE, SIZE)['video'])


TWO = _plan([A, B], [_subject('moves right', (0.3, 0.3), (0.6, 0.3)), _subject('moves down', (0.7, 0.45), (0.7, 0.75))])


def test_real_clip_is_clean():
  truth = synthetic.plan_truth(TWO, TABLE, FRAMES, SIZE, SIZE)
  row = metrics.evaluate_video(_video(TWO), _refs(TWO), truth=truth, scorers=('histogram',))
  assert row['subject_presence_min'] == 1.0
  assert row['binding_error'] == 0.0
  assert row['background_leakage'] == 0.0
  assert row['pose_copy_rate'] == 0.0
  assert row['motion_adherence'] == 1.0 and row['motion_judged'] == 1.0


def test_pasted_reference_is_pose_copy_and_leakage():
  one = _plan([A], [_subject('moves right', (0.3, 0.4), (0.65, 0.4))])
  refs = _refs(one)
  truth = synthetic.plan_truth(one, TABLE, FRAMES, SIZE, SIZE)
  pasted = np.repeat(refs[:1], FRAMES, 0)
  row = metrics.evaluate_video(pasted, refs, truth=truth, scorers=('histogram',))
  assert row['pose_copy_rate'] == 1.0
  assert row['background_leakage'] == pytest.approx(1.0)
  assert row['motion_adherence'] == 0.0  # a still paste does not move right
  clean = metrics.evaluate_video(_video(one), refs, truth=truth, scorers=('histogram',))
  assert clean['pose_copy_rate'] == 0.0 and clean['background_leakage'] == 0.0


def test_vanished_second_subject_shows_in_min_presence_and_binding():
  only_a = _plan([A], [TWO['subjects'][0]])
  row = metrics.evaluate_video(_video(only_a), _refs(TWO), scorers=('histogram',))
  assert row['subject_presence'] == pytest.approx(0.5)  # the mean hides it ...
  assert row['subject_presence_min'] == 0.0             # ... the minimum does not
  assert row['binding_error'] == pytest.approx(0.5)     # B's windows all match A better than B


def test_merged_pair_is_a_binding_error():
  # Both slots drawn as identity A: B's reference finds only A-coloured subjects.
  both_a = copy.deepcopy(TWO)
  both_a['ids'] = np.asarray([A, (A + 1) % 240], np.int32)
  table = [dict(t) for t in TABLE]
  table[(A + 1) % 240] = dict(TABLE[A])
  video = _float(synthetic.render_plan(both_a, table, FRAMES, SIZE, SIZE)['video'])
  assert metrics.binding_error(video, list(_refs(TWO))) == pytest.approx(0.5)
  assert metrics.binding_error(_video(TWO), list(_refs(TWO))) == 0.0
  assert np.isnan(metrics.binding_error(video, list(_refs(TWO))[:1]))


@pytest.mark.parametrize('motion,right,wrong', [
    ('moves right', dict(p0=(0.3, 0.5), p1=(0.65, 0.5)), dict(p0=(0.65, 0.5), p1=(0.3, 0.5))),
    ('moves up', dict(p0=(0.5, 0.7), p1=(0.5, 0.35)), dict(p0=(0.5, 0.35), p1=(0.5, 0.7))),
    ('zooms in', dict(p0=(0.5, 0.5), s0=0.2, s1=0.32), dict(p0=(0.5, 0.5), s0=0.32, s1=0.2)),
    ('circles around', dict(p0=(0.5, 0.5), amp=0.15), dict(p0=(0.5, 0.5), amp=-0.15)),
    ('spins in place', dict(p0=(0.5, 0.5), s0=0.3, spin=1.0), dict(p0=(0.5, 0.5), s0=0.3, spin=-1.0)),
])
def test_motion_adherence_tells_the_prompted_motion_from_the_opposite(motion, right, wrong):
  ident = B  # the checkered cross: rotation is visible (symmetry 180 degrees at this size)
  plan = _plan([ident], [_subject(motion, **right)])
  truth = synthetic.plan_truth(plan, TABLE, FRAMES, SIZE, SIZE)
  refs = _refs(plan)
  ok, judged = metrics.motion_adherence(_video(plan), refs, truth['motions'], truth['target'], truth['poses'])
  assert (ok, judged) == (1.0, 1.0)
  bad, _ = metrics.motion_adherence(_video(_plan([ident], [_subject(motion, **wrong)])), refs, truth['motions'],
                                    truth['target'], truth['poses'])
  assert bad == 0.0


def test_rotation_of_a_plain_disc_is_not_judged():
  disc = next(i for i, t in enumerate(TABLE) if t['shape'] == 'circle' and t['pattern'] == 'plain')
  plan = _plan([disc], [_subject('spins in place', (0.5, 0.5), s0=0.3, spin=1.0)])
  truth = synthetic.plan_truth(plan, TABLE, FRAMES, SIZE, SIZE)
  patch, mask = metrics.subject_patch(_refs(plan)[0])
  assert tracking.symmetry_period(patch, mask) is None
  rate, judged = metrics.motion_adherence(_video(plan), _refs(plan), truth['motions'], truth['target'],
                                          truth['poses'])
  assert np.isnan(rate) and judged == 0.0


def test_tracker_reads_centre_and_size():
  plan = _plan([A], [_subject('zooms in', (0.4, 0.6), s0=0.18, s1=0.29)])
  patch, mask = metrics.subject_patch(_refs(plan)[0])
  tr = tracking.track(_video(plan), patch, mask)
  np.testing.assert_allclose(tr.x, 0.4, atol=1.5 / SIZE)
  np.testing.assert_allclose(tr.y, 0.6, atol=1.5 / SIZE)
  assert tracking.slope(np.log(tr.size)) == pytest.approx(np.log(0.29 / 0.18), abs=0.1)


def test_aggregate_skips_missing_and_nan():
  rows = [dict(a=1.0, binding_error=0.5), dict(a=3.0), dict(a=2.0, binding_error=float('nan'))]
  assert metrics.aggregate(rows) == dict(a=2.0, binding_error=0.5)
