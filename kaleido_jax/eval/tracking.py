"""Where a reference subject is in each frame, how big and how rotated: the tracker behind the motion metrics.

`metrics.localise` finds the best window at three scales for the fidelity scorers; judging prompted motion
needs finer geometry: the subject's centre, its size over a dense geometric grid of scales (a zoom of 1.6x or
a shrink to 0.6x must show), and its in-plane rotation. Correlations run through scipy's FFT path, so a new
patch size costs no compilation (eval sees dozens of sizes). Centre and size come from the subject's own
colours around the best window (see :func:`track`).

Rotation is only observable up to the subject's own symmetry: a plain circle has none to see, a square repeats
every 90 degrees. :func:`symmetry_period` measures it on the reference patch, and angle changes are read
modulo it.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage
from scipy import signal

SEARCH_SCALES = (0.3, 0.5, 0.75, 1.0)  # of the reference patch: where to look (not how big: see track)
PALETTE_TOLERANCE = 0.35  # RGB distance in [-1, 1] units (~45/255) for a pixel to count as a subject colour
ANGLE_STEP = 10.0  # degrees between the rotated templates of the angle search
SYMMETRY_MATCH = 0.25  # a rotation that reproduces the patch within this fraction of its worst self-mismatch


def resize(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  zoom = (shape[0] / x.shape[0], shape[1] / x.shape[1]) + (1,) * (x.ndim - 2)
  out = ndimage.zoom(x, zoom, order=1, mode='nearest', grid_mode=True)
  return out[:shape[0], :shape[1]]


class Track(NamedTuple):
  """Per-frame geometry of one subject: centre x, y in [0, 1] of the frame's width / height, size (square root
  of the subject's area over the frame's, NaN where it is not found) and the raw window around it resized to
  the patch size (for the rotation search)."""
  x: np.ndarray
  y: np.ndarray
  size: np.ndarray
  windows: list


def palette(patch: np.ndarray, mask: np.ndarray, *, min_share: float = 0.1) -> np.ndarray:
  """The subject's colours: (k, 3) means of the quantised colours covering >= `min_share` of its pixels."""
  px = patch[mask > 0.5]
  q = np.round((px + 1.0) * 4.0).astype(np.int64)  # 9 levels per channel
  keys, inv, counts = np.unique(q, axis=0, return_inverse=True, return_counts=True)
  keep = np.nonzero(counts >= min_share * len(px))[0]
  if len(keep) == 0:
    keep = np.array([int(np.argmax(counts))])
  return np.stack([px[inv.ravel() == k].mean(0) for k in keep])


def membership(frames: np.ndarray, colours: np.ndarray, tolerance: float = PALETTE_TOLERANCE) -> np.ndarray:
  """(F, H, W) bool: pixels within `tolerance` (RGB distance, [-1, 1] units) of one of the subject's colours."""
  d = np.linalg.norm(frames[..., None, :] - colours, axis=-1).min(-1)
  return d < tolerance


