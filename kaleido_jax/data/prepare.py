"""The construction pipeline: videos + annotations -> filtered, cross-paired, synthesised TFDS shards.

    python -m kaleido_jax.data.prepare --config configs/<name>.py \
        --config.data.prepare.input_dir=DIR --config.data.prepare.output_dir=OUT
    python -m kaleido_jax.main --mode prepare --config ... --workdir OUT   # the same `run(config, workdir)`

Input: a directory of videos (mp4 / webm / gif) and a jsonl (default `input_dir/annotations.jsonl`), one line
per clip: {"video": "a.mp4", "caption": "...", "subjects": [{"id": 3, "index": 0, "boxes": [[x0,y0,x1,y1],
...]}], "masks": "a.masks.npz"}; masks (F, S, H, W) bit-packed (see `synthetic.write_example`) or per-frame
boxes per subject. With no input_dir and `data.source='synthetic'`, the synthetic set is exported first, so
the real path is the tested path.

Stages (counts in the final report, `output_dir/report.json`; input == kept + sum(dropped)):
  1. read + low-quality filters (filters.py): unreadable, resolution, duration, blur, static / shaky,
     subject too small / too large / truncated at the border; then near-duplicates (perceptual hash);
  2. subject cut-out on white with margins (synthetic.cutout) from the best frame of the training window and
     from the frame farthest from it;
  3. cross-pairing (pairing.py): each subject's references (up to `refs_per_subject` candidates; the loader
     samples one per epoch) come from other kept clips with that subject id, never the target clip;
     fallback: the far frame, augmented;
  4. diverse synthesis (synthesis.py): `synth_per_clip` variants per kept clip (background, geometry, colour,
     multi-subject composition), cross-paired the same way (never from the clips they were built from);
  5. output: ArrayRecord shards through the TFDS builder (tfds_builder.py), optional precomputed latents /
     text embeddings through `video_encoder` / `text_encoder` callables.

Every per-clip result is cached under `output_dir/_work` (each file appears whole or not at all), so a rerun
resumes where an interrupted one stopped; the shards themselves are written atomically by TFDS. Every path
(input_dir, annotations, captions, output_dir) may be a bucket (`gs://...`, storage.py) on both engines.
`data.prepare.engine='beam'` runs the same stages as an Apache Beam pipeline (beam_pipeline.py) on the runner
`data.prepare.beam_args` names (DirectRunner with worker processes, Dataflow, Flink, Spark).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Any, Callable

import ml_collections
import numpy as np

from kaleido_jax import storage
from kaleido_jax.data import filters
from kaleido_jax.data import pairing
from kaleido_jax.data import synthesis
from kaleido_jax.data import synthetic
from kaleido_jax.data import tfds_builder
from kaleido_jax.data import video as video_lib

VideoEncoder = Callable[[np.ndarray], np.ndarray]  # (F, H, W, 3) float32 [-1, 1] -> latents (f, h, w, c)
TextEncoder = Callable[[str], np.ndarray]          # caption -> (L, D) float32


def _rng(seed: int, *keys: str) -> np.random.Generator:
  return np.random.default_rng([seed] + [zlib.crc32(k.encode()) for k in keys])


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


def _resize(video: np.ndarray, masks: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Centre-crop to the target aspect, then resize (bilinear frames, nearest masks)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
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
    video, masks, ids, caption = read_line(line, input_dir)
  except Exception as e:  # pylint: disable=broad-except
    return dict(drop='unreadable', error=f'{type(e).__name__}: {e}'[:300])
  return clip_record(video, masks, ids, caption, data_cfg)


def clip_record(video: np.ndarray, masks: np.ndarray, ids: np.ndarray, caption: str,
                data_cfg: ml_collections.ConfigDict, window: tuple[int, int] | None = None) -> dict[str, Any]:
  """Filters, then the training window (centred unless given), its masks and the subjects' cut-outs."""
  cfg = data_cfg.prepare
  reason = filters.check_clip(video, masks, cfg)
  if reason:
    return dict(drop=reason)
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


def load_record(work: str, name: str) -> dict[str, Any]:
  """A kept clip's stage 1 + 2 record from its cache under `work` (the Beam engine's examples read them)."""
  return _load_cached(storage.join(work, name + '.npz'))


def _load_cached(path: str) -> dict[str, Any]:
  d = storage.load_npz(path)
  d['caption'] = str(d['caption'])
  return d


