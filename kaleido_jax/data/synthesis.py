"""Diverse synthesis: new training clips from a kept clip and its subject masks.

Background disentanglement in Kaleido's recipe: the subject must not be tied to its original scene, so kept
clips are re-rendered with a replaced background, a global geometric change (scale / rotation / mirror / crop;
the caption's left/right words are swapped on a mirror), an identity-safe colour jitter (brightness and
contrast only, never hue, so the subject's colours still match its references) and multi-subject composition
(another clip's subjects pasted on top, with their ids and captions added).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np


def procedural_background(num_frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
  """A panning two-colour gradient with waves and grain: (F, H, W, 3) float32 in 0..255."""
  t = (np.arange(num_frames, dtype=np.float32) / max(num_frames - 1, 1))[:, None, None]
  yy = ((np.arange(height, dtype=np.float32) + 0.5) / height)[None, :, None]
  xx = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, None, :]
  c0, c1 = rng.uniform(40, 240, 3).astype(np.float32), rng.uniform(40, 240, 3).astype(np.float32)
  a, f, pan = rng.uniform(0, 2 * np.pi), rng.uniform(1, 5, 2), rng.uniform(-0.2, 0.2, 2)
  bx, by = xx + pan[0] * t, yy + pan[1] * t
  g = np.clip(0.5 + 0.7 * (np.cos(a) * (bx - 0.5) + np.sin(a) * (by - 0.5)), 0, 1)[..., None]
  wave = (rng.uniform(5, 20) * np.sin(2 * np.pi * f[0] * bx) * np.cos(2 * np.pi * f[1] * by))[..., None]
  grain = rng.normal(0, 5, (height, width, 3)).astype(np.float32)
  return c0 * (1 - g) + c1 * g + wave + grain


def replace_background(video: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  fg = masks.any(1)[..., None]
  bg = procedural_background(*video.shape[:3], rng)
  return np.where(fg, video, np.clip(bg, 0, 255).astype(np.uint8))


def geometric(video: np.ndarray, masks: np.ndarray, rng: np.random.Generator, *, max_rotation: float = 10.0,
              zoom: tuple[float, float] = (1.0, 1.25)) -> tuple[np.ndarray, np.ndarray, bool]:
  """One random zoom + rotation + optional mirror + crop offset for the whole clip (nearest sampling)."""
  f, h, w = video.shape[:3]
  z = rng.uniform(*zoom)
  r = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
  flip = bool(rng.random() < 0.5)
  slack = (1 - 1 / z) / 2
  cx, cy = 0.5 + rng.uniform(-slack, slack), 0.5 + rng.uniform(-slack, slack)
  yy, xx = np.meshgrid((np.arange(h) + 0.5) / h - 0.5, (np.arange(w) + 0.5) / w - 0.5, indexing='ij')
  if flip:
    xx = -xx
  sx = (np.cos(r) * xx * w - np.sin(r) * yy * h) / z / w + cx
  sy = (np.sin(r) * xx * w + np.cos(r) * yy * h) / z / h + cy
  ix, iy = np.floor(sx * w).astype(np.int64), np.floor(sy * h).astype(np.int64)
  inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  ix, iy = np.clip(ix, 0, w - 1), np.clip(iy, 0, h - 1)
  return video[:, iy, ix], masks[:, :, iy, ix] & inside, flip


def colour_jitter(video: np.ndarray, rng: np.random.Generator, *, brightness: float = 0.1,
                  contrast: float = 0.1) -> np.ndarray:
  """Brightness / contrast only (hue and saturation are identity, so they are never touched)."""
  x = video.astype(np.float32)
  mean = x.mean()
  x = (x - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
  x = x * rng.uniform(1 - brightness, 1 + brightness)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def compose(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
  """Paste `other`'s visible subjects onto `base` (on top); ids and captions are merged, masks re-occluded."""
  top = other['masks'].any(1)
  video = np.where(top[..., None], other['video'], base['video'])
  masks = np.concatenate([base['masks'] & ~top[:, None], other['masks']], axis=1)
  ids = np.concatenate([base['subject_ids'], other['subject_ids']]).astype(np.int32)
  cap = base['caption'].rstrip('.') + '; meanwhile ' + other['caption'][0].lower() + other['caption'][1:]
  return dict(video=video, masks=masks, subject_ids=ids, caption=cap)


def mirror_caption(text: str) -> str:
  swap = {'left': 'right', 'right': 'left', 'Left': 'Right', 'Right': 'Left'}
  return re.sub(r'\b(left|right|Left|Right)\b', lambda m: swap[m.group(0)], text)


def synthesize(clip: dict[str, Any], rng: np.random.Generator, other: dict[str, Any] | None = None,
               max_subjects: int | None = None) -> dict[str, Any]:
  """One synthesised variant of `clip` (video, masks, subject_ids, caption) and the list of ops applied.

  `other` (a different kept clip with disjoint subject ids) is composed in when the subject count allows.
  """
  ops = []
  out = dict(video=clip['video'], masks=clip['masks'], subject_ids=clip['subject_ids'], caption=clip['caption'])
  if (other is not None and not set(map(int, other['subject_ids'])) & set(map(int, clip['subject_ids'])) and
      (max_subjects is None or len(clip['subject_ids']) + len(other['subject_ids']) <= max_subjects)):
    out = compose(out, other)
    ops.append('compose')
  out['video'] = replace_background(out['video'], out['masks'], rng)
  ops.append('background')
  out['video'], out['masks'], flip = geometric(out['video'], out['masks'], rng)
  ops.append('geometric')
  if flip:
    out['caption'] = mirror_caption(out['caption'])
    ops.append('mirror')
  out['video'] = colour_jitter(out['video'], rng)
  ops.append('colour')
  out['ops'] = ops
  return out