def masked_ssd(frames: np.ndarray, patch: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """sum m (F - S)^2 for every valid window: conv(F^2, m) - 2 conv(F, m S) + sum m S^2 -> (F, H-h+1, W-w+1)."""
  m3 = np.broadcast_to(mask[..., None], patch.shape)
  corr = lambda a, k: signal.correlate(a, k[None], mode='valid', method='fft')[..., 0]
  return corr(frames * frames, m3) - 2.0 * corr(frames, m3 * patch) + np.sum(m3 * patch * patch)


def track(frames: np.ndarray, patch: np.ndarray, mask: np.ndarray, *,
          scales: Sequence[float] = SEARCH_SCALES) -> Track:
  """Centre, size and window of the (patch, mask) subject (metrics.subject_patch) in every frame.

  The masked-SSD search only says roughly where the subject is: a small window inside a flat-coloured subject
  matches as well as the whole one, so the search cannot measure size. The subject itself is the connected
  region of its own colours (:func:`palette`) that overlaps the best window most; its centroid and area give
  the centre and size.
  """
  num_frames, height, width, _ = frames.shape
  h, w = mask.shape
  colours = palette(patch, mask)
  member = membership(frames, colours)
  best = np.full(num_frames, np.inf)
  boxes = np.zeros((num_frames, 4), np.int64)
  for s in scales:
    sh, sw = max(2, round(h * s)), max(2, round(w * s))
    if sh > height or sw > width:
      continue
    p, m = (patch, mask) if (sh, sw) == (h, w) else (resize(patch, (sh, sw)), resize(mask, (sh, sw)))
    ssd = masked_ssd(frames, p, m).reshape(num_frames, -1)
    mse = ssd.min(1) / (3.0 * max(float(m.sum()), 1e-6))
    where = ssd.argmin(1)
    for f in np.nonzero(mse < best)[0]:
      yy, xx = divmod(int(where[f]), width - sw + 1)
      best[f], boxes[f] = mse[f], (yy, xx, sh, sw)
  if not np.isfinite(best).all():
    raise ValueError(f'subject patch {h}x{w} is larger than the frames {height}x{width} at every scale')
  x, y, size = (np.full(num_frames, np.nan) for _ in range(3))
  windows = [None] * num_frames
  area_px = height * width
  for f in range(num_frames):
    labels, n = ndimage.label(member[f])
    if n == 0:
      continue
    yy, xx, sh, sw = boxes[f]
    inside = np.bincount(labels[yy:yy + sh, xx:xx + sw].ravel(), minlength=n + 1)[1:]
    if inside.max() == 0:
      continue
    region = labels == int(np.argmax(inside)) + 1
    ys, xs = np.nonzero(region)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    x[f], y[f], size[f] = cx / width, cy / height, np.sqrt(len(ys) / area_px)
    # The window for the rotation search: the patch's box, scaled to the region's area, around its centroid.
    k = np.sqrt(len(ys) / max(float((mask > 0.5).sum()), 1.0))
    wh, ww = max(2, round(h * k)), max(2, round(w * k))
    y0, x0 = int(round(cy - wh / 2)), int(round(cx - ww / 2))
    pad = np.pad(frames[f], ((wh, wh), (ww, ww), (0, 0)), mode='edge')
    windows[f] = resize(pad[y0 + wh:y0 + 2 * wh, x0 + ww:x0 + 2 * ww], (h, w))
  return Track(x, y, size, windows)


def rotated(patch: np.ndarray, mask: np.ndarray, angle: float, reshape: bool = False):
  """A subject patch (on white) and its mask turned by `angle` degrees; `reshape` grows the box to fit."""
  p = ndimage.rotate(patch, angle, axes=(1, 0), reshape=reshape, order=1, mode='constant', cval=1.0)
  m = ndimage.rotate(mask, angle, axes=(1, 0), reshape=reshape, order=1, mode='constant', cval=0.0)
  return p, m


def _angle_scores(window: np.ndarray, patch: np.ndarray, mask: np.ndarray, angles: np.ndarray) -> np.ndarray:
  out = np.empty(len(angles))
  for i, a in enumerate(angles):
    p, m = rotated(patch, mask, float(a))
    out[i] = float((((window - p) ** 2).mean(-1) * m).sum() / max(float(m.sum()), 1e-6))
  return out


def symmetry_period(patch: np.ndarray, mask: np.ndarray) -> float | None:
  """Smallest rotation (degrees, a divisor of 360 on the angle grid) that maps the subject onto itself;
  None when no rotation changes it visibly (a plain disc: rotation cannot be seen)."""
  angles = np.arange(ANGLE_STEP, 360.0, ANGLE_STEP)
  self_mse = _angle_scores(patch, patch, mask, angles)
  worst = float(self_mse.max())
  if worst < 0.02:  # rotating by any angle changes the patch by < 0.02 mse: rotation is not observable
    return None
  for a, e in zip(angles, self_mse):
    if 360.0 % a == 0 and e < SYMMETRY_MATCH * worst and a >= 2 * ANGLE_STEP:
      return float(a)
  return 360.0


def rotation(track_: Track, patch: np.ndarray, mask: np.ndarray, period: float) -> np.ndarray:
  """Best template angle of every frame's window in [0, period) degrees (counter-clockwise on screen)."""
  angles = np.arange(0.0, period, ANGLE_STEP / 2)
  return np.array([np.nan if w is None else angles[int(np.argmin(_angle_scores(w, patch, mask, angles)))]
                   for w in track_.windows])


def wrap(delta: np.ndarray, period: float) -> np.ndarray:
  """Angle differences into (-period / 2, period / 2]."""
  return -((-np.asarray(delta) + period / 2) % period - period / 2)


def slope(values: np.ndarray) -> float:
  """Least-squares change of `values` over the clip (frame 0 at t = 0, the last at t = 1), NaN frames skipped."""
  values = np.asarray(values, np.float64)
  t = np.linspace(0.0, 1.0, len(values))
  ok = np.isfinite(values)
  if ok.sum() < 2:
    return float('nan')
  return float(np.polyfit(t[ok], values[ok], 1)[0])
