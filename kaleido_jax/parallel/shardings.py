"""NamedShardings from logical names, all through ``model.sharding.spec_for`` (the one resolver).

Parameters and optimizer state carry their names as nnx metadata; a batch-leading input is named
``activation_batch`` (+ ``activation_length`` on a sequence axis), exactly as the DiT constrains its activations,
so inputs arrive where the model wants them.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kaleido_jax.model import sharding as names_lib


def spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> P:
  return names_lib.spec_for(names, shape, mesh.shape)


def named(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, spec(names, shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedSharding for every Variable of an (abstract) nnx State, from its logical names."""
  def f(var):
    return named(names_lib.variable_names(var), var.value.shape, mesh)
  return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, shape: Sequence[int], seq_axis: int | None = None) -> NamedSharding:
  """A batch-leading array: dim 0 over (data, fsdp) as far as they divide it; `seq_axis` over context."""
  names: list[str | None] = ['activation_batch'] + [None] * (len(shape) - 1)
  if seq_axis is not None:
    names[seq_axis] = 'activation_length'
  return named(names, shape, mesh)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

