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

Every per-clip result is cached under `output_dir/_work` (written to a temporary name, then renamed), so a
rerun resumes where an interrupted one stopped; the shards themselves are written atomically by TFDS.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Any, Callable

import ml_collections
import numpy as np

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


def _atomic_savez(path: str, **arrays: Any) -> None:
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _atomic_json(path: str, obj: Any) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)


def read_video(path: str) -> np.ndarray:
  """(F, H, W, 3) uint8 frames of any container ffmpeg reads (mp4 / webm / gif)."""
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  gen = imageio_ffmpeg.read_frames(path, pix_fmt='rgb24')
  w, h = next(gen)['size']
  frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen]
  if not frames:
    raise ValueError('no frames')
  return np.stack(frames)


def read_masks(line: dict[str, Any], input_dir: str, shape: tuple[int, int, int]) -> np.ndarray:
  """(F, S, H, W) bool from the mask file or the per-frame boxes, in subject order."""
  f, h, w = shape
  subjects = line.get('subjects') or []
  if line.get('masks'):
    with np.load(os.path.join(input_dir, line['masks'])) as z:
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
  path = os.path.join(input_dir, line['video'])
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


def _load_cached(path: str) -> dict[str, Any]:
  with np.load(path, allow_pickle=False) as z:
    d = {k: z[k] for k in z.files}
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
  npz, drop_json = os.path.join(work, name + '.npz'), os.path.join(work, name + '.drop.json')
  if os.path.exists(npz):
    return _load_cached(npz), True
  if os.path.exists(drop_json):
    with open(drop_json) as g:
      return json.load(g), True
  d = make()
  if 'drop' in d:
    _atomic_json(drop_json, d)
  else:
    _atomic_savez(npz, **d)
  return d, False


def _annotated_stage(data_cfg, input_dir: str, annotations: str, work: str):
  """Stage 1 + 2 on annotated clips: read, filter, normalise, cut out (cached per clip for resuming)."""
  dropped: dict[str, str] = {}
  errors: dict[str, str] = {}
  clips: dict[str, dict] = {}
  resumed = 0
  with open(annotations) as f:
    raw_lines = [l for l in f.read().splitlines() if l.strip()]
  for n, raw in enumerate(raw_lines):
    try:
      line = json.loads(raw)
      name = line.get('clip') or os.path.splitext(os.path.basename(line['video']))[0]
    except Exception as e:  # pylint: disable=broad-except
      dropped[f'line_{n}'] = 'unreadable'
      errors[f'line_{n}'] = f'{type(e).__name__}: {e}'[:300]
      continue
    if name in clips or name in dropped:
      dropped[f'{name}#line_{n}'] = 'near_duplicate'
      continue
    d, was = _cached_or(work, name, lambda line=line: process_clip(line, input_dir, data_cfg))
    resumed += was
    if 'drop' in d:
      dropped[name] = d['drop']
      if 'error' in d:
        errors[name] = d['error']
    else:
      clips[name] = d
  return clips, dropped, errors, resumed, len(raw_lines)


def _ground_stage(data_cfg, input_dir: str, output_dir: str, work: str):
  """Stage 0-2 on raw videos (ingest.py): decode, shots, captions, grounding, windows; then filter and cut out.

  Per video the grounded lines and drops are cached in `work/videos/`, every window's record like an annotated
  clip's; `output_dir/grounded.jsonl` is rewritten (atomically) from the caches at the end.
  """
  from kaleido_jax.data import ingest  # pylint: disable=g-import-not-at-top
  cfg = data_cfg.prepare
  grounder = captions = None
  vdir = os.path.join(work, 'videos')
  os.makedirs(vdir, exist_ok=True)
  dropped: dict[str, str] = {}
  errors: dict[str, str] = {}
  clips: dict[str, dict] = {}
  resumed, total, shots = 0, 0, 0
  all_lines = []
  videos = video_lib.list_videos(input_dir)
  for rel in videos:
    stem = ingest.source_name(rel)
    cache = os.path.join(vdir, stem + '.json')
    if os.path.exists(cache):
      with open(cache) as f:
        done = json.load(f)
      resumed += 1
      windows = None
    else:
      if grounder is None:
        grounder, captions = ingest.make_grounder(cfg), ingest.make_captions(cfg, input_dir)
      try:
        done, windows = ingest.ground_video(rel, input_dir, data_cfg, grounder, captions,
                                            os.path.join(output_dir, 'grounded'))
      except video_lib.VideoError as e:
        done, windows = dict(lines=[], drops={stem: 'unreadable'}, shots=0, error=str(e)[:300]), []
    if 'error' in done:
      errors[stem] = done['error']
    dropped.update(done['drops'])
    total += len(done['lines']) + len(done['drops'])
    shots += done['shots']
    made = {w[0]: w for w in windows or []}
    for line in done['lines']:
      name = line['clip']
      if name in made:
        _, frames, masks, window = made[name]
        ids = np.asarray([s['id'] for s in line['subjects']], np.int32)
        make = lambda f=frames, m=masks, i=ids, c=line['caption'], w=window: clip_record(f, m, i, c, data_cfg, w)
      else:  # resumed video, window not yet processed: read it back from its grounded line
        make = lambda line=line: process_clip(line, input_dir, data_cfg)
      d, _ = _cached_or(work, name, make)
      if 'drop' in d:
        dropped[name] = d['drop']
      else:
        clips[name] = d
    if not os.path.exists(cache):
      _atomic_json(cache, done)
    all_lines += done['lines']
  path = os.path.join(output_dir, 'grounded.jsonl')
  with open(path + '.tmp', 'w') as f:
    for line in all_lines:
      f.write(json.dumps(line) + '\n')
  os.replace(path + '.tmp', path)
  extra = dict(videos=len(videos), shots=shots, grounded=path, grounding=cfg.grounding)
  return clips, dropped, errors, resumed, total, extra


