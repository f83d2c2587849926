"""kaleido_jax: Kaleido subject-to-video generation in JAX / Flax NNX."""

__version__ = "0.1.0"
