"""``python -m kaleido_jax.convert ...``: the converter's command line (kaleido_jax/cli/convert.py)."""

import sys

from kaleido_jax import host_platform

host_platform.cpu_unless_tpu()  # before JAX starts: no libtpu trace on a machine without a TPU

from kaleido_jax.cli import convert  # noqa: E402

if __name__ == "__main__":
  sys.exit(convert.main())
