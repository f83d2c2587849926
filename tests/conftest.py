"""Test-wide settings: CPU only, 8 virtual devices for mesh/sharding tests, fp32 matmuls."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare fp32 numbers; the default CPU matmul precision is already full fp32, but be explicit.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng_seed():
  return 0
