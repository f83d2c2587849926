"""Raw videos -> grounded clips: decode, cut into shots, caption, ground, identify subjects, slice into windows.

The stage `prepare` runs before its filters when `data.prepare.grounding` is not 'none'. Per source video it
writes one grounded annotation line per training window, in the `annotations.jsonl` format plus "fps", "start"
and "end" (frames at that rate), with masks in `output_dir/grounded/`: `prepare` assembles them into
`output_dir/grounded.jsonl`, which reads back as the input of a run with grounding='none' (inspect, correct,
reuse). Subject ids are per source video (grounding.assign_identities), so cross-pairing draws a subject's
references from its other shots.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from kaleido_jax import storage
from kaleido_jax.data import captions as captions_lib
from kaleido_jax.data import grounding
from kaleido_jax.data import timing
from kaleido_jax.data import video as video_lib

GROUNDINGS = ('none', 'motion', 'people', 'transformers', 'auto')


def make_grounder(cfg: ml_collections.ConfigDict) -> grounding.Grounder:
  """The grounder `data.prepare.grounding` names (not 'none'). 'auto': people and faces (offline models), then
  the other subjects from the transformers detector where its directory is given, else from motion."""
  if cfg.grounding == 'motion':
    return grounding.MotionGrounder(threshold=cfg.motion_threshold, min_area=cfg.min_subject_area,
                                    max_tracks=cfg.max_tracks, max_box_area=cfg.max_subject_box_area)
  if cfg.grounding == 'people':
    from kaleido_jax.data import grounding_people  # lazy: optional (dlib, OpenCV; the grounding extra)
    return grounding_people.PersonGrounder(max_tracks=cfg.max_tracks, identity=cfg.face_identity_threshold)
  if cfg.grounding == 'transformers':
    from kaleido_jax.data import grounding_transformers  # lazy: optional (torch, transformers)
    return grounding_transformers.TransformersGrounder(cfg.detector_dir, cfg.segmenter_dir,
                                                       box_threshold=cfg.box_threshold, max_tracks=cfg.max_tracks)
  if cfg.grounding == 'auto':
    others = make_grounder(dict_with(cfg, grounding='transformers' if cfg.detector_dir else 'motion'))
    return grounding.CombinedGrounder([make_grounder(dict_with(cfg, grounding='people')), others],
                                      max_tracks=cfg.max_tracks)
  raise ValueError(f'data.prepare.grounding={cfg.grounding!r}; use one of {GROUNDINGS}')


def dict_with(cfg: ml_collections.ConfigDict, **changes: Any) -> ml_collections.ConfigDict:
  out = cfg.copy_and_resolve_references()
  out.update(changes)
  return out


def make_captions(cfg: ml_collections.ConfigDict, input_dir: str) -> captions_lib.Captions:
  captioner = captions_lib.transformers_captioner(cfg.captioner) if cfg.captioner else None
  return captions_lib.Captions(input_dir, cfg.captions, captioner)


def source_name(rel: str) -> str:
  """A file-name-safe stem for a video path relative to the input directory."""
  return os.path.splitext(rel)[0].replace(os.sep, '__').replace(' ', '_')


def caption_from_phrases(phrases: list[str]) -> str:
  """['a person', 'a person'] -> 'A person and a person.' (data.prepare.caption_from_subjects)."""
  text = ', '.join(phrases[:-1]) + (' and ' if len(phrases) > 1 else '') + phrases[-1]
  return text[0].upper() + text[1:] + '.'


def _boxes(boxes: np.ndarray) -> list:
  return [None if np.isnan(bx).any() else [round(float(v), 1) for v in bx] for bx in boxes]


def _pack(masks: np.ndarray) -> dict[str, np.ndarray]:
  return dict(shape=np.asarray(masks.shape), bits=np.packbits(masks.astype(bool).ravel()))


def ground_video(rel: str, input_dir: str, data_cfg: ml_collections.ConfigDict, grounder: grounding.Grounder,
                 captions: captions_lib.Captions, masks_dir: str
                 ) -> tuple[dict[str, Any], list[tuple[str, np.ndarray, np.ndarray, tuple[int, int]]]]:
  """One source video -> (summary, windows).

  summary: {'lines': grounded lines (one per window), 'drops': {shot or window: reason}, 'shots': count};
  windows: (name, shot frames, shot masks (F, S, H, W), window within the shot), so that `prepare` takes the
  cut-outs' far frame from anywhere in the shot, never across a cut. Raises video.VideoError when the file
  cannot be decoded.
  """
  cfg = data_cfg.prepare
  stem = source_name(rel)
  with timing.stage('decode'):
    d = video_lib.decode(storage.join(input_dir, rel), cfg.fps, short_side=cfg.decode_short_side)
  with timing.stage('shots'):
    cuts = video_lib.shot_cuts(d.frames, threshold=cfg.shot_threshold)
  drops: dict[str, str] = {}
  shots = []  # (index, start, end, caption, frames, tracks)
  ranges = video_lib.shots(len(d.frames), cuts)
  for j, (a, b) in enumerate(ranges):
    name = f'{stem}_s{j:03d}'
    if not video_lib.windows(a, b, data_cfg.num_frames, cfg.window_stride):
      drops[name] = 'too_short'
      continue
    frames = d.frames[a:b]
    with timing.stage('captions'):
      found = captions.lookup(rel, a / d.fps, b / d.fps, frames)
    if found is None and not cfg.caption_from_subjects:
      drops[name] = 'no_caption'
      continue
    if found is None:  # asked for (caption_from_subjects): the grounded subjects' phrases make the caption
      with timing.stage('grounding'):
        tracks = grounder(frames, [])
      named = [t.phrase for t in tracks if t.phrase]
      if not named:
        drops[name] = 'no_caption'
        continue
      text = caption_from_phrases(named)
    else:
      text, phrases = found
      with timing.stage('grounding'):
        tracks = grounder(frames, phrases or grounding.subject_phrases(text, data_cfg.max_subjects))
    shots.append((j, a, b, text, frames, tracks))
  with timing.stage('identity'):
    grounding.assign_identities(stem, [(s[4], s[5]) for s in shots], threshold=cfg.identity_threshold)
  lines, windows = [], []
  for j, a, b, text, frames, tracks in shots:
    for w, (s, e) in enumerate(video_lib.windows(a, b, data_cfg.num_frames, cfg.window_stride)):
      name = f'{stem}_s{j:03d}_w{w:03d}'
      present = [t for t in tracks if t.presence[s - a:e - a].mean() >= 0.5]
      if not present:
        drops[name] = 'no_subject'
        continue
      masks = np.stack([t.masks for t in present], 1)
      storage.path(masks_dir).mkdir(parents=True, exist_ok=True)
      mpath = storage.join(masks_dir, f'{name}.masks.npz')
      with timing.stage('write'):
        storage.save_npz(mpath, compressed=True, **_pack(masks[s - a:e - a]))
      subjects = [dict(id=int(t.subject_id), index=k, phrase=t.phrase, score=round(float(t.score), 4),
                       grounder=t.grounder, boxes=_boxes(t.boxes[s - a:e - a]),
                       **({} if t.face_boxes is None else {'face_boxes': _boxes(t.face_boxes[s - a:e - a])}))
                  for k, t in enumerate(present)]
      lines.append(dict(video=rel, fps=d.fps, start=s, end=e, caption=text, subjects=subjects,
                        masks=storage.absolute(mpath), clip=name))
      windows.append((name, frames, masks, (s - a, e - a)))
  return dict(lines=lines, drops=drops, shots=len(ranges)), windows
