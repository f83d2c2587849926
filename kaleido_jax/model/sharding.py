"""The one resolver from logical axis names to PartitionSpecs, for parameters, optimizer state, activations and
attention alike.

Dimensions carry logical names; ``RULES`` maps them onto the mesh axes ``data, fsdp, context, tensor``
(maxdiffusion's layout). Parameters use ``embed / heads / kv / mlp / vocab / layers``; activations have names of
their own (``activation_batch / activation_length / activation_heads / activation_embed``), so a batch that cannot
use fsdp never puts a hidden dimension on a parameter's fsdp:

  embed                            -> (context, fsdp)  parameters (and Adam moments) sharded over fsdp *and*
                                                       context, so a context-parallel mesh does not replicate them
  heads, mlp, vocab                -> tensor           Megatron-style tensor parallelism
  kv, layers                       -> replicated
  activation_batch                 -> (data, fsdp)     data parallel + ZeRO-3 style sharded batch
  activation_length                -> context          long video sequences split over `context`
  activation_heads                 -> tensor
  activation_embed                 -> replicated

A mesh axis is used at most once per array; a dimension its axes do not divide drops the last of them until they
do (batch 2 on data 2 x fsdp 2 goes over data only), and each such drop is logged once. The mesh itself is built
in ``kaleido_jax/parallel``; this module stays inside model/ so the DiT and attention need nothing else.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec as P

RULES: tuple[tuple[str, Any], ...] = (
    ('embed', ('context', 'fsdp')),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('kv', None),
    ('layers', None),
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', 'context'),
    ('activation_heads', 'tensor'),
    ('activation_embed', None),
)

_LOGGED: set[tuple] = set()


def spec_for(names: Sequence[str | None] | None, shape: Sequence[int], mesh_shape: Mapping[str, int],
             rules: Sequence[tuple[str, Any]] | None = None) -> P:
  """PartitionSpec of an array of `shape` whose dimensions carry logical `names` on a mesh of `mesh_shape`
  (``mesh.shape``); an axis dropped because it does not divide its dimension is logged once."""
  if not names:
    return P()
  table = dict(RULES if rules is None else rules)
  used: set[str] = set()
  spec = []
  for dim, name in zip(shape, names):
    axes = table.get(name) if isinstance(name, str) else None
    axes = [] if axes is None else [axes] if isinstance(axes, str) else list(axes)
    axes = [a for a in axes if mesh_shape.get(a, 1) > 1 and a not in used]
    while axes and dim % math.prod(mesh_shape[a] for a in axes):
      dropped = axes.pop()
      if (name, dim, dropped) not in _LOGGED:
        _LOGGED.add((name, dim, dropped))
        logging.warning('%s of size %d is not divisible over mesh axis %r (size %d): replicated over it',
                        name, dim, dropped, mesh_shape[dropped])
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*spec)


def current_mesh():
  """The mesh set with ``jax.set_mesh`` when arrays may be constrained on it (non-empty, no manual axes)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.manual_axes:
    return None
  return mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names under the current mesh (``jax.set_mesh``); identity without one."""
  mesh = current_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(names, x.shape, mesh.shape))


def variable_names(var) -> tuple | None:
  """The logical axis names an nnx Variable carries (its sharding metadata), or None."""
  meta = var.get_metadata()
  for key in ('out_sharding', 'sharding_names', 'sharding'):
    if meta.get(key):
      return tuple(meta[key])
  return None
