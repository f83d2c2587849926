"""A tiny DiT stand-in with the KaleidoDiT call contract, for trainer tests that must not depend on the
real model's size: patchify (1,2,2) → joint attention over [refs | video] with masked padded refs and
cross-attention to text → unpatchify. Parameters carry the same logical axis names as the DiT."""

import jax
import jax.numpy as jnp
from flax import nnx

_init = nnx.initializers.lecun_normal()


def _linear(din, dout, names, rngs):
  return nnx.Linear(din, dout, kernel_init=nnx.with_partitioning(_init, names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)), rngs=rngs)


class TinyDiT(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    c = cfg.in_channels
    d = cfg.num_heads * cfg.head_dim
    self.heads, self.dtype = cfg.num_heads, jnp.dtype(cfg.dtype)
    self.patch_in = _linear(c * 4, d, ('kv', 'embed'), rngs)
    self.text_in = _linear(cfg.text_dim, d, ('kv', 'embed'), rngs)
    self.t_in = _linear(cfg.freq_dim, d, ('kv', 'embed'), rngs)
    self.qkv = _linear(d, 3 * d, ('embed', 'heads'), rngs)
    self.o = _linear(d, d, ('heads', 'embed'), rngs)
    self.mlp_in = _linear(d, cfg.ffn_dim, ('embed', 'mlp'), rngs)
    self.mlp_out = _linear(cfg.ffn_dim, d, ('mlp', 'embed'), rngs)
    self.out = _linear(d, c * 4, ('embed', 'kv'), rngs)
    self.freq_dim = cfg.freq_dim

  def _patch(self, x):  # (B, F, H, W, C) -> (B, F*H/2*W/2, 4C)
    b, f, h, w, c = x.shape
    x = x.reshape(b, f, h // 2, 2, w // 2, 2, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, f * (h // 2) * (w // 2), 4 * c)

  def __call__(self, video, timestep, text, refs=None, ref_mask=None):
    b, f, h, w, c = video.shape
    half = self.freq_dim // 2
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half) / half)
    temb = jnp.concatenate([jnp.cos(timestep[:, None] * freqs), jnp.sin(timestep[:, None] * freqs)], -1)
    x = self.patch_in(self._patch(video.astype(self.dtype)))
    n_vid = x.shape[1]
    keep = jnp.ones((b, n_vid), bool)
    if refs is not None and refs.shape[1] > 0:
      r = refs.reshape((b * refs.shape[1], 1) + refs.shape[2:])
      rt = self.patch_in(self._patch(r.astype(self.dtype))).reshape(b, -1, x.shape[-1])
      per = rt.shape[1] // refs.shape[1]
      keep = jnp.concatenate([jnp.repeat(ref_mask, per, axis=1), keep], axis=1)
      x = jnp.concatenate([rt, x], axis=1)
    tx = self.text_in(text.astype(self.dtype))
    x = x + self.t_in(temb.astype(self.dtype))[:, None]
    kv_mask = jnp.concatenate([keep, jnp.ones(tx.shape[:2], bool)], axis=1)
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    _, k2, v2 = jnp.split(self.qkv(tx), 3, axis=-1)
    k, v = jnp.concatenate([k, k2], 1), jnp.concatenate([v, v2], 1)
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, -1))
    att = jax.nn.dot_product_attention(split(q), split(k), split(v), mask=kv_mask[:, None, None, :])
    x = x + self.o(att.reshape(x.shape))
    x = x + self.mlp_out(jax.nn.gelu(self.mlp_in(x)))
    y = self.out(x[:, -n_vid:]).astype(jnp.float32)
    y = y.reshape(b, f, h // 2, w // 2, 2, 2, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return y.reshape(b, f, h, w, c)
