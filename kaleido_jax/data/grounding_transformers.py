"""An open-vocabulary grounder from local `transformers` models: a zero-shot detector prompted with the subject
phrases (OWLv2 / OWL-ViT, or Grounding DINO) and SAM masks from the detected boxes.

The detector runs every `detect_every` frames (boxes in between are interpolated); per phrase, the track takes in
each frame the detection that best combines score and overlap with its box in the previous detected frame, so a
phrase's track does not jump between two look-alikes. SAM (`SamModel`) turns each box into a mask; without a
segmenter directory the masks are the boxes. Nothing is downloaded: both directories must exist locally. torch and
transformers are needed only when this grounder is used (the `test` extra has them; they are not runtime
dependencies of kaleido_jax).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from kaleido_jax.data import grounding


def _require_dir(path: str, what: str) -> None:
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f'{what} directory {path!r} does not exist; give a local transformers model directory '
                            '(save_pretrained output), nothing is downloaded')


class TransformersGrounder:
  """grounding='transformers' (see module doc)."""

  def __init__(self, detector_dir: str, segmenter_dir: str = '', *, box_threshold: float = 0.2,
               max_tracks: int = 4, detect_every: int = 1):
    _require_dir(detector_dir, 'data.prepare.detector_dir')
    if segmenter_dir:
      _require_dir(segmenter_dir, 'data.prepare.segmenter_dir')
    import transformers  # lazy: optional dependency (torch / transformers, grounding=transformers)
    self.processor = transformers.AutoProcessor.from_pretrained(detector_dir)
    self.detector = transformers.AutoModelForZeroShotObjectDetection.from_pretrained(detector_dir).eval()
    self.dino = 'grounding' in self.detector.config.model_type
    text_config = getattr(self.detector.config, 'text_config', None)
    self.text_length = int(getattr(text_config, 'max_position_embeddings', 16))  # OWL: 16 text positions
    self.sam = self.sam_processor = None
    if segmenter_dir:
      self.sam_processor = transformers.SamProcessor.from_pretrained(segmenter_dir)
      self.sam = transformers.SamModel.from_pretrained(segmenter_dir).eval()
    self.box_threshold, self.max_tracks, self.detect_every = box_threshold, max_tracks, max(1, detect_every)

  def detect(self, frame: np.ndarray, phrases: Sequence[str]) -> list[tuple[int, float, np.ndarray]]:
    """[(phrase index, score, box x0, y0, x1, y1 in pixels)] above the threshold in one frame."""
    import torch  # lazy: optional dependency (torch / transformers, grounding=transformers)
    h, w = frame.shape[:2]
    if self.dino:  # Grounding DINO: one lower-case text, phrases ended by '.'
      inputs = self.processor(images=frame, text='. '.join(p.lower() for p in phrases) + '.', return_tensors='pt')
    else:  # OWL-ViT / OWLv2: a list of queries per image
      inputs = self.processor(text=[list(phrases)], images=[frame], return_tensors='pt', padding='max_length',
                              truncation=True, max_length=self.text_length)
    with torch.no_grad():
      outputs = self.detector(**inputs)
    if self.dino:
      res = self.processor.post_process_grounded_object_detection(
          outputs, inputs.input_ids, threshold=self.box_threshold, text_threshold=self.box_threshold,
          target_sizes=[(h, w)])[0]
      names = [p.lower() for p in phrases]
      labels = [max(range(len(names)), key=lambda k: _overlap(str(t), names[k])) for t in res['text_labels']]
      out = []
      for lab, sc, bx in zip(labels, res['scores'].numpy(), res['boxes'].numpy()):
        out.append((lab, float(sc), bx))
    else:
      # OWL's post-processing labels each box with its best query only; a phrase that is never the best would
      # get nothing. So each phrase is post-processed on its own logits column.
      logits, out = outputs.logits, []
      for k, phrase in enumerate(phrases):
        outputs.logits = logits[..., k:k + 1]
        res = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.box_threshold, target_sizes=[(h, w)], text_labels=[[phrase]])[0]
        out += [(k, float(sc), bx) for sc, bx in zip(res['scores'].numpy(), res['boxes'].numpy())]
      outputs.logits = logits
    dets = []
    for k, sc, b in out:
      b = np.asarray(b, np.float32).copy()
      b[[0, 2]], b[[1, 3]] = b[[0, 2]].clip(0, w), b[[1, 3]].clip(0, h)
      if b[2] > b[0] and b[3] > b[1]:
        dets.append((k, sc, b))
    return dets

  def segment(self, frame: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(n, H, W) bool masks of the boxes (n, 4): SAM's, or the boxes themselves."""
    h, w = frame.shape[:2]
    out = np.zeros((len(boxes), h, w), bool)
    if self.sam is None or not len(boxes):
      for k, (x0, y0, x1, y1) in enumerate(boxes):
        out[k, int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
      return out
    import torch  # lazy: optional dependency (torch / transformers, grounding=transformers)
    inputs = self.sam_processor(images=frame, input_boxes=[[[float(v) for v in b] for b in boxes]],
                                return_tensors='pt')
    with torch.no_grad():
      outputs = self.sam(**inputs, multimask_output=False)
    masks = self.sam_processor.image_processor.post_process_masks(
        outputs.pred_masks, inputs['original_sizes'], inputs['reshaped_input_sizes'])[0]
    return masks[:, 0].numpy().astype(bool)

  def __call__(self, frames: np.ndarray, phrases: Sequence[str]) -> list[grounding.Track]:
    phrases = list(phrases)[:self.max_tracks]
    if not phrases:
      return []
    f = len(frames)
    keys = sorted(set(range(0, f, self.detect_every)) | {f - 1})
    boxes = np.full((len(phrases), f, 4), np.nan, np.float32)
    scores = np.zeros((len(phrases), f), np.float32)
    prev: list[np.ndarray | None] = [None] * len(phrases)
    for t in keys:
      dets = self.detect(frames[t], phrases)
      for k in range(len(phrases)):
        cands = [(s * (1 + (grounding.box_iou(b, prev[k]) if prev[k] is not None else 0.0)), s, b)
                 for j, s, b in dets if j == k]
        if cands:
          _, s, b = max(cands, key=lambda c: c[0])
          boxes[k, t], scores[k, t], prev[k] = b, s, b
    tracks = []
    for k, phrase in enumerate(phrases):
      seen = ~np.isnan(boxes[k, :, 0])
      if not seen.any():
        continue
      idx = np.nonzero(seen)[0]
      for c in range(4):  # between detected key frames, boxes are interpolated (not past the ends)
        between = (np.arange(f) >= idx[0]) & (np.arange(f) <= idx[-1])
        boxes[k, between, c] = np.interp(np.arange(f)[between], idx, boxes[k, idx, c])
      tracks.append((k, phrase))
    masks = np.zeros((len(phrases), f) + frames.shape[1:3], bool)
    for t in range(f):
      live = [k for k, _ in tracks if not np.isnan(boxes[k, t, 0])]
      if live:
        masks[live, t] = self.segment(frames[t], boxes[live, t])
    return [grounding.Track(boxes=np.stack([grounding.mask_box(m) for m in masks[k]]), masks=masks[k],
                            phrase=phrase, score=float(scores[k][scores[k] > 0].mean()))
            for k, phrase in tracks]


def _overlap(a: str, b: str) -> int:
  return len(set(a.split()) & set(b.split()))
