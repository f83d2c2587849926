"""``python -m kaleido_jax.main --config configs/X.py --workdir DIR [--mode MODE]``: the entry point the design
card names. The command line itself is kaleido_jax/cli/main.py; nothing imports this file."""

from kaleido_jax.cli import main

if __name__ == "__main__":
  main.entry()
