"""LoRA on the DiT's linears: merged into the weights for sampling, or trained as adapters on a frozen base.

A rank-r LoRA on ``y = x W + b`` (our kernels are (din, dout)) adds ``s · (x A) B`` with ``A`` (din, r),
``B`` (r, dout) and ``s = alpha / r`` (PEFT's scaling; ``alpha / sqrt(r)`` with rsLoRA). PEFT / diffusers
store ``lora_A.weight = Aᵀ`` (r, din) and ``lora_B.weight = Bᵀ`` (dout, r); the Wan / ComfyUI and kohya
files call them ``lora_down`` / ``lora_up`` with a per-module ``alpha`` (kaleido_jax/convert/lora.py reads
all three into :class:`Update` lists).

Two uses:
- **merge** (:func:`merge_state`, :func:`merge`): ``W += strength · s · A B`` (and dense ``diff`` / ``diff_b``
  deltas, as LightX2V-style distilled LoRAs carry for biases and norms) on a pure state dict or a model, the
  stacked ``blocks`` (``model.scan_layers``) as well as per-layer ones; a quantized kernel is dequantized, updated
  and quantized again in its own scheme. Sampling then costs what the base model costs.
- **train** (:func:`add_adapters`): each targeted linear under ``blocks/`` becomes a :class:`LoRALinear` that
  keeps the base (float, bf16 or quantized) and adds ``s · (x A) B`` with ``A``, ``B`` as ``nnx.LoRAParam``
  (flax's variable type for adapters): the trainer differentiates and optimises only that filter.
  :func:`adapter_weights` reads the trained factors back per layer (what the PEFT writer saves) and
  :func:`fold_adapters` merges them into the base for sampling.

Target names (``train.lora.targets``, and what a merged LoRA may touch) are our block-relative paths
(``self_attn/to_q``, ``cross_attn/to_out``, ``ffn/proj_in``, ...) or the groups of :data:`TARGET_GROUPS`.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kaleido_jax.model import quantization
from kaleido_jax.model import sharding

BLOCK_LINEARS = ("self_attn/to_q", "self_attn/to_k", "self_attn/to_v", "self_attn/to_out",
                 "cross_attn/to_q", "cross_attn/to_k", "cross_attn/to_v", "cross_attn/to_out",
                 "ffn/proj_in", "ffn/proj_out")
TARGET_GROUPS = {
    "attention": BLOCK_LINEARS[:8],
    "self_attn": BLOCK_LINEARS[:4],
    "cross_attn": BLOCK_LINEARS[4:8],
    "qkv": tuple(f"{a}/to_{p}" for a in ("self_attn", "cross_attn") for p in "qkv"),
    "ffn": BLOCK_LINEARS[8:],
    "all": BLOCK_LINEARS,
}


def resolve_targets(targets: Sequence[str] | str) -> tuple[str, ...]:
  """Block-relative linear paths of ``targets`` (paths, groups, or leaf names such as ``to_q``)."""
  if isinstance(targets, str):
    targets = [t for t in re.split(r"[,\s]+", targets) if t]
  out: list[str] = []
  for t in targets:
    if t in TARGET_GROUPS:
      picked = TARGET_GROUPS[t]
    else:
      picked = tuple(p for p in BLOCK_LINEARS if p == t or p.endswith("/" + t))
    if not picked:
      raise ValueError(f"LoRA target {t!r} names no linear of a block; use one of {BLOCK_LINEARS}, a leaf name "
                       f"(to_q, to_out, proj_in, ...) or a group {sorted(TARGET_GROUPS)}")
    out.extend(p for p in picked if p not in out)
  return tuple(out)


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
  """PEFT's scaling of the adapter output: alpha / r (alpha / sqrt(r) with rsLoRA)."""
  return float(alpha) / (math.sqrt(rank) if rslora else rank)


# --------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------


