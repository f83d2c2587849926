"""Attention behind one call: ``dot_product_attention``; kernels ``xla`` (anywhere), ``cudnn`` (GPU), ``splash``
(TPU Pallas), ``auto`` = the one for the platform.

Layout (B, L, H, D). ``mask`` is a (B, Lk) boolean *key* mask (True = attend); Kaleido uses it to hide
padded reference slots. Softmax statistics are float32 whatever the input dtype.

Under a mesh set with ``jax.set_mesh`` the kernel runs per device in ``jax.shard_map``: batch and heads placed by
the logical rules (``activation_batch`` / ``activation_heads``: (data, fsdp) / tensor, ``model/sharding.py``),
queries over context. Self-attention, whose keys are the same sequence, is
context-parallel (``context_parallel``):
  gather   keys / values all-gathered over ``context`` (each device holds every key for its queries);
  ulysses  all-to-all that trades the sequence shards for head shards, the kernel sees the whole sequence
           for heads / context of the heads, and back (heads per device % context == 0);
  ring     keys / values travel around the ``context`` ring by ``ppermute``; partial outputs are merged by
           their log-sum-exp, and the backward sends the key / value gradients round the ring with them.
Cross-attention (``context_parallel=None``) keeps its keys / values (the 512 text tokens) on every device.
Padding to the shard / block multiple happens here: padded keys are masked, padded queries dropped.

``KALEIDO_SPLASH_INTERPRET=1`` (or ``SPLASH_INTERPRET = True``) runs splash in Pallas interpret mode so CPU
tests cover the TPU path.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from kaleido_jax.model import cpu
from kaleido_jax.model import sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
CONTEXT_PARALLEL = ("gather", "ulysses", "ring")


def dot_product_attention(q, k, v, *, mask=None, implementation: str = "auto",
                          context_parallel: str | None = None, splash_blocks: Mapping[str, int] | None = None):
  """softmax(q k^T / sqrt(d)) v with a key mask, on the kernel and the sharding of the current mesh.

  ``context_parallel`` (gather | ulysses | ring) marks self-attention over a sequence split on ``context``;
  None is cross-attention (local keys). ``splash_blocks`` overrides splash tile sizes (``SPLASH_BLOCKS`` keys;
  0 or missing = the TPU generation's default).
  """
  impl = resolve_implementation(implementation, q.dtype)
  if impl not in IMPLEMENTATIONS[1:]:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
  if context_parallel is not None and context_parallel not in CONTEXT_PARALLEL:
    raise ValueError(f"unknown context_parallel {context_parallel!r}; choose one of {CONTEXT_PARALLEL}")
  mesh = _attention_mesh()
  kernel = _kernel(impl, tuple(sorted((splash_blocks or {}).items())), cpu.active())
  if mesh is None and impl != "splash":
    return kernel.attend(q, k, v, mask)
  return _sharded_attention(q, k, v, mask, impl, context_parallel, kernel, mesh)


def resolve_implementation(name: str, dtype=jnp.bfloat16, platform: str | None = None) -> str:
  """``auto`` -> splash on TPU, cudnn on GPU for 16-bit inputs (cuDNN's fused attention takes no float32),
  xla elsewhere and in a multi-platform export's branches (``cpu.portable``); other names are returned as
  they are. The platform is the current mesh's (so an AOT
  compile for a TPU slice from a CPU host picks splash), else the default backend."""
  if name != "auto":
    if cpu.portable() and name in ("splash", "cudnn"):
      raise ValueError(f"attention={name!r} cannot be part of a program exported for several platforms (its kernel "
                       "lowers only on its own); export for that platform alone, or use attention=auto (xla)")
    return name
  if cpu.portable():  # a branch of a multi-platform export: the kernel every platform lowers
    return "xla"
  platform = platform or cpu.platform()
  if platform == "tpu":
    return "splash"
  if platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def reference_attention(q, k, v, mask=None):
  """Textbook softmax attention, (B, L, H, D): the definition the kernels are tested against."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


# Queries per block of the `xla` kernel: a (b, h, 256, keys) float32 score block at a time, not all of them.
# On the CPU (model/cpu.py, `tuned`) it loops over heads and takes longer blocks.
XLA_QUERY_BLOCK = 256


def _query_block(batch: int, num_heads: int, num_keys: int, pass_: str, tuned: bool) -> int:
  if not tuned:
    return XLA_QUERY_BLOCK
  g = _heads_per_iteration(num_heads, num_keys, pass_, tuned)
  return cpu.attention_query_block(XLA_QUERY_BLOCK, batch, g, num_heads, num_keys)


def _query_blocks(length: int, block: int) -> tuple[int, int]:
  """(number of blocks, block size) covering `length` queries with blocks of at most `block`.

  Applied to its own result's padded length n * c it gives (n, c) again, so the kernel's backward finds the
  blocks `_xla_attention` padded the queries to (the forward pads further if its blocks differ).
  """
  n = max(1, -(-length // block))
  return n, -(-length // n)


def _heads_per_iteration(num_heads: int, num_keys: int, pass_: str, tuned: bool) -> int:
  """Heads per loop iteration: all of them, or the CPU's few (model/cpu.py)."""
  return cpu.attention_heads_per_iteration(num_heads, num_keys, pass_) if tuned else num_heads


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


def _blocked_forward(q, k, v, mask, tuned):
  """Output and log-sum-exp per query, one block of queries at a time; layout (b, h, l, d)."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # scale the (l, d) queries, not the (l, l) scores
  lq = q.shape[2]
  n, c = _query_blocks(lq, _query_block(q.shape[0], q.shape[1], k.shape[2], "forward", tuned))
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

  o, lse = _map_heads(head_group, _heads_per_iteration(q.shape[1], k.shape[2], "forward", tuned), q, k, v)
  return o[:, :, :lq], lse[:, :, :lq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_attention(q, k, v, mask, tuned):
  return _blocked_forward(q, k, v, mask, tuned)[0]


# Names of the kernel's saved residuals, for remat policies (dit.REMAT_POLICIES['dots_and_attention']): saving
# them lets a rematerialised layer skip re-running attention's forward in the backward pass.
ATTENTION_RESIDUALS = ("attention_out", "attention_lse")


def _blocked_attention_fwd(q, k, v, mask, tuned):
  o, lse = _blocked_forward(q, k, v, mask, tuned)
  o = checkpoint_name(o, ATTENTION_RESIDUALS[0])
  lse = checkpoint_name(lse, ATTENTION_RESIDUALS[1])
  return o, (q, k, v, mask, o, lse)


def _blocked_attention_bwd(tuned, res, do):
  q, k, v, mask, o, lse = res
  dq, dk, dv = _blocked_backward(q, k, v, mask, o, lse, do, tuned)
  dmask = None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)
  return dq, dk, dv, dmask


def _blocked_backward(q, k, v, mask, o, lse, do, tuned):
  """Flash-attention backward: probabilities are recomputed per query block from the saved log-sum-exp.

  Layout (b, h, l, d); `o` and `lse` may be those of attention over a longer key sequence than `k` (ring
  attention passes the merged output and log-sum-exp with one key block), which gives that block's share of
  dQ and its dK / dV.

  dK and dV are accumulated transposed, (d, l_k) = (d, c) x (c, l_k), from transposed query and output-gradient
  blocks (small (d, c) copies), so that both are plain row-major matmul operands. XLA:CPU ran this 1.3x faster
  than dK = (c, l_k)^T x (c, d) (the probability block as a transposed left operand), and 1.2x faster than
  contracting untransposed (c, d) blocks over their leading axis (1 head, 896 x 1792 block: 1.61 -> 1.32 ms;
  demo train step 395 -> 358 ms, bench/dit_step.py step ~2% less, min of 6-12 interleaved rounds).
  """
  scale = q.shape[-1] ** -0.5
  n, c = _query_blocks(q.shape[2], _query_block(q.shape[0], q.shape[1], k.shape[2], "backward", tuned))
  if n * c != q.shape[2]:  # o / lse came from another blocking (ring attention): pad to this one's
    pad = lambda x, fill=0: jnp.pad(x, ((0, 0), (0, 0), (0, n * c - x.shape[2])) + ((0, 0),) * (x.ndim - 3),
                                    constant_values=fill)
    lq = q.shape[2]
    # Padded rows get an infinite log-sum-exp: probability 0, so they add nothing to dK / dV.
    dq, dk, dv = _blocked_backward(pad(q), k, v, mask, pad(o), pad(lse, jnp.inf), pad(do), tuned)
    return dq[:, :, :lq], dk, dv
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
  dq, dk, dv = _map_heads(head_group, _heads_per_iteration(q.shape[1], k.shape[2], "backward", tuned), qs, k, v,
                           do, lse, delta)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def _xla_attention(q, k, v, mask, tuned):
  """Memory-efficient attention in plain XLA: query blocks, float32 statistics, flash-style custom backward.

  Works on any backend; under a mesh it runs per device (`_sharded_attention`). Queries are padded to whole
  blocks and the padding is dropped. `tuned`: the CPU's head loop and query blocks (model/cpu.py).
  """
  b, lq, h, _ = q.shape
  n, c = _query_blocks(lq, _query_block(b, h, k.shape[1], "backward", tuned))
  t = lambda x: jnp.swapaxes(x, 1, 2)  # (b, l, h, d) <-> (b, h, l, d)
  qh = t(q)
  if n * c != lq:
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, n * c - lq), (0, 0)))
  return t(_blocked_attention(qh, t(k), t(v), mask, tuned)[:, :, :lq])


class _Kernel(NamedTuple):
  """A per-device kernel in (b, l, h, d) layout.

  attend(q, k, v, mask) -> o, differentiable; forward(...) -> (o, lse (b, h, l) float32) and
  backward(q, k, v, mask, o, lse, do) -> (dq, dk, dv) given the output and log-sum-exp of attention over a
  longer key sequence (ring attention's building blocks).
  """
  attend: Callable
  forward: Callable
  backward: Callable


def _hl(x):
  return jnp.swapaxes(x, 1, 2)  # (b, l, h, d) <-> (b, h, l, d)


def _xla_kernel(tuned: bool) -> _Kernel:
  def forward(q, k, v, mask):
    o, lse = _blocked_forward(_hl(q), _hl(k), _hl(v), mask, tuned)
    return _hl(o), lse

  def backward(q, k, v, mask, o, lse, do):
    return tuple(_hl(g) for g in _blocked_backward(_hl(q), _hl(k), _hl(v), mask, _hl(o), lse, _hl(do), tuned))
  return _Kernel(attend=functools.partial(_xla_attention, tuned=tuned), forward=forward, backward=backward)


def _cudnn_attend(q, k, v, mask):
  bias_mask = None if mask is None else mask[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation="cudnn")


@functools.cache
def _kernel(impl: str, splash_blocks: tuple, tuned: bool) -> _Kernel:
  """The per-device kernel; `tuned` = the CPU tiling of the `xla` kernel (model/cpu.py). Cached: the ring's
  custom VJP takes the kernel as a static argument, so one setting must give one (hashable) object."""
  splash_blocks = dict(splash_blocks)
  if impl == "xla":
    return _xla_kernel(tuned)
  if impl == "cudnn":
    # cuDNN's fused kernel returns no log-sum-exp: ring attention on GPU runs the xla kernel's blocks.
    return _xla_kernel(tuned)._replace(attend=_cudnn_attend)
  if impl == "splash":
    return _Kernel(attend=functools.partial(_splash_attend, blocks=splash_blocks),
                   forward=functools.partial(_splash_forward, blocks=splash_blocks),
                   backward=functools.partial(_splash_backward, blocks=splash_blocks))
  raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")


# ---------------------------------------------------------------------------------------------------------
# Splash (TPU Pallas).

# Splash tiles. Lengths must be multiples of the blocks and blocks multiples of 128 lanes
# (jax.experimental.pallas.ops.tpu.splash_attention: `NUM_LANES = 128`, "block_kv must be a multiple of
# NUM_LANES"). Defaults per TPU generation, from maxdiffusion's Wan configs: 512 everywhere; v6e forward
# block_q 3024 / block_kv 2048 / block_kv_compute 1024; v5p backward block_q_dkv 1024 / block_kv_dkv 3072 /
# block_kv_dkv_compute 256. Each block is then clamped to the largest multiple of 128 not above it that divides
# the (padded, per-device) length, so 3024 becomes a 128-multiple and 3072 a divisor of 37888.
SPLASH_BLOCKS = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute",
                 "block_q_dq", "block_kv_dq")
SPLASH_BLOCK_DEFAULTS = {
    "default": dict.fromkeys(SPLASH_BLOCKS, 512),
    "v6e": dict(dict.fromkeys(SPLASH_BLOCKS, 512), block_q=3024, block_kv=2048, block_kv_compute=1024),
    "v5p": dict(dict.fromkeys(SPLASH_BLOCKS, 512), block_q_dkv=1024, block_kv_dkv=3072, block_kv_dkv_compute=256),
}
# device_kind -> generation ("TPU v5" is v5p; v5e and v6e report "lite").
_GENERATIONS = {"TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}

# Padding: the length pads to a multiple of 512 (or 256, 128) per shard when that costs at most this factor more
# tokens than the minimal 128-multiple; Kaleido's 37440 self-attention tokens pad to 37888 (+1.2%).
_PAD_BLOCKS = (512, 256, 128)
_PAD_SLACK = 1.02

# Run the Pallas kernel in interpret mode (any backend, slow): for CPU tests of the TPU path. Read at trace time.
SPLASH_INTERPRET = os.environ.get("KALEIDO_SPLASH_INTERPRET", "") not in ("", "0")


def _pad_and_block(length: int, shards: int = 1) -> tuple[int, int]:
  """(padded length, block): the padded length splits into `shards` equal parts that the block divides."""
  minimal = -(-length // (128 * shards)) * 128 * shards
  for block in _PAD_BLOCKS:
    padded = -(-length // (block * shards)) * block * shards
    if padded <= minimal * _PAD_SLACK:
      return padded, block
  return minimal, 128


def _generation() -> str:
  mesh = jax.sharding.get_abstract_mesh()
  kind = (mesh.abstract_device.device_kind if mesh is not None and not mesh.empty
          else jax.devices()[0].device_kind)
  return _GENERATIONS.get(kind, "default")


def _clamp_block(block: int, length: int) -> int:
  """Largest multiple of 128 <= block that divides `length` (a multiple of 128)."""
  b = max(128, min(block, length) // 128 * 128)
  while length % b:
    b -= 128
  return b


def splash_block_sizes(lq: int, lk: int, blocks: Mapping[str, int] | None = None, generation: str | None = None):
  """Splash BlockSizes for per-device lengths (lq, lk): overrides, else the generation's defaults, clamped."""
  want = dict(SPLASH_BLOCK_DEFAULTS.get(generation or _generation(), SPLASH_BLOCK_DEFAULTS["default"]))
  want.update({k: int(v) for k, v in (blocks or {}).items() if v})
  unknown = set(want) - set(SPLASH_BLOCKS)
  if unknown:
    raise ValueError(f"unknown splash block(s) {sorted(unknown)}; the keys are {SPLASH_BLOCKS}")
  size = {name: _clamp_block(want[name], lq if name.startswith("block_q") else lk) for name in SPLASH_BLOCKS}
  for compute, memory in (("block_kv_compute", "block_kv"), ("block_kv_dkv_compute", "block_kv_dkv")):
    size[compute] = _clamp_block(size[compute], size[memory])  # a compute block tiles its memory block
  return sk.BlockSizes(**size)


def _splash_kernel(lq, lk, heads, blocks, save_residuals=False):
  return sk.make_splash_mha(mask=sm.MultiHeadMask([sm.FullMask((lq, lk))] * heads),
                            block_sizes=splash_block_sizes(lq, lk, blocks), head_shards=1, q_seq_shards=1,
                            save_residuals=save_residuals, interpret=SPLASH_INTERPRET)


def _segments(q, mask):
  """Splash segment ids: every query segment 0, masked keys segment 1 (they receive no weight)."""
  if mask is None:
    return None
  return sk.SegmentIds(q=jnp.zeros(q.shape[:2], jnp.int32), kv=jnp.where(mask, 0, 1).astype(jnp.int32))


def _splash_call(kernel, q, k, v, mask):
  """Per-device splash over the batch (vmap), (b, l, h, d) in, kernel's (h, l, ...) outputs per sample."""
  seg = _segments(q, mask)
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  if seg is None:
    return jax.vmap(kernel)(_hl(q), _hl(k), _hl(v))
  return jax.vmap(lambda a, b_, c, s: kernel(a, b_, c, segment_ids=s))(_hl(q), _hl(k), _hl(v), seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _splash_attention(q, k, v, mask, blocks: tuple):
  return _splash_forward(q, k, v, mask, dict(blocks))[0]


def _splash_attention_fwd(q, k, v, mask, blocks):
  # splash's own custom VJP keeps (out, logsumexp) unnamed, so a remat policy could not save them and the
  # backward of a rematerialised layer re-ran the Pallas forward; here they carry ATTENTION_RESIDUALS' names
  # (remat 'dots_and_attention' saves them), and the backward is splash's own kernels given them.
  o, lse = _splash_forward(q, k, v, mask, dict(blocks))
  o = checkpoint_name(o, ATTENTION_RESIDUALS[0])
  lse = checkpoint_name(lse, ATTENTION_RESIDUALS[1])
  return o, (q, k, v, mask, o, lse)


def _splash_attention_bwd(blocks, res, do):
  q, k, v, mask, o, lse = res
  dq, dk, dv = _splash_backward(q, k, v, mask, o, lse, do, dict(blocks))
  return dq, dk, dv, None if mask is None else jnp.zeros(mask.shape, jax.dtypes.float0)


_splash_attention.defvjp(_splash_attention_fwd, _splash_attention_bwd)


def _splash_attend(q, k, v, mask, blocks):
  return _splash_attention(q, k, v, mask, tuple(sorted(blocks.items())))


def _splash_forward(q, k, v, mask, blocks):
  o, (lse,) = _splash_call(_splash_kernel(q.shape[1], k.shape[1], q.shape[2], blocks, save_residuals=True),
                           q, k, v, mask)
  return _hl(o), lse


def _splash_backward(q, k, v, mask, o, lse, do, blocks):
  """Splash's own backward kernels given (o, lse): the gradients of attention with named residuals
  (`_splash_attention`) and, with (o, lse) of the whole key sequence, one key block's (ring attention).

  No public entry takes (o, lse) (checked 2026-12-06): jax 0.10.2's splash forward refuses `save_residuals`
  under autodiff and its backward is the private `_splash_attention_bwd`; tokamax 0.0.12's public
  `dot_product_attention` returns no residuals, and its ring kernel lives under `tokamax._src` (experimental).
  So this calls jax's `_splash_attention_bwd` with the residuals it expects (q, k, v, segment ids, sinks, out,
  logsumexp, dq / dkv mask infos), pinned by setup.py's jax and exercised by the interpret-mode tests.
  """
  kernel = _splash_kernel(q.shape[1], k.shape[1], q.shape[2], blocks)
  kw = kernel.kwargs
  scale = q.shape[-1] ** -0.5
  seg = _segments(q, mask)

  def one(q, k, v, seg, o, lse, do):
    res = (q, k, v, seg, None, o, lse, kernel.dq_mask_info, kernel.dkv_mask_info)
    grads = sk._splash_attention_bwd(  # pylint: disable=protected-access
        False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None, kw["mask_function"],
        kw["attn_logits_soft_cap"], kw["interpret"], res, do)
    return grads[3:6]

  qs = q * jnp.asarray(scale, q.dtype)
  dq, dk, dv = jax.vmap(one)(_hl(qs), _hl(k), _hl(v), seg, _hl(o), lse, _hl(do).astype(o.dtype))
  return _hl(dq * jnp.asarray(scale, dq.dtype)).astype(q.dtype), _hl(dk), _hl(dv)


# ---------------------------------------------------------------------------------------------------------
# Ring attention.

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _ring_attention(q, k, v, mask, kernel: _Kernel, axis: str, size: int):
  return _ring_fwd(q, k, v, mask, kernel, axis, size)[0]


def _rotate(xs, axis, size):
  """Each device's blocks to the next device on the ring (i -> i + 1)."""
  perm = [(i, (i + 1) % size) for i in range(size)]
  return tuple(jax.lax.ppermute(x, axis, perm) for x in xs)


def _ring_fwd(q, k, v, mask, kernel, axis, size):
  """`size` kernel calls, one per key block as the blocks travel the ring; outputs merged by log-sum-exp."""
  kb, vb, mb = k, v, mask
  o, lse = None, None
  for step in range(size):
    if step:
      kb, vb, mb = _rotate((kb, vb, mb), axis, size)
    o_i, lse_i = kernel.forward(q, kb, vb, mb)
    o_i = o_i.astype(jnp.float32)
    if o is None:
      o, lse = o_i, lse_i
    else:
      new = jnp.logaddexp(lse, lse_i)
      w = lambda l: _hl(jnp.exp(l - new)[..., None])  # (b, h, l) weights as (b, l, h, 1)
      o, lse = o * w(lse) + o_i * w(lse_i), new
  o = checkpoint_name(o.astype(q.dtype), ATTENTION_RESIDUALS[0])
  lse = checkpoint_name(lse, ATTENTION_RESIDUALS[1])
  return o, (q, k, v, mask, o, lse)


def _ring_bwd(kernel, axis, size, res, do):
  """Each device computes its queries' gradient against every key block with the merged (o, lse), while the
  key / value gradients travel with their blocks; one last hop takes them home."""
  q, k, v, mask, o, lse = res
  kb, vb, mb = k, v, mask
  dq = dk = dv = None
  for step in range(size):
    if step:
      kb, vb, mb, dk, dv = _rotate((kb, vb, mb, dk, dv), axis, size)
    dq_i, dk_i, dv_i = (g.astype(jnp.float32) for g in kernel.backward(q, kb, vb, mb, o, lse, do))
    dq, dk, dv = (dq_i, dk_i, dv_i) if dq is None else (dq + dq_i, dk + dk_i, dv + dv_i)
  if size > 1:
    dk, dv = _rotate((dk, dv), axis, size)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          jnp.zeros(mask.shape, jax.dtypes.float0))


_ring_attention.defvjp(_ring_fwd, _ring_bwd)


# ---------------------------------------------------------------------------------------------------------
# Per-device execution under a mesh.

def _attention_mesh():
  """The current mesh if attention should run per device on it: set, more than one device, no manual axes."""
  mesh = sharding.current_mesh()
  return None if mesh is None or mesh.size == 1 else mesh


def _axes(entry) -> tuple:
  """The mesh axes of one PartitionSpec entry (None, a name or a tuple of names)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _sharded_attention(q, k, v, mask, impl, context_parallel, kernel, mesh):
  """Pad to the shard / block multiple, run the kernel per device (context-parallel for self-attention)."""
  b, lq, h, _ = q.shape
  lk = k.shape[1]
  ctx = mesh.shape.get("context", 1) if mesh is not None else 1
  ctx_ax = "context" if ctx > 1 else None
  self_cp = context_parallel is not None and ctx_ax is not None
  if self_cp and lq != lk:
    raise ValueError(f"context-parallel self-attention needs one sequence for queries and keys, got {lq} / {lk}")
  if impl == "splash":
    lq_pad = _pad_and_block(lq, ctx)[0]
    lk_pad = lq_pad if self_cp else _pad_and_block(lk)[0]
  else:
    lq_pad = -(-lq // ctx) * ctx
    lk_pad = lq_pad if self_cp else lk
  pad_seq = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
  if mask is not None or lk_pad != lk:
    mask = pad_seq(jnp.ones((b, lk), jnp.bool_) if mask is None else mask.astype(jnp.bool_), lk_pad)
  q, k, v = pad_seq(q, lq_pad), pad_seq(k, lk_pad), pad_seq(v, lk_pad)

  batch_ax = head_ax = None
  if mesh is not None:  # the sequence axis is placed by hand below: it is padded to the context size first
    batch_ax, _, head_ax, _ = sharding.spec_for(
        ("activation_batch", None, "activation_heads", None), q.shape, mesh.shape)
  local_heads = h // math.prod(mesh.shape[a] for a in _axes(head_ax))
  if self_cp and context_parallel == "ulysses" and local_heads % ctx:
    raise ValueError(f"context_parallel='ulysses' needs the heads per device ({local_heads}) to divide by "
                     f"mesh.context={ctx}; use context_parallel='ring' or 'gather', or another context size")

  def local(q, k, v, mask):
    if not self_cp:
      return kernel.attend(q, k, v, mask)
    gather = lambda x: jax.lax.all_gather(x, "context", axis=1, tiled=True)
    if context_parallel == "gather":
      return kernel.attend(q, gather(k), gather(v), None if mask is None else gather(mask))
    if context_parallel == "ulysses":
      to_heads = lambda x: jax.lax.all_to_all(x, "context", 2, 1, tiled=True)  # seq shards -> head shards
      o = kernel.attend(to_heads(q), to_heads(k), to_heads(v), None if mask is None else gather(mask))
      return jax.lax.all_to_all(o, "context", 1, 2, tiled=True)
    if mask is None:
      mask = jnp.ones(k.shape[:2], jnp.bool_)
    return _ring_attention(q, k, v, mask, kernel, "context", ctx)

  if mesh is None:
    out = local(q, k, v, mask)
  else:
    q_spec = P(batch_ax, ctx_ax, head_ax, None)
    kv_spec = P(batch_ax, ctx_ax if self_cp else None, head_ax, None)
    specs, args = (q_spec, kv_spec, kv_spec), (q, k, v)
    if mask is not None:
      specs, args = specs + (P(batch_ax, ctx_ax if self_cp else None),), args + (mask,)
    out = jax.shard_map(lambda *a: local(*a) if len(a) == 4 else local(*a, None), mesh=mesh, in_specs=specs,
                        out_specs=q_spec, check_vma=False)(*args)
  return out[:, :lq]
