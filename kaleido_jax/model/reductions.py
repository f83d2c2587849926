"""Sums written as products with a ones vector, for XLA:CPU's sake.

jaxlib 0.10's CPU backend hands a reduction fed by an elementwise product to a YNNPACK fusion that is ~10-25x
slower than XLA's own loop: `sum(a * b, axis)` over a (1, 1792, 512) fp32 pair took 5.0 ms over tokens and
2.5 ms over features, against 0.2 ms for the same sum as `(a * b) @ ones` (2 cores; bench/dit_step.py
shows the effect on a whole step). A DiT layer's backward has about a dozen such sums (gradients of biases, norm scales and
the AdaLN shift/scale/gate, which are broadcast over tokens), and its norms have a few more. Writing them as
dot products keeps them on the fast matmul path on every backend; on TPU/GPU a dot with a ones vector costs
the same as a reduction. Numerics: both sum in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def mean_last(x: jax.Array) -> jax.Array:
  """Mean over the last axis, keeping it (..., 1); the transpose of a dot is a broadcast, not a reduction."""
  ones = jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)
  return jnp.matmul(x, ones, preferred_element_type=jnp.float32).astype(x.dtype)


def sum_last(x: jax.Array) -> jax.Array:
  """Sum over the last axis, keeping it (..., 1)."""
  ones = jnp.ones((x.shape[-1], 1), x.dtype)
  return jnp.matmul(x, ones, preferred_element_type=jnp.float32).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_to(v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`jnp.broadcast_to` whose gradient sums the broadcast axes with a dot against ones."""
  return jnp.broadcast_to(v, shape)


def _broadcast_fwd(v, shape):
  return jnp.broadcast_to(v, shape), v  # v is small (a bias or a per-sample vector): kept for its shape


def _broadcast_bwd(shape, v, g):
  padded = (1,) * (len(shape) - v.ndim) + tuple(v.shape)
  axes = tuple(i for i, (a, b) in enumerate(zip(padded, shape)) if a == 1 and b != 1)
  if not axes:
    return (g.reshape(v.shape).astype(v.dtype),)
  ones = jnp.ones([shape[i] for i in axes], g.dtype)
  k = len(axes)
  if axes == tuple(range(len(shape) - k, len(shape))):
    # Trailing axes (a per-token statistic): g is the (M, K) left operand in its own row-major layout.
    summed = jax.lax.dot_general(g, ones, ((axes, tuple(range(k))), ((), ())),
                                 preferred_element_type=jnp.float32)
  else:
    # Leading / token axes (a bias, a per-sample vector): ones on the left, g the (K, N) right operand.
    summed = jax.lax.dot_general(ones, g, ((tuple(range(k)), axes), ((), ())),
                                 preferred_element_type=jnp.float32)
  keep = [d for i, d in enumerate(padded) if i not in axes]
  return (summed.reshape(keep).reshape(v.shape).astype(v.dtype),)


broadcast_to.defvjp(_broadcast_fwd, _broadcast_bwd)