class Update(NamedTuple):
  """One change to one parameter of one layer.

  ``leaf``: our path of the parameter without the layer ('blocks/self_attn/to_q/kernel', 'text_linear_1/bias',
  'blocks/norm2_scale'); ``layer``: the block index for ``blocks/`` leaves, else None. Either low-rank
  (``down`` (din, r), ``up`` (r, dout), delta = scale · down @ up) or ``dense`` (a delta of the leaf's per-layer
  shape). ``source`` names the file's key(s) for error messages.
  """
  leaf: str
  layer: int | None
  down: np.ndarray | None = None
  up: np.ndarray | None = None
  dense: np.ndarray | None = None
  scale: float = 1.0
  source: str = ""


class LoRAMismatch(ValueError):
  """A LoRA whose keys or shapes do not fit the model; the message names them."""


def _delta(u: Update) -> np.ndarray:
  if u.dense is not None:
    return np.asarray(u.dense, np.float32)
  return np.float32(u.scale) * (np.asarray(u.down, np.float32) @ np.asarray(u.up, np.float32))


def _node(pure: dict, parts: Sequence[str]) -> Any:
  node = pure
  for p in parts:
    key = int(p) if p.isdigit() and p not in node and int(p) in node else p
    if not isinstance(node, dict) or key not in node:
      return None
    node = node[key]
  return node


@jax.jit
def _add_stacked(value, down, up, scale):
  """value (L, din, dout) + scale[l] · down[l] @ up[l], in float32, back in value's dtype."""
  delta = jnp.einsum("lir,lro->lio", down, up) * scale[:, None, None]
  return (value.astype(jnp.float32) + delta).astype(value.dtype)


def _quantized_float(node: dict) -> tuple[jax.Array, str]:
  qvalue, scale = jnp.asarray(node["qvalue"]), jnp.asarray(node["scale"])
  scheme = {jnp.dtype(t): s for s, t in quantization.QTYPES.items()}[jnp.dtype(qvalue.dtype)]
  kernel = quantization.dequantize_kernel(qvalue, scale, scheme)
  return kernel, scheme


def merge_state(pure: dict, updates: Sequence[Update], strength: float = 1.0, *, num_layers: int) -> dict:
  """Adds ``strength`` × every update to the pure KaleidoDiT state ``pure`` (in place where its arrays are
  writable numpy arrays, else by replacing them) and returns it.

  ``blocks`` may be stacked (a leading layer axis) or per layer (``{i: block}``); a leaf given as a quantized
  pair (``qvalue`` / ``scale``) is dequantized, updated and quantized again. Raises :class:`LoRAMismatch`
  naming the first update whose parameter the model lacks or whose shape differs.
  """
  flat: dict[str, Any] = {}

  def walk(node, prefix):
    for k, v in node.items():
      (walk(v, f"{prefix}{k}/") if isinstance(v, dict) else flat.__setitem__(f"{prefix}{k}", v))
  walk(pure, "")
  stacked = stacked_blocks(flat)
  for path, group in index_updates(updates, {k: np.shape(v) for k, v in flat.items()}, num_layers=num_layers,
                                   strength=strength).items():
    parts = path.split("/")
    parent = _node(pure, parts[:-1])
    if parts[-1] == "kernel" and "kernel" not in parent:  # a quantized linear
      parent["qvalue"], parent["scale"] = apply_to_quantized(parent["qvalue"], parent["scale"], group, stacked)
    else:
      parent[parts[-1]] = apply_updates(parent[parts[-1]], group, stacked and parts[0] == "blocks")
  return pure


def stacked_blocks(flat_paths: Any) -> bool:
  """Whether a flat state ({'blocks/...': leaf}) holds its blocks stacked (True) or one entry per layer."""
  blocks = [p.split("/")[1] for p in flat_paths if p.startswith("blocks/")]
  return bool(blocks) and not all(b.isdigit() for b in blocks)


