"""The trainer's mesh on real slices as they come: libtpu's abstract topologies list the devices as `jax.devices()`
does on that slice (physical order, each with its `process_index`), and `parallel.mesh.make_mesh` places them by
the ICI topology, so hosts interleave along `fsdp`. Every layout README, the configs and the fit table name must
start there: each host feeds an equal share of rows and together they cover the batch."""

import importlib.util
import jax
import numpy as np
import pytest

from kaleido_jax import config as kcfg
from kaleido_jax.parallel import mesh as mesh_lib
from kaleido_jax.train import inputs, loop

pytestmark = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (test extra)')

# (topology, slices, mesh, global batch, where the layout is named)
LAYOUTS = [
    ('v5p:2x2x1', 1, dict(fsdp=4), 4, 'configs/kaleido_14b.py as shipped; README fit row v5p-8'),
    ('v5p:2x2x1', 1, dict(context=4), 1, 'README fit row v5p-8 720p, context 4'),
    ('v5p:2x2x2', 1, dict(fsdp=8), 8, "configs/kaleido_14b.py docstring and README's launch example: v5p-16, batch 8"),
    ('v5p:2x2x2', 1, dict(context=8), 1, 'README fit row v5p-16 720p + 5 refs, context 8'),
    ('v5p:2x2x2', 1, dict(data=2, fsdp=4), 8, 'v5p-16, data 2 x fsdp 4'),
    ('v5p:2x2x2', 1, dict(tensor=8), 1, 'v5p-16, tensor over both hosts: both feed the one row'),
    ('v5p:2x2x2', 1, dict(fsdp=2, tensor=4), 2, 'v5p-16, fsdp 2 x tensor 4'),
    ('v6e:4x4', 1, dict(fsdp=2, context=8), 4, 'v6e-16, context 8 spans two hosts'),
    ('v6e:4x4', 1, dict(fsdp=8, context=2), 8, 'README fit row v6e-16, fsdp 8 x context 2'),
    ('v6e:4x4', 1, dict(fsdp=16), 16, 'v6e-16, fsdp 16'),
    ('v6e:4x4', 1, dict(data=4, fsdp=4), 16, 'v6e-16, data 4 x fsdp 4'),
    ('v5e:4x4', 1, dict(fsdp=16), 16, 'v5e-16, fsdp 16'),
    ('v5e:2x4', 1, dict(fsdp=8), 8, 'configs/wan_1_3b.py as shipped; README fit row v5e-8'),
    ('v5e:2x4', 1, dict(fsdp=4, context=2), 4, 'README fit row v5e-8 LoRA, fsdp 4 x context 2'),
    ('v5p:2x4x4', 1, dict(fsdp=32), 32, 'v5p-64, fsdp 32'),
    ('v5p:2x4x4', 1, dict(data=4, fsdp=8), 32, 'v5p-64, data 4 x fsdp 8'),
    ('v5p:2x2x1', 2, dict(data=2, fsdp=4), 8, 'README fit row and command: 2 x v5p-8, data 2 over DCN x fsdp 4'),
    ('v5p:2x2x2', 2, dict(data=2, fsdp=8), 16, '2 x v5p-16, data 2 over DCN x fsdp 8'),
]


def _devices(topology, slices):
  from kaleido_jax.tools import aot
  return aot.topology_devices(topology, slices)


def _cfg(**mesh):
  return kcfg.mesh_config(**dict(dict(data=1, fsdp=1, context=1, tensor=1), **mesh))


@pytest.mark.parametrize('topology,slices,mesh,batch,where', LAYOUTS, ids=[f'{l[0]}x{l[1]}-{l[3]}-' +
                         '-'.join(f'{k}{v}' for k, v in l[2].items()) for l in LAYOUTS])
