"""OpenS2V-Eval's NexusScore: is each reference subject in the video, and is it the same subject?

As the benchmark's `eval/get_nexusscore.py` computes it (PKU-YuanGroup/OpenS2V-Nexus b452831; v1.1, 8cb7427,
changed only its bookkeeping):
- 32 frames at `np.linspace(0, n - 1, 32, dtype=int)`;
- the id's references are `zip(img_paths, class_label)`; in an id whose name holds "face" a reference labelled
  "Man" or "Woman" is skipped, in one whose name holds "human" such a label becomes "human";
- every (frame, reference): YOLO-World with the reference as its image prompt (eval/yoloworld.py) gives boxes and
  confidences; a pair with at least one box counts once in `frame_obj`; each box's crop of the frame
  (`PIL.Image.crop`, which rounds the box) is a "local image";
- GME-Qwen2-VL embeds each reference image and each crop as corpus images and each label as a query under
  "Find an image that matches the given text."; per crop, image score = <reference, crop> and text score =
  <label, crop>;
- NexusScore = the mean image score over the crops with box confidence > 0.6, text score > 0.30 and image
  score != 0, divided by `frame_obj`; 0 when no crop passes.

A video in which no reference is found in any frame makes the benchmark's script fail (GME gets an empty list) and
leave the id out of `nexusscore.json`; here it is left out too and named in the run's problems.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

NUM_FRAMES = 32
BOX_CONFIDENCE = 0.6
TEXT_SCORE = 0.30
PERSON_LABELS = ('Man', 'Woman')
QUERY_INSTRUCTION = 'Find an image that matches the given text.'


def references_scored(video_id: str, references: Sequence[str], labels: Sequence[str]) -> list[tuple[str, str]]:
  """(reference, label) pairs the script scores for this id, labels rewritten as it rewrites them."""
  out = []
  for ref, label in zip(references, labels):
    if 'face' in video_id and label in PERSON_LABELS:
      continue
    if 'human' in video_id and label in PERSON_LABELS:
      label = 'human'
    out.append((ref, label))
  return out


def crop(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
  """`frame.crop((x1, y1, x2, y2))` as the script does it on the PIL frame (PIL rounds the coordinates)."""
  return np.asarray(Image.fromarray(np.asarray(frame, np.uint8)).crop(tuple(float(v) for v in box)))


def score(confidences: Sequence[float], image_scores: Sequence[float], text_scores: Sequence[float],
          frame_obj: int) -> float:
  """The script's reduction (module docstring)."""
  kept = [i for c, t, i in zip(confidences, text_scores, image_scores)
          if c > BOX_CONFIDENCE and t > TEXT_SCORE and i != 0]
  return float(np.mean(kept)) / frame_obj if kept else 0.0


class BoxWithoutArea(ValueError):
  """A kept box rounds to an empty crop: the benchmark's script fails on the video (GME cannot resize it)."""


class NexusScorer:
  """video frames (F, H, W, 3) RGB uint8, its references (RGB) and labels -> NexusScore, or None when no reference
  is found in any frame (the benchmark leaves such an id out)."""

  def __init__(self, detector, embedder, num_frames: int = NUM_FRAMES):
    """`detector`: eval.yoloworld.Detector; `embedder`: eval.gme.GmeScorer (image_embeddings, text_embedding)."""
    self.detector, self.embedder, self.num_frames = detector, embedder, num_frames

  def __call__(self, video_id: str, frames: np.ndarray, references: Sequence[np.ndarray],
               labels: Sequence[str]) -> float | None:
    pairs = references_scored(video_id, list(range(len(references))), labels)
    if not pairs:
      return None
    refs = [references[r] for r, _ in pairs]
    idx = np.linspace(0, len(frames) - 1, self.num_frames, dtype=int)
    found = self.detector([frames[i] for i in idx], self.detector.prompts(refs))
    crops, which, confidences, frame_obj = [], [], [], 0
    for i, per_ref in zip(idx, found):
      for r, (boxes, scores) in enumerate(per_ref):
        confidences.extend(float(s) for s in scores)
        frame_obj += bool(len(boxes))
        for box in boxes:
          piece = crop(frames[i], box)
          if piece.size == 0:
            raise BoxWithoutArea(f'a box of no area ({box.round(2).tolist()}): the benchmark\'s script fails on '
                                 'this video')
          crops.append(piece)
          which.append(r)
    if not crops:
      return None
    e_crops = self.embedder.image_embeddings(crops)
    e_refs = self.embedder.image_embeddings(refs)
    texts = {label: self.embedder.text_embedding(label, QUERY_INSTRUCTION) for _, label in pairs}
    e_labels = np.stack([texts[pairs[r][1]] for r in range(len(pairs))])
    which = np.asarray(which)
    image_scores = np.sum(e_refs[which] * e_crops, axis=-1)
    text_scores = np.sum(e_labels[which] * e_crops, axis=-1)
    return score(confidences, image_scores, text_scores, frame_obj)