def index_updates(updates: Sequence[Update], shapes: dict[str, tuple[int, ...]], *, num_layers: int,
                  strength: float = 1.0) -> dict[str, list[Update]]:
  """``{flat parameter path: its updates}`` for a state whose leaves have ``shapes`` (flat paths, stacked or
  per-layer blocks, quantized linears as ``qvalue`` / ``scale``), every update checked against the model before
  any weight is touched: :class:`LoRAMismatch` names the first that does not fit. ``strength`` is folded into
  each update, so the groups apply as they are (:func:`apply_updates`)."""
  stacked = stacked_blocks(shapes)
  out: dict[str, list[Update]] = {}
  for u in updates:
    if u.layer is not None and not 0 <= u.layer < num_layers:
      raise LoRAMismatch(f"{u.source}: block {u.layer} does not exist (the model has {num_layers} blocks); this "
                         "LoRA is for a deeper model")
    parts = u.leaf.split("/")
    in_blocks = parts[0] == "blocks"
    path = u.leaf if (stacked or not in_blocks) else "/".join(["blocks", str(u.layer)] + parts[1:])
    parent = path.rsplit("/", 1)[0]
    shape = shapes.get(path)
    if shape is None and parts[-1] == "kernel":
      shape = shapes.get(parent + "/qvalue")
    if shape is None:
      raise LoRAMismatch(f"{u.source}: the model has no parameter {u.leaf!r}; the LoRA targets a layer "
                         "this model does not have")
    per_layer_shape = tuple(shape[1:] if (stacked and in_blocks) else shape)
    want = (u.down.shape[0], u.up.shape[-1]) if u.dense is None else tuple(u.dense.shape)
    if u.dense is None and u.down.shape[1] != u.up.shape[0]:
      raise LoRAMismatch(f"{u.source}: lora_down has rank {u.down.shape[1]} but lora_up {u.up.shape[0]}")
    if want != per_layer_shape:
      raise LoRAMismatch(f"{u.source}: its update is {want} but the model's {u.leaf} is {per_layer_shape}; "
                         "this LoRA is for another model size")
    if strength != 1.0:
      u = u._replace(scale=u.scale * strength, dense=None if u.dense is None else np.float32(strength) * u.dense)
    out.setdefault(path, []).append(u)
  return out


def apply_updates(value: Any, group: list[Update], stacked: bool) -> Any:
  """``value`` (a float leaf; ``stacked``: with a leading layer axis) plus every update of ``group``."""
  return _apply(value, group, 1.0, stacked)


def apply_to_quantized(qvalue: Any, scale: Any, group: list[Update], stacked: bool) -> tuple[Any, Any]:
  """A quantized kernel with ``group`` merged: dequantized, updated, quantized again in its own scheme."""
  value, scheme = _quantized_float({"qvalue": qvalue, "scale": scale})
  q = quantization.quantize_kernel(apply_updates(value, group, stacked), scheme, jnp.asarray(scale).dtype)
  return q.qvalue, q.scale


def _apply(value: Any, group: list[Update], strength: float, stacked: bool) -> Any:
  """value + strength · Σ deltas; numpy arrays in place (no second copy of a stacked 14B kernel)."""
  if isinstance(value, np.ndarray):
    if not value.flags.writeable:  # e.g. a view of a restored array: this one leaf is copied
      value = value.copy()
    for u in group:
      target = value[u.layer] if stacked else value  # a view: updated in place
      target[...] = (target.astype(np.float32) + np.float32(strength) * _delta(u)).astype(value.dtype)
    return value
  value = jnp.asarray(value)
  low = [u for u in group if u.dense is None]
  if stacked and low:  # one fused update of the whole stack: zero factors for untouched layers
    rank = max(u.down.shape[1] for u in low)
    n = value.shape[0]
    down = np.zeros((n, value.shape[1], rank), np.float32)
    up = np.zeros((n, rank, value.shape[2]), np.float32)
    scale = np.zeros((n,), np.float32)
    for u in low:
      r = u.down.shape[1]
      if scale[u.layer]:  # two LoRAs on one layer of one call: fold the first into the value
        value = _add_stacked(value, down, up, scale)
        down[:], up[:], scale[:] = 0, 0, 0
      down[u.layer, :, :r], up[u.layer, :r] = u.down, u.up
      scale[u.layer] = strength * u.scale
    value = _add_stacked(value, down, up, scale)
    group = [u for u in group if u.dense is not None]
  for u in group:
    delta = jnp.asarray(np.float32(strength) * _delta(u))
    if stacked:
      value = value.at[u.layer].set((value[u.layer].astype(jnp.float32) + delta).astype(value.dtype))
    else:
      value = (value.astype(jnp.float32) + delta).astype(value.dtype)
  return value