def prepare(data_cfg: ml_collections.ConfigDict, *, output_dir: str, input_dir: str = '',
            annotations: str = '', seed: int = 0, video_encoder: VideoEncoder | None = None,
            text_encoder: TextEncoder | None = None, verbose: bool = True) -> dict[str, Any]:
  """Run every stage; returns (and writes to output_dir/report.json) the report."""
  cfg = data_cfg.prepare
  input_dir = input_dir or cfg.input_dir
  os.makedirs(output_dir, exist_ok=True)
  report_path = os.path.join(output_dir, 'report.json')
  ds_dir = tfds_builder.dataset_dir(output_dir, data_cfg.dataset_name)
  if os.path.exists(os.path.join(ds_dir, 'dataset_info.json')) and os.path.exists(report_path):
    with open(report_path) as f:
      report = json.load(f)
    report['resumed'] = 'complete'
    return report
  t0 = time.time()
  if not input_dir:
    if data_cfg.source != 'synthetic':
      raise ValueError('data.prepare.input_dir is empty and data.source is not synthetic')
    input_dir = os.path.join(output_dir, '_synthetic_input')
    if not os.path.exists(os.path.join(input_dir, 'annotations.jsonl')):
      synthetic.export_clips(input_dir, num_clips=data_cfg.num_clips, num_identities=data_cfg.num_identities,
                             heldout_identities=data_cfg.heldout_identities, split='train',
                             num_frames=data_cfg.num_frames, height=data_cfg.height, width=data_cfg.width,
                             seed=data_cfg.synthetic_seed, max_subjects=data_cfg.max_subjects, fps=cfg.fps)
  work = os.path.join(output_dir, '_work')
  os.makedirs(work, exist_ok=True)
  if cfg.grounding != 'none':
    clips, dropped, errors, resumed, total, extra = _ground_stage(data_cfg, input_dir, output_dir, work)
  else:
    annotations = annotations or cfg.annotations or os.path.join(input_dir, 'annotations.jsonl')
    clips, dropped, errors, resumed, total = _annotated_stage(data_cfg, input_dir, annotations, work)
    extra = {}

  # Near-duplicates: in name order, a clip close to an already kept one is dropped.
  dedup = filters.Deduplicator(cfg.dedup_threshold)
  for name in sorted(clips):
    if dedup.is_duplicate(clips[name]['hash']):
      dropped[name] = 'near_duplicate'
    else:
      dedup.add(clips[name]['hash'])
  clips = {k: v for k, v in clips.items() if k not in dropped}

  # Stage 3 + 4: cross-pairing and synthesis.
  index = pairing.build_index({k: v['subject_ids'] for k, v in clips.items()})
  shot_mates: dict[str, list[str]] = {}
  for k in sorted(clips):
    shot_mates.setdefault(_shot_of(k), []).append(k)
  names = sorted(clips)
  plan = []  # (key, target name, variant, other name or '')
  for name in names:
    plan.append((name, name, 0, ''))
    for j in range(cfg.synth_per_clip):
      rng = _rng(seed, name, 'other', str(j))
      other = names[int(rng.integers(len(names)))] if len(names) > 1 else ''
      plan.append((f'{name}~s{j}', name, j + 1, other if other != name else ''))
  modes = {'cross': 0, 'far_frame': 0}

  def example(key: str, name: str, variant: int, other: str) -> dict[str, Any]:
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
    exclude += tuple(o for o in shot_mates.get(_shot_of(name), ()) if o != name)
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

  if not plan:
    raise ValueError(f'no clip survived the filters: {_counts(dropped)}')
  latent_shapes = {}
  if video_encoder is not None or text_encoder is not None:
    first = example(*plan[0])
    for k in ('video_latents', 'text_embedding'):
      if k in first:
        latent_shapes[k] = first[k].shape
    if 'ref_latents' in first:
      latent_shapes['ref_latents'] = (None,) + first['ref_latents'].shape[1:]
  feats = tfds_builder.features(data_cfg.num_frames, data_cfg.height, data_cfg.width, latent_shapes)

  def generate():
    for p in plan:
      ex = example(*p)
      for q in json.loads(ex['pairing']):
        modes[q['mode']] += 1
      yield p[0], ex

  num_shards = -(-len(plan) // cfg.shard_size)
  tfds_builder.write(output_dir, feats, {cfg.split: generate}, num_shards)
  dt = time.time() - t0
  report = dict(input=total, kept=len(clips), dropped=_counts(dropped), dropped_clips=dropped,
                errors=errors, synthesised=len(plan) - len(clips), examples=len(plan), references=modes,
                resumed_clips=resumed, seconds=round(dt, 2), clips_per_s=round(total / max(dt, 1e-9), 3),
                dataset_dir=ds_dir, split=cfg.split, num_shards=num_shards, **extra)
  _atomic_json(report_path, report)
  if verbose:
    print(format_report(report))
  return report


def _shot_of(name: str) -> str:
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
    if path and not os.path.exists(path):
      problems.append(f'data.prepare.{key}={path!r} does not exist')
  if cfg.grounding != 'none' and not cfg.input_dir:
    problems.append('data.prepare.grounding needs data.prepare.input_dir (a directory of raw videos)')
  if problems:
    raise kcfg.ConfigError('invalid prepare config: ' + '; '.join(problems))


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
