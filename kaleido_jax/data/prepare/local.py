"""The local engine: every stage in this process, one clip (or raw video) at a time."""

from __future__ import annotations

import json
import time

from kaleido_jax.data import pairing
from kaleido_jax.data import tfds_builder
from kaleido_jax.data import timing
from kaleido_jax.data import video as video_lib
from kaleido_jax.data.prepare import clips as clips_lib
from kaleido_jax.data.prepare import report as report_lib
from kaleido_jax.data.prepare import stages


def _annotated_stage(data_cfg, input_dir: str, annotations: str, work: str):
  """Stage 1 + 2 on annotated clips: read, filter, normalise, cut out (cached per clip for resuming)."""
  entries, dropped, errors, total = clips_lib.parse_annotations(annotations)
  clips: dict[str, dict] = {}
  resumed = 0
  for name, line in entries:
    d, was = clips_lib.annotated_one(name, line, data_cfg, input_dir, work)
    resumed += was
    if 'drop' in d:
      dropped[name] = d['drop']
      if 'error' in d:
        errors[name] = d['error']
    else:
      clips[name] = d
  return clips, dropped, errors, resumed, total


def _ground_stage(data_cfg, input_dir: str, output_dir: str, work: str):
  """Stage 0-2 on raw videos, one video at a time (`ground_one`); `output_dir/grounded.jsonl` is rewritten
  (atomically) from the caches at the end."""
  models = clips_lib.LazyModels(data_cfg.prepare, input_dir)
  dropped: dict[str, str] = {}
  errors: dict[str, str] = {}
  clips: dict[str, dict] = {}
  resumed, total, shots = 0, 0, 0
  all_lines = []
  videos = video_lib.list_videos(input_dir)
  for rel in videos:
    done, records, was = clips_lib.ground_one(rel, data_cfg, input_dir, output_dir, work, models)
    resumed += was
    _merge_video(done, records, clips, dropped, errors)
    total += len(done['lines']) + len(done['drops'])
    shots += done['shots']
    all_lines += done['lines']
  summary = report_lib.grounded_summary(data_cfg, output_dir, videos, shots, all_lines)
  summary['lines'] = all_lines  # for the references per grounder; not in the report
  return clips, dropped, errors, resumed, total, summary


def _merge_video(done, records, clips, dropped, errors) -> None:
  for name, reason, error in clips_lib.video_drops(done):
    dropped[name] = reason
    if error:
      errors[name] = error
  for name, d in records.items():
    if 'drop' in d:
      dropped[name] = d['drop']
    else:
      clips[name] = d


def run(data_cfg, input_dir, output_dir, annotations, work, seed, feats, video_encoder, text_encoder):
  """Every stage in this process, one clip at a time; the counts the report needs."""
  cfg = data_cfg.prepare
  timing.take()  # from zero
  if cfg.grounding != 'none':
    clips, dropped, errors, resumed, total, extra = _ground_stage(data_cfg, input_dir, output_dir, work)
  else:
    clips, dropped, errors, resumed, total = _annotated_stage(data_cfg, input_dir, annotations, work)
    extra = {}

  dropped.update(stages.near_duplicates({k: v['hash'] for k, v in clips.items()}, cfg.dedup_threshold))
  clips = {k: v for k, v in clips.items() if k not in dropped}

  # Stage 3 + 4: cross-pairing and synthesis.
  index = pairing.build_index({k: v['subject_ids'] for k, v in clips.items()})
  names = sorted(clips)
  mates = stages.shot_mates(names)
  plan = stages.plan_examples(names, seed, cfg.synth_per_clip)
  if not plan:
    raise report_lib.nothing_survived(dropped, errors)
  modes = {'cross': 0, 'far_frame': 0}
  by_subject: dict[int, list[int]] = {}

  def generate():
    for p in plan:
      ex = stages.make_example(p, clips, index, mates.get(stages.shot_of(p[1]), ()), data_cfg, seed, video_encoder,
                        text_encoder)
      pairs = json.loads(ex['pairing'])
      for q in pairs:
        modes[q['mode']] += 1
      report_lib.count_modes(by_subject, pairs)
      yield p[0], ex

  before = timing.take()
  t = time.perf_counter()
  tfds_builder.write(output_dir, feats, {cfg.split: generate}, -(-len(plan) // cfg.shard_size))
  inside = timing.take()  # synthesis, pairing, encode: the rest of the shard write's time is writing
  seconds = timing.add(timing.add(before, inside), {'write': time.perf_counter() - t - sum(inside.values())})
  lines = extra.pop('lines', None)
  if lines is not None:
    extra['references_by_grounder'] = report_lib.references_by_grounder(by_subject, lines)
  return dict(input=total, kept=len(clips), dropped=dropped, errors=errors, examples=len(plan), references=modes,
              resumed=resumed, stage_seconds=seconds, **extra)
