"""The construction pipeline: videos + annotations -> filtered, cross-paired, synthesised TFDS shards.

    python -m kaleido_jax.main --mode prepare --config configs/<name>.py \
        --config.data.prepare.input_dir=DIR --workdir OUT

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

The package: stages.py (pure per-clip stages), clips.py (inputs and the per-clip caches), local.py (the local
engine), beam.py (the Beam engine), report.py (the report); this file runs one of the engines between the two.

Every per-clip result is cached under `output_dir/_work` (each file appears whole or not at all), so a rerun
resumes where an interrupted one stopped; the shards themselves are written atomically by TFDS. Every path
(input_dir, annotations, captions, output_dir) may be a bucket (`gs://...`, storage.py) on both engines.
`data.prepare.engine='beam'` runs the same stages as an Apache Beam pipeline (beam.py) on the runner
`data.prepare.beam_args` names (DirectRunner with worker processes, Dataflow, Flink, Spark).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import ml_collections
import numpy as np

from kaleido_jax import config as kcfg
from kaleido_jax import storage
from kaleido_jax.data import ingest
from kaleido_jax.data import synthetic
from kaleido_jax.data import tfds_builder
from kaleido_jax.data.prepare import local
from kaleido_jax.data.prepare import report as report_lib
from kaleido_jax.data.prepare.stages import TextEncoder, VideoEncoder


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
  annotations = annotations or cfg.annotations or storage.join(input_dir, 'annotations.jsonl')
  data_cfg = resolve_grounding(data_cfg, annotations)
  # The per-clip caches belong to the settings that made them: a rerun with other settings (the fix an error line
  # named, another grounder) starts its own, one with the same settings resumes.
  work = storage.join(output_dir, '_work', settings_key(data_cfg))
  storage.path(work).mkdir(parents=True, exist_ok=True)
  feats = latent_features(data_cfg, video_encoder, text_encoder)
  if cfg.engine == 'beam':
    from kaleido_jax.data.prepare import beam  # lazy: optional dependency (apache-beam, the [beam] extra)
    run_engine = beam.run
  else:
    run_engine = local.run
  counts = run_engine(data_cfg, input_dir, output_dir, annotations, work, seed, feats, video_encoder, text_encoder)
  if text_encoder is not None:  # text dropout's unconditional input (tfds_builder.EMPTY_TEXT_FILE)
    tfds_builder.write_empty_text(output_dir, text_encoder(''), data_cfg.dataset_name)
  dt = time.time() - t0
  dropped = counts.pop('dropped')
  report = dict(input=counts.pop('input'), kept=counts['kept'], dropped=report_lib.counts(dropped),
                dropped_clips=dropped,
                errors=counts.pop('errors'), synthesised=counts['examples'] - counts.pop('kept'),
                examples=counts.pop('examples'), references=counts.pop('references'),
                resumed_clips=counts.pop('resumed'), seconds=round(dt, 2),
                dataset_dir=ds_dir, split=cfg.split, num_shards=tfds_builder.num_shards(output_dir, cfg.split),
                engine=cfg.engine, **counts)
  report['clips_per_s'] = round(report['input'] / max(dt, 1e-9), 3)
  report['stage_seconds'] = {k: round(v, 3) for k, v in sorted(report.get('stage_seconds', {}).items(),
                                                                key=lambda kv: -kv[1])}
  storage.write_json(report_path, report)
  if verbose:
    print(report_lib.format_report(report))
  return report


def validate(data_cfg: ml_collections.ConfigDict) -> None:
  """The prepare settings a run cannot use, as one kcfg.ConfigError naming the key and the fix."""
  cfg = data_cfg.prepare
  problems = []
  if cfg.grounding not in ingest.GROUNDINGS:
    problems.append(f'data.prepare.grounding={cfg.grounding!r} not in {" | ".join(ingest.GROUNDINGS)}')
  if cfg.engine not in ('local', 'beam'):
    problems.append(f'data.prepare.engine={cfg.engine!r} not in local | beam')
  if cfg.grounding == 'transformers' and not os.path.isdir(cfg.detector_dir or ''):
    problems.append(f'data.prepare.detector_dir={cfg.detector_dir!r} is not a directory; grounding=transformers '
                    'needs a local OWLv2 / OWL-ViT / Grounding DINO model directory (nothing is downloaded)')
  if cfg.grounding == 'people':
    from kaleido_jax.data import grounding_people  # lazy: optional (dlib, OpenCV; the grounding extra)
    try:
      grounding_people.check_installed()
    except grounding_people.MissingModels as e:
      problems.append(f'data.prepare.grounding={cfg.grounding}: {e}')
  for key in ('segmenter_dir', 'captioner', 'captions'):
    path = cfg.get(key, '')
    if path and not storage.exists(path):
      problems.append(f'data.prepare.{key}={path!r} does not exist')
  if cfg.grounding not in ('none', 'auto') and not cfg.input_dir:
    problems.append('data.prepare.grounding needs data.prepare.input_dir (a directory of raw videos)')
  if cfg.engine == 'beam':
    try:
      from kaleido_jax.data.prepare import beam  # lazy: optional dependency (apache-beam, the [beam] extra)
    except ImportError:
      problems.append('data.prepare.engine=beam needs apache-beam: pip install -e ".[beam]" (on Dataflow also '
                      '"apache-beam[gcp]==2.77.0")')
    else:
      problems += beam.problems(cfg.beam_args)
  if problems:
    raise kcfg.ConfigError('invalid prepare config: ' + '; '.join(problems))


def resolve_grounding(data_cfg: ml_collections.ConfigDict, annotations: str) -> ml_collections.ConfigDict:
  """grounding='auto' (the default): the annotations where they exist (grounding='none'), else raw videos grounded
  by people and faces, then motion or the transformers detector (ingest.make_grounder)."""
  cfg = data_cfg.prepare
  if cfg.grounding != 'auto':
    return data_cfg
  if storage.exists(annotations):
    data_cfg = data_cfg.copy_and_resolve_references()
    data_cfg.prepare.grounding = 'none'
    return data_cfg
  from kaleido_jax.data import grounding_people  # lazy: optional (dlib, OpenCV; the grounding extra)
  try:
    grounding_people.check_installed()
  except grounding_people.MissingModels as e:
    raise kcfg.ConfigError(f'{annotations!r} does not exist, so the raw videos in data.prepare.input_dir are '
                           f'grounded (data.prepare.grounding=auto), which needs the offline models: {e}') from None
  return data_cfg


# Settings that change how a run goes, not what a clip's cache holds.
_NOT_IN_KEY = ('engine', 'beam_args', 'output_dir', 'shard_size', 'split')


def settings_key(data_cfg: ml_collections.ConfigDict) -> str:
  """A short hash of the data settings a clip's cached stages depend on."""
  d = data_cfg.to_dict()
  d['prepare'] = {k: v for k, v in d['prepare'].items() if k not in _NOT_IN_KEY}
  return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`--mode prepare`: output to data.prepare.output_dir (or the workdir)."""
  out = config.data.prepare.output_dir or workdir
  if not out:
    raise kcfg.ConfigError('set data.prepare.output_dir or --workdir')
  validate(config.data)
  return prepare(config.data, output_dir=out, seed=config.seed)
