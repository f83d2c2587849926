"""Weight quantization of nnx.Linear layers with qwix: int8 / int4 / fp8 kernels behind the same call.

  model = quantize(model, "int8")          # in place: every Linear under blocks/ or layers/ is replaced

A :class:`QuantizedLinear` holds its kernel as the two arrays of a qwix ``QArray`` (``qvalue`` in the
quantized type, ``scale`` in the compute dtype or, for the DiT, float32 by its precision policy) as ordinary ``nnx.Param`` leaves with the kernel's logical
axis names, so the stacked layers (``nnx.vmap`` / ``lax.scan`` over a leading ``layers`` axis), the mesh
placement (kaleido_jax/parallel/shardings.py), orbax checkpoints and ``jax.export`` see plain arrays. The matmul is
``qwix.dot_general`` on the rebuilt ``QArray``: weight-only by default (qwix multiplies by the float
activations and applies the per-channel scale to the output), or int8 x int8 / fp8 x fp8 with
``activations=True`` (activations quantized per token on the fly; on TPU the MXU then runs the integer
matmul).

Why explicit modules rather than ``qwix.quantize_model``: qwix's PTQ provider swaps a module's parameter
for its quantized form the first time the module runs, by attribute assignment on the module it finds on
the Python stack. Our blocks run as ``nnx.merge`` of a per-layer state slice inside ``lax.scan`` (and the
sampler runs that inside another scan), where such an assignment would land on a temporary module and be
lost. Quantizing the stacked kernels up front and calling qwix's quantized ``dot_general`` per layer gives
the same numbers (qwix's own ``quantize`` / ``dot_general``) with a state that scans.

Schemes (qwix ``HowToQuantize``, symmetric absmax calibration):
- ``int8``: per output channel (one scale per column of the kernel, per layer);
- ``fp8``: float8_e4m3fn values, per output channel;
- ``int4``: blocks of ``INT4_BLOCK`` = 128 input rows per output channel (sub-channel scales: with one
  scale per column int4's 16 levels lose about twice as much).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from kaleido_jax.model import sharding

SCHEMES = ("none", "int8", "int4", "fp8")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "fp8": jnp.float8_e4m3fn}
# Activation types with activations=True (int4 weights take int8 activations).
ACT_QTYPES = {"int8": jnp.int8, "int4": jnp.int8, "fp8": jnp.float8_e4m3fn}
INT4_BLOCK = 128
# The transformer layers: the DiT's `blocks` and umT5's `layers` hold all but ~1% of the parameters; the
# embedders, the time projection and the output head stay in the model's dtype.
DEFAULT_INCLUDE = r"(blocks|layers)/.*"


def check_scheme(scheme: str, where: str = "quantization") -> str:
  if scheme not in SCHEMES:
    raise ValueError(f"{where}={scheme!r}; choose one of {SCHEMES}")
  return scheme


class QuantizedLinear(nnx.Module):
  """``y = x @ dequant(qvalue, scale) + bias`` through ``qwix.dot_general``; see the module docstring."""

  def __init__(self, qvalue: nnx.Param, scale: nnx.Param, bias: nnx.Param | None, *, scheme: str,
               dtype: Any, activations: bool = False):
    self.qvalue, self.scale, self.bias = qvalue, scale, bias
    self.scheme, self.dtype, self.activations = scheme, jnp.dtype(dtype), bool(activations)

  def __call__(self, x: jax.Array) -> jax.Array:
    qvalue, scale = self.qvalue.value, self.scale.value
    lhs = x.astype(self.dtype)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    if self.activations:  # dynamic, one scale per token (all axes but the contracted one)
      lhs = qwix.quantize(lhs, ACT_QTYPES[self.scheme], channelwise_axes=tuple(range(x.ndim - 1)))
      y = qwix.dot_general(lhs, qwix.QArray(qvalue=qvalue, scale=scale, qtype=QTYPES[self.scheme]), dims)
    elif scale.shape[0] == 1:
      # One scale per output channel: x @ (q * s) == (x @ q) * s. The int8 / int4 / e4m3 values are exact in
      # bf16, so the matmul runs in the compute dtype and the scale, float32 by the DiT's precision policy,
      # applies to its output in float32. qwix's weight-only dot_general would dequantize the kernel in the
      # scale's dtype instead, which with fp32 scales is an fp32 matmul. The matmul's own output stays in the
      # compute dtype: it is what a remat policy saves (fp32 there cost the int8 LoRA fit row 0.8 GiB per chip).
      y = jax.lax.dot_general(lhs, qvalue.astype(self.dtype), dims)
      y = y.astype(jnp.float32) * scale[0].astype(jnp.float32)
    else:  # int4's sub-channel scales vary along the contraction: qwix's dequantizing dot_general
      kernel = qwix.QArray(qvalue=qvalue, scale=scale.astype(self.dtype), qtype=QTYPES[self.scheme])
      y = qwix.dot_general(lhs, kernel, dims)
    y = y.astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias.value.astype(self.dtype)
    return y


def int4_block(din: int) -> int:
  """Rows per int4 scale: INT4_BLOCK, or the largest divisor of a smaller / non-multiple input dim below it.

  Every real Wan / umT5 input dim is a multiple of 128 (1536, 4096, 5120, 8960, 10240, 13824); the divisor
  rule serves the tiny test models.
  """
  return max(b for b in range(1, min(INT4_BLOCK, din) + 1) if din % b == 0)


def quantize_kernel(kernel: jax.Array, scheme: str, scale_dtype: Any) -> qwix.QArray:
  """The qwix QArray of a (..., din, dout) kernel; leading axes (stacked layers) get their own scales."""
  contract = kernel.ndim - 2
  channels = tuple(a for a in range(kernel.ndim) if a != contract)
  tiles = {contract: int4_block(kernel.shape[contract])} if scheme == "int4" else None
  return qwix.quantize(kernel, QTYPES[scheme], channelwise_axes=channels, tiled_axes=tiles,
                       scale_dtype=scale_dtype)


def dequantize_kernel(qvalue: jax.Array, scale: jax.Array, scheme: str) -> jax.Array:
  """The float kernel (in ``scale``'s dtype) of a quantized one (merging a LoRA into a quantized model)."""
  return qwix.dequantize(qwix.QArray(qvalue=qvalue, scale=scale, qtype=QTYPES[scheme]))


def quantized_linear(linear: nnx.Linear, scheme: str, *, activations: bool = False,
                     scale_dtype: Any = None) -> QuantizedLinear:
  """The QuantizedLinear of an nnx.Linear (its kernel may carry a leading stacked-layers axis).

  ``scale_dtype``: the scales' dtype (the DiT's precision policy keeps them float32); default the compute dtype.
  """
  kernel = linear.kernel
  dtype = linear.dtype or kernel.value.dtype
  q = quantize_kernel(kernel.value, scheme, scale_dtype or dtype)
  names = sharding.variable_names(kernel)
  meta = {k: v for k, v in kernel.get_metadata().items() if k not in ("out_sharding", "sharding_names",
                                                                        "sharding")}
  scale_names = None
  if names is not None:
    contract = kernel.value.ndim - 2
    # One scale per column: the contracted axis has size 1 and no mesh axis; int4's blocks keep the name.
    scale_names = tuple(None if (i == contract and q.scale.shape[i] == 1) else n for i, n in enumerate(names))
  qvalue = nnx.Param(q.qvalue, **meta, **({"out_sharding": names} if names else {}))
  scale = nnx.Param(q.scale, **meta, **({"out_sharding": scale_names} if scale_names else {}))
  return QuantizedLinear(qvalue, scale, linear.bias if linear.use_bias else None, scheme=scheme, dtype=dtype,
                         activations=activations)


def quantize(model: nnx.Module, scheme: str, *, activations: bool = False,
             include: str = DEFAULT_INCLUDE, scale_dtype: Any = None) -> nnx.Module:
  """Replaces, in place, every nnx.Linear whose path ('blocks/self_attn/to_q') matches ``include``.

  Returns ``model`` (same call, same outputs up to the quantization error). In place because the point is
  memory: the float kernels are dropped as their quantized forms are made, so quantizing a 14B model never
  holds two copies. ``scheme='none'`` returns the model untouched. Works on abstract models
  (``nnx.eval_shape``) too, which is how a quantized checkpoint is restored and an AOT plan is compiled.
  """
  check_scheme(scheme)
  if scheme == "none":
    return model
  if activations and scheme == "int4":
    raise ValueError("activations=True takes int8 or fp8 weights; int4 is weight-only")
  targets = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Linear) and path and re.fullmatch(include, "/".join(map(str, path))):
      targets.append(path)
  if not targets:
    raise ValueError(f"no nnx.Linear of {type(model).__name__} matches include={include!r}")
  for path in targets:
    parent = model
    for key in path[:-1]:
      parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    child = parent[path[-1]] if isinstance(path[-1], int) else getattr(parent, path[-1])
    new = quantized_linear(child, scheme, activations=activations, scale_dtype=scale_dtype)
    if isinstance(path[-1], int):
      parent[path[-1]] = new
    else:
      setattr(parent, path[-1], new)
  return model


def scheme_of(model: nnx.Module) -> str:
  """The scheme of a (possibly) quantized model: 'none' when it holds no QuantizedLinear."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, QuantizedLinear):
      return node.scheme
  return "none"


def weight_bytes(model: nnx.Module) -> int:
  """Bytes of the model's parameters as stored (int4 counts half a byte)."""
  total = 0
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    bits = 4 if leaf.dtype == jnp.int4 else jnp.dtype(leaf.dtype).itemsize * 8
    total += int(leaf.size) * bits // 8
  return total
