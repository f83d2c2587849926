"""The offline metrics rank what they should: a pasted subject beats a recoloured one beats none."""

import numpy as np
import pytest

from kaleido_jax.eval import metrics


def _subject(h=12, w=10, seed=0):
  """A textured disc-ish subject on white, (H, W, 3) in [-1, 1] with its mask."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  mask = ((yy - h / 2 + 0.5) / (h / 2)) ** 2 + ((xx - w / 2 + 0.5) / (w / 2)) ** 2 <= 1.0
  tex = np.stack([np.sin(yy / 2.0), np.cos(xx / 3.0), (yy + xx) / (h + w) * 2 - 1], -1) * 0.6
  tex = tex + rng.normal(0, 0.05, tex.shape) - 0.2
  return np.where(mask[..., None], tex, 1.0).astype(np.float32), mask


def _reference(subject, size=32):
  ref = np.ones((size, size, 3), np.float32)
  h, w = subject.shape[:2]
  ref[5:5 + h, 7:7 + w] = subject
  return ref


def _video(subject, mask, positions, size=32, seed=1, recolour=0.0):
  rng = np.random.default_rng(seed)
  frames = rng.uniform(-1, 0.2, (len(positions), size, size, 3)).astype(np.float32)
  for f, (y, x) in enumerate(positions):
    h, w = mask.shape
    patch = np.clip(subject + recolour, -1, 1)
    region = frames[f, y:y + h, x:x + w]
    frames[f, y:y + h, x:x + w] = np.where(mask[..., None], patch, region)
  return frames


POSITIONS = [(2, 3), (6, 9), (10, 14), (15, 18)]


def test_subject_patch_is_the_non_white_bounding_box():
  subject, mask = _subject()
  patch, m = metrics.subject_patch(_reference(subject))
  assert patch.shape == subject.shape
  np.testing.assert_array_equal(m.astype(bool), mask)


def test_localise_finds_a_pasted_subject_exactly():
  subject, mask = _subject()
  video = _video(subject, mask, POSITIONS)
  crops, patch, m, mse, scale = metrics.localise(video, _reference(subject))
  np.testing.assert_allclose(mse, 0.0, atol=1e-5)
  np.testing.assert_array_equal(scale, 1.0)
  np.testing.assert_allclose(crops, np.broadcast_to(patch, crops.shape), atol=1e-5)


def test_localise_finds_a_half_size_subject():
  subject, mask = _subject(16, 16)
  small = metrics._resize(subject, (8, 8))
  small_mask = metrics._resize(mask.astype(np.float32), (8, 8)) > 0.5
  video = _video(small, small_mask, POSITIONS)
  _, _, _, mse, scale = metrics.localise(video, _reference(subject))
  np.testing.assert_array_equal(scale, 0.5)
  assert mse.max() < 0.1  # edge pixels blend with white when the mask is resized


def test_fidelity_ranks_pasted_over_recoloured_over_absent():
  subject, mask = _subject()
  ref = _reference(subject)
  pasted = metrics.subject_fidelity(_video(subject, mask, POSITIONS), ref)
  recoloured = metrics.subject_fidelity(_video(subject, mask, POSITIONS, recolour=0.5), ref)
  absent = metrics.subject_fidelity(_video(subject, mask, POSITIONS)[:, :, :, ::-1] * 0 - 0.5, ref)
  assert pasted["lpips"] < recoloured["lpips"] < absent["lpips"], (pasted, recoloured, absent)
  # The colour histogram sees colours only: a subject shifted by a quarter of the range has moved every pixel
  # to another colour cell, as far as a flat grey is, so it only has to rank the paste first.
  assert pasted["histogram"] < 0.01 and min(recoloured["histogram"], absent["histogram"]) > 0.5
  assert pasted["lpips"] < 1e-3


def test_copy_paste_rate_is_one_for_a_paste_and_low_for_a_rerendering():
  subject, mask = _subject()
  ref = _reference(subject)
  assert metrics.copy_paste_rate(_video(subject, mask, POSITIONS), ref) == pytest.approx(1.0)
  noisy = subject + np.random.default_rng(3).normal(0, 0.1, subject.shape).astype(np.float32)
  assert metrics.copy_paste_rate(_video(np.clip(noisy, -1, 1), mask, POSITIONS), ref) < 0.1


def test_subject_presence_counts_frames_with_the_subject():
  subject, mask = _subject()
  ref = _reference(subject)
  video = _video(subject, mask, POSITIONS)
  video[2:] = -0.9  # the subject leaves after two frames
  assert metrics.subject_presence(video, ref) == pytest.approx(0.5)


def test_temporal_smoothness():
  still = np.zeros((5, 8, 8, 3), np.float32)
  assert metrics.temporal_smoothness(still) == {"frame_diff_mean": 0.0, "frame_diff_std": 0.0,
                                                "flicker": 0.0}
  blink = np.stack([np.full((8, 8, 3), (-1) ** i * 0.5, np.float32) for i in range(5)])
  ramp = np.stack([np.full((8, 8, 3), i * 0.2 - 0.5, np.float32) for i in range(5)])
  assert metrics.temporal_smoothness(blink)["flicker"] > metrics.temporal_smoothness(ramp)["flicker"]
  assert metrics.temporal_smoothness(ramp)["flicker"] == pytest.approx(0.0, abs=1e-6)


def test_evaluate_video_skips_padded_references_and_aggregates():
  subject, mask = _subject()
  ref = _reference(subject)
  video = _video(subject, mask, POSITIONS)
  refs = np.stack([ref, np.ones_like(ref)])  # the second slot is padding (all white)
  row = metrics.evaluate_video(video, refs, np.array([True, False]))
  assert row["fidelity_lpips"] < 1e-3 and row["copy_paste_rate"] == pytest.approx(1.0)
  uint8_row = metrics.evaluate_video(((video + 1) * 127.5).round().astype(np.uint8),
                                     ((refs + 1) * 127.5).round().astype(np.uint8), [True, False])
  assert uint8_row["subject_presence"] == 1.0
  table = metrics.markdown_table({"a": metrics.aggregate([row, row])})
  assert table.splitlines()[0].startswith("| model | fidelity_lpips")


def test_bad_inputs_name_the_problem():
  with pytest.raises(metrics.MetricInputError, match="all white"):
    metrics.subject_patch(np.ones((8, 8, 3), np.float32))
  with pytest.raises(metrics.MetricInputError, match=r"\(F, H, W, 3\)"):
    metrics.temporal_smoothness(np.zeros((8, 8, 3)))
  with pytest.raises(metrics.MetricInputError, match=r"\[-1, 1\]"):
    metrics.temporal_smoothness(np.full((2, 8, 8, 3), 7.0))
  with pytest.raises(metrics.MetricInputError, match="unknown scorers"):
    subject, _ = _subject()
    metrics.subject_fidelity(np.zeros((2, 32, 32, 3)), _reference(subject), scorers=("clip",))
  with pytest.raises(metrics.MetricInputError, match="no real reference"):
    metrics.evaluate_video(np.zeros((2, 32, 32, 3)), np.ones((1, 32, 32, 3)), [False])


def test_histogram_is_joint_so_saturated_noise_does_not_match_a_coloured_subject():
  # A pure green subject; noise whose channels are each clipped to -1 or 1 has the same per-channel
  # marginals (half the pixels at each end) but almost never the colour (0, 255, 0).
  mask = np.ones((8, 8), np.float32)
  green = np.broadcast_to(np.array([-1.0, 1.0, -1.0], np.float32), (8, 8, 3))
  noise = np.sign(np.random.default_rng(0).normal(size=(4, 8, 8, 3))).astype(np.float32)
  exact = metrics.histogram_distance(green[None], green, mask)
  far = metrics.histogram_distance(noise, green, mask)
  np.testing.assert_allclose(exact, 0.0, atol=1e-6)
  assert far.min() > 0.7  # ~7/8 of random sign triples are another colour
