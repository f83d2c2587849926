"""Attention kernels behind one call: ``xla`` (CPU / anywhere), ``cudnn`` (GPU), ``splash`` (TPU Pallas).

Layout (B, L, H, D). ``mask`` is a (B, Lk) boolean *key* mask (True = attend); Kaleido uses it to hide
padded reference slots. Softmax statistics are float32 whatever the input dtype.

``splash`` pads any length to its blocks and, under a mesh set with ``jax.set_mesh``, runs per device in
``jax.shard_map``. ``KALEIDO_SPLASH_INTERPRET=1`` (or ``SPLASH_INTERPRET = True``) runs it in Pallas interpret
mode so CPU tests cover the TPU path.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

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


# Splash kernel tiles. The kernel needs sequence lengths that are multiples of its blocks and blocks that are
# multiples of 128 lanes (jax.experimental.pallas.ops.tpu.splash_attention: `NUM_LANES = 128`, "block_q must
# be a multiple of NUM_LANES"); larger blocks run faster on TPU, so a 512 block is worth a little padding.
_BLOCKS = (512, 256, 128)
# Accept a larger block if it pads to at most this factor more tokens than the minimal 128-multiple; Kaleido's
# 37440 self-attention tokens pad to 37888 (block 512, +1.0%) instead of 37504 (block 128).
_PAD_SLACK = 1.02

# Run the Pallas kernel in interpret mode (any backend, slow): for CPU tests of the TPU path. Read at trace time.
SPLASH_INTERPRET = os.environ.get("KALEIDO_SPLASH_INTERPRET", "") not in ("", "0")


def _pad_and_block(length: int, shards: int = 1) -> tuple[int, int]:
  """(padded length, block): the padded length splits into `shards` equal parts that the block divides."""
  minimal = -(-length // (128 * shards)) * 128 * shards
  for block in _BLOCKS:
    padded = -(-length // (block * shards)) * block * shards
    if padded <= minimal * _PAD_SLACK:
      return padded, block
  return minimal, 128


def _mesh_axes(mesh, names, dim):
  """Mesh axes (of `names`) to shard `dim` over: present, >1, and dividing it, as sharding.constrain does."""
  axes = [a for a in names if a in mesh.shape and mesh.shape[a] > 1]
  while axes and dim % math.prod(mesh.shape[a] for a in axes):
    axes.pop()
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _splash_attention(q, k, v, mask):
  """TPU Pallas splash attention at any lengths, and per device under a mesh.

  Splash wants block-multiple lengths, so q/k/v are zero-padded along the sequence; padded and masked keys get
  kv segment id 1 while every query has segment 0, so they receive no weight (padded query rows are dropped).
  A Pallas call cannot be partitioned by XLA, so under a mesh set with ``jax.set_mesh`` it runs in
  ``jax.shard_map``: batch over (data, fsdp), heads over tensor, queries over context with k/v gathered
  (every query row only needs all keys, so context parallelism costs one k/v all-gather per call).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  b, lq, h, d = q.shape
  lk = k.shape[1]
  mesh = jax.sharding.get_abstract_mesh()
  sharded = mesh is not None and not mesh.empty
  batch_ax = _mesh_axes(mesh, ("data", "fsdp"), b) if sharded else None
  head_ax = _mesh_axes(mesh, ("tensor",), h) if sharded else None
  ctx_ax = "context" if sharded and mesh.shape.get("context", 1) > 1 else None
  ctx = mesh.shape[ctx_ax] if ctx_ax else 1
  lq_pad, bq = _pad_and_block(lq, ctx)
  lk_pad, bkv = _pad_and_block(lk)
  local_heads = h // (mesh.shape[head_ax] if head_ax else 1)

  key_mask = jnp.ones((b, lk), jnp.bool_) if mask is None else mask.astype(jnp.bool_)
  pad_seq = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
  q = pad_seq(q * jnp.asarray(d ** -0.5, q.dtype), lq_pad)
  k, v, key_mask = pad_seq(k, lk_pad), pad_seq(v, lk_pad), pad_seq(key_mask, lk_pad)
  q_seg = jnp.zeros((b, lq_pad), jnp.int32)
  kv_seg = jnp.where(key_mask, 0, 1).astype(jnp.int32)
  use_segments = mask is not None or lk_pad != lk

  def local(q, k, v, q_seg, kv_seg):
    lq_local = q.shape[1]
    blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    kernel = sk.make_splash_mha(mask=sm.MultiHeadMask([sm.FullMask((lq_local, lk_pad))] * local_heads),
                                block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=SPLASH_INTERPRET)
    to_hld = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
    if use_segments:
      one = lambda a, b_, c, sq, skv: kernel(a, b_, c, segment_ids=sk.SegmentIds(q=sq, kv=skv))
      out = jax.vmap(one)(to_hld(q), to_hld(k), to_hld(v), q_seg, kv_seg)
    else:
      out = jax.vmap(kernel)(to_hld(q), to_hld(k), to_hld(v))
    return to_hld(out)

  if sharded:
    q_spec = P(batch_ax, ctx_ax, head_ax, None)
    kv_spec = P(batch_ax, None, head_ax, None)
    local = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(batch_ax, ctx_ax),
                                                      P(batch_ax, None)),
                          out_specs=q_spec, check_vma=False)
  return local(q, k, v, q_seg, kv_seg)[:, :lq]
