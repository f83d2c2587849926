"""Subprocess entry for trainer tests: `python -m tests.train.worker ARGS_JSON`.

ARGS: workdir, train (overrides), mesh (overrides), data (overrides), sleep (seconds per batch, so a test can
signal the process mid-run), out (JSON file for the run's step / losses / preempted / data shard; process i > 0
writes OUT.i), slice (a TPU topology, e.g. 'v5p:2x2x2': the CPU devices of the processes stand in for that
slice's chips, host for host, and the trainer's mesh builder places them as it places the real chips, so hosts
interleave along fsdp as on the slice; needs libtpu)."""

import json
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

import numpy as np  # noqa: E402

from kaleido_jax.parallel import mesh as mesh_lib  # noqa: E402
from kaleido_jax.train import inputs, loop  # noqa: E402
from tests.train.common import tiny_config  # noqa: E402


def stand_in_for(topology):
  """mesh_lib.device_grid for CPU devices standing in for `topology`'s chips: the k-th chip of host p (in the
  order libtpu lists that slice's devices, as jax.devices() does on it) is the k-th CPU device of process p."""
  from kaleido_jax.tools import aot
  chips = aot.topology_devices(topology)
  place = mesh_lib.device_grid

  def grid(shape, devices):
    mine = {}
    for d in devices:
      mine.setdefault(d.process_index, []).append(d)
    seen = {}
    twin = {}
    for c in chips:
      k = seen[c.process_index] = seen.get(c.process_index, -1) + 1
      twin[c] = mine[c.process_index][k]
    placed = place(shape, chips)
    return np.vectorize(twin.get, otypes=[object])(placed)
  return grid


def main():
  args = json.loads(sys.argv[1])
  config = tiny_config(**args.get('train', {}))
  config.mesh.update(args.get('mesh', {}))
  config.data.update(args.get('data', {}))
  if args.get('slice'):
    mesh_lib.device_grid = stand_in_for(args['slice'])
  sleep = args.get('sleep', 0.0)
  if sleep:
    make = inputs.make_input

    def slow(config, *, seed, **kw):
      it = make(config, seed=seed, **kw)

      class Slow:
        def __iter__(self):
          return self

        def __next__(self):
          time.sleep(sleep)
          return next(it)

        def get_state(self):
          return it.get_state()

        def set_state(self, s):
          it.set_state(s)

        def start_prefetch(self):
          pass
      return Slow()
    inputs.make_input = slow
  out = loop.run(config, args['workdir'])
  if args.get('out'):  # process 0 writes OUT, process i > 0 OUT.i
    path = args['out'] + ('' if jax.process_index() == 0 else f'.{jax.process_index()}')
    with open(path, 'w') as f:
      json.dump({'step': out['step'], 'losses': out['losses'], 'preempted': out['preempted'],
                 'shard': list(out['shard'])}, f)


if __name__ == '__main__':
  main()
