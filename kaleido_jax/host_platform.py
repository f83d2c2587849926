"""Keep a plain CPU run quiet: with libtpu installed (the [test] / [tpu] extras) and no TPU in the machine, JAX would
try the TPU backend first and libtpu print its initialisation trace (`libtpu_init_utils.cc`, worker-hostname
errors) on every command, which a user reads as an error. The command-line entry files call `cpu_unless_tpu()`
before JAX starts; JAX_PLATFORMS set by the user always wins."""

from __future__ import annotations

import glob
import importlib.util
import os

# Where a TPU VM's chips appear: /dev/accel* (v4, v5p), /dev/vfio/N (v5e, v6e).
TPU_DEVICE_FILES = ('/dev/accel*', '/dev/vfio/[0-9]*')
GPU_DEVICE_FILES = ('/dev/nvidia[0-9]*',)


def _present(patterns: tuple[str, ...]) -> bool:
  return any(glob.glob(p) for p in patterns)


def cpu_unless_tpu() -> str | None:
  """Sets JAX_PLATFORMS=cpu when it is unset, libtpu is installed, and the machine has no TPU (nor a GPU, whose
  backend is left to JAX); returns what it set."""
  if 'JAX_PLATFORMS' in os.environ or importlib.util.find_spec('libtpu') is None:
    return None
  if _present(TPU_DEVICE_FILES) or _present(GPU_DEVICE_FILES):
    return None
  os.environ['JAX_PLATFORMS'] = 'cpu'
  return 'cpu'
