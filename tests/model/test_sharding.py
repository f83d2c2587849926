"""Activation sharding by logical names: activations carry names of their own, so a batch that cannot use fsdp
leaves the hidden dimension replicated (it never lands on a parameter's fsdp), and the dropped axis is logged once."""

import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from kaleido_jax import config as kcfg
from kaleido_jax.model import dit
from kaleido_jax.model import sharding
from kaleido_jax.train import mesh as mesh_lib


def _spec(mesh, shape):
  f = jax.jit(lambda x: sharding.constrain(x, dit._ACT))  # pylint: disable=protected-access
  with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.LOGICAL_RULES):
    spec = tuple(f(jnp.zeros(shape)).sharding.spec)
  return P(*spec, *[None] * (len(shape) - len(spec)))  # jit's output drops trailing Nones


def test_indivisible_batch_keeps_the_hidden_dimension_whole_and_says_so_once(caplog):
  mesh = mesh_lib.make_mesh(kcfg.mesh_config(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  assert _spec(mesh, (4, 16, 32)) == P(('data', 'fsdp'), None, None)
  with caplog.at_level(logging.WARNING):
    assert _spec(mesh, (2, 16, 32)) == P('data', None, None)  # was P('data', None, 'fsdp') with `embed`
    _spec(mesh, (2, 16, 32))
  assert sum("not divisible over mesh axis 'fsdp'" in r.getMessage() for r in caplog.records) == 1
  ctx = mesh_lib.make_mesh(kcfg.mesh_config(data=2, context=2, tensor=2), jax.devices()[:8])
  assert _spec(ctx, (2, 16, 32)) == P('data', 'context', None)
