"""The Beam engine (`data.prepare.engine='beam'`): the same stages as Beam transforms, written by TFDS.

    read -> decode / shots / ground (raw videos) or read (annotated clips) -> filters + cut-outs   (ParDo)
    -> near-duplicates (one global pass over the hashes, name order)                         (ToDict, side input)
    -> cross-pairing: subject id -> clips                                                         (GroupByKey)
    -> plan (target, variant, other), spread over the workers                                    (Reshuffle)
    -> synthesis + cross-paired references + optional encoders -> (key, example)     (Map, index as side input)
    -> ArrayRecord shards through TFDS' Beam writer (the same features and files the local engine writes).

Only names, subject ids and hashes travel between the stages; a clip's frames, masks and cut-outs stay in its
per-clip cache file and are read by the example that needs them. That keeps the shuffles small and sidesteps
a DirectRunner fault: with worker processes (or threads) and megabyte elements its CoGroupByKey lost elements
at random (96 raw videos, clip records in the pipeline: 114 to 120 of 128 clips kept, 214 to 252 of 256
examples; a pure-Beam pipeline of 256 3-MB elements through a CoGroupByKey lost 98 of 512 joins).

Every per-clip function is the local engine's own (stages.py, clips.py), so both engines give the same examples (same
keys, same bytes) and the same report counts (tests/data/test_beam.py, two DirectRunner worker processes); the
per-clip caches under `output_dir/_work` are shared too, so a failed or killed Beam run resumes like a local one.
TFDS sizes the Beam engine's shards by bytes (64 MiB to 1 GiB); `shard_size` applies to the local engine. An
example joins in the cut-outs of every kept clip that holds one of its subjects (what cross-pairing picks from):
with per-source identities (ingest.py) that is a source's other shots, a few KiB each. `input_dir`,
`output_dir` and the caches may be buckets (`gs://`, storage.py): no worker needs a shared POSIX disk, so
Dataflow runs it as it is (tests/test_storage.py: raw videos in a bucket, two DirectRunner worker processes,
shards in a bucket, the same examples as a local run). Runner and workers come from `data.prepare.beam_args`, passed to Beam's
PipelineOptions, e.g. '--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing', or
'--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp' (needs `pip install
"apache-beam[gcp]==2.77.0"`), FlinkRunner, SparkRunner.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
from typing import Any, Sequence

import apache_beam as beam

from kaleido_jax import storage
from kaleido_jax.data import tfds_builder
from kaleido_jax.data import timing
from kaleido_jax.data import video as video_lib
from kaleido_jax.data.prepare import clips as clips_lib
from kaleido_jax.data.prepare import report as report_lib
from kaleido_jax.data.prepare import stages


def pipeline_options(beam_args: str) -> beam.options.pipeline_options.PipelineOptions:
  return beam.options.pipeline_options.PipelineOptions(flags=shlex.split(beam_args or ''))


class _Stage(beam.DoFn):
  """Stage 0-2 of one item: ('clip', name, {subject_ids, hash}) / ('drop', name, reason, error) /
  ('video', summary) / ('resumed', 1); the clip's record itself goes to its cache file."""

  def __init__(self, mode: str, data_cfg, input_dir: str, output_dir: str, work: str):
    self.mode, self.data_cfg, self.input_dir, self.output_dir, self.work = mode, data_cfg, input_dir, output_dir, work
    self.models = None

  def setup(self):
    self.models = clips_lib.LazyModels(self.data_cfg.prepare, self.input_dir)

  def process(self, item):
    if self.mode == 'annotated':
      name, line = item
      d, was = clips_lib.annotated_one(name, json.loads(line), self.data_cfg, self.input_dir, self.work)
      records, done = {name: d}, None
    else:
      done, records, was = clips_lib.ground_one(item, self.data_cfg, self.input_dir, self.output_dir, self.work,
                                              self.models)
      for name, reason, error in clips_lib.video_drops(done):
        yield ('drop', name, reason, error)
      yield ('video', dict(lines=done['lines'], shots=done['shots'], inputs=len(done['lines']) + len(done['drops'])))
    if was:
      yield ('resumed', 1)
    for name, d in records.items():
      if 'drop' in d:
        yield ('drop', name, d['drop'], d.get('error', ''))
      else:  # the full record stays in its cache file: only the name, ids and hash travel
        yield ('clip', name, dict(subject_ids=d['subject_ids'], hash=d['hash']))
    yield ('seconds', timing.take())  # this item's stages, measured in this worker


