"""The video codec between pixels and the DiT's input space: the Wan VAE, or pixels themselves.

Everything above the codec (trainer, sampler, pipeline, exporter) talks to this small contract only:

  encode(video (B, F, H, W, 3) in [-1, 1]) -> raw latents (B, f, h, w, z)
  normalize(z) / denormalize(z)           -> what the DiT sees / what decode takes
  decode(raw latents) -> video in [-1, 1]
  latent_shape(F, H, W) -> (f, h, w, z);  temporal_factor, spatial_factor, z_dim
  check_video_size(vae_config, F, H, W) and factors(vae_config) answer without building the codec.

`vae.kind = 'wan'` is :class:`kaleido_jax.model.vae.WanVAE` (4x time, 8x space, 16 channels).
`vae.kind = 'pixel'` is :class:`PixelCodec`: the DiT denoises RGB pixels directly (average-pooled by
`vae.pixel_downsample`; its patch embedding does the spatial folding). It exists for the CPU demo, where a tiny DiT on 32x32 pixels learns
visibly faster than it would behind an untrained or tiny VAE, and there are no VAE weights to download.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from kaleido_jax.model import vae as vae_lib

CODECS = ('wan', 'pixel')


class PixelCodec(nnx.Module):
  """Fixed codec: latents are the pixels in [-1, 1], average-pooled by `pixel_downsample` in space.

  No temporal compression, z = 3. Decoding upsamples by `pixel_upsample`: 'nearest' (default) repeats each
  latent pixel over the block it was pooled from; on the demo's held-out target clips the round trip then
  costs 0.001 LPIPS against 0.040 for bilinear upsampling (0.233 / 0.272 vs 0.232 raw). Pooling by 2 makes
  each DiT token carry 12 numbers (2x2 patch of 3 channels) instead of 48: a tiny DiT must carry the noise
  through to its velocity output, which it learns far faster with a small token dimension (measured on the
  CPU demo: with 4x4 pixel patches and width 128 samples stayed noise after 600 steps).
  """

  temporal_factor = 1
  z_dim = 3

  def __init__(self, config: ml_collections.ConfigDict | None = None):
    self.config = config
    self.spatial_factor = int(config.get('pixel_downsample', 1)) if config is not None else 1
    self.upsample = str(config.get('pixel_upsample', 'nearest')) if config is not None else 'nearest'
    if self.upsample not in ('nearest', 'linear'):
      raise ValueError(f"vae.pixel_upsample={self.upsample!r}; choose 'nearest' or 'linear'")

  def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    s = self.spatial_factor
    return (num_frames, height // s, width // s, 3)

  def encode(self, video: Any) -> jnp.ndarray:
    video = jnp.asarray(video, jnp.float32)
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f'video of shape {tuple(video.shape)}: expected (B, F, H, W, 3) in [-1, 1]')
    s = self.spatial_factor
    if s == 1:
      return video
    b, f, h, w, c = video.shape
    return video.reshape((b, f, h // s, s, w // s, s, c)).mean(axis=(3, 5))

  def decode(self, z: Any, **unused: Any) -> jnp.ndarray:
    z = jnp.asarray(z, jnp.float32)
    s = self.spatial_factor
    if s > 1:
      b, f, h, w, c = z.shape
      z = jax.image.resize(z, (b, f, h * s, w * s, c), method=self.upsample)
    return jnp.clip(z, -1.0, 1.0)

  def normalize(self, z: Any) -> Any:
    return z

  def denormalize(self, z: Any) -> Any:
    return z


def check_video_size(vae_config: ml_collections.ConfigDict, num_frames: int, height: int, width: int) -> None:
  """ValueError naming the size and the fix when the codec `vae_config` describes cannot take the video."""
  if num_frames < 1 or height < 1 or width < 1:
    raise ValueError(f'video size {num_frames}x{height}x{width} must be positive')
  if vae_config.get('kind', 'wan') == 'pixel':
    s = int(vae_config.get('pixel_downsample', 1))
    if height % s or width % s:
      raise ValueError(f'--size {height}x{width}: height and width must be multiples of {s} '
                       '(vae.pixel_downsample)')
    return
  t, s = vae_lib.ENCODE_CHUNK, factors(vae_config)[1]  # the Wan VAE encodes frame 0, then chunks of 4
  if (num_frames - 1) % t:
    raise ValueError(f'--frames {num_frames}: the Wan VAE needs 1 + {t}k frames (e.g. '
                     f'{1 + t * ((num_frames - 1) // t)} or {1 + t * ((num_frames + t - 2) // t)})')
  if height % s or width % s:
    raise ValueError(f'--size {height}x{width}: height and width must be multiples of {s} '
                     '(the VAE downsamples by that factor)')


def make_codec(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs | None = None) -> Any:
  """The codec `config` (the `vae` section) names, randomly initialised for 'wan' (load weights on top)."""
  kind = config.get('kind', 'wan')
  if kind == 'pixel':
    return PixelCodec(config)
  if kind == 'wan':
    return vae_lib.WanVAE(config, rngs=rngs if rngs is not None else nnx.Rngs(0))
  raise ValueError(f"unknown vae.kind {kind!r}; use one of {CODECS}")


def factors(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(temporal, spatial, channels) compression of the codec `config` describes, without building it."""
  if config.get('kind', 'wan') == 'pixel':
    return 1, int(config.get('pixel_downsample', 1)), 3
  return (2 ** sum(bool(x) for x in config.temporal_downsample), 2 ** (len(config.dim_mult) - 1),
          int(config.z_dim))
