"""The per-clip stages as pure functions of arrays and names: the filters and cut-outs of one clip (stage 1 + 2),
near-duplicates, the plan of examples and each example's synthesis and cross-paired references (stage 3 + 4).

Nothing here reads or writes files; both engines (local.py, beam.py) call these on records clips.py hands them.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Callable

import ml_collections
import numpy as np
from PIL import Image

from kaleido_jax.data import filters
from kaleido_jax.data import pairing
from kaleido_jax.data import synthesis
from kaleido_jax.data import synthetic
from kaleido_jax.data import timing

VideoEncoder = Callable[[np.ndarray], np.ndarray]  # (F, H, W, 3) float32 [-1, 1] -> latents (f, h, w, c)
TextEncoder = Callable[[str], np.ndarray]          # caption -> (L, D) float32


def _rng(seed: int, *keys: str) -> np.random.Generator:
  return np.random.default_rng([seed] + [zlib.crc32(k.encode()) for k in keys])


def _resize(video: np.ndarray, masks: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Centre-crop to the target aspect, then resize (bilinear frames, nearest masks)."""
  f, h, w = video.shape[:3]
  if (h, w) == (height, width):
    return video, masks
  if h * width > w * height:
    ch, cw = int(round(w * height / width)), w
  else:
    ch, cw = h, int(round(h * width / height))
  t, l = (h - ch) // 2, (w - cw) // 2
  video, masks = video[:, t:t + ch, l:l + cw], masks[:, :, t:t + ch, l:l + cw]
  v = np.stack([np.asarray(Image.fromarray(x).resize((width, height), Image.BILINEAR)) for x in video])
  yi = (np.arange(height) * ch // height)
  xi = (np.arange(width) * cw // width)
  return v, masks[:, :, yi][:, :, :, xi]


def clip_record(video: np.ndarray, masks: np.ndarray, ids: np.ndarray, caption: str,
                data_cfg: ml_collections.ConfigDict, window: tuple[int, int] | None = None) -> dict[str, Any]:
  """Filters, then the training window (centred unless given), its masks and the subjects' cut-outs."""
  cfg = data_cfg.prepare
  with timing.stage('filters'):
    reason = filters.check_clip(video, masks, cfg)
  if reason:
    return dict(drop=reason)
  with timing.stage('cut-outs'):
    return _windowed_record(video, masks, ids, caption, data_cfg, window)


def _windowed_record(video, masks, ids, caption, data_cfg, window):
  cfg = data_cfg.prepare
  nf = data_cfg.num_frames
  if window is None:
    start = (len(video) - nf) // 2
    window = (start, start + nf)
  start = window[0]
  far = pairing.far_frame(len(video), window)
  v, m = _resize(video, masks, data_cfg.height, data_cfg.width)
  size = (data_cfg.height, data_cfg.width)
  win_v, win_m = v[start:start + nf], m[start:start + nf]
  cut, cut_frame, far_cut = [], [], []
  for k in range(len(ids)):
    best = int(np.argmax(win_m[:, k].sum((1, 2))))
    cut.append(synthetic.cutout(win_v[best], win_m[best, k], size, cfg.cutout_margin))
    cut_frame.append(start + best)
    far_cut.append(synthetic.cutout(v[far], m[far, k], size, cfg.cutout_margin))
  return dict(video=win_v, masks=win_m, subject_ids=ids, caption=caption, hash=filters.video_hash(win_v),
              cutouts=np.stack(cut), cutout_frames=np.asarray(cut_frame, np.int32), far_cutouts=np.stack(far_cut),
              far_frame=np.int32(far))


def references(target: str, ids: np.ndarray, index: dict[int, list[str]], clips: dict[str, dict],
                rng: np.random.Generator, exclude: tuple[str, ...] = (),
                per_subject: int = 1) -> tuple[np.ndarray, list[dict]]:
  picks = pairing.pick_references(target, ids, {k: [c for c in v if c not in exclude] for k, v in index.items()},
                                  rng, per_subject)
  refs, prov = [], []
  for p in picks:
    if p['mode'] == 'far_frame':  # the clip the subject's pixels came from (a composed subject's own clip)
      p['clip'] = next(c for c in (target,) + exclude if p['subject_id'] in clips[c]['subject_ids'])
    src = clips[p['clip']]
    k = int(np.nonzero(src['subject_ids'] == p['subject_id'])[0][0])
    if p['mode'] == 'cross':
      refs.append(src['cutouts'][k])
      prov.append(dict(p, frame=int(src['cutout_frames'][k])))
    else:
      refs.append(pairing.augment_reference(src['far_cutouts'][k], rng))
      prov.append(dict(p, frame=int(src['far_frame'])))
  return np.stack(refs), prov


def near_duplicates(hashes: dict[str, np.ndarray], threshold: int) -> dict[str, str]:
  """In name order, a clip close to an already kept one is a near-duplicate: {name: 'near_duplicate'}."""
  dedup = filters.Deduplicator(threshold)
  out = {}
  for name in sorted(hashes):
    if dedup.is_duplicate(hashes[name]):
      out[name] = 'near_duplicate'
    else:
      dedup.add(hashes[name])
  return out


def plan_examples(names: list[str], seed: int, synth_per_clip: int) -> list[tuple[str, str, int, str]]:
  """(key, target name, variant, other name or '') of every example, from the sorted kept names."""
  plan = []
  for name in names:
    plan.append((name, name, 0, ''))
    for j in range(synth_per_clip):
      rng = _rng(seed, name, 'other', str(j))
      other = names[int(rng.integers(len(names)))] if len(names) > 1 else ''
      plan.append((f'{name}~s{j}', name, j + 1, other if other != name else ''))
  return plan


def shot_of(name: str) -> str:
  """The shot a grounded window belongs to (`<source>_s<shot>_w<window>`); any other clip is its own."""
  head, sep, tail = name.rpartition('_w')
  return head if sep and tail.isdigit() and '_s' in head else name


def shot_mates(names: list[str]) -> dict[str, tuple[str, ...]]:
  out: dict[str, list[str]] = {}
  for k in sorted(names):
    out.setdefault(shot_of(k), []).append(k)
  return {k: tuple(v) for k, v in out.items()}


def make_example(entry: tuple[str, str, int, str], clips: dict[str, dict], index: dict[int, list[str]],
                 mates: tuple[str, ...], data_cfg, seed: int, video_encoder: VideoEncoder | None = None,
                 text_encoder: TextEncoder | None = None) -> dict[str, Any]:
  """Stage 3 + 4 for one planned example: synthesis (variant > 0), cross-paired references, encoders.

  `clips` maps a clip name to its record: a dict here, the per-clip caches read on demand on Beam; it is read
  for the target, `other` and the references picked.
  """
  key, name, variant, other = entry
  cfg = data_cfg.prepare
  rng = _rng(seed, key)
  c = clips[name]
  ex = dict(video=c['video'], masks=c['masks'], subject_ids=c['subject_ids'], caption=c['caption'], ops=[])
  exclude: tuple[str, ...] = ()
  if variant:
    o = dict(clips[other], caption=clips[other]['caption']) if other else None
    with timing.stage('synthesis'):
      ex = synthesis.synthesize(c, rng, o, max_subjects=data_cfg.max_subjects)
    if 'compose' in ex['ops']:
      exclude = (other,)
  # Windows of one shot are one clip to cross-pairing: never each other's references.
  exclude += tuple(o for o in mates if o != name)
  with timing.stage('pairing'):
    refs, prov = references(name, ex['subject_ids'], index, clips, rng, exclude, cfg.refs_per_subject)
  out = dict(video=ex['video'], refs=refs, ref_slots=np.asarray([p['slot'] for p in prov], np.int32),
             subject_ids=np.asarray(ex['subject_ids'], np.int32),
             caption=ex['caption'], clip_id=key, pairing=json.dumps(prov), synthesis=json.dumps(ex['ops']))
  with timing.stage('encode'):
    _encode(out, ex, refs, video_encoder, text_encoder)
  return out


def _encode(out, ex, refs, video_encoder, text_encoder):
  if video_encoder is not None:
    out['video_latents'] = np.asarray(video_encoder(ex['video'].astype(np.float32) / 127.5 - 1), np.float32)
    out['ref_latents'] = np.stack([np.asarray(video_encoder(r[None].astype(np.float32) / 127.5 - 1),
                                              np.float32)[0] for r in refs])
  if text_encoder is not None:
    out['text_embedding'] = np.asarray(text_encoder(ex['caption']), np.float32)
