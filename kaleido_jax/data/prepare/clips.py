"""Inputs and the per-clip caches: one annotated clip or one raw video from its files through stage 0-2, cached
under `output_dir/_work` (each file appears whole or not at all), so a rerun resumes where a killed one stopped.

Both engines call these per item; every path may be a bucket (storage.py). The stages themselves are stages.py.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import ml_collections
import numpy as np

from kaleido_jax import storage
from kaleido_jax.data import ingest
from kaleido_jax.data import timing
from kaleido_jax.data import video as video_lib
from kaleido_jax.data.prepare import stages


def read_video(path: str) -> np.ndarray:
  """(F, H, W, 3) uint8, every frame of any container FFmpeg reads (mp4 / webm / gif), decoded in-process by
  PyAV (video.decode): an ffmpeg subprocess forked from a Beam worker that holds gRPC threads fails at random."""
  return video_lib.decode(path).frames


def read_masks(line: dict[str, Any], input_dir: str, shape: tuple[int, int, int]) -> np.ndarray:
  """(F, S, H, W) bool from the mask file or the per-frame boxes, in subject order."""
  f, h, w = shape
  subjects = line.get('subjects') or []
  if line.get('masks'):
    z = storage.load_npz(storage.resolve(input_dir, line['masks']))
    mshape = tuple(int(x) for x in z['shape'])
    masks = np.unpackbits(z['bits'])[:int(np.prod(mshape))].reshape(mshape).astype(bool)
    if masks.shape[2:] != (h, w) and masks.shape[0] == f and abs(masks.shape[2] * w - masks.shape[3] * h) <= max(h, w):
      # Grounded at a lower decode resolution (data.prepare.decode_short_side): nearest upsampling.
      yi, xi = np.arange(h) * masks.shape[2] // h, np.arange(w) * masks.shape[3] // w
      masks = masks[:, :, yi][:, :, :, xi]
    if masks.shape[0] != f or masks.shape[2:] != (h, w):
      raise ValueError(f'masks {masks.shape} do not match video {shape}')
    return masks[:, [int(s.get('index', k)) for k, s in enumerate(subjects)]]
  masks = np.zeros((f, len(subjects), h, w), bool)
  for k, s in enumerate(subjects):
    boxes = np.asarray(s['boxes'], np.float32)
    if boxes.shape != (f, 4):
      raise ValueError(f'subject {k}: boxes {boxes.shape}, expected ({f}, 4)')
    for t, (x0, y0, x1, y1) in enumerate(boxes):
      masks[t, k, max(int(y0), 0):int(np.ceil(y1)), max(int(x0), 0):int(np.ceil(x1))] = True
  return masks


def read_line(line: dict[str, Any], input_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
  """(video, masks, subject ids, caption) of one annotation line.

  A line with "fps" (a grounded line, grounding.py) is decoded at that rate and cut to its [start, end) frames,
  so `grounded.jsonl` reads back as input exactly as it was made; otherwise every frame of the file.
  """
  path = storage.resolve(input_dir, line['video'])
  if 'fps' in line:
    frames = video_lib.decode(path, float(line['fps'])).frames
    start, end = int(line.get('start', 0)), int(line.get('end', len(frames)))
    if end > len(frames):
      raise ValueError(f'frames [{start}, {end}) past the end of {line["video"]} ({len(frames)} at {line["fps"]} fps)')
    frames = frames[start:end]
  else:
    frames = read_video(path)
  masks = read_masks(line, input_dir, frames.shape[:3])
  ids = np.asarray([int(s['id']) for s in line.get('subjects') or []], np.int32)
  return frames, masks, ids, str(line['caption'])


def process_clip(line: dict[str, Any], input_dir: str, data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Stage 1 + 2 for one annotated clip: {'drop': reason} or the normalised window, masks, cut-outs and hash."""
  try:
    with timing.stage('decode'):
      video, masks, ids, caption = read_line(line, input_dir)
  except Exception as e:  # pylint: disable=broad-except
    return dict(drop='unreadable', error=f'{type(e).__name__}: {e}'[:300])
  return stages.clip_record(video, masks, ids, caption, data_cfg)


def load_record(work: str, name: str) -> dict[str, Any]:
  """A kept clip's stage 1 + 2 record from its cache under `work` (the Beam engine's examples read them)."""
  return _load_cached(storage.join(work, name + '.npz'))


def _load_cached(path: str) -> dict[str, Any]:
  d = storage.load_npz(path)
  d['caption'] = str(d['caption'])
  return d


