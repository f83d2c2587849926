"""``python -m kaleido_jax.main --config configs/X.py --workdir DIR [--mode MODE]``: the entry point the design
card names. The command line itself is kaleido_jax/cli/main.py; nothing imports this file."""

from kaleido_jax import host_platform

host_platform.cpu_unless_tpu()  # before JAX starts: no libtpu trace on a machine without a TPU

from kaleido_jax.cli import main  # noqa: E402

if __name__ == "__main__":
  main.entry()
