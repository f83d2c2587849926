"""`prepare` on Apache Beam (`data.prepare.engine='beam'`): the same stages as Beam transforms, written by TFDS.

    read -> decode / shots / ground (raw videos) or read (annotated clips) -> filters + cut-outs   (ParDo)
    -> near-duplicates (one global pass over the hashes, name order)                         (ToDict, side input)
    -> cross-pairing: subject id -> clips, a GroupByKey on subject id                             (GroupByKey)
    -> plan (target, variant, other) -> join target / other / every candidate reference's cut-outs (CoGroupByKey)
    -> synthesis + references + optional encoders -> (key, example)                               (Map)
    -> ArrayRecord shards through TFDS' Beam writer (the same features and files the local engine writes).

Every per-clip function is the local engine's own (prepare.py), so both engines give the same examples (same
keys, same bytes) and the same report counts (tests/data/test_beam.py, two DirectRunner worker processes); the
per-clip caches under `output_dir/_work` are shared too, so a failed or killed Beam run resumes like a local one.
TFDS sizes the Beam engine's shards by bytes (64 MiB to 1 GiB); `shard_size` applies to the local engine. An
example joins in the cut-outs of every kept clip that holds one of its subjects (what cross-pairing picks from):
with per-source identities (ingest.py) that is a source's other shots, a few KiB each. `input_dir` and
`output_dir` must be POSIX paths every worker can read and write (NFS / Filestore, or a bucket mounted with
gcsfuse in the workers' container). Runner and workers come from `data.prepare.beam_args`, passed to Beam's
PipelineOptions, e.g. '--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing', or
'--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp' (needs `pip install
"apache-beam[gcp]==2.77.0"`), FlinkRunner, SparkRunner.
"""

from __future__ import annotations

import json
import shlex
from typing import Any, Sequence

import apache_beam as beam

from kaleido_jax.data import prepare

REF_FIELDS = ('subject_ids', 'cutouts', 'cutout_frames')  # what a clip contributes as another clip's reference


def pipeline_options(beam_args: str) -> beam.options.pipeline_options.PipelineOptions:
  return beam.options.pipeline_options.PipelineOptions(flags=shlex.split(beam_args or ''))


class _Stage(beam.DoFn):
  """Stage 0-2 of one item: ('clip', name, record) / ('drop', name, reason, error) / ('video', summary) /
  ('resumed', 1)."""

  def __init__(self, mode: str, data_cfg, input_dir: str, output_dir: str, work: str):
    self.mode, self.data_cfg, self.input_dir, self.output_dir, self.work = mode, data_cfg, input_dir, output_dir, work
    self.models = None

  def setup(self):
    self.models = prepare.LazyModels(self.data_cfg.prepare, self.input_dir)

  def process(self, item):
    if self.mode == 'annotated':
      name, line = item
      d, was = prepare.annotated_one(name, json.loads(line), self.data_cfg, self.input_dir, self.work)
      records, done = {name: d}, None
    else:
      done, records, was = prepare.ground_one(item, self.data_cfg, self.input_dir, self.output_dir, self.work,
                                              self.models)
      for name, reason in done['drops'].items():
        yield ('drop', name, reason, done.get('error', ''))
      yield ('video', dict(lines=done['lines'], shots=done['shots'], inputs=len(done['lines']) + len(done['drops'])))
    if was:
      yield ('resumed', 1)
    for name, d in records.items():
      if 'drop' in d:
        yield ('drop', name, d['drop'], d.get('error', ''))
      else:
        yield ('clip', name, d)


def _kind(k):
  return lambda x: x[0] == k


class _Report(beam.CombineFn):
  """Everything the report counts, merged from small tagged tuples."""

  def create_accumulator(self):
    return dict(dropped={}, errors={}, kept=0, examples=0, synthesised=0, cross=0, far_frame=0, resumed=0,
                lines=[], shots=0, inputs=0)

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
      acc['cross'] += x[2]
      acc['far_frame'] += x[3]
    elif kind == 'resumed':
      acc['resumed'] += 1
    elif kind == 'video':
      acc['lines'] += x[1]['lines']
      acc['shots'] += x[1]['shots']
      acc['inputs'] += x[1]['inputs']
    return acc

  def merge_accumulators(self, accs):
    out = self.create_accumulator()
    for a in accs:
      for k, v in a.items():
        if isinstance(v, dict):
          out[k].update(v)
        else:
          out[k] += v
    return out

  def extract_output(self, acc):
    return acc


def _write_json(obj, path):
  prepare.atomic_json(path, obj)


