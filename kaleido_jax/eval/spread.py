"""The evaluation networks (CLIP + aesthetic MLP, CurricularFace, GME) on every device of this host: the weights
replicated once, each call's batch split over the devices (padded to a multiple of their count with its last
item, the padding dropped from the result), one jitted program per batch shape."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class OverDevices:
  """`fn(state, *batched, *static)` jitted with `state` replicated and the batched arrays' leading axis sharded
  over this host's devices; call it as `(*batched, static=(...))`; it returns numpy arrays (one or a tuple)."""

  def __init__(self, fn: Callable[..., Any], state: Any, num_batched: int, static: int = 0):
    self.devices = jax.local_devices()
    self.mesh = Mesh(np.asarray(self.devices), ('batch',))
    rep, part = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P('batch'))
    self.state = jax.device_put(state, rep)  # once: the weights on every device
    self.part = part
    self.fn = jax.jit(fn, in_shardings=(rep,) + (part,) * num_batched,
                      static_argnums=tuple(range(1 + num_batched, 1 + num_batched + static)))

  def __call__(self, *batched: np.ndarray, static: tuple = ()) -> np.ndarray:
    n, b = len(self.devices), len(batched[0])
    pad = (-b) % n
    if pad:
      batched = tuple(np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) for x in batched)
    out = self.fn(self.state, *(jax.device_put(np.asarray(x), self.part) for x in batched), *static)
    return jax.tree.map(lambda o: np.asarray(o)[:b], out)  # an array or a tuple of them
