"""Logical-axis sharding constraints for activations; a no-op outside a mesh with logical rules.

The model names activation dimensions (``activation_batch``, ``activation_length``, ``activation_embed``), apart
from parameter dimensions (``embed``, ``heads``, ...); the trainer owns
the mapping onto mesh axes (``kaleido_jax/train/mesh.py``) and installs it with ``nnx.logical_axis_rules``.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import jax
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec as P


_LOGGED: set[tuple] = set()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names when a mesh and rules are active; else identity. A mesh axis a
  dimension cannot be divided by is left out (that dimension is replicated over it), logged once."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = core_spmd.get_logical_axis_rules()
  if mesh is None or mesh.empty or not rules:
    return x
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in zip(x.shape, names):
    axes = table.get(name) if name else None
    axes = [] if axes is None else [axes] if isinstance(axes, str) else list(axes)
    axes = [a for a in axes if a in mesh.shape and a not in used and mesh.shape[a] > 1]
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      dropped = axes.pop()
      if (name, dim, dropped) not in _LOGGED:
        _LOGGED.add((name, dim, dropped))
        logging.warning('%s of size %d is not divisible over mesh axis %r: replicated over it', name, dim, dropped)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return jax.lax.with_sharding_constraint(x, P(*spec))


def variable_names(var) -> tuple | None:
  """The logical axis names an nnx Variable carries (its sharding metadata), or None."""
  meta = var.get_metadata()
  for key in ('out_sharding', 'sharding_names', 'sharding'):
    if meta.get(key):
      return tuple(meta[key])
  return None