def test_every_named_layout_starts_on_its_slice_as_the_trainer_builds_it(monkeypatch, topology, slices, mesh,
                                                                          batch, where):
  devices = _devices(topology, slices)
  hosts = sorted({d.process_index for d in devices})
  monkeypatch.setattr(jax, 'devices', lambda *a: list(devices))  # what jax.devices() lists on that slice
  cfg = _cfg(**mesh)
  config = kcfg.base_config()
  config.mesh.update(cfg)
  config.data.batch_size = batch
  loop.validate(config, len(devices))  # what the trainer checks first
  trainer = mesh_lib.make_mesh(cfg)  # the trainer's own call (train/loop.py): no devices passed
  aot = mesh_lib.make_mesh(cfg, _devices(topology, slices))  # tools.aot's call: the topology's devices
  assert [d.id for d in trainer.devices.flat] == [d.id for d in aot.devices.flat], where
  assert sorted(d.id for d in trainer.devices.flat) == sorted(d.id for d in devices)
  shards = inputs.data_shards(trainer, batch)
  assert sorted(shards) == hosts, where  # every host feeds rows
  sizes = {len(s.rows) for s in shards.values()}
  assert len(sizes) == 1, (where, shards)
  covered = {}
  for s in shards.values():
    assert covered.setdefault(s.index, s.rows) == s.rows  # one shard index, one row set
  rows = sorted(r for g in covered.values() for r in g)
  assert rows == list(range(batch)), where  # the groups' rows cover the batch once
  assert len(covered) == shards[0].count == batch // sizes.pop()


def test_hosts_interleave_along_fsdp_on_v5p_16_and_each_feeds_its_own_rows():
  # The device order a real v5p-16 gives (2 hosts x 4 chips, 2x2x2): ICI placement puts the hosts' chips
  # alternately along fsdp, so host 0 holds rows 0, 2, 4, 6 of batch 8 (refused before: "not one aligned block").
  mesh = mesh_lib.make_mesh(_cfg(fsdp=8), _devices('v5p:2x2x2', 1))
  assert [d.process_index for d in mesh.devices.flat] == [0, 1] * 4
  assert inputs.data_shards(mesh, 8) == {0: inputs.DataShard(0, 2, (0, 2, 4, 6)),
                                         1: inputs.DataShard(1, 2, (1, 3, 5, 7))}


def test_v6e_16_fsdp_8_context_2_splits_a_physical_axis_instead_of_failing():
  # jax.make_mesh itself raises NotImplementedError ("Failed to find assignment for logical_axis_index 2") here.
  devices = _devices('v6e:4x4', 1)
  with pytest.raises(NotImplementedError):
    jax.make_mesh((1, 8, 2, 1), mesh_lib.MESH_AXES, devices=devices)
  mesh = mesh_lib.make_mesh(_cfg(fsdp=8, context=2), devices)
  assert dict(mesh.shape) == dict(data=1, fsdp=8, context=2, tensor=1)
  # Each context pair is two ICI neighbours (one hop), as the split keeps them.
  for pair in mesh.devices.reshape(8, 2):
    a, b = (np.asarray(d.coords) for d in pair)
    assert np.abs(a - b).sum() == 1


def test_a_layout_that_cannot_split_rows_evenly_over_hosts_is_refused_by_name():
  # 4 hosts x 4 chips, data 4 x context 4, with the chips arranged so that host h holds rows h and h + 1:
  # overlapping row sets (no mesh builder gives this; a hand-made Mesh can).
  devices = _devices('v6e:4x4', 1)
  by_host = {h: [d for d in devices if d.process_index == h] for h in range(4)}
  take = lambda h: [by_host[h].pop(), by_host[h].pop()]
  grid = [take(0) + take(3), take(0) + take(1), take(1) + take(2), take(2) + take(3)]
  mesh = jax.sharding.Mesh(np.asarray(grid).reshape(4, 1, 4, 1), mesh_lib.MESH_AXES)
  with pytest.raises(kcfg.ConfigError, match=r'overlapping row sets of a batch of 4 \(process 0: \[0, 1\]; '
                     r'process 1: \[1, 2\]'):
    inputs.data_shards(mesh, 4)
