"""Cross-pairing: references for a target clip come from *other* clips of the same subject id.

Kaleido's point (DESIGN.md, "Data construction"): a reference cut from the target clip itself lets the model
copy-paste; one from another clip forces it to learn the identity. When no other clip holds the subject, the
fallback is the target clip's frame farthest from the training window, augmented (mirror, rotation, scale).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image


def build_index(clip_subjects: dict[str, Sequence[int]]) -> dict[int, list[str]]:
  """subject id -> clip names (sorted, so the pairing does not depend on processing order)."""
  index: dict[int, list[str]] = {}
  for name in sorted(clip_subjects):
    for sid in clip_subjects[name]:
      index.setdefault(int(sid), []).append(name)
  return index


def pick_references(target: str, subject_ids: Sequence[int], index: dict[int, list[str]],
                    rng: np.random.Generator, per_subject: int = 1) -> list[dict[str, Any]]:
  """Reference sources: {'slot', 'subject_id', 'clip', 'mode'}; mode 'cross' or 'far_frame'.

  Up to `per_subject` distinct other clips per subject (the loader samples one per epoch); never the target
  clip in 'cross' mode; one 'far_frame' entry for a subject no other clip holds.
  """
  out = []
  for slot, sid in enumerate(subject_ids):
    others = [c for c in index.get(int(sid), []) if c != target]
    if others:
      for j in rng.choice(len(others), size=min(per_subject, len(others)), replace=False):
        out.append(dict(slot=slot, subject_id=int(sid), clip=str(others[int(j)]), mode='cross'))
    else:
      out.append(dict(slot=slot, subject_id=int(sid), clip=target, mode='far_frame'))
  return out


def far_frame(num_frames: int, window: tuple[int, int]) -> int:
  """The frame farthest from the window [start, stop) (an end of the window when the clip is the window)."""
  start, stop = window
  if start > 0 or stop < num_frames:
    return 0 if start >= num_frames - stop else num_frames - 1
  return 0


def augment_reference(ref: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Fallback-reference augmentation: mirror, small rotation and scale on white (identity-safe geometry)."""
  h, w = ref.shape[:2]
  img = Image.fromarray(ref[:, ::-1] if rng.random() < 0.5 else ref)
  img = img.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR, fillcolor=(255, 255, 255))
  s = float(rng.uniform(0.8, 1.0))
  small = img.resize((max(1, int(w * s)), max(1, int(h * s))), Image.BILINEAR)
  canvas = Image.new('RGB', (w, h), (255, 255, 255))
  canvas.paste(small, ((w - small.width) // 2, (h - small.height) // 2))
  return np.asarray(canvas)
