"""The Wan2.1 causal 3D VAE in Flax NNX, channels-last: video (B, F, H, W, 3) in [-1, 1] <-> latents.

Facts (diffusers ``AutoencoderKLWan``, the parity reference): 8x spatial and 4x temporal compression for
F = 1 + 4k frames; causal 3D convolutions (3x3x3, zero padding of 2 frames in front, none behind);
RMS norm = ``x / ||x||_channels * sqrt(C) * gamma``; residual blocks norm-SiLU-conv twice (+1x1x1 shortcut
when channels change); a middle block resnet-attention-resnet with single-head spatial attention per frame;
``downsample3d`` = zero-pad (right, bottom) + 3x3 stride-2 conv, then a (3,1,1) stride-2 time conv over
(last frame of the previous chunk, this chunk); ``upsample3d`` = a (3,1,1) causal time conv doubling the
channels that are interleaved into 2x frames (skipped for the very first frame), then nearest 2x + 3x3 conv
to half the channels. Encoding runs frame 0 alone, then chunks of 4 frames; decoding one latent frame at a
time; a per-conv cache of the last 2 input frames carries the causal context between chunks.

Here every causal conv keeps a fixed-shape 2-frame cache (zeros at the start, which *is* the causal zero
padding), so one jitted step serves every chunk; decoding is chunked (``decode_chunk_frames`` latent frames
per step) and can be tiled spatially with linear blending for large frames.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kaleido_jax.model import cpu


CACHE_T = 2  # frames of causal context per 3x3x3 conv (kernel 3 in time)
# Frames per XLA conv are capped so one conv's input holds at most this many elements (32 MiB in fp32): on
# 2 CPU cores, 4 frames of 256x256x96 in one conv ran ~25% slower than the same frames 1-2 at a time
# (~65 vs ~90 GFLOP/s); 4 frames of 128x128x192 or smaller were unaffected. Bit-identical results.
CONV_GROUP_ELEMS = 1 << 23
ENCODE_CHUNK = 4  # the reference encodes frame 0, then 4 frames at a time, whatever the temporal factor


class Cache:
  """Walks the per-conv caches in call order (the reference's feat_cache / feat_idx, made functional)."""

  def __init__(self, entries: list | None):
    self.entries = entries
    self.out: list = []
    self.i = 0

  def take(self):
    e = None if self.entries is None else self.entries[self.i]
    self.i += 1
    return e

  def put(self, value):
    self.out.append(value)


def _init(rngs, shape, fan_in):
  return jax.random.normal(rngs.params(), shape, jnp.float32) * (1.0 / np.sqrt(fan_in))


def _conv_frames(x, kernel, stride, padding, taps=None):
  """2D conv of frames ``x`` (N, H, W, C) in groups of at most ``CONV_GROUP_ELEMS`` input elements.

  With ``taps`` (a list of (N, H, W, C) arrays or None for zeros), returns the sum of
  conv(taps[t], kernel[t]) instead: the time taps of a 3D conv.
  """
  if taps is None:
    taps, kernel = [x], kernel[None]
  ref = next(xt for xt in taps if xt is not None)
  n = ref.shape[0]
  group = max(1, CONV_GROUP_ELEMS // int(np.prod(ref.shape[1:])))
  outs = []
  for i in range(0, n, group):
    out = None
    for t, xt in enumerate(taps):
      if xt is None:
        continue
      xt = xt[i:i + group] if group < n else xt
      kt = kernel[t].astype(xt.dtype)
      if kt.shape[:2] == (1, 1) and tuple(stride) == (1, 1):
        y = jnp.dot(xt, kt[0, 0], precision=jax.lax.Precision.HIGHEST)
      else:
        y = jax.lax.conv_general_dilated(xt, kt, tuple(stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=jax.lax.Precision.HIGHEST)
      out = y if out is None else out + y
    outs.append(out)
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


class CausalConv3d(nnx.Module):
  """3D conv, channels-last, zero 'same' padding in space and causal (cached) context in time.

  On TPU / GPU one ``lax.conv_general_dilated`` in 3D over [cached context | frames]. Where the program is
  built for the CPU (model/cpu.py's switch, ``vae.cpu_kernels``) a sum over the kt time taps of 2D convs
  over all frames at once instead: XLA CPU's 3D convolution ran 3x3x3 convs at the VAE's sizes
  (96-384 channels) at ~40 GFLOP/s on 2 cores, its 2D path (YNNPACK) at ~65-110. bench/vae.py at
  17x256x256 vs diffusers in the same run went from 0.23x / 0.33x (encode / decode) with the 3D conv to
  0.68x / 0.74x with this (plus frame groups and the step changes below), on a busy 2-core machine.
  The tap sum only changes fp32 rounding. Precision
  HIGHEST vs DEFAULT made no difference to speed or results on CPU (kept HIGHEST: DEFAULT means bf16
  passes on GPU/TPU).
  """

  def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), stride=(1, 1, 1), *, rngs: nnx.Rngs):
    self.kernel_size, self.stride = tuple(kernel), tuple(stride)
    self.kernel = nnx.Param(_init(rngs, self.kernel_size + (cin, cout), cin * int(np.prod(kernel))))
    self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))

  def conv(self, x):
    """Valid in time, 'same' in space, over all frames of ``x`` (the context already prepended)."""
    if not cpu.active():  # one 3D convolution: the program TPUs and GPUs run
      _, kh, kw = self.kernel_size
      y = jax.lax.conv_general_dilated(x, self.kernel.value.astype(x.dtype), self.stride,
                                       ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                       precision=jax.lax.Precision.HIGHEST)
      return y + self.bias.value.astype(y.dtype)
    st = self.stride[0]
    fo = (x.shape[1] - self.kernel_size[0]) // st + 1
    return self._taps([x[:, t:t + st * (fo - 1) + 1:st] for t in range(self.kernel_size[0])])

  def _taps(self, taps):
    """Tap t's frames are ``taps[t]`` (B, F, H, W, C), or None where they are all zeros."""
    _, kh, kw = self.kernel_size
    ref = next(xt for xt in taps if xt is not None)
    b, f = ref.shape[:2]
    flat = [None if xt is None else xt.reshape((b * f,) + xt.shape[2:]) for xt in taps]
    out = _conv_frames(None, self.kernel.value, self.stride[1:], ((kh // 2, kh // 2), (kw // 2, kw // 2)), flat)
    out = out + self.bias.value.astype(out.dtype)
    return out.reshape((b, f) + out.shape[1:])

  def __call__(self, x, cache: Cache | None = None):
    kt = self.kernel_size[0]
    if kt == 1:
      return self.conv(x)
    assert kt == CACHE_T + 1 and self.stride[0] == 1, (self.kernel_size, self.stride)
    prev = cache.take() if cache is not None else None   # None: the causal zero padding
    n = x.shape[1]

    def front():
      return prev if prev is not None else jnp.zeros(x.shape[:1] + (CACHE_T,) + x.shape[2:], x.dtype)

    if cache is not None:
      cache.put(x[:, -CACHE_T:] if n >= CACHE_T else jnp.concatenate([front(), x], axis=1)[:, -CACHE_T:])
    if not cpu.active():
      return self.conv(jnp.concatenate([front(), x], axis=1))
    # Tap t reads frames t .. t+n-1 of [context | x]: the last tap is x itself (no copy), and taps that
    # would read only the zero context of the first chunk are skipped (exact: they add 0).
    taps = []
    for t in range(kt):
      lead = CACHE_T - t   # context frames in front of this tap's window
      if lead == 0:
        taps.append(x)
      elif prev is None and lead >= n:
        taps.append(None)
      else:
        taps.append(jnp.concatenate([front()[:, t:t + min(lead, n)], x[:, :max(0, n - lead)]], axis=1))
    return self._taps(taps)


class Conv2d(nnx.Module):
  """Per-frame 2D conv on (B, F, H, W, C) with explicit spatial padding."""

  def __init__(self, cin, cout, k, stride=1, padding=((1, 1), (1, 1)), *, rngs: nnx.Rngs):
    self.stride, self.padding = (stride, stride), padding
    self.kernel = nnx.Param(_init(rngs, (k, k, cin, cout), cin * k * k))
    self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))

  def __call__(self, x):
    b, f = x.shape[:2]
    frames = x.reshape((b * f,) + x.shape[2:])
    if cpu.active():
      y = _conv_frames(frames, self.kernel.value, self.stride, self.padding)
    else:
      y = jax.lax.conv_general_dilated(frames, self.kernel.value.astype(x.dtype), self.stride, self.padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=jax.lax.Precision.HIGHEST)
    y = y + self.bias.value.astype(x.dtype)
    return y.reshape((b, f) + y.shape[1:])


class RMSNorm(nnx.Module):

  def __init__(self, dim: int):
    self.scale = float(np.sqrt(dim))
    self.gamma = nnx.Param(jnp.ones((dim,), jnp.float32))

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    # model/cpu.py: the sum as a dot with ones where compiled for the CPU (encode 1.08x faster there).
    norm = jnp.sqrt(cpu.sum_last(x * x) if cpu.active() else jnp.sum(x * x, -1, keepdims=True))
    return (x / jnp.maximum(norm, 1e-12) * self.scale * self.gamma.value).astype(dtype)


class ResidualBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.norm1 = RMSNorm(cin)
    self.conv1 = CausalConv3d(cin, cout, rngs=rngs)
    self.norm2 = RMSNorm(cout)
    self.conv2 = CausalConv3d(cout, cout, rngs=rngs)
    self.conv_shortcut = CausalConv3d(cin, cout, (1, 1, 1), rngs=rngs) if cin != cout else None

  def __call__(self, x, cache=None, first=False):
    h = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x = self.conv1(jax.nn.silu(self.norm1(x)), cache)
    x = self.conv2(jax.nn.silu(self.norm2(x)), cache)
    return x + h


class AttentionBlock(nnx.Module):
  """Single-head self-attention over the pixels of each frame."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.norm = RMSNorm(dim)
    self.to_qkv = Conv2d(dim, 3 * dim, 1, padding=((0, 0), (0, 0)), rngs=rngs)
    self.proj = Conv2d(dim, dim, 1, padding=((0, 0), (0, 0)), rngs=rngs)

  def __call__(self, x, cache=None, first=False):
    b, f, h, w, c = x.shape
    qkv = self.to_qkv(self.norm(x)).reshape(b * f, h * w, 3 * c)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=jax.lax.Precision.HIGHEST) / np.sqrt(c)
    out = jnp.einsum("bqk,bkc->bqc", jax.nn.softmax(logits.astype(jnp.float32), -1).astype(v.dtype), v,
                     precision=jax.lax.Precision.HIGHEST)
    return x + self.proj(out.reshape(b, f, h, w, c))


class Resample(nnx.Module):
  """downsample2d/3d and upsample2d/3d of the Wan VAE (see module docstring)."""

  def __init__(self, dim: int, mode: str, *, rngs: nnx.Rngs):
    self.mode = mode
    if mode.startswith("up"):
      self.resample = Conv2d(dim, dim // 2, 3, rngs=rngs)
      self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), rngs=rngs) if mode == "upsample3d" else None
    else:
      self.resample = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), rngs=rngs)
      self.time_conv = (CausalConv3d(dim, dim, (3, 1, 1), (2, 1, 1), rngs=rngs)
                        if mode == "downsample3d" else None)

  def __call__(self, x, cache=None, first=False):
    if self.mode == "upsample3d":
      if first:   # the first frame is not doubled in time; its causal context starts at zero
        if cache is not None:
          cache.take()
          cache.put(jnp.zeros(x.shape[:1] + (CACHE_T,) + x.shape[2:], x.dtype))
      else:
        b, f, h, w, c = x.shape
        y = self.time_conv(x, cache).reshape(b, f, h, w, 2, c)
        x = jnp.moveaxis(y, 4, 2).reshape(b, 2 * f, h, w, c)   # channel halves -> interleaved frames
    if self.mode.startswith("up"):
      x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)     # nearest-exact 2x
    x = self.resample(x)
    if self.mode == "downsample3d":
      prev = cache.take() if cache is not None else None
      if cache is not None:
        cache.put(x[:, -1:])
      if not first:
        x = self.time_conv.conv(jnp.concatenate([prev, x], axis=1))
    return x


class MidBlock(nnx.Module):

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResidualBlock(dim, dim, rngs=rngs), ResidualBlock(dim, dim, rngs=rngs)])
    self.attentions = nnx.List([AttentionBlock(dim, rngs=rngs)])

  def __call__(self, x, cache=None, first=False):
    x = self.resnets[0](x, cache)
    x = self.attentions[0](x)
    return self.resnets[1](x, cache)


class Encoder(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dims = [cfg.base_dim * u for u in (1,) + tuple(cfg.dim_mult)]
    self.conv_in = CausalConv3d(3, dims[0], rngs=rngs)
    blocks, scale = [], 1.0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(cfg.num_res_blocks):
        blocks.append(ResidualBlock(cin, cout, rngs=rngs))
        if scale in tuple(cfg.attn_scales):
          blocks.append(AttentionBlock(cout, rngs=rngs))
        cin = cout
      if i != len(cfg.dim_mult) - 1:
        mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
        blocks.append(Resample(cout, mode, rngs=rngs))
        scale /= 2.0
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], rngs=rngs)
    self.norm_out = RMSNorm(dims[-1])
    self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, rngs=rngs)

  def __call__(self, x, cache=None, first=False):
    x = self.conv_in(x, cache)
    for block in self.down_blocks:
      x = block(x, cache, first)
    x = self.mid_block(x, cache)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


class UpBlock(nnx.Module):

  def __init__(self, cin: int, cout: int, num_res_blocks: int, mode: str | None, *, rngs: nnx.Rngs):
    blocks = []
    for _ in range(num_res_blocks + 1):
      blocks.append(ResidualBlock(cin, cout, rngs=rngs))
      cin = cout
    self.resnets = nnx.List(blocks)
    self.upsamplers = nnx.List([Resample(cout, mode, rngs=rngs)]) if mode else None

  def __call__(self, x, cache=None, first=False):
    for r in self.resnets:
      x = r(x, cache)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, cache, first)
    return x


class Decoder(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    mult = tuple(cfg.dim_mult)
    dims = [cfg.base_dim * u for u in (mult[-1],) + mult[::-1]]
    temporal_up = tuple(cfg.temporal_downsample)[::-1]
    self.conv_in = CausalConv3d(cfg.z_dim, dims[0], rngs=rngs)
    self.mid_block = MidBlock(dims[0], rngs=rngs)
    blocks = []
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:
        cin //= 2   # every resample halves the channels
      up = i != len(mult) - 1
      mode = ("upsample3d" if temporal_up[i] else "upsample2d") if up else None
      blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode, rngs=rngs))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1])
    self.conv_out = CausalConv3d(dims[-1], 3, rngs=rngs)

  def __call__(self, x, cache=None, first=False):
    x = self.conv_in(x, cache)
    x = self.mid_block(x, cache)
    for block in self.up_blocks:
      x = block(x, cache, first)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), cache)


class WanVAE(nnx.Module):
  """``encode(video) -> raw latent mean``, ``decode(latents) -> video``, ``normalize`` / ``denormalize``."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs=rngs)
    self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, (1, 1, 1), rngs=rngs)
    self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, (1, 1, 1), rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)
    self.latents_mean = nnx.Variable(jnp.asarray(config.latents_mean, jnp.float32))
    self.latents_std = nnx.Variable(jnp.asarray(config.latents_std, jnp.float32))

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(bool(t) for t in self.config.temporal_downsample)

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.config.dim_mult) - 1)

  def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    return (1 + (num_frames - 1) // self.temporal_factor, height // self.spatial_factor,
            width // self.spatial_factor, self.config.z_dim)

  def _check_video(self, video):
    b, f, h, w, c = video.shape
    s = self.spatial_factor
    if c != 3 or (f - 1) % ENCODE_CHUNK or h % s or w % s:
      raise ValueError(f"video of shape {tuple(video.shape)}: the VAE needs (B, 1 + {ENCODE_CHUNK}k frames, "
                       f"H and W divisible by {s}, 3 channels)")

  # -- encoding ------------------------------------------------------------------------------------

  def encode_step(self, chunk, caches, first: bool):
    with cpu.kernels(self.config.get("cpu_kernels", "auto")):
      cache = Cache(caches)
      out = self.encoder(chunk, cache, first)
      return out, cache.out

  def encode(self, video):
    """Posterior mean in the raw latent space, (B, 1 + (F-1)/4, H/8, W/8, z) (diffusers' latent_dist.mean)."""
    self._check_video(video)
    video = jnp.asarray(video, jnp.float32)
    t = ENCODE_CHUNK
    outs, caches = [], None
    for start in range(0, video.shape[1], t):
      first = start == 0
      chunk = video[:, :1] if first else video[:, start - t + 1:start + 1]
      out, caches = _encode_step(self, chunk, caches, first)
      outs.append(out)
    moments = self.quant_conv(jnp.concatenate(outs, axis=1))
    return moments[..., :self.config.z_dim]

  # -- decoding ------------------------------------------------------------------------------------

  def decode_step(self, z_chunk, caches, first: bool):
    with cpu.kernels(self.config.get("cpu_kernels", "auto")):
      cache = Cache(caches)
      out = self.decoder(z_chunk, cache, first)
      return out, cache.out

  def _decode_untiled(self, z, chunk_frames: int):
    x = self.post_quant_conv(jnp.asarray(z, jnp.float32))
    out, caches = _decode_step(self, x[:, :1], None, True)
    outs = [out]
    for start in range(1, x.shape[1], chunk_frames):
      out, caches = _decode_step(self, x[:, start:start + chunk_frames], caches, False)
      outs.append(out)
    return jnp.clip(jnp.concatenate(outs, axis=1), -1.0, 1.0)

  def decode(self, z, *, chunk_frames: int | None = None, tile_size: int | None = None,
             tile_overlap: int | None = None):
    """Video (B, 1 + 4(f-1), 8h, 8w, 3) in [-1, 1] from raw latents, chunk by chunk (and tile by tile)."""
    cfg = self.config
    chunk_frames = int(chunk_frames or cfg.decode_chunk_frames or 1)
    tile_size = tile_size if tile_size is not None else cfg.tile_size
    if not tile_size:
      return self._decode_untiled(z, chunk_frames)
    return self._decode_tiled(z, chunk_frames, int(tile_size),
                              int(tile_overlap if tile_overlap is not None else cfg.tile_overlap))

  def _decode_tiled(self, z, chunk_frames: int, tile_px: int, overlap_px: int):
    s = self.spatial_factor
    tile, overlap = max(1, tile_px // s), max(0, overlap_px // s)
    if overlap >= tile:
      raise ValueError(f"tile_overlap {overlap_px} must be smaller than tile_size {tile_px}")
    b, f, h, w, _ = z.shape
    stride = tile - overlap
    ys = list(range(0, max(h - overlap, 1), stride))
    xs = list(range(0, max(w - overlap, 1), stride))
    out = None
    weight = None
    for y0 in ys:
      for x0 in xs:
        y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
        part = self._decode_untiled(z[:, :, y0:y1, x0:x1], chunk_frames)
        ramp_y = _ramp(y1 - y0, overlap * s if y0 > 0 else 0, overlap * s if y1 < h else 0, s)
        ramp_x = _ramp(x1 - x0, overlap * s if x0 > 0 else 0, overlap * s if x1 < w else 0, s)
        wgt = ramp_y[:, None] * ramp_x[None, :]
        if out is None:
          out = jnp.zeros(part.shape[:2] + (h * s, w * s, 3), jnp.float32)
          weight = jnp.zeros((h * s, w * s), jnp.float32)
        out = out.at[:, :, y0 * s:y1 * s, x0 * s:x1 * s].add(part * wgt[None, None, :, :, None])
        weight = weight.at[y0 * s:y1 * s, x0 * s:x1 * s].add(wgt)
    return out / weight[None, None, :, :, None]

  # -- latent statistics ---------------------------------------------------------------------------

  def normalize(self, z):
    return (z - self.latents_mean.value) / self.latents_std.value

  def denormalize(self, z):
    return z * self.latents_std.value + self.latents_mean.value


def _ramp(n_latent: int, lead: int, trail: int, s: int) -> jax.Array:
  """Per-pixel blend weights: linear ramps over the overlaps shared with neighbouring tiles."""
  n = n_latent * s
  w = np.ones(n, np.float32)
  if lead:
    w[:lead] = (np.arange(lead) + 0.5) / lead
  if trail:
    w[n - trail:] = np.minimum(w[n - trail:], (np.arange(trail)[::-1] + 0.5) / trail)
  return jnp.asarray(w)


# graph_updates=False: the steps change no module state, and without it nnx.jit returns (copies of) every
# parameter from every step (~0.1-0.2 s a step here).
@nnx.jit(static_argnums=(3,), graph_updates=False)
def _encode_step(vae: WanVAE, chunk, caches, first: bool):
  return vae.encode_step(chunk, caches, first)


@nnx.jit(static_argnums=(3,), graph_updates=False)
def _decode_step(vae: WanVAE, z_chunk, caches, first: bool):
  return vae.decode_step(z_chunk, caches, first)


def param_count(vae: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(vae, nnx.Param)))