def _kind(k):
  return lambda x: x[0] == k


class _Report(beam.CombineFn):
  """Everything the report counts, merged from small tagged tuples."""

  def create_accumulator(self):
    return dict(dropped={}, errors={}, kept=0, examples=0, synthesised=0, cross=0, far_frame=0, resumed=0,
                lines=[], shots=0, inputs=0, seconds={}, by_subject={})

  def add_input(self, acc, x):
    kind = x[0]
    if kind == 'drop':
      acc['dropped'][x[1]] = x[2]
      if x[3]:
        acc['errors'][x[1]] = x[3]
    elif kind == 'kept':
      acc['kept'] += 1
    elif kind == 'example':
      acc['examples'] += 1
      acc['synthesised'] += int('~' in x[1])
      pairs = json.loads(x[2])
      acc['cross'] += sum(p['mode'] == 'cross' for p in pairs)
      acc['far_frame'] += sum(p['mode'] != 'cross' for p in pairs)
      report_lib.count_modes(acc['by_subject'], pairs)
    elif kind == 'resumed':
      acc['resumed'] += 1
    elif kind == 'seconds':
      timing.add(acc['seconds'], x[1])
    elif kind == 'video':
      acc['lines'] += x[1]['lines']
      acc['shots'] += x[1]['shots']
      acc['inputs'] += x[1]['inputs']
    return acc

  def merge_accumulators(self, accs):
    out = self.create_accumulator()
    for a in accs:
      for k, v in a.items():
        if k == 'seconds':
          timing.add(out[k], v)
        elif k == 'by_subject':
          for sid, (cross, far) in v.items():
            pair = out[k].setdefault(int(sid), [0, 0])
            pair[0] += cross
            pair[1] += far
        elif isinstance(v, dict):
          out[k].update(v)
        else:
          out[k] += v
    return out

  def extract_output(self, acc):
    return acc


def _write_json(obj, path):
  storage.write_json(path, obj)


class _CachedClips(dict):
  """Clip records read from the per-clip caches under `work` on first use (what the example touches: its target,
  its other clip, the references it picks)."""

  def __init__(self, work: str):
    super().__init__()
    self.work = work

  def __missing__(self, name):
    self[name] = clips_lib.load_record(self.work, name)
    return self[name]


def _example(entry, index, mates, work, data_cfg, seed, video_encoder, text_encoder):
  timing.take()  # from zero: only this example's stages go with it
  ex = stages.make_example(entry, _CachedClips(work), index, mates.get(stages.shot_of(entry[1]), ()),
                            data_cfg, seed, video_encoder, text_encoder)
  yield entry[0], ex
  yield beam.pvalue.TaggedOutput('seconds', ('seconds', timing.take()))


