r"""Checkpoint save / restore of the demo's train state: local disk vs a bucket (fake-gcs-server on loopback).

  JAX_PLATFORMS=cpu python bench/storage.py [--config configs/demo.py] [--repeats 3]

The same trainer Checkpointer (orbax CheckpointManager: state, config; no data iterator) writes the demo's
full train state (params, AdamW moments, EMA) to a local directory and to `gs://BUCKET/...` on the emulator
(tests/gcs.py), then restores it into its shardings; both in this one run. Printed: MB written, the median
seconds of `save + wait` and of `restore` per target, and the bucket / local ratio. The emulator is a single
Go process on this machine, not Cloud Storage: the ratio says what the protocol path costs here (HTTP,
tensorstore's GCS driver, one object per chunk), not what a TPU VM's network to a real bucket gives.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _config(path):
  spec = importlib.util.spec_from_file_location('bench_cfg', os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  config.mesh.update(data=1)
  config.train.async_checkpointing = False
  return config


def _time(directory, config, spec, state, repeats):
  import jax  # pylint: disable=g-import-not-at-top
  from kaleido_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  saves, restores = [], []
  ckpt = checkpoint.Checkpointer(directory, config.train)
  for step in range(1, repeats + 1):
    t = time.perf_counter()
    ckpt.save(step, state, None, config, force=True)
    ckpt.wait()
    saves.append(time.perf_counter() - t)
    t = time.perf_counter()
    got = ckpt.restore(step, spec.abstract_state)
    jax.block_until_ready(got)
    restores.append(time.perf_counter() - t)
  ckpt.close()
  return statistics.median(saves), statistics.median(restores)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--config', default='configs/demo.py')
  p.add_argument('--repeats', type=int, default=3)
  args = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  from kaleido_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from kaleido_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from tests import gcs as gcs_lib  # pylint: disable=g-import-not-at-top
  config = _config(args.config)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  spec = state_lib.build_spec(config, mesh)
  state = state_lib.checkpointed(state_lib.init_state(config, spec, mesh))
  mb = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) / 2 ** 20
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    rows.append(('local disk', *_time(os.path.join(tmp, 'ckpt'), config, spec, state, args.repeats)))
  with gcs_lib.emulator() as gcs:
    rows.append(('gs:// (emulator)', *_time(f'gs://{gcs.bucket}/ckpt', config, spec, state, args.repeats)))
  print(f'{args.config}: train state {mb:.1f} MB, median of {args.repeats}, {jax.devices()[0].platform}')
  print(f'| target | save + wait (s) | restore (s) | save ratio | restore ratio |')
  print('|---|---|---|---|---|')
  for name, s, r in rows:
    print(f'| {name} | {s:.3f} | {r:.3f} | {s / rows[0][1]:.2f}x | {r / rows[0][2]:.2f}x |')


if __name__ == '__main__':
  main()