def _references(target: str, ids: np.ndarray, index: dict[int, list[str]], clips: dict[str, dict],
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


def _cached_or(work: str, name: str, make: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
  """A clip's stage 1 + 2 result from the cache under `work`, or made and cached (atomically); (result, resumed)."""
  npz, drop_json = storage.join(work, name + '.npz'), storage.join(work, name + '.drop.json')
  if storage.exists(npz):
    return _load_cached(npz), True
  if storage.exists(drop_json):
    return storage.read_json(drop_json), True
  d = make()
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


def _annotated_stage(data_cfg, input_dir: str, annotations: str, work: str):
  """Stage 1 + 2 on annotated clips: read, filter, normalise, cut out (cached per clip for resuming)."""
  entries, dropped, errors, total = parse_annotations(annotations)
  clips: dict[str, dict] = {}
  resumed = 0
  for name, line in entries:
    d, was = annotated_one(name, line, data_cfg, input_dir, work)
    resumed += was
    if 'drop' in d:
      dropped[name] = d['drop']
      if 'error' in d:
        errors[name] = d['error']
    else:
      clips[name] = d
  return clips, dropped, errors, resumed, total


class LazyModels:
  """The grounder and captions, built on first use (a fully resumed run loads no model)."""

  def __init__(self, cfg, input_dir):
    self.cfg, self.input_dir, self.value = cfg, input_dir, None

  def get(self):
    from kaleido_jax.data import ingest  # pylint: disable=g-import-not-at-top
    if self.value is None:
      self.value = ingest.make_grounder(self.cfg), ingest.make_captions(self.cfg, self.input_dir)
    return self.value


def ground_one(rel: str, data_cfg, input_dir: str, output_dir: str, work: str, models: LazyModels):
  """One raw video through stage 0-2 (ingest.py), cached: (summary, {window: record or drop dict}, resumed).

  The summary (grounded lines, drops, shot count, error) is cached in `work/videos/` after every window's
  record is cached like an annotated clip's, so a run killed anywhere redoes at most the video it was in.
  """
  from kaleido_jax.data import ingest  # pylint: disable=g-import-not-at-top
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
      make = lambda f=frames, m=masks, i=ids, c=line['caption'], w=window: clip_record(f, m, i, c, data_cfg, w)
    else:  # resumed video, window not cached: read it back from its grounded line
      make = lambda line=line: process_clip(line, input_dir, data_cfg)
    records[name], _ = _cached_or(work, name, make)
  if not storage.exists(cache):
    storage.path(cache).parent.mkdir(parents=True, exist_ok=True)
    storage.write_json(cache, done)
  return done, records, windows is None


def _ground_stage(data_cfg, input_dir: str, output_dir: str, work: str):
  """Stage 0-2 on raw videos, one video at a time (`ground_one`); `output_dir/grounded.jsonl` is rewritten
  (atomically) from the caches at the end."""
  models = LazyModels(data_cfg.prepare, input_dir)
  dropped: dict[str, str] = {}
  errors: dict[str, str] = {}
  clips: dict[str, dict] = {}
  resumed, total, shots = 0, 0, 0
  all_lines = []
  videos = video_lib.list_videos(input_dir)
  for rel in videos:
    done, records, was = ground_one(rel, data_cfg, input_dir, output_dir, work, models)
    resumed += was
    _merge_video(done, records, clips, dropped, errors)
    total += len(done['lines']) + len(done['drops'])
    shots += done['shots']
    all_lines += done['lines']
  return clips, dropped, errors, resumed, total, _grounded_summary(data_cfg, output_dir, videos, shots, all_lines)


def video_drops(done: dict[str, Any]) -> list[tuple[str, str, str]]:
  """(name, reason, error or '') of a grounded video's drops; an undecodable video's error goes with its one drop."""
  return [(name, reason, done.get('error', '')) for name, reason in done['drops'].items()]


def _merge_video(done, records, clips, dropped, errors) -> None:
  for name, reason, error in video_drops(done):
    dropped[name] = reason
    if error:
      errors[name] = error
  for name, d in records.items():
    if 'drop' in d:
      dropped[name] = d['drop']
    else:
      clips[name] = d


def _grounded_summary(data_cfg, output_dir, videos, shots, all_lines) -> dict[str, Any]:
  path = storage.join(output_dir, 'grounded.jsonl')
  storage.write_bytes(path, ''.join(json.dumps(line, sort_keys=True) + '\n'
                                    for line in sorted(all_lines, key=lambda l: l['clip'])).encode())
  return dict(videos=len(videos), shots=shots, grounded=path, grounding=data_cfg.prepare.grounding)


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
    ex = synthesis.synthesize(c, rng, o, max_subjects=data_cfg.max_subjects)
    if 'compose' in ex['ops']:
      exclude = (other,)
  # Windows of one shot are one clip to cross-pairing: never each other's references.
  exclude += tuple(o for o in mates if o != name)
  refs, prov = _references(name, ex['subject_ids'], index, clips, rng, exclude, cfg.refs_per_subject)
  out = dict(video=ex['video'], refs=refs, ref_slots=np.asarray([p['slot'] for p in prov], np.int32),
             subject_ids=np.asarray(ex['subject_ids'], np.int32),
             caption=ex['caption'], clip_id=key, pairing=json.dumps(prov), synthesis=json.dumps(ex['ops']))
  if video_encoder is not None:
    out['video_latents'] = np.asarray(video_encoder(ex['video'].astype(np.float32) / 127.5 - 1), np.float32)
    out['ref_latents'] = np.stack([np.asarray(video_encoder(r[None].astype(np.float32) / 127.5 - 1),
                                              np.float32)[0] for r in refs])
  if text_encoder is not None:
    out['text_embedding'] = np.asarray(text_encoder(ex['caption']), np.float32)
  return out


def latent_features(data_cfg, video_encoder: VideoEncoder | None = None, text_encoder: TextEncoder | None = None):
  """The TFDS features; the latent shapes are the encoders' outputs on zero inputs of the example shapes."""
  latent_shapes = {}
  if video_encoder is not None:
    f, h, w = data_cfg.num_frames, data_cfg.height, data_cfg.width
    latent_shapes['video_latents'] = np.shape(video_encoder(np.zeros((f, h, w, 3), np.float32)))
    latent_shapes['ref_latents'] = (None,) + np.shape(video_encoder(np.zeros((1, h, w, 3), np.float32)))[1:]
  if text_encoder is not None:
    latent_shapes['text_embedding'] = np.shape(text_encoder(''))
  return tfds_builder.features(data_cfg.num_frames, data_cfg.height, data_cfg.width, latent_shapes)


def prepare(data_cfg: ml_collections.ConfigDict, *, output_dir: str, input_dir: str = '',
            annotations: str = '', seed: int = 0, video_encoder: VideoEncoder | None = None,
            text_encoder: TextEncoder | None = None, verbose: bool = True) -> dict[str, Any]:
  """Run every stage (in this process, or on Beam with data.prepare.engine='beam'); returns (and writes to
  output_dir/report.json) the report."""
  cfg = data_cfg.prepare
  input_dir = input_dir or cfg.input_dir
  storage.check_writable_dir(output_dir, 'data.prepare.output_dir')
  report_path = storage.join(output_dir, 'report.json')
  ds_dir = tfds_builder.dataset_dir(output_dir, data_cfg.dataset_name)
  if storage.exists(storage.join(ds_dir, 'dataset_info.json')) and storage.exists(report_path):
    report = storage.read_json(report_path)
    report['resumed'] = 'complete'
    return report
  t0 = time.time()
  if not input_dir:
    if data_cfg.source != 'synthetic':
      raise ValueError('data.prepare.input_dir is empty and data.source is not synthetic')
    input_dir = storage.join(output_dir, '_synthetic_input')
    if not storage.exists(storage.join(input_dir, 'annotations.jsonl')):
      with storage.atomic_dir(input_dir, replace=True) as tmp:  # written locally, then moved (or copied) in
        synthetic.export_clips(tmp, num_clips=data_cfg.num_clips, num_identities=data_cfg.num_identities,
                               heldout_identities=data_cfg.heldout_identities, split='train',
                               num_frames=data_cfg.num_frames, height=data_cfg.height, width=data_cfg.width,
                               seed=data_cfg.synthetic_seed, max_subjects=data_cfg.max_subjects, fps=cfg.fps)
  work = storage.join(output_dir, '_work')
  storage.path(work).mkdir(parents=True, exist_ok=True)
  annotations = annotations or cfg.annotations or storage.join(input_dir, 'annotations.jsonl')
  feats = latent_features(data_cfg, video_encoder, text_encoder)
  run_engine = _run_beam if cfg.engine == 'beam' else _run_local
  counts = run_engine(data_cfg, input_dir, output_dir, annotations, work, seed, feats, video_encoder, text_encoder)
  if text_encoder is not None:  # text dropout's unconditional input (tfds_builder.EMPTY_TEXT_FILE)
    tfds_builder.write_empty_text(output_dir, text_encoder(''), data_cfg.dataset_name)
  dt = time.time() - t0
  dropped = counts.pop('dropped')
  report = dict(input=counts.pop('input'), kept=counts['kept'], dropped=_counts(dropped), dropped_clips=dropped,
                errors=counts.pop('errors'), synthesised=counts['examples'] - counts.pop('kept'),
                examples=counts.pop('examples'), references=counts.pop('references'),
                resumed_clips=counts.pop('resumed'), seconds=round(dt, 2),
                dataset_dir=ds_dir, split=cfg.split, num_shards=tfds_builder.num_shards(output_dir, cfg.split),
                engine=cfg.engine, **counts)
  report['clips_per_s'] = round(report['input'] / max(dt, 1e-9), 3)
  storage.write_json(report_path, report)
  if verbose:
    print(format_report(report))
  return report


def _run_local(data_cfg, input_dir, output_dir, annotations, work, seed, feats, video_encoder, text_encoder):
  """Every stage in this process, one clip at a time; the counts the report needs."""
  cfg = data_cfg.prepare
  if cfg.grounding != 'none':
    clips, dropped, errors, resumed, total, extra = _ground_stage(data_cfg, input_dir, output_dir, work)
  else:
    clips, dropped, errors, resumed, total = _annotated_stage(data_cfg, input_dir, annotations, work)
    extra = {}

  dropped.update(near_duplicates({k: v['hash'] for k, v in clips.items()}, cfg.dedup_threshold))
  clips = {k: v for k, v in clips.items() if k not in dropped}

  # Stage 3 + 4: cross-pairing and synthesis.
  index = pairing.build_index({k: v['subject_ids'] for k, v in clips.items()})
  names = sorted(clips)
  mates = shot_mates(names)
  plan = plan_examples(names, seed, cfg.synth_per_clip)
  if not plan:
    raise ValueError(f'no clip survived the filters: {_counts(dropped)}')
  modes = {'cross': 0, 'far_frame': 0}

  def generate():
    for p in plan:
      ex = make_example(p, clips, index, mates.get(shot_of(p[1]), ()), data_cfg, seed, video_encoder,
                        text_encoder)
      for q in json.loads(ex['pairing']):
        modes[q['mode']] += 1
      yield p[0], ex

  tfds_builder.write(output_dir, feats, {cfg.split: generate}, -(-len(plan) // cfg.shard_size))
  return dict(input=total, kept=len(clips), dropped=dropped, errors=errors, examples=len(plan), references=modes,
              resumed=resumed, **extra)


def _run_beam(data_cfg, input_dir, output_dir, annotations, work, seed, feats, video_encoder, text_encoder):
  """Every stage as a Beam pipeline (beam_pipeline.py) on `data.prepare.beam_args`' runner; the same counts."""
  from kaleido_jax.data import beam_pipeline  # pylint: disable=g-import-not-at-top
  cfg = data_cfg.prepare
  if cfg.grounding != 'none':
    mode, items, dropped, errors, total = 'raw', video_lib.list_videos(input_dir), {}, {}, 0
  else:
    entries, dropped, errors, total = parse_annotations(annotations)
    mode, items = 'annotated', [(name, json.dumps(line)) for name, line in entries]
  parts_path = storage.join(work, 'beam_report.json')
  storage.path(parts_path).unlink(missing_ok=True)
  transform = beam_pipeline.PrepareTransform(
      mode=mode, items=items, data_cfg=data_cfg, input_dir=input_dir, output_dir=output_dir, work=work, seed=seed,
      report_path=parts_path, video_encoder=video_encoder, text_encoder=text_encoder)
  try:
    tfds_builder.write(output_dir, feats, {cfg.split: transform}, None,
                       beam_pipeline.pipeline_options(cfg.beam_args))
  except ValueError as e:
    if 'number of generated examples is 0' not in str(e):
      raise
    raise ValueError(f'no clip survived the filters: {_counts({**dropped, **_cached_drops(work)})}') from None
  parts = storage.read_json(parts_path)
  dropped.update(parts['dropped'])
  errors.update(parts['errors'])
  out = dict(input=total + parts['inputs'], kept=parts['kept'], dropped=dropped, errors=errors,
             examples=parts['examples'], references=dict(cross=parts['cross'], far_frame=parts['far_frame']),
             resumed=parts['resumed'])
  if mode == 'raw':
    out.update(_grounded_summary(data_cfg, output_dir, items, parts['shots'], parts['lines']))
  return out


def _cached_drops(work: str) -> dict[str, str]:
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


def shot_of(name: str) -> str:
  """The shot a grounded window belongs to (`<source>_s<shot>_w<window>`); any other clip is its own."""
  head, sep, tail = name.rpartition('_w')
  return head if sep and tail.isdigit() and '_s' in head else name


def _counts(dropped: dict[str, str]) -> dict[str, int]:
  out: dict[str, int] = {}
  for r in dropped.values():
    out[r] = out.get(r, 0) + 1
  return dict(sorted(out.items()))


def format_report(report: dict[str, Any]) -> str:
  rows = [('input clips', report['input']), ('kept', report['kept'])]
  rows += [(f'dropped: {k}', v) for k, v in report['dropped'].items()]
  rows += [('synthesised variants', report['synthesised']), ('examples written', report['examples']),
           ('refs cross-paired', report['references']['cross']),
           ('refs far-frame fallback', report['references']['far_frame']),
           ('clips/s', report['clips_per_s'])]
  w = max(len(r[0]) for r in rows)
  return '\n'.join(f'{k:<{w}}  {v}' for k, v in rows)


def validate(data_cfg: ml_collections.ConfigDict) -> None:
  """The prepare settings a run cannot use, as one kcfg.ConfigError naming the key and the fix."""
  from kaleido_jax import config as kcfg  # pylint: disable=g-import-not-at-top
  from kaleido_jax.data import ingest  # pylint: disable=g-import-not-at-top
  cfg = data_cfg.prepare
  problems = []
  if cfg.grounding not in ingest.GROUNDINGS:
    problems.append(f'data.prepare.grounding={cfg.grounding!r} not in {" | ".join(ingest.GROUNDINGS)}')
  if cfg.engine not in ('local', 'beam'):
    problems.append(f'data.prepare.engine={cfg.engine!r} not in local | beam')
  if cfg.grounding == 'transformers' and not os.path.isdir(cfg.detector_dir or ''):
    problems.append(f'data.prepare.detector_dir={cfg.detector_dir!r} is not a directory; grounding=transformers '
                    'needs a local OWLv2 / OWL-ViT / Grounding DINO model directory (nothing is downloaded)')
  for key in ('segmenter_dir', 'captioner', 'captions'):
    path = cfg.get(key, '')
    if path and not storage.exists(path):
      problems.append(f'data.prepare.{key}={path!r} does not exist')
  if cfg.grounding != 'none' and not cfg.input_dir:
    problems.append('data.prepare.grounding needs data.prepare.input_dir (a directory of raw videos)')
  if cfg.engine == 'beam':
    problems += _beam_problems(cfg.beam_args)
  if problems:
    raise kcfg.ConfigError('invalid prepare config: ' + '; '.join(problems))


def _beam_problems(beam_args: str) -> list[str]:
  """What keeps `data.prepare.beam_args` from starting a pipeline: no apache-beam, a bad flag, a bad runner."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  import shlex  # pylint: disable=g-import-not-at-top
  try:
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
  except ImportError:
    return ['data.prepare.engine=beam needs apache-beam: pip install -e ".[beam]" (on Dataflow also '
            '"apache-beam[gcp]==2.77.0")']
  try:
    options = beam.options.pipeline_options.PipelineOptions(shlex.split(beam_args or ''))
    with contextlib.redirect_stderr(io.StringIO()) as err:
      try:
        options.get_all_options()
      except SystemExit:
        return [f'data.prepare.beam_args={beam_args!r}: ' + (err.getvalue().strip().splitlines() or ['bad flag'])[-1]]
    runner = options.view_as(beam.options.pipeline_options.StandardOptions).runner
    if runner:
      beam.runners.create_runner(runner)
  except Exception as e:  # pylint: disable=broad-except
    return [f'data.prepare.beam_args={beam_args!r}: {str(e).splitlines()[0]}']
  return []


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`--mode prepare`: output to data.prepare.output_dir (or the workdir)."""
  from kaleido_jax import config as kcfg  # pylint: disable=g-import-not-at-top
  out = config.data.prepare.output_dir or workdir
  if not out:
    raise kcfg.ConfigError('set data.prepare.output_dir or --workdir')
  validate(config.data)
  return prepare(config.data, output_dir=out, seed=config.seed)


def main(argv) -> None:
  del argv
  run(_CONFIG.value, '')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
  app.run(main)
