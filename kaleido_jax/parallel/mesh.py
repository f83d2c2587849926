"""The device mesh ``data, fsdp, context, tensor``: one slice over ICI, or several slices joined over DCN.

``config.mesh.{data,fsdp,context,tensor}`` are the axes' total sizes (at most one -1, which takes the remaining
devices). On a multislice job (devices carry ``slice_index``) the ``dcn_*`` keys say how many slices each axis
spans (one -1 takes the remaining slices; the default puts the slices on ``data``, as maxdiffusion's
``dcn_data_parallelism=-1`` does), and the mesh is built with ``mesh_utils.create_hybrid_device_mesh``: within a
slice the axes follow the ICI topology, across slices only the DCN part of each axis (so only data-parallel
gradient reductions cross DCN by default).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES = ('data', 'fsdp', 'context', 'tensor')
_AUTO = (AxisType.Auto,) * len(MESH_AXES)  # GSPMD propagation between the explicit constraints
# jax.make_mesh's own choice (jax 0.10): v5e / v5 lite may split physical axes from the start, others may not.
_SPLIT_FROM_THE_START = ('TPU v5 lite', 'TPU v5e')


def _fill(sizes: list[int], total: int, what: str) -> tuple[int, ...]:
  """Axis sizes with at most one -1 filled so that their product is `total`."""
  named = dict(zip(MESH_AXES, sizes))
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f'at most one {what} axis may be -1, got {named}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'{what} axis sizes must be positive or -1, got {named}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if total % known:
      raise ValueError(f'{total} {"devices" if what == "mesh" else "slices"} do not divide into {what} {named}')
    sizes[sizes.index(-1)] = total // known
  if math.prod(sizes) != total:
    raise ValueError(f'{what} {named} needs {math.prod(sizes)} {"devices" if what == "mesh" else "slices"}, '
                     f'have {total}')
  return tuple(sizes)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Total axis sizes from the config; at most one -1, which takes the remaining devices."""
  return _fill([int(mesh_cfg[a]) for a in MESH_AXES], num_devices, 'mesh')


def dcn_shape(mesh_cfg: ml_collections.ConfigDict, shape: Sequence[int], num_slices: int) -> tuple[int, ...]:
  """How many slices each axis spans (``mesh.dcn_*``); each must divide its axis' total size."""
  dcn = _fill([int(mesh_cfg.get(f'dcn_{a}', -1 if a == 'data' else 1)) for a in MESH_AXES], num_slices,
              'mesh.dcn_*')
  for axis, total, n in zip(MESH_AXES, shape, dcn):
    if total % n:
      raise ValueError(f'mesh.{axis}={total} does not split over mesh.dcn_{axis}={n} slices')
  return dcn


def num_slices(devices: Sequence[Any]) -> int:
  return len({getattr(d, 'slice_index', 0) for d in devices})


def initialize_distributed() -> None:
  """Join the multi-process job described by the environment, if any (before any JAX computation)."""
  addr = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if addr and int(os.environ.get('JAX_NUM_PROCESSES', '1')) > 1:
    if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(addr, int(os.environ['JAX_NUM_PROCESSES']),
                               int(os.environ['JAX_PROCESS_ID']))
  elif (os.environ.get('KALEIDO_DISTRIBUTED') == 'auto' or
        len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1):
    jax.distributed.initialize()  # Cloud TPU: hosts discovered from the slice's metadata


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """One slice's devices arranged as `shape`, following the ICI topology as `jax.make_mesh` arranges them.

  The same call on a real slice (`jax.devices()`), in tools.aot (libtpu's abstract devices, listed in the same
  order with the same `process_index`) and in tests. Where `jax.make_mesh` finds no assignment of the mesh axes
  to whole physical axes (v6e-16 as fsdp 8 x context 2: NotImplementedError inside mesh_utils), a physical axis
  is split between two mesh axes instead (`allow_split_physical_axes`), logged once. CPU / GPU devices: their
  order, reshaped.
  """
  split = getattr(devices[0], 'device_kind', '') in _SPLIT_FROM_THE_START
  try:
    return mesh_utils.create_device_mesh(tuple(shape), list(devices), allow_split_physical_axes=split)
  except (NotImplementedError, ValueError, AssertionError) as e:
    if split:
      raise
    logging.info('mesh %s: no assignment to whole physical axes (%s); splitting a physical axis',
                 tuple(shape), str(e).splitlines()[0])
    return mesh_utils.create_device_mesh(tuple(shape), list(devices), allow_split_physical_axes=True)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh over `devices` (default: all global devices, as `jax.devices()` lists them), placed by the ICI
  topology (`device_grid`), hybrid ICI x DCN when they span several slices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  slices = num_slices(devices)
  if slices > 1:
    dcn = dcn_shape(mesh_cfg, shape, slices)
    ici = tuple(t // n for t, n in zip(shape, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=_AUTO)
  dcn_shape(mesh_cfg, shape, 1)  # a dcn_* other than 1 / -1 on one slice is a config error
  return Mesh(device_grid(shape, devices), MESH_AXES, axis_types=_AUTO)


def group_meshes(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[Any]) -> list[Mesh]:
  """`devices` split into independent meshes of ``fsdp x context x tensor`` chips each (data = 1): batch
  sampling's groups, one request per group at a time."""
  sizes = tuple(max(1, int(mesh_cfg[a])) for a in MESH_AXES[1:])
  per = math.prod(sizes)
  if len(devices) % per:
    raise ValueError(f'{len(devices)} local devices do not split into groups of fsdp x context x tensor = {per}')
  return [Mesh(np.asarray(devices[i:i + per]).reshape((1,) + sizes), MESH_AXES, axis_types=_AUTO)
          for i in range(0, len(devices), per)]


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']
