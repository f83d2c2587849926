r"""Device order on real slices: the trainer's ICI placement vs a host-contiguous order, per layout.

  JAX_PLATFORMS=cpu python bench/mesh.py

libtpu's abstract topologies list each slice's chips as `jax.devices()` does there (coordinates, `process_index`).
For each layout: the mesh `parallel.mesh.make_mesh` builds (ICI placement, what the trainer, tools.aot and sampling
use) and the alternative that would give every host one block of batch rows (devices sorted by host, reshaped).
Printed: the ICI hops between neighbours along each `fsdp` ring (torus distance without wraparound, which slices
of these sizes lack; largest and mean, the ring closed), and the batch rows host 0 feeds under the ICI order.
Neither column is a time: XLA picks its own collective algorithm; a longer ring hop is a longer path it may use.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from kaleido_jax import config as kcfg  # noqa: E402
from kaleido_jax.parallel import mesh as mesh_lib  # noqa: E402
from kaleido_jax.tools import aot  # noqa: E402
from kaleido_jax.train import inputs  # noqa: E402

LAYOUTS = [('v5p:2x2x2', dict(fsdp=8), 8), ('v5p:2x2x2', dict(data=2, fsdp=4), 8),
           ('v6e:4x4', dict(fsdp=16), 16), ('v6e:4x4', dict(data=4, fsdp=4), 16),
           ('v6e:4x4', dict(fsdp=8, context=2), 8), ('v5e:4x4', dict(fsdp=16), 16),
           ('v5p:2x4x4', dict(fsdp=32), 32), ('v5p:2x4x4', dict(data=4, fsdp=8), 32)]


def ring_hops(grid: np.ndarray) -> list[int]:
  rings = np.moveaxis(grid, 1, -1).reshape(-1, grid.shape[1])
  return [int(np.abs(np.subtract(r[i].coords, r[(i + 1) % len(r)].coords)).sum())
          for r in rings for i in range(len(r)) if len(r) > 1]


def main() -> None:
  print('| slice | mesh | fsdp ring hops, ICI order (max / mean) | host-contiguous (max / mean) | host 0 rows (ICI) |')
  print('|---|---|---|---|---|')
  for topology, mesh, batch in LAYOUTS:
    devices = aot.topology_devices(topology)
    cfg = kcfg.mesh_config(**dict(dict(data=1, fsdp=1, context=1, tensor=1), **mesh))
    ici = mesh_lib.make_mesh(cfg, devices)
    shape = ici.devices.shape
    by_host = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id)), dtype=object).reshape(shape)
    a, b = ring_hops(ici.devices), ring_hops(by_host)
    rows = inputs.data_shards(ici, batch)[0].rows
    name = ' x '.join(f'{k} {v}' for k, v in mesh.items())
    print(f'| {topology} ({len(devices)} chips, {len({d.process_index for d in devices})} hosts) | {name}, batch '
          f'{batch} | {max(a)} / {np.mean(a):.2f} | {max(b)} / {np.mean(b):.2f} | {list(rows)} |')


if __name__ == '__main__':
  argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
  main()
