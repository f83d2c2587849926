"""The precision policy: which parameters stay float32 when the model computes (and is stored) in bf16.

The policy is data, ``config.model.fp32_params``: a parameter stays float32 when any component of its path
(``blocks/self_attn/norm_q/scale`` -> ``blocks``, ``self_attn``, ``norm_q``, ``scale``) is in that set. It holds
where the weights live (a model built with ``param_dtype='bfloat16'`` keeps these leaves float32, so sampling
weights and a LoRA's frozen base carry them in fp32) and where the trainer casts its fp32 master weights to the
compute dtype inside the loss (:func:`cast`).

The default set follows diffusers' ``WanTransformer3DModel._keep_in_fp32_modules`` (time_embedder,
scale_shift_table, norm1/2/3) and Wan2.1's own model (time embedding *and* projection under fp32 autocast):
the time embedding and projection (``time_linear_1/2``, ``time_proj``), the modulation tables
(``scale_shift_table``, ``head_table``), the affine norm before cross-attention (``norm2_*``), the q/k RMSNorm
scales (``norm_q``, ``norm_k``) and the qwix quantization scales (a QuantizedLinear's ``scale``). Together they
are ~1% of the parameters (14B: the time projection's 5120 x 30720 is most of it).
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import nnx

DEFAULT_FP32 = ('time_linear_1', 'time_linear_2', 'time_proj', 'scale_shift_table', 'head_table',
                'norm2_scale', 'norm2_bias', 'norm_q', 'norm_k', 'scale')


def _component(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def keeps_fp32(path: Iterable[Any], fp32: Iterable[str]) -> bool:
  """Whether the parameter at ``path`` (strings or jax tree-path keys) is in the fp32 set ``fp32``."""
  names = set(fp32)
  return any(_component(k) in names for k in path)


def cast(tree: Any, dtype: Any, fp32: Iterable[str]) -> Any:
  """``tree``'s float leaves in ``dtype``, except those the policy keeps (which come out float32)."""
  fp32 = tuple(fp32)
  dtype = jnp.dtype(dtype)

  def f(path, x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    return x.astype(jnp.float32 if keeps_fp32(path, fp32) else dtype)
  return jax.tree_util.tree_map_with_path(f, tree)


def apply(module: nnx.Module, fp32: Iterable[str]) -> None:
  """Stores, in place, the float parameters of ``module`` that the policy names in float32."""
  fp32 = tuple(fp32)
  for path, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Param) and keeps_fp32(path, fp32):
      value = node.value
      if jnp.issubdtype(value.dtype, jnp.floating) and value.dtype != jnp.float32:
        node.value = value.astype(jnp.float32)
