"""CPU-only rewrites of the model's hot spots, behind one switch: ``model.cpu_kernels`` (auto | on | off).

The model files are plain jnp / nnx; where a program is built for XLA:CPU these replacements run instead,
because jaxlib 0.10's CPU backend is slow at a few patterns a DiT is full of:
- a sum fed by an elementwise product (the gradient of every bias, norm scale and AdaLN shift / scale /
  gate broadcast over the tokens, and the norms' statistics) ran ~10-25x slower than the same sum as a dot
  with a ones vector ((1, 1792, 512) fp32: 5.0 ms over tokens, 2.5 ms over features, against 0.2 ms);
  `mean_last`, `sum_last` and `broadcast_to` (a broadcast whose gradient is such a dot) are those dots;
- the kernel gradient of a (B, L, din) x (din, dout) product contracts two axes: 74 ms against 42 ms for the
  (B*L, din) form (1792 x 512 -> 2048); `linear` multiplies the tokens as one matrix;
- attention: one head's block of scores stays in cache between the matmuls and the softmax, eight heads' do
  not, so the `xla` kernel loops over heads with longer query blocks (`attention_heads_per_iteration`,
  `attention_query_block`).
Measured on bench/dit_step.py's shape (train step, remat dots_and_attention, 2 cores, min of 6 interleaved
rounds, 2026-12-02): the plain program 1.24x the time of this one; the token-matrix linears alone take it
to 1.19x, with the norms 1.12x, the broadcasts of the modulation vectors the rest.

``auto`` turns them on only where the program is compiled for the CPU: the platform an export branch names
(``target_platform``), else the platform of the mesh set with ``jax.set_mesh``, else the default backend. So a TPU / GPU program, and an AOT compile for a TPU slice from a
CPU host, is the plain one. ``KaleidoDiT.__call__`` sets the switch for its trace (``kernels``); the leaves
ask ``active()``.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import jax
import jax.numpy as jnp

SETTINGS = ("auto", "on", "off")
_STATE = threading.local()


def platform() -> str:
  """The platform the program being traced is for: an enclosing :func:`target_platform` (one branch of a
  multi-platform export), else the current mesh's (jax.set_mesh), else the default backend."""
  target = getattr(_STATE, "platform", None)
  if target is not None:
    return target
  mesh = jax.sharding.get_abstract_mesh()
  return mesh.abstract_device.platform if mesh is not None and not mesh.empty else jax.default_backend()


@contextlib.contextmanager
def target_platform(name: str, portable: bool = False):
  """Within: the program being traced is for ``name`` (cpu | cuda | rocm | tpu), whatever host traces it, so
  every ``auto`` (CPU rewrites here, the attention kernel in attention.py) resolves for that platform.

  ``portable``: the trace is one branch of a program lowered for several platforms. jax lowers every branch of
  ``lax.platform_dependent`` for all of the program's platforms, and a Pallas (splash) or cuDNN call has no
  lowering off its own platform, so such a branch uses none (:func:`portable`).
  """
  previous = getattr(_STATE, "platform", None), getattr(_STATE, "portable", False)
  _STATE.platform, _STATE.portable = ("gpu" if name in ("cuda", "rocm") else name), bool(portable)
  try:
    yield
  finally:
    _STATE.platform, _STATE.portable = previous


def portable() -> bool:
  """Whether the trace must lower on every platform of a multi-platform program (no platform-only kernels)."""
  return bool(getattr(_STATE, "portable", False))


def enabled(setting: str) -> bool:
  """Whether `setting` (auto | on | off) means CPU kernels for the program being traced now."""
  if setting not in SETTINGS:
    raise ValueError(f"config.model.cpu_kernels={setting!r}; choose one of {SETTINGS}")
  return setting == "on" if setting != "auto" else platform() == "cpu"


@contextlib.contextmanager
def kernels(setting: str):
  """Within: `active()` is `enabled(setting)` (the model's trace)."""
  previous = getattr(_STATE, "on", None)
  _STATE.on = enabled(setting)
  try:
    yield
  finally:
    _STATE.on = previous


def active() -> bool:
  """The switch for the code being traced: the enclosing `kernels(...)`, else `enabled('auto')`."""
  on = getattr(_STATE, "on", None)
  return enabled("auto") if on is None else on


# ---------------------------------------------------------------------------------------------------------
# Sums as dots with ones.

def mean_last(x: jax.Array) -> jax.Array:
  """Mean over the last axis, keeping it (..., 1); the transpose of a dot is a broadcast, not a reduction."""
  ones = jnp.full((x.shape[-1], 1), 1.0 / x.shape[-1], x.dtype)
  return jnp.matmul(x, ones, preferred_element_type=jnp.float32).astype(x.dtype)