class PrepareTransform(beam.PTransform):
  """The whole of `prepare` after the driver's listing: items -> (key, example); the report goes to `report_path`."""

  def __init__(self, *, mode: str, items: Sequence[Any], data_cfg, input_dir: str, output_dir: str, work: str,
               seed: int, report_path: str, video_encoder=None, text_encoder=None):
    super().__init__()
    self.mode, self.items, self.data_cfg = mode, list(items), data_cfg
    self.input_dir, self.output_dir, self.work, self.seed = input_dir, output_dir, work, seed
    self.report_path, self.video_encoder, self.text_encoder = report_path, video_encoder, text_encoder

  def expand(self, pbegin):
    cfg = self.data_cfg.prepare
    staged = (pbegin | 'Items' >> beam.Create(self.items)
              | 'Stage' >> beam.ParDo(_Stage(self.mode, self.data_cfg, self.input_dir, self.output_dir, self.work)))
    clips = staged | 'Clips' >> beam.Filter(_kind('clip')) | 'ClipKV' >> beam.Map(lambda x: (x[1], x[2]))
    dupes = (clips | 'Hashes' >> beam.Map(lambda kv: (kv[0], kv[1]['hash']))
             | 'AllHashes' >> beam.combiners.ToDict()
             | 'NearDuplicates' >> beam.Map(stages.near_duplicates, cfg.dedup_threshold))
    kept = clips | 'Dedup' >> beam.Filter(lambda kv, d: kv[0] not in d, beam.pvalue.AsSingleton(dupes))
    names = (kept | 'Names' >> beam.Keys() | 'AllNames' >> beam.combiners.ToList()
             | 'Sorted' >> beam.Map(sorted))
    # Cross-pairing: a GroupByKey on subject id gives every subject's clips, the index references are drawn from.
    # (One entry per occurrence, as pairing.build_index lists a clip once per occurrence of a subject id.)
    index = (kept | 'BySubject' >> beam.FlatMap(lambda kv: [(int(s), kv[0]) for s in kv[1]['subject_ids'].tolist()])
             | 'GroupBySubject' >> beam.GroupByKey()
             | 'Index' >> beam.MapTuple(lambda sid, clips: (sid, sorted(clips))))
    # Plan, spread over the workers, then each example from its clips' cached records.
    made = (names | 'Plan' >> beam.FlatMap(stages.plan_examples, self.seed, cfg.synth_per_clip)
                | 'Spread' >> beam.Reshuffle()
                | 'Example' >> beam.FlatMap(lambda entry, index, names: _example(
                    entry, index, stages.shot_mates(names), self.work, self.data_cfg, self.seed,
                    self.video_encoder, self.text_encoder),
                    beam.pvalue.AsDict(index), beam.pvalue.AsSingleton(names)).with_outputs('seconds', main='examples'))
    examples, example_seconds = made.examples, made.seconds
    # The report: drops, duplicates, kept, example reference modes, resumed items, grounded lines.
    tags = [staged | 'Drops' >> beam.Filter(lambda x: x[0] in ('drop', 'resumed', 'video', 'seconds')),
            example_seconds,
            dupes | 'DupeDrops' >> beam.FlatMap(lambda d: [('drop', k, v, '') for k, v in d.items()]),
            kept | 'Kept' >> beam.Map(lambda kv: ('kept',)),
            examples | 'Modes' >> beam.Map(lambda kv: ('example', kv[0], kv[1]['pairing']))]
    _ = (tags | 'ReportParts' >> beam.Flatten() | 'Report' >> beam.CombineGlobally(_Report())
         | 'WriteReport' >> beam.Map(_write_json, self.report_path))
    return examples


def run(data_cfg, input_dir, output_dir, annotations, work, seed, feats, video_encoder, text_encoder):
  """Every stage as a Beam pipeline on `data.prepare.beam_args`' runner; the same counts."""
  cfg = data_cfg.prepare
  if cfg.grounding != 'none':
    mode, items, dropped, errors, total = 'raw', video_lib.list_videos(input_dir), {}, {}, 0
  else:
    entries, dropped, errors, total = clips_lib.parse_annotations(annotations)
    mode, items = 'annotated', [(name, json.dumps(line)) for name, line in entries]
  parts_path = storage.join(work, 'beam_report.json')
  storage.path(parts_path).unlink(missing_ok=True)
  transform = PrepareTransform(
      mode=mode, items=items, data_cfg=data_cfg, input_dir=input_dir, output_dir=output_dir, work=work, seed=seed,
      report_path=parts_path, video_encoder=video_encoder, text_encoder=text_encoder)
  try:
    tfds_builder.write(output_dir, feats, {cfg.split: transform}, None,
                       pipeline_options(cfg.beam_args))
  except ValueError as e:
    if 'number of generated examples is 0' not in str(e):
      raise
    raise report_lib.nothing_survived({**dropped, **clips_lib.cached_drops(work)}, errors) from None
  parts = storage.read_json(parts_path)
  dropped.update(parts['dropped'])
  errors.update(parts['errors'])
  out = dict(input=total + parts['inputs'], kept=parts['kept'], dropped=dropped, errors=errors,
             examples=parts['examples'], references=dict(cross=parts['cross'], far_frame=parts['far_frame']),
             resumed=parts['resumed'], stage_seconds=parts['seconds'])  # worker-seconds, summed over workers
  if mode == 'raw':
    out.update(report_lib.grounded_summary(data_cfg, output_dir, items, parts['shots'], parts['lines']))
    out['references_by_grounder'] = report_lib.references_by_grounder(parts['by_subject'], parts['lines'])
  return out


def problems(beam_args: str) -> list[str]:
  """What keeps `data.prepare.beam_args` from starting a pipeline: a bad flag, a bad runner."""
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