def _cached_or(work: str, name: str, make: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
  """A clip's stage 1 + 2 result from the cache under `work`, or made and cached (atomically); (result, resumed)."""
  npz, drop_json = storage.join(work, name + '.npz'), storage.join(work, name + '.drop.json')
  if storage.exists(npz):
    return _load_cached(npz), True
  if storage.exists(drop_json):
    return storage.read_json(drop_json), True
  d = make()
  with timing.stage('write'):
    if 'drop' in d:
      storage.write_json(drop_json, d)
    else:
      storage.save_npz(npz, **d)
  return d, False


def parse_annotations(annotations: str) -> tuple[list[tuple[str, dict]], dict[str, str], dict[str, str], int]:
  """(name, line) per clip to process, {line: drop reason} for unreadable / repeated lines, errors, line count."""
  dropped: dict[str, str] = {}
  errors: dict[str, str] = {}
  entries, seen = [], set()
  raw_lines = [l for l in storage.read_text(annotations).splitlines() if l.strip()]
  for n, raw in enumerate(raw_lines):
    try:
      line = json.loads(raw)
      name = line.get('clip') or os.path.splitext(os.path.basename(line['video']))[0]
    except Exception as e:  # pylint: disable=broad-except
      dropped[f'line_{n}'] = 'unreadable'
      errors[f'line_{n}'] = f'{type(e).__name__}: {e}'[:300]
      continue
    if name in seen:
      dropped[f'{name}#line_{n}'] = 'near_duplicate'
      continue
    seen.add(name)
    entries.append((name, line))
  return entries, dropped, errors, len(raw_lines)


def annotated_one(name: str, line: dict, data_cfg, input_dir: str, work: str) -> tuple[dict[str, Any], bool]:
  """Stage 1 + 2 of one annotated clip, cached: (record or drop dict, resumed)."""
  return _cached_or(work, name, lambda: process_clip(line, input_dir, data_cfg))


class LazyModels:
  """The grounder and captions, built on first use (a fully resumed run loads no model)."""

  def __init__(self, cfg, input_dir):
    self.cfg, self.input_dir, self.value = cfg, input_dir, None

  def get(self):
    if self.value is None:
      self.value = ingest.make_grounder(self.cfg), ingest.make_captions(self.cfg, self.input_dir)
    return self.value


def ground_one(rel: str, data_cfg, input_dir: str, output_dir: str, work: str, models: LazyModels):
  """One raw video through stage 0-2 (ingest.py), cached: (summary, {window: record or drop dict}, resumed).

  The summary (grounded lines, drops, shot count, error) is cached in `work/videos/` after every window's
  record is cached like an annotated clip's, so a run killed anywhere redoes at most the video it was in.
  """
  stem = ingest.source_name(rel)
  cache = storage.join(work, 'videos', stem + '.json')
  windows = None
  if storage.exists(cache):
    done = storage.read_json(cache)
  else:
    grounder, captions = models.get()
    try:
      done, windows = ingest.ground_video(rel, input_dir, data_cfg, grounder, captions,
                                          storage.join(output_dir, 'grounded'))
    except video_lib.VideoError as e:
      done, windows = dict(lines=[], drops={stem: 'unreadable'}, shots=0, error=str(e)[:300]), []
  made = {w[0]: w for w in windows or []}
  records = {}
  for line in done['lines']:
    name = line['clip']
    if name in made:
      _, frames, masks, window = made[name]
      ids = np.asarray([s['id'] for s in line['subjects']], np.int32)
      make = lambda f=frames, m=masks, i=ids, c=line['caption'], w=window: stages.clip_record(f, m, i, c, data_cfg, w)
    else:  # resumed video, window not cached: read it back from its grounded line
      make = lambda line=line: process_clip(line, input_dir, data_cfg)
    records[name], _ = _cached_or(work, name, make)
  if not storage.exists(cache):
    storage.path(cache).parent.mkdir(parents=True, exist_ok=True)
    storage.write_json(cache, done)
  return done, records, windows is None


def video_drops(done: dict[str, Any]) -> list[tuple[str, str, str]]:
  """(name, reason, error or '') of a grounded video's drops; an undecodable video's error goes with its one drop."""
  return [(name, reason, done.get('error', '')) for name, reason in done['drops'].items()]


def cached_drops(work: str) -> dict[str, str]:
  """{clip or video: reason} of every drop the per-clip / per-video caches under `work` hold."""
  out = {}
  for name in storage.listdir(work):
    if name.endswith('.drop.json'):
      out[name[:-len('.drop.json')]] = storage.read_json(storage.join(work, name))['drop']
  videos = storage.join(work, 'videos')
  for name in storage.listdir(videos):
    if name.endswith('.json'):
      out.update(storage.read_json(storage.join(videos, name))['drops'])
  return out