def _example(joined, parts, index, mates, data_cfg, seed, video_encoder, text_encoder):
  entry, target, other = joined
  clips = {}
  for group in parts:
    for name, part in group:
      clips[name] = part
  clips[entry[1]] = target
  if other is not None:
    clips[entry[3]] = other
  ex = prepare.make_example(entry, clips, index, mates.get(prepare.shot_of(entry[1]), ()),
                            data_cfg, seed, video_encoder, text_encoder)
  return entry[0], ex


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
             | 'NearDuplicates' >> beam.Map(prepare.near_duplicates, cfg.dedup_threshold))
    kept = clips | 'Dedup' >> beam.Filter(lambda kv, d: kv[0] not in d, beam.pvalue.AsSingleton(dupes))
    names = (kept | 'Names' >> beam.Keys() | 'AllNames' >> beam.combiners.ToList()
             | 'Sorted' >> beam.Map(sorted))
    # Cross-pairing: a GroupByKey on subject id gives every subject's clips (the index) and their cut-outs.
    # (One entry per occurrence, as pairing.build_index lists a clip once per occurrence of a subject id.)
    by_subject = (kept | 'BySubject' >> beam.FlatMap(
        lambda kv: [(int(s), (kv[0], {f: kv[1][f] for f in REF_FIELDS})) for s in kv[1]['subject_ids'].tolist()])
                  | 'GroupBySubject' >> beam.GroupByKey())
    index = by_subject | 'Index' >> beam.Map(lambda kv: (kv[0], sorted(n for n, _ in kv[1])))
    plan = names | 'Plan' >> beam.FlatMap(prepare.plan_examples, self.seed, cfg.synth_per_clip)
    # Join the target's and the other clip's records.
    with_target = ({'e': plan | 'ByTarget' >> beam.Map(lambda e: (e[1], e)), 'c': kept}
                   | 'JoinTarget' >> beam.CoGroupByKey()
                   | 'TargetRec' >> beam.FlatMap(lambda kv: [(e[3], (e, kv[1]['c'][0])) for e in kv[1]['e']]))
    none_other = with_target | 'NoOther' >> beam.Filter(lambda kv: not kv[0]) | 'NoOtherKV' >> beam.Map(
        lambda kv: (kv[1][0][0], (kv[1][0], kv[1][1], None)))
    with_other = ({'e': with_target | 'HasOther' >> beam.Filter(lambda kv: bool(kv[0])), 'c': kept}
                  | 'JoinOther' >> beam.CoGroupByKey()
                  | 'OtherRec' >> beam.FlatMap(lambda kv: [(e[0], (e, t, kv[1]['c'][0])) for e, t in kv[1]['e']]))
    joined = (none_other, with_other) | 'Joined' >> beam.Flatten()
    # Every candidate reference of the example's subjects (target's and other's: a composed variant has both).
    needs = joined | 'Needs' >> beam.FlatMap(lambda kv: [(s, kv[0]) for s in _subjects(kv[1][1], kv[1][2])])
    parts = ({'need': needs, 'parts': by_subject}
             | 'JoinSubjects' >> beam.CoGroupByKey()
             | 'PartsFor' >> beam.FlatMap(lambda kv: [(k, list(kv[1]['parts'][0])) for k in kv[1]['need']])
             | 'GroupParts' >> beam.GroupByKey())
    examples = ({'j': joined, 'p': parts} | 'JoinExample' >> beam.CoGroupByKey()
                | 'Example' >> beam.Map(lambda kv, index, names: _example(
                    kv[1]['j'][0], kv[1]['p'][0] if kv[1]['p'] else [], index, prepare.shot_mates(names),
                    self.data_cfg, self.seed, self.video_encoder, self.text_encoder),
                    beam.pvalue.AsDict(index), beam.pvalue.AsSingleton(names)))
    # The report: drops, duplicates, kept, example reference modes, resumed items, grounded lines.
    tags = [staged | 'Drops' >> beam.Filter(lambda x: x[0] in ('drop', 'resumed', 'video')),
            dupes | 'DupeDrops' >> beam.FlatMap(lambda d: [('drop', k, v, '') for k, v in d.items()]),
            kept | 'Kept' >> beam.Map(lambda kv: ('kept',)),
            examples | 'Modes' >> beam.Map(lambda kv: ('example', kv[0], *_modes(kv[1])))]
    _ = (tags | 'ReportParts' >> beam.Flatten() | 'Report' >> beam.CombineGlobally(_Report())
         | 'WriteReport' >> beam.Map(_write_json, self.report_path))
    return examples


def _subjects(target, other) -> list[int]:
  ids = set(target['subject_ids'].tolist()) | (set(other['subject_ids'].tolist()) if other is not None else set())
  return sorted(int(s) for s in ids)


def _modes(ex) -> tuple[int, int]:
  prov = json.loads(ex['pairing'])
  return sum(p['mode'] == 'cross' for p in prov), sum(p['mode'] == 'far_frame' for p in prov)

