r"""``python -m kaleido_jax.main --config configs/X.py --workdir DIR [--mode MODE]`` (kaleido_jax/main.py runs this).

Modes (default: ``config.mode``): train | sample | export | eval | prepare | demo | calibrate. Each mode is one
function ``run(config, workdir)``: the trainer's and prepare's live in the library, the others in this package.
This file parses flags, dispatches, and turns a user error into one ``error: ...`` line on stderr and exit status
2 (``run_mode``). The sampling flags (--prompt, --ref, --out, --checkpoint, --lora, --steps, --guidance, --seed,
--frames, --size) are shorthands for ``config.sample`` keys.
"""

from __future__ import annotations

import importlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from kaleido_jax import config as kcfg
from kaleido_jax.train import console

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/demo.py", "Python config file (get_config() -> ConfigDict); override any key "
    "with --config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/kaleido-demo", "Checkpoints, logs and outputs go here.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Load the config, apply every flag and override, say what would run, "
                             "and run nothing (the docs' commands are checked this way).")
_MODE = flags.DEFINE_enum("mode", None, ["train", "sample", "export", "eval", "prepare", "demo", "calibrate"],
                          "What to run; default: config.mode.")

# Sampling shorthands: each sets one config.sample key (so `--steps 20` == `--config.sample.num_steps=20`).
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt (config.sample.prompt).")
_PROMPTS = flags.DEFINE_string("prompts", None, "A prompt set, prompt@@img1@@img2 lines or a JSON manifest: one video "
                               "per request in the --out directory (config.sample.prompts).")
_REF = flags.DEFINE_multi_string("ref", None, "Reference image, repeat per subject (config.sample.refs).")
_LORA = flags.DEFINE_multi_string("lora", None, "LoRA file merged into the DiT, PATH or PATH:SCALE; repeat for "
                                  "several (config.sample.loras).")
_OUT = flags.DEFINE_string("out", None, "Output video .mp4/.gif (config.sample.output).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Weights: training checkpoint dir, converted dir, PyTorch "
                                  "checkpoint or 'random' (config.sample.checkpoint).")
_STEPS = flags.DEFINE_integer("steps", None, "Denoising steps (config.sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Text CFG scale (config.sample.guidance_scale).")
_SEED = flags.DEFINE_integer("seed", None, "Noise seed (config.sample.seed).")
_FRAMES = flags.DEFINE_integer("frames", None, "Video frames (config.sample.num_frames).")
_SIZE = flags.DEFINE_string("size", None, "HxW, e.g. 480x832, or one number for square (config.sample.height/width).")


def parse_size(text: str) -> tuple[int, int]:
  parts = text.lower().replace("*", "x").split("x")
  try:
    hw = [int(p) for p in parts]
  except ValueError:
    hw = []
  if len(hw) not in (1, 2) or min(hw) <= 0:
    raise ValueError(f"--size {text!r}: expected HxW (e.g. 480x832) or one positive number")
  return (hw[0], hw[-1])


def apply_sample_flags(config) -> None:
  """Copy the sampling shorthands that were given into config.sample."""
  s = config.sample
  for flag, key, cast in ((_PROMPT, "prompt", str), (_PROMPTS, "prompts", str), (_OUT, "output", str),
                          (_CHECKPOINT, "checkpoint", str),
                          (_STEPS, "num_steps", int), (_GUIDANCE, "guidance_scale", float), (_SEED, "seed", int),
                          (_FRAMES, "num_frames", int)):
    if flag.value is not None:
      s[key] = cast(flag.value)
  if _REF.value is not None:
    s.refs = tuple(_REF.value)
  if _LORA.value is not None:
    s.loras = tuple(_LORA.value)
  if _SIZE.value is not None:
    s.height, s.width = parse_size(_SIZE.value)


# mode -> "module:function"; each function is run(config, workdir).
MODES = {
    "train": "kaleido_jax.train.loop:run",
    "sample": "kaleido_jax.cli.sample:run",
    "export": "kaleido_jax.cli.export:run",
    "eval": "kaleido_jax.cli.evaluate:run",
    "prepare": "kaleido_jax.data.prepare:run",
    "demo": "kaleido_jax.cli.demo:run",
    "calibrate": "kaleido_jax.cli.calibrate:run",
}


def resolve(mode: str):
  """The run(config, workdir) of a mode; imported on use, so `--mode sample` never imports the trainer."""
  module, fn = MODES[mode].split(":")
  return getattr(importlib.import_module(module), fn)


def user_errors(mode: str) -> tuple[type[BaseException], ...]:
  """What a mode raises for bad input (one line, exit 2); anything else is a bug and keeps its traceback.

  Every library error class for user input is here; a mode adds the OS errors its inputs raise (a missing file).
  """
  # Imported on the error path only: the trainer and the pipeline take seconds to import.
  from kaleido_jax import batch, exported, storage  # lazy: the error path
  from kaleido_jax.data import references  # lazy: the error path
  from kaleido_jax.train import loop  # lazy: the error path
  errors = (kcfg.ConfigError, storage.StorageError, references.ReferenceImageError, batch.PromptSetError,
            exported.ExportedSamplerError, loop.TrainingDiverged)
  if mode != "train":  # the trainer never imports the sampling pipeline
    from kaleido_jax import pipeline  # lazy: the error path
    errors += (pipeline.UserInputError,)
  if mode == "prepare":
    from kaleido_jax.data.prepare import report  # lazy: the error path
    errors += (report.NothingSurvived,)
  return errors + {"sample": (FileNotFoundError,), "eval": (FileNotFoundError,),
                   "export": (FileNotFoundError, ValueError)}.get(mode, ())


def run_mode(mode: str, config, workdir: str):
  """Run a mode as the command line does: its result, or a user error as one stderr line and exit status 2."""
  try:
    return resolve(mode)(config, workdir)
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, user_errors(mode)):
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
  """absl's flag parsing, with an unknown or malformed --config.* override as one line and exit status 2."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    line = kcfg.unknown_override(argv, _CONFIG.default)
    print(line or f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}; see --help", file=sys.stderr)
    sys.exit(2)
  except (ImportError, SyntaxError, OSError) as e:  # the config file itself does not load
    where = f" ({e.filename}:{e.lineno})" if isinstance(e, SyntaxError) else ""
    print(f"error: the config file does not load: {type(e).__name__}: {str(e).splitlines()[0]}{where}; fix it or "
          "pass another --config", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = _CONFIG.value
    mode = _MODE.value or config.mode
  except OSError as e:  # ml_collections defers a config file it could not read until the config is used
    detail = str(e).strip().splitlines()[-1].strip()
    print(f"error: the config file does not load: {detail}; pass an existing --config file", file=sys.stderr)
    sys.exit(2)
  if mode not in MODES:
    print(f"error: unknown mode {mode!r}; choose one of {sorted(MODES)}", file=sys.stderr)
    sys.exit(2)
  try:
    apply_sample_flags(config)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _DRY_RUN.value:
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    print(f"dry run: --mode {mode} --workdir {_WORKDIR.value} with {config_file} ({MODES[mode]})")
    return
  with console.quiet_logs(config.train.get('console', 'log') == 'progress'):
    run_mode(mode, config, _WORKDIR.value)


def entry():
  app.run(main, flags_parser=parse_flags)
