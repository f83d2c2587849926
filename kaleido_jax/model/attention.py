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
from jax.ad_checkpoint import checkpoint_name
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


def reference_attention(q, k, v, mask=None):
  """Textbook softmax attention, (B, L, H, D): the definition the kernels are tested against."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


# Queries per block of the `xla` kernel, and heads per loop iteration on the CPU. Measured on the 2-core CPU
# (bench/dit_step.py shapes: 1792 tokens, 8 heads x 64, fp32; jitted forward+backward of one attention call,
# min of 7): `reference_attention` 379 ms (XLA materialises the 8x1792x1792 probabilities and re-reads them);
# this kernel with all heads per 256-query block 225 ms; one head per iteration 156 ms, and 143 ms with the
# key/value gradients accumulated transposed (below); PyTorch's fused CPU SDPA 144 ms. Likely why: one head's
# 256x1792 block (1.8 MB) stays in cache between the matmuls and the softmax; eight heads' (14.7 MB) do not.
XLA_QUERY_BLOCK = 256
CPU_HEADS_PER_ITERATION = 1
# Key counts from which the CPU forward / backward loop over heads; below them one batched call (fewer, larger
# matmuls) is kept. Measured one head vs all heads per iteration (2 shared cores): forward+backward as fast or
# faster with the loop in every shape tried, 1.0-1.4x (batch x tokens, heads x dim: 1x896, 8x64 1.0x;
# 1x1024, 12x128 1.06x; 2x896, 8x64; 8x448, 4x32; 1x1792, 8x64; 1x3584, 8x64 1.2-1.4x); the forward gains
# at 1792+ keys (1x1792: 54 vs 62 ms) and is a toss-up below 1k keys. Text keys (48-512) stay batched in the
# forward.
CPU_HEAD_LOOP_MIN_KEYS = {"forward": 1024, "backward": 256}


# Scores per loop iteration (batch x queries x keys) the CPU head loop aims at: one head leaves room for longer
# query blocks, and fewer iterations. bench/dit_step.py step (1792 keys, one head per iteration), 256 / 448 /
# 896 / 1792 queries per block: 1692 / 1670 / 1639 / 1671 ms (min of 8 interleaved rounds).
CPU_HEAD_LOOP_BLOCK_SCORES = 2 ** 21


def _query_block(batch: int, num_heads: int, num_keys: int, pass_: str) -> int:
  """Largest query block: XLA_QUERY_BLOCK, or more where the CPU loops over groups of heads in this pass.

  A symbolic batch size (an exported sampler's) keeps XLA_QUERY_BLOCK: the block must be a number at trace time.
  """
  g = _heads_per_iteration(num_heads, num_keys, pass_)
  if isinstance(batch, int) and g < num_heads:
    return max(XLA_QUERY_BLOCK, CPU_HEAD_LOOP_BLOCK_SCORES // (batch * g * num_keys))
  return XLA_QUERY_BLOCK


def _query_blocks(length: int, block: int) -> tuple[int, int]:
  """(number of blocks, block size) covering `length` queries with blocks of at most `block`.

  Applied to its own result's padded length n * c it gives (n, c) again, so the kernel's backward finds the
  blocks `_xla_attention` padded the queries to (the forward pads further if its blocks differ).
  """
  n = max(1, -(-length // block))
  return n, -(-length // n)


def _heads_per_iteration(num_heads: int, num_keys: int, pass_: str) -> int:
  """Heads per loop iteration: a few on the CPU (cache-sized blocks), all of them elsewhere or when sharded.

  Under a mesh that shards heads (``tensor``), looping over the head axis would make every iteration fetch a
  head from its device, so all heads stay in one batched matmul there.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty and mesh.shape.get("tensor", 1) > 1:
    return num_heads
  if jax.default_backend() != "cpu" or num_keys < CPU_HEAD_LOOP_MIN_KEYS[pass_]:
    return num_heads
  g = min(CPU_HEADS_PER_ITERATION, num_heads)
  while num_heads % g:
    g -= 1
  return g


def _split_queries(x, n, c):
  """(b, h, n*c, ...) -> (n, b, h, c, ...)."""
  return jnp.moveaxis(x.reshape(x.shape[:2] + (n, c) + x.shape[3:]), 2, 0)


def _merge_queries(x):
  """(n, b, h, c, ...) -> (b, h, n*c, ...)."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:])


def _split_heads(x, g):
  """(b, h, ...) -> (h // g, b, g, ...): the loop axis first."""
  return jnp.moveaxis(x.reshape((x.shape[0], x.shape[1] // g, g) + x.shape[2:]), 1, 0)


def _merge_heads(x):
  """(h // g, b, g, ...) -> (b, h, ...)."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])


def _map_heads(fn, g, *xs):
  """fn over groups of `g` heads (a loop when g < h), inputs and outputs in (b, h, ...) layout."""
  if g == xs[0].shape[1]:
    return fn(*xs)
  out = jax.lax.map(lambda a: fn(*a), tuple(_split_heads(x, g) for x in xs))
  return jax.tree.map(_merge_heads, out)


def _logits(q, k, mask):
  """Scores of pre-scaled queries, float32, masked keys at the float32 minimum."""
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    s = jnp.where(mask[:, None, None, :], s, jnp.finfo(jnp.float32).min)
  return s


def _blocked_forward(q, k, v, mask):
  """Output and log-sum-exp per query, one block of queries at a time; layout (b, h, l, d)."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # scale the (l, d) queries, not the (l, l) scores
  lq = q.shape[2]
  n, c = _query_blocks(lq, _query_block(q.shape[0], q.shape[1], k.shape[2], "forward"))
  if n * c != lq:  # the queries were padded for the backward's blocks; these need a little more
    q = jnp.pad(q, ((0, 0), (0, 0), (0, n * c - lq), (0, 0)))

  def block(qb, k, v):
    s = _logits(qb, k, mask)
    m = s.max(-1, keepdims=True)
    p = jnp.exp(s - m)
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / l
    return o.astype(q.dtype), (m + jnp.log(l))[..., 0]

  def head_group(q, k, v):
    if n == 1:
      return block(q, k, v)
    o, lse = jax.lax.map(lambda qb: block(qb, k, v), _split_queries(q, n, c))
    return _merge_queries(o), _merge_queries(lse)

  o, lse = _map_heads(head_group, _heads_per_iteration(q.shape[1], k.shape[2], "forward"), q, k, v)
  return o[:, :, :lq], lse[:, :, :lq]


@jax.custom_vjp
def _blocked_attention(q, k, v, mask):
  return _blocked_forward(q, k, v, mask)[0]


# Names of the kernel's saved residuals, for remat policies (dit.REMAT_POLICIES['dots_and_attention']): saving
# them lets a rematerialised layer skip re-running attention's forward in the backward pass.
ATTENTION_RESIDUALS = ("attention_out", "attention_lse")


def _blocked_attention_fwd(q, k, v, mask):
  o, lse = _blocked_forward(q, k, v, mask)
  o = checkpoint_name(o, ATTENTION_RESIDUALS[0])
  lse = checkpoint_name(lse, ATTENTION_RESIDUALS[1])
  return o, (q, k, v, mask, o, lse)


def _blocked_attention_bwd(res, do):
  """Flash-attention backward: probabilities are recomputed per query block from the saved log-sum-exp.

  dK and dV are accumulated transposed, (d, l_k) = (d, c) x (c, l_k), from transposed query and output-gradient
  blocks (small (d, c) copies), so that both are plain row-major matmul operands. XLA:CPU ran this 1.3x faster
  than dK = (c, l_k)^T x (c, d) (the probability block as a transposed left operand), and 1.2x faster than
  contracting untransposed (c, d) blocks over their leading axis (1 head, 896 x 1792 block: 1.61 -> 1.32 ms;
  demo train step 395 -> 358 ms, bench/dit_step.py step ~2% less, min of 6-12 interleaved rounds).
  """
  q, k, v, mask, o, lse = res
  scale = q.shape[-1] ** -0.5
  n, c = _query_blocks(q.shape[2], _query_block(q.shape[0], q.shape[1], k.shape[2], "backward"))
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)  # rowsum(dO * O) = rowsum(P * dP)

  def block(qb, dob, lseb, deltab, qbt, dobt, k, v):
    p = jnp.exp(_logits(qb, k, mask) - lseb[..., None])
    dp = jnp.einsum("bhqd,bhkd->bhqk", dob, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - deltab[..., None])).astype(q.dtype)  # gradient of the scaled scores
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k, preferred_element_type=jnp.float32)
    dkt = jnp.einsum("bhdq,bhqk->bhdk", qbt, ds, preferred_element_type=jnp.float32)
    dvt = jnp.einsum("bhdq,bhqk->bhdk", dobt, p.astype(do.dtype), preferred_element_type=jnp.float32)
    return dq, dkt, dvt

  def head_group(q, k, v, do, lse, delta):
    xs = tuple(_split_queries(x, n, c) for x in (q, do, lse, delta))
    xs += tuple(jnp.swapaxes(x, -1, -2) for x in xs[:2])  # (n, b, h, d, c) query / output-gradient blocks
    if n == 1:
      dq, dkt, dvt = block(*(x[0] for x in xs), k, v)
    else:
      def body(carry, xs):
        dq, dkt, dvt = block(*xs, k, v)
        return (carry[0] + dkt, carry[1] + dvt), dq
      zeros = jnp.zeros(k.shape[:2] + (k.shape[3], k.shape[2]), jnp.float32)
      (dkt, dvt), dq = jax.lax.scan(body, (zeros, zeros), xs)
      dq = _merge_queries(dq)
    return dq * scale, jnp.swapaxes(dkt, 2, 3), jnp.swapaxes(dvt, 2, 3)

  qs = q * jnp.asarray(scale, q.dtype)  # the forward's scaled queries
  dq, dk, dv = _map_heads(head_group, _heads_per_iteration(q.shape[1], k.shape[2], "backward"), qs, k, v, do,
                           lse, delta)
  dmask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dmask


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def _xla_attention(q, k, v, mask):
  """Memory-efficient attention in plain XLA: query blocks, float32 statistics, flash-style custom backward.

  Works on any backend and under any sharding GSPMD can propagate (batch and heads stay put; the query blocks
  are a reshape of the length axis). Queries are padded to whole blocks and the padding is dropped.
  """
  b, lq, h, _ = q.shape
  n, c = _query_blocks(lq, _query_block(b, h, k.shape[1], "backward"))
  t = lambda x: jnp.swapaxes(x, 1, 2)  # (b, l, h, d) <-> (b, h, l, d)
  qh = t(q)
  if n * c != lq:
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, n * c - lq), (0, 0)))
  return t(_blocked_attention(qh, t(k), t(v), mask)[:, :, :lq])


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
