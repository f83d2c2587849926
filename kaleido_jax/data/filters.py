"""Low-quality filters of the construction pipeline: each returns the drop reason or None.

Thresholds live in `config.data.prepare`; every check is a cheap numpy statistic so `prepare` stays I/O bound.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

REASONS = ('unreadable', 'low_resolution', 'too_short', 'blurry', 'static', 'shaky', 'no_subject',
           'subject_too_small', 'subject_too_large', 'subject_truncated', 'near_duplicate')


def gray(video: np.ndarray) -> np.ndarray:
  """(F, H, W, 3) uint8 -> (F, H, W) float32 luma."""
  return video[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def laplacian_variance(video: np.ndarray) -> float:
  """Mean over frames of the variance of the 4-neighbour Laplacian (low = blurry)."""
  g = gray(video)
  lap = (g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4 * g[:, 1:-1, 1:-1])
  return float(lap.reshape(len(g), -1).var(axis=1).mean())


def frame_difference(video: np.ndarray) -> float:
  """Mean |frame(t+1) - frame(t)| on 0..255 luma (low = static, high = shaky or a cut)."""
  g = gray(video)
  if len(g) < 2:
    return 0.0
  return float(np.abs(np.diff(g, axis=0)).mean())


def phash(frame: np.ndarray) -> np.ndarray:
  """64-bit perceptual hash (DCT of a 32x32 luma thumbnail, low 8x8 block above its median)."""
  g = np.asarray(Image.fromarray(frame[..., :3]).convert('L').resize((32, 32), Image.BILINEAR), np.float32)
  n = np.arange(32)
  dct = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 64)
  coef = (dct @ g @ dct.T)[:8, :8].ravel()
  return coef[1:] > np.median(coef[1:])


def video_hash(video: np.ndarray) -> np.ndarray:
  """Hashes of the first, middle and last frames, concatenated (near-duplicate clips match all three)."""
  return np.concatenate([phash(video[i]) for i in (0, len(video) // 2, len(video) - 1)])


def box_area(masks: np.ndarray) -> np.ndarray:
  """(F, S, H, W) masks -> (S,) the median over the frames a subject is present in of its bounding box's area as a
  fraction of the frame (0 for a subject never present). A sparse mask spread over the frame (texture motion
  merged into one component) has a small mask area but a box as large as the frame."""
  f, s, h, w = masks.shape
  rows, cols = masks.any(-1), masks.any(-2)  # (F, S, H), (F, S, W)
  out = np.zeros(s)
  for k in range(s):
    present = rows[:, k].any(-1)
    if not present.any():
      continue
    r, c = rows[present, k], cols[present, k]
    height = h - r.argmax(-1) - r[:, ::-1].argmax(-1)
    width = w - c.argmax(-1) - c[:, ::-1].argmax(-1)
    out[k] = float(np.median(height * width)) / (h * w)
  return out


def subject_stats(masks: np.ndarray) -> dict[str, np.ndarray]:
  """Per subject: mean area fraction over frames, median box area fraction (box_area) and fraction of frames
  whose box touches the border."""
  f, s, h, w = masks.shape
  area = masks.reshape(f, s, -1).mean(-1).mean(0) if f else np.zeros(s)
  touch = (masks[:, :, 0].any(-1) | masks[:, :, -1].any(-1) | masks[:, :, :, 0].any(-1) |
           masks[:, :, :, -1].any(-1))
  return dict(area=area, box=box_area(masks), border=touch.mean(0))


def check_clip(video: np.ndarray, masks: np.ndarray, cfg: Any) -> str | None:
  """Every per-clip filter in order; the first failing reason (or None = keep)."""
  f, h, w = video.shape[:3]
  if h < cfg.min_height or w < cfg.min_width:
    return 'low_resolution'
  if f < cfg.min_frames:
    return 'too_short'
  if laplacian_variance(video) < cfg.min_blur_var:
    return 'blurry'
  diff = frame_difference(video)
  if diff < cfg.min_motion:
    return 'static'
  if diff > cfg.max_shake:
    return 'shaky'
  if masks.shape[1] == 0:
    return 'no_subject'
  st = subject_stats(masks)
  if (st['area'] < cfg.min_subject_area).any():
    return 'subject_too_small'
  if (st['area'] > cfg.max_subject_area).any() or (st['box'] > cfg.max_subject_box_area).any():
    return 'subject_too_large'
  if (st['border'] > cfg.max_border_touch).any():
    return 'subject_truncated'
  return None


class Deduplicator:
  """Keeps the hashes of kept clips; a clip within `threshold` bits (per frame hash) of one is a duplicate."""

  def __init__(self, threshold: int):
    self.threshold = threshold
    self.hashes: list[np.ndarray] = []

  def is_duplicate(self, h: np.ndarray) -> bool:
    if not self.hashes:
      return False
    d = (np.stack(self.hashes) != h[None]).reshape(len(self.hashes), 3, -1).sum(-1).max(-1)
    return bool((d <= self.threshold).any())

  def add(self, h: np.ndarray) -> None:
    self.hashes.append(h)
