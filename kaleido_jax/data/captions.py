"""Captions for raw videos: a captions jsonl (per video or per time range), a sidecar `clip.txt`, or a captioner.

Lookup order for a window [start, end) seconds of video `rel`: a jsonl line for `rel` whose [start, end) holds
the window's middle; a jsonl line for `rel` without times; the sidecar (`a/clip.mp4` -> `a/clip.txt`); the
captioner (frames -> text), when one is given. jsonl lines: {"video": "a/clip.mp4", "caption": "...",
["start": s, "end": s,] ["subjects": ["a red ball", ...]]} (`subjects`: the phrases the grounder looks for;
without them they come from the caption, grounding.subject_phrases).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np

from kaleido_jax import storage

Captioner = Callable[[np.ndarray], str]  # frames (F, H, W, 3) uint8 -> caption


class CaptionError(ValueError):
  """A captions file that cannot be read; the message names the file and the line."""


class Captions:
  """Captions of the videos under `input_dir` (see module doc)."""

  def __init__(self, input_dir: str, jsonl: str = '', captioner: Captioner | None = None):
    self.input_dir = input_dir
    self.captioner = captioner
    self.lines: dict[str, list[dict[str, Any]]] = {}
    if jsonl:
      for n, raw in enumerate(storage.read_text(jsonl).splitlines()):
          if not raw.strip():
            continue
          try:
            line = json.loads(raw)
            str(line['video']), str(line['caption'])
          except (ValueError, KeyError, TypeError) as e:
            raise CaptionError(f'{jsonl}: line {n + 1} is not {{"video": ..., "caption": ...}} '
                               f'({type(e).__name__}: {e})') from None
          self.lines.setdefault(os.path.normpath(line['video']), []).append(line)

  def lookup(self, rel: str, start: float, end: float, frames: np.ndarray | None = None
             ) -> tuple[str, list[str]] | None:
    """(caption, given subject phrases) for a window of `rel`, or None when nothing captions it."""
    lines = self.lines.get(os.path.normpath(rel), [])
    mid = 0.5 * (start + end)
    timed = [l for l in lines if 'start' in l and float(l['start']) <= mid < float(l.get('end', np.inf))]
    whole = [l for l in lines if 'start' not in l]
    for l in timed + whole:
      return str(l['caption']), [str(p) for p in l.get('subjects', [])]
    sidecar = storage.join(self.input_dir, os.path.splitext(rel)[0] + '.txt')
    if storage.exists(sidecar):
      text = storage.read_text(sidecar).strip()
      if text:
        return text, []
    if self.captioner is not None and frames is not None:
      return str(self.captioner(frames)).strip(), []
    return None


def transformers_captioner(model_dir: str, max_new_tokens: int = 40, frames_used: Sequence[float] = (0.5,)
                           ) -> Captioner:
  """A captioner from a local `transformers` image-to-text model directory (BLIP, GIT, ...): the caption of
  the window's middle frame. torch and transformers are needed only when this is used."""
  if not os.path.isdir(model_dir):
    raise FileNotFoundError(f'captioner directory {model_dir!r} does not exist; set data.prepare.captioner to '
                            'a local transformers model directory (no downloads) or leave it empty')
  import torch  # lazy: optional dependency (a local transformers captioner)
  import transformers  # lazy: optional dependency (a local transformers captioner)
  processor = transformers.AutoProcessor.from_pretrained(model_dir)
  model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir).eval()

  def caption(frames: np.ndarray) -> str:
    picks = [frames[min(int(q * len(frames)), len(frames) - 1)] for q in frames_used]
    inputs = processor(images=list(picks), return_tensors='pt')
    with torch.no_grad():
      ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return processor.batch_decode(ids, skip_special_tokens=True)[0]

  return caption
