"""Device mesh `data, fsdp, context, tensor` and the logical-axis rules that map the model's names onto it.

Parameters carry logical axis names (`embed`, `heads`, `kv`, `mlp`, `layers`, `vocab`) as nnx sharding
metadata; activations use `batch` and `activation_length`. The rules (maxdiffusion's layout):

  batch             -> (data, fsdp)   data parallel + ZeRO-3 style sharded batch
  activation_length -> context        long video sequences split over `context`
  embed             -> (context, fsdp) parameters (and Adam moments) sharded over fsdp *and* context, so a
                                      context-parallel mesh does not replicate them (gathered per layer)
  heads, mlp, vocab -> tensor         Megatron-style tensor parallelism
  kv, layers        -> replicated

A mesh axis is used at most once per array, and a dimension that the mesh axes do not divide is
replicated instead (tiny test models on 8 devices), so every parameter gets a valid sharding.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kaleido_jax.model import sharding as sharding_lib

MESH_AXES = ('data', 'fsdp', 'context', 'tensor')

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', ('data', 'fsdp')),
    # Activations have names of their own: a parameter's `embed` (context, fsdp) would put a hidden dimension on
    # fsdp whenever the batch cannot use it (batch 2 on data 2 x fsdp 2).
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', 'context'),
    ('activation_embed', None),
    ('embed', ('context', 'fsdp')),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('kv', None),
    ('layers', None),
)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Axis sizes from the config; at most one -1, which takes the remaining devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'{num_devices} devices do not divide into mesh {dict(zip(MESH_AXES, sizes))}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
                     f'have {num_devices}')
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh over `devices` (default: all global devices) with Auto axis types (GSPMD propagation)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _rule(name):
  for logical, mesh_axes in LOGICAL_RULES:
    if logical == name:
      return mesh_axes
  return None


def logical_to_spec(names: Sequence[Any] | None, shape: Sequence[int], mesh: Mesh) -> P:
  """PartitionSpec for an array of `shape` whose dimensions carry logical `names`."""
  if not names:
    return P()
  used: set[str] = set()
  out = []
  for dim, name in zip(shape, names):
    axes = _rule(name) if isinstance(name, str) else None
    if axes is None:
      out.append(None)
      continue
    axes = [a for a in ((axes,) if isinstance(axes, str) else axes) if a not in used and mesh.shape[a] > 1]
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedSharding for every Variable of an (abstract) nnx State, from its logical names."""
  def f(var):
    return NamedSharding(mesh, logical_to_spec(sharding_lib.variable_names(var), var.value.shape, mesh))
  return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, seq_axis: int | None = None) -> NamedSharding:
  """Batch-leading arrays: dim 0 over (data, fsdp); optionally a sequence dim over context."""
  spec = [('data', 'fsdp')] + [None] * (ndim - 1)
  if seq_axis is not None and mesh.shape['context'] > 1:
    spec[seq_axis] = 'context'
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def batch_axes(mesh: Mesh, global_batch: int) -> tuple[str, str] | None:
  """The mesh axes of a batch's leading dimension: (data, fsdp) when they divide it, else none (replicated)."""
  dp = data_parallel_size(mesh)
  return ('data', 'fsdp') if dp > 1 and global_batch % dp == 0 else None