def merge(model: nnx.Module, updates: Sequence[Update], strength: float = 1.0) -> nnx.Module:
  """:func:`merge_state` on a KaleidoDiT (float or quantized); in place, returns the model."""
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  merge_state(pure, updates, strength, num_layers=int(model.config.num_layers))
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


class LoRALinear(nnx.Module):
  """``base(x) + scale · (x A) B`` with a frozen ``base`` (nnx.Linear or QuantizedLinear) and trainable A, B.

  ``A`` starts like PEFT's (Kaiming-uniform, bound 1/sqrt(din)) and ``B`` at zero, so the adapted model starts
  as the base. The factors are float32 ``nnx.LoRAParam`` leaves with the base kernel's logical names on din
  (``A``) and dout (``B``), so a sharded base shards its adapters the same way.
  """

  def __init__(self, base: nnx.Module, rank: int, alpha: float, *, rngs: nnx.Rngs, layers: int | None = None,
               rslora: bool = False):
    kernel = base.kernel if hasattr(base, "kernel") else base.qvalue
    din, dout = kernel.value.shape[-2:]
    names = sharding.variable_names(kernel)
    lead = (layers,) if layers else ()
    init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1,
                                             batch_axis=(0,) if layers else ())
    a_names = None if names is None else tuple(names[:-1]) + (None,)
    b_names = None if names is None else tuple(names[:-2]) + (None, names[-1])
    self.base = base
    self.lora_a = nnx.LoRAParam(init(rngs.params(), lead + (din, rank), jnp.float32),
                                **({"out_sharding": a_names} if a_names else {}))
    self.lora_b = nnx.LoRAParam(jnp.zeros(lead + (rank, dout), jnp.float32),
                                **({"out_sharding": b_names} if b_names else {}))
    self.rank, self.scale = int(rank), lora_scale(alpha, rank, rslora)
    self.dtype = jnp.dtype(getattr(base, "dtype", None) or jnp.float32)

  def __call__(self, x):
    y = self.base(x)
    lora = (x.astype(self.dtype) @ self.lora_a.value.astype(self.dtype)) @ self.lora_b.value.astype(self.dtype)
    return y + (self.scale * lora).astype(y.dtype)


def _linear_paths(model: nnx.Module, targets: tuple[str, ...]) -> list[tuple]:
  found = []
  for path, node in nnx.iter_graph(model):
    if not path or path[0] != "blocks" or not isinstance(node, (nnx.Linear, quantization.QuantizedLinear)):
      continue
    rel = "/".join(str(p) for p in path[1:] if not isinstance(p, int))
    if rel in targets:
      found.append(path)
  return found


def _get(parent, key):
  return parent[key] if isinstance(key, int) else getattr(parent, key)


def _set(parent, key, value):
  if isinstance(key, int):
    parent[key] = value
  else:
    setattr(parent, key, value)


def add_adapters(model: nnx.Module, rank: int, alpha: float, targets: Sequence[str] | str, *, rngs: nnx.Rngs,
                 rslora: bool = False) -> nnx.Module:
  """In place: every targeted linear under ``blocks/`` becomes a :class:`LoRALinear` (see the module docstring)."""
  if int(rank) < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  paths = _linear_paths(model, resolve_targets(targets))
  if not paths:
    raise ValueError(f"no linear of {type(model).__name__}'s blocks matches the LoRA targets {targets!r}")
  layers = int(model.config.num_layers) if model.config.get("scan_layers", False) else None
  with nnx.use_eager_sharding(False):  # logical names are metadata; the trainer places the arrays (as the DiT's)
    for path in paths:
      parent = model
      for key in path[:-1]:
        parent = _get(parent, key)
      _set(parent, path[-1], LoRALinear(_get(parent, path[-1]), rank, alpha, rngs=rngs, layers=layers,
                                        rslora=rslora))
  return model


