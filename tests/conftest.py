"""Test-wide settings: CPU only, 8 virtual devices for mesh/sharding tests, fp32 matmuls, a compilation cache."""

import os
import tempfile

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# XLA's persistent compilation cache, shared by the xdist workers and every subprocess the tests start (trainers,
# `python -m kaleido_jax.main`, multi-process runs): the suite compiles the same tiny programs many times over
# (a resumed run, each process of a multi-host run); keyed by the program, the flags and the jax version.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kaleido_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare fp32 numbers; the default CPU matmul precision is already full fp32, but be explicit.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng_seed():
  return 0
