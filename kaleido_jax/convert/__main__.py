"""``python -m kaleido_jax.convert ...``: the converter's command line (kaleido_jax/cli/convert.py)."""

import sys

from kaleido_jax.cli import convert

if __name__ == "__main__":
  sys.exit(convert.main())
