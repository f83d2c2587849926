"""Attention kernels behind one call: ``xla`` (CPU / anywhere), ``cudnn`` (GPU), ``splash`` (TPU Pallas).

Layout (B, L, H, D). ``mask`` is a (B, Lk) boolean *key* mask (True = attend); Kaleido uses it to hide
padded reference slots. Softmax statistics are float32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "splash")


def dot_product_attention(q, k, v, *, mask=None, implementation: str = "xla"):
  if implementation == "xla":
    return _xla_attention(q, k, v, mask)
  if implementation == "cudnn":
    bias_mask = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation="cudnn")
  if implementation == "splash":
    return _splash_attention(q, k, v, mask)
  raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")


def _xla_attention(q, k, v, mask):
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _splash_attention(q, k, v, mask):
  """TPU Pallas splash attention; padded keys become a separate segment. Needs L % 128 == 0."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b, lq, h, d = q.shape
  lk = k.shape[1]
  kernel = sk.make_splash_mha(mask=sm.MultiHeadMask([sm.FullMask((lq, lk))] * h), head_shards=1,
                              q_seq_shards=1)
  q = q * (d ** -0.5)
  to_hld = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
  if mask is None:
    out = jax.vmap(kernel)(to_hld(q), to_hld(k), to_hld(v))
  else:
    seg = sk.SegmentIds(q=jnp.zeros((b, lq), jnp.int32), kv=jnp.where(mask, 0, 1).astype(jnp.int32))
    out = jax.vmap(lambda a, b_, c, s: kernel(a, b_, c, segment_ids=s))(to_hld(q), to_hld(k), to_hld(v), seg)
  return to_hld(out)
