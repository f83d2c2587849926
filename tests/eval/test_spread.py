"""The evaluation networks' batches split over this host's devices (8 virtual CPU devices in the tests): the same
numbers as one device, for a batch that is not a multiple of the device count."""

import jax
import jax.numpy as jnp
import numpy as np

from kaleido_jax.eval import spread


def test_a_batch_split_over_the_devices_gives_the_one_device_numbers():
  assert len(jax.local_devices()) > 1
  w = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
  x = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)  # 5 rows over 8 devices: 3 padded
  fn = lambda state, x, k: jnp.tanh(x @ state['w']) * k
  over = spread.OverDevices(fn, {'w': w}, num_batched=1, static=1)
  got = over(x, static=(2.0,))
  assert got.shape == (5, 4)
  np.testing.assert_allclose(got, np.tanh(x @ w) * 2.0, rtol=1e-6, atol=1e-6)
  assert len(over.state['w'].sharding.device_set) == len(jax.local_devices())  # the weights on every device
