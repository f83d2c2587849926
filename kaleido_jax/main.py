r"""Entry point: ``python -m kaleido_jax.main --config configs/X.py --workdir DIR [--mode MODE]``.

Modes (default: ``config.mode``): train | sample | export | eval | prepare | demo. Each mode is one
function ``run(config, workdir)`` in the module that owns it; this file only parses flags, validates the
config and dispatches, so nothing imports ``main``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/demo.py", "Python config file (get_config() -> ConfigDict); override any key "
    "with --config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/kaleido-demo", "Checkpoints, logs and outputs go here.")
_MODE = flags.DEFINE_enum("mode", None, ["train", "sample", "export", "eval", "prepare", "demo"],
                          "What to run; default: config.mode.")

# mode -> "module:function"; each function is run(config, workdir).
MODES = {
    "train": "kaleido_jax.train.loop:run",
    "sample": "kaleido_jax.generate:run",
    "export": "kaleido_jax.export:run",
    "eval": "kaleido_jax.eval.runner:run",
    "prepare": "kaleido_jax.data.prepare:run",
    "demo": "kaleido_jax.demo:run",
}


def resolve(mode: str):
  module, fn = MODES[mode].split(":")
  if importlib.util.find_spec(module) is None:
    print(f"error: --mode {mode} needs {module}, which this version of kaleido_jax does not ship yet; "
          f"available modes: {sorted(m for m, t in MODES.items() if importlib.util.find_spec(t.split(':')[0]))}",
          file=sys.stderr)
    sys.exit(2)
  return getattr(importlib.import_module(module), fn)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  mode = _MODE.value or config.mode
  if mode not in MODES:
    print(f"error: unknown mode {mode!r}; choose one of {sorted(MODES)}", file=sys.stderr)
    sys.exit(2)
  resolve(mode)(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
