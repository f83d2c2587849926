"""The one resolver from logical names to shardings: activations carry names of their own, so a batch that cannot
use fsdp leaves the hidden dimension replicated (it never lands on a parameter's fsdp), the dropped axis is logged
once, and meshes span slices as ICI x DCN."""

import logging

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from kaleido_jax import config as kcfg
from kaleido_jax.model import attention
from kaleido_jax.model import dit
from kaleido_jax.model import sharding
from kaleido_jax.parallel import mesh as mesh_lib
from kaleido_jax.parallel import shardings


def _spec(mesh, shape):
  f = jax.jit(lambda x: sharding.constrain(x, dit._ACT))  # pylint: disable=protected-access
  with jax.set_mesh(mesh):
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


def test_inputs_parameters_and_attention_resolve_through_the_same_rules(caplog):
  mesh = mesh_lib.make_mesh(kcfg.mesh_config(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  # An input batch lands where the DiT constrains its activations.
  assert shardings.batch_sharding(mesh, (2, 16, 32)).spec == _spec(mesh, (2, 16, 32))
  assert shardings.batch_sharding(mesh, (4, 5, 8, 8, 16), seq_axis=1).spec == P(('data', 'fsdp'), None, None,
                                                                                None, None)
  # Attention runs per device with batch and heads placed by the same resolver: a batch of 6 cannot use fsdp
  # (6 % 4), goes over data alone, and says so; the result equals the unsharded one.
  q = jax.random.normal(jax.random.key(0), (6, 8, 4, 16))
  fn = jax.jit(lambda q: attention.dot_product_attention(q, q, q, implementation='xla'))
  with caplog.at_level(logging.WARNING), jax.set_mesh(mesh):
    out = fn(q)
  assert any(r.getMessage().startswith("activation_batch of size 6 is not divisible over mesh axis 'fsdp'")
             for r in caplog.records)
  want = attention.dot_product_attention(q, q, q, implementation='xla')
  assert float(jnp.max(jnp.abs(out - want))) < 1e-5


def test_mesh_spans_slices_over_dcn():
  class Dev:  # the attributes create_hybrid_device_mesh reads; CPU devices carry no slice_index
    def __init__(self, i):
      self.id, self.slice_index, self.process_index, self.platform, self.device_kind = i, i // 4, i // 4, 'cpu', 'cpu'
      self.coords, self.core_on_chip = None, 0

    def __repr__(self):
      return f'Dev({self.id})'
  devices = [Dev(i) for i in range(8)]
  assert mesh_lib.num_slices(devices) == 2
  # Default: the slices split data (dcn_data=-1); fsdp stays inside a slice.
  mesh = mesh_lib.make_mesh(kcfg.mesh_config(data=2, fsdp=4), devices)
  assert dict(mesh.shape) == dict(data=2, fsdp=4, context=1, tensor=1)
  assert [{d.slice_index for d in row.flat} for row in mesh.devices] == [{0}, {1}]
  # fsdp across the two slices instead: each fsdp group holds chips of both.
  mesh = mesh_lib.make_mesh(kcfg.mesh_config(data=2, fsdp=4, dcn_data=1, dcn_fsdp=2), devices)
  assert all({d.slice_index for d in row.flat} == {0, 1} for row in mesh.devices)
  with pytest.raises(ValueError, match='does not split over mesh.dcn_context=2'):
    mesh_lib.make_mesh(kcfg.mesh_config(data=8, dcn_data=1, dcn_context=2), devices)
  with pytest.raises(ValueError, match='needs 2 slices, have 1'):
    mesh_lib.make_mesh(kcfg.mesh_config(data=8, dcn_data=2), jax.devices()[:8])