def _adapters(model: nnx.Module) -> list[tuple[tuple, LoRALinear]]:
  return [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, LoRALinear)]


def has_adapters(model: nnx.Module) -> bool:
  return bool(_adapters(model))


def adapter_weights(model: nnx.Module) -> list[Update]:
  """The trained factors of every :class:`LoRALinear`, one low-rank :class:`Update` per layer and linear."""
  out = []
  stacked = bool(model.config.get("scan_layers", False))
  for path, node in _adapters(model):
    a, b = np.asarray(node.lora_a.value, np.float32), np.asarray(node.lora_b.value, np.float32)
    rel = "/".join(str(p) for p in path[1:] if not isinstance(p, int))
    if stacked:
      out.extend(Update(f"blocks/{rel}/kernel", i, a[i], b[i], scale=node.scale, source=f"adapter {rel} layer {i}")
                 for i in range(a.shape[0]))
    else:
      layer = next(p for p in path if isinstance(p, int))
      out.append(Update(f"blocks/{rel}/kernel", layer, a, b, scale=node.scale, source=f"adapter {rel} layer {layer}"))
  return sorted(out, key=lambda u: (u.layer, BLOCK_LINEARS.index(u.leaf[len("blocks/"):-len("/kernel")])))


def updates_from_adapters(pure: dict, alpha: float = 0.0, rslora: bool = False) -> list[Update]:
  """The low-rank updates of a pure adapter state ({..: {'lora_a', 'lora_b'}}: a LoRA training checkpoint's
  params), stacked (leading layer axis) or per layer; alpha 0 = the rank (scale 1)."""
  flat: dict[str, Any] = {}

  def walk(node, prefix):
    for k, v in node.items():
      (walk(v, f"{prefix}{k}/") if isinstance(v, dict) else flat.__setitem__(f"{prefix}{k}", v))
  walk(pure, "")
  out = []
  for key, a in sorted(flat.items()):
    if not key.endswith("/lora_a"):
      continue
    prefix = key[: -len("/lora_a")]
    a, b = np.asarray(a, np.float32), np.asarray(flat[prefix + "/lora_b"], np.float32)
    parts = prefix.split("/")
    layer_parts = [p for p in parts if p.isdigit()]
    rel = "/".join(p for p in parts if not p.isdigit())
    scale = lora_scale(alpha or a.shape[-1], a.shape[-1], rslora)
    if a.ndim == 3:
      out.extend(Update(f"{rel}/kernel", i, a[i], b[i], scale=scale, source=f"adapter {rel} layer {i}")
                 for i in range(a.shape[0]))
    else:
      layer = int(layer_parts[0]) if layer_parts else None
      out.append(Update(f"{rel}/kernel", layer, a, b, scale=scale, source=f"adapter {rel}"))
  return out


def is_adapter_state(pure: dict) -> bool:
  """Whether a pure parameter dict holds only LoRA factors (a LoRA training checkpoint's params)."""
  leaves = []

  def walk(node, name):
    for k, v in node.items():
      walk(v, str(k)) if isinstance(v, dict) else leaves.append(str(k))
  walk(pure, "")
  return bool(leaves) and all(k in ("lora_a", "lora_b") for k in leaves)


def fold_adapters(model: nnx.Module) -> nnx.Module:
  """In place: each LoRALinear is replaced by its base with the adapter merged in (sampling, export)."""
  updates = adapter_weights(model)
  for path, _ in _adapters(model):
    parent = model
    for key in path[:-1]:
      parent = _get(parent, key)
    _set(parent, path[-1], _get(parent, path[-1]).base)
  return merge(model, updates)
