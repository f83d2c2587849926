r"""``python -m kaleido_jax.tools.aot``: the AOT fit check's command line (the compiling: kaleido_jax/tools/aot.py).

Run as a command, tools/aot.py sets the environment before JAX starts: JAX_PLATFORMS=cpu (the host backend stays
CPU; the TPU backend is only a compiler) and ALLOW_MULTIPLE_LIBTPU_LOAD=1 (compile-only use of libtpu takes no TPU
lock).
"""

from __future__ import annotations

import importlib.util
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from kaleido_jax import config as kcfg
from kaleido_jax.tools import aot


def _define_flags():
  """Flags exist only when this runs as the command, so importing it next to `kaleido_jax.cli.main`, which owns
  --config in the same absl registry, does not collide."""
  return (
      config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Training config file.', lock_config=False),
      flags.DEFINE_string('topology', 'v5p:2x2x2', 'TPU slice: "<generation>:<AxBxC>", e.g. '
                          'v5p:2x2x2 (v5p-16), v6e:4x4 (v6e-16).'),
      flags.DEFINE_integer('batch_size', 0, "Global batch; 0 = the config's data.batch_size (train; validated "
                           'as the trainer would) or one video (sample).'),
      flags.DEFINE_integer('num_refs', -1, 'References per sample; -1 = data.max_refs (train) or '
                           'model.max_refs (sample).'),
      flags.DEFINE_integer('num_slices', 1, 'Slices of --topology joined over DCN (multislice, --step train); the mesh '
                           'spans them as config.mesh.dcn_* say (default: data across slices).'),
      flags.DEFINE_bool('dry_run', False, 'Load the config and the flags, say what would compile, compile nothing.'),
      flags.DEFINE_enum('step', 'train', ['train', 'sample'], 'train: the training step; sample: one '
                        'denoising call with all guidance branches, the umT5 encoder and a VAE decode chunk.'),
  )


def main(argv):
  del argv
  config, topology, batch, refs, slices, dry_run, step = _FLAGS
  if dry_run.value:
    print(f'dry run: --step {step.value} for {slices.value} x {topology.value} with '
          f'{config_flags.get_config_filename(flags.FLAGS["config"])}')
    return
  if importlib.util.find_spec('libtpu') is None:
    print('error: libtpu is not installed; pip install "jax[tpu]==<your jax version>"', file=sys.stderr)
    sys.exit(2)
  try:
    if step.value == 'sample':
      print(aot.format_sample_table(aot.analyse_sample(config.value, topology.value, batch.value or 1, refs.value)))
    else:
      print(aot.format_table(aot.analyse(config.value, topology.value, batch.value, refs.value, slices.value)))
  except kcfg.ConfigError as e:  # what `--mode train` would refuse on this slice: refused before compiling
    print(f'error: {e} (topology {topology.value})', file=sys.stderr)
    sys.exit(2)


def entry():
  global _FLAGS
  _FLAGS = _define_flags()
  app.run(main)


_FLAGS = None
