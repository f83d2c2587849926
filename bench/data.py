r"""Data throughput: the Grain loader (0 / 1 / 2 workers) on the synthetic set and `prepare` in clips/s.

  JAX_PLATFORMS=cpu python bench/data.py [--batches 12] [--prepare_clips 24]

Loader: synthetic source at 17 x 128 x 128 with 3 reference slots, batch 4, read_threads 1; the first batch
(worker start-up) is excluded; samples/s and the ratio against the 0-worker run of the same invocation.
Prepare: `num_clips` synthetic clips exported to mp4 + masks, then the whole construction pipeline
(read, filter, cut-out, cross-pair, one synthesised variant per clip, TFDS ArrayRecord write); export time is
reported separately; then the loader (0 workers) reading those ArrayRecord shards. Runs under absl.app.run (grain worker processes need parsed flags).
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


if __name__ == '__main__':
  app.run(main)
