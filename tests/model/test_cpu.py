"""The CPU rewrites (model/cpu.py) equal the plain code: the dot-product sums, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaleido_jax.model import cpu


@pytest.mark.parametrize("vshape,shape", [((2, 1, 5), (2, 7, 5)),   # per-sample AdaLN vector over tokens
                                          ((5,), (2, 7, 5)),         # a bias / norm scale
                                          ((2, 7, 1), (2, 7, 5)),    # a per-token statistic
                                          ((1, 7, 5), (3, 7, 5)),    # broadcast over the batch only
                                          ((2, 7, 5), (2, 7, 5))])   # nothing broadcast
def test_broadcast_to_has_the_gradient_of_jnp_broadcast_to(vshape, shape):
  r = np.random.default_rng(0)
  v = jnp.asarray(r.standard_normal(vshape), jnp.float32)
  w = jnp.asarray(r.standard_normal(shape), jnp.float32)
  f = lambda bcast: jax.jit(jax.value_and_grad(lambda v: jnp.sum(jnp.sin(bcast(v, shape)) * w)))(v)
  (a, ga), (b, gb) = f(cpu.broadcast_to), f(jnp.broadcast_to)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert ga.shape == v.shape
  np.testing.assert_allclose(ga, gb, atol=1e-5 * float(jnp.abs(gb).max()))


def test_mean_and_sum_over_the_last_axis_and_the_gradient():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 11, 64)), jnp.float32)
  np.testing.assert_allclose(cpu.mean_last(x), x.mean(-1, keepdims=True), atol=1e-6)
  np.testing.assert_allclose(cpu.sum_last(x), x.sum(-1, keepdims=True), atol=1e-5)
  g = jax.grad(lambda x: jnp.sum(jnp.cos(cpu.mean_last(x * x))))(x)
  h = jax.grad(lambda x: jnp.sum(jnp.cos((x * x).mean(-1, keepdims=True))))(x)
  np.testing.assert_allclose(g, h, atol=1e-6)
