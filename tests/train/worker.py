"""Subprocess entry for trainer tests: `python -m tests.train.worker ARGS_JSON`.

ARGS: workdir, train (overrides), mesh (overrides), sleep (seconds per batch, so a test can signal the
process mid-run), out (JSON file for the run's step / losses / preempted / data shard; process i > 0 writes
OUT.i)."""

import json
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

from kaleido_jax.train import inputs, loop  # noqa: E402
from tests.train.common import tiny_config  # noqa: E402


def main():
  args = json.loads(sys.argv[1])
  config = tiny_config(**args.get('train', {}))
  config.mesh.update(args.get('mesh', {}))
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