def sum_last(x: jax.Array) -> jax.Array:
  """Sum over the last axis, keeping it (..., 1)."""
  ones = jnp.ones((x.shape[-1], 1), x.dtype)
  return jnp.matmul(x, ones, preferred_element_type=jnp.float32).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_to(v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`jnp.broadcast_to` whose gradient sums the broadcast axes with a dot against ones."""
  return jnp.broadcast_to(v, shape)


def _broadcast_fwd(v, shape):
  return jnp.broadcast_to(v, shape), v  # v is small (a bias or a per-sample vector): kept for its shape


def _broadcast_bwd(shape, v, g):
  padded = (1,) * (len(shape) - v.ndim) + tuple(v.shape)
  axes = tuple(i for i, (a, b) in enumerate(zip(padded, shape)) if a == 1 and b != 1)
  if not axes:
    return (g.reshape(v.shape).astype(v.dtype),)
  ones = jnp.ones([shape[i] for i in axes], g.dtype)
  k = len(axes)
  if axes == tuple(range(len(shape) - k, len(shape))):
    # Trailing axes (a per-token statistic): g is the (M, K) left operand in its own row-major layout.
    summed = jax.lax.dot_general(g, ones, ((axes, tuple(range(k))), ((), ())),
                                 preferred_element_type=jnp.float32)
  else:
    # Leading / token axes (a bias, a per-sample vector): ones on the left, g the (K, N) right operand.
    summed = jax.lax.dot_general(ones, g, ((tuple(range(k)), axes), ((), ())),
                                 preferred_element_type=jnp.float32)
  keep = [d for i, d in enumerate(padded) if i not in axes]
  return (summed.reshape(keep).reshape(v.shape).astype(v.dtype),)


broadcast_to.defvjp(_broadcast_fwd, _broadcast_bwd)


# ---------------------------------------------------------------------------------------------------------
# The model's leaves, CPU versions (same parameters and numbers as the plain ones in dit.py / text_encoder.py
# / vae.py; tests run both).

def linear(module, x: jax.Array) -> jax.Array:
  """An nnx.Linear on the tokens as one (N, din) matrix, its bias added with `broadcast_to`."""
  x2, kernel, bias = module.promote_dtype((x.reshape(-1, x.shape[-1]), module.kernel[...], module.bias[...]),
                                          dtype=module.dtype)
  y = jnp.matmul(x2, kernel, precision=module.precision)
  y = y + broadcast_to(bias, y.shape)
  return y.reshape(x.shape[:-1] + (y.shape[-1],))


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine, float32 (dit._layer_norm)."""
  x = x.astype(jnp.float32)
  x = x - broadcast_to(mean_last(x), x.shape)
  return x * broadcast_to(jax.lax.rsqrt(mean_last(jnp.square(x)) + eps), x.shape)


def rms_scale(x: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) over the last axis, float32."""
  x = x.astype(jnp.float32)
  return x * broadcast_to(jax.lax.rsqrt(mean_last(jnp.square(x)) + eps), x.shape)


def broadcast_like(v: jax.Array, x: jax.Array) -> jax.Array:
  """`v` (a per-sample or per-feature vector) broadcast to `x`'s shape, its gradient a dot."""
  return broadcast_to(v, x.shape)


# ---------------------------------------------------------------------------------------------------------
# The `xla` attention kernel's CPU tiling.

# Heads per loop iteration. Measured on the 2-core CPU (bench/dit_step.py shapes: 1792 tokens, 8 heads x 64,
# fp32; jitted forward+backward of one attention call, min of 7): all heads per 256-query block 225 ms; one
# head per iteration 156 ms, 143 ms with the key/value gradients accumulated transposed; PyTorch's fused CPU
# SDPA 144 ms.
HEADS_PER_ITERATION = 1
# Key counts from which the forward / backward loop over heads; below them one batched call (fewer, larger
# matmuls) is kept. One head vs all heads per iteration (2 cores): forward+backward as fast or faster with the
# loop in every shape tried, 1.0-1.4x (batch x tokens, heads x dim: 1x896, 8x64 1.0x; 1x1024, 12x128 1.06x;
# 2x896, 8x64; 8x448, 4x32; 1x1792, 8x64; 1x3584, 8x64 1.2-1.4x); the forward gains at 1792+ keys (1x1792:
# 54 vs 62 ms) and is a toss-up below 1k keys. Text keys (48-512) stay batched in the forward.
HEAD_LOOP_MIN_KEYS = {"forward": 1024, "backward": 256}
# Scores per loop iteration (batch x queries x keys): one head leaves room for longer query blocks, and fewer
# iterations. bench/dit_step.py step (1792 keys, one head per iteration), 256 / 448 / 896 / 1792 queries per
# block: 1692 / 1670 / 1639 / 1671 ms (min of 8 interleaved rounds).
HEAD_LOOP_BLOCK_SCORES = 2 ** 21


def attention_heads_per_iteration(num_heads: int, num_keys: int, pass_: str) -> int:
  """Heads per loop iteration of the `xla` kernel on the CPU: a few (cache-sized blocks) for long keys."""
  if num_keys < HEAD_LOOP_MIN_KEYS[pass_]:
    return num_heads
  g = min(HEADS_PER_ITERATION, num_heads)
  while num_heads % g:
    g -= 1
  return g


def attention_query_block(default: int, batch, heads_per_iteration: int, num_heads: int, num_keys: int) -> int:
  """Longer query blocks where the loop runs over fewer heads than all. A symbolic batch size (an exported
  sampler's) keeps `default`: the block must be a number at trace time."""
  if isinstance(batch, int) and heads_per_iteration < num_heads:
    return max(default, HEAD_LOOP_BLOCK_SCORES // (batch * heads_per_iteration * num_keys))
  return default
