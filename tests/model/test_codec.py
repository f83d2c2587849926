"""The pixel codec: average pooling down, nearest (default) or bilinear upsampling back."""

import numpy as np
import pytest

from kaleido_jax import config as kcfg
from kaleido_jax.model import codec


def _codec(**kw):
  return codec.PixelCodec(kcfg.vae_config(kind='pixel', pixel_downsample=2, **kw))


def test_nearest_round_trip_is_exact_on_block_constant_video():
  rng = np.random.default_rng(0)
  z = rng.uniform(-1, 1, size=(2, 3, 4, 5, 3)).astype(np.float32)
  video = np.repeat(np.repeat(z, 2, axis=2), 2, axis=3)   # every 2x2 block one colour
  c = _codec()
  np.testing.assert_allclose(np.asarray(c.encode(video)), z, atol=1e-6)
  np.testing.assert_allclose(np.asarray(c.decode(c.encode(video))), video, atol=1e-6)


def test_linear_upsampling_blends_neighbouring_blocks():
  z = np.zeros((1, 1, 2, 2, 3), np.float32)
  z[..., 0, 1, :] = 1.0
  near = np.asarray(_codec().decode(z))[0, 0, :, :, 0]
  lin = np.asarray(_codec(pixel_upsample='linear').decode(z))[0, 0, :, :, 0]
  assert set(np.unique(near)) == {0.0, 1.0}
  assert 0.0 < lin[0, 1] < 1.0 and 0.0 < lin[0, 2] < 1.0   # the edge between the blocks is blurred


def test_unknown_upsampling_names_the_key():
  with pytest.raises(ValueError, match='pixel_upsample'):
    _codec(pixel_upsample='cubic')
