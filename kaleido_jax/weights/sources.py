"""Where weights come from: an orbax tree (a converted directory, a training checkpoint) or PyTorch-side files.

A source streams the leaves of a *wanted* tree (flat ``{'blocks/self_attn/to_q/kernel': ShapeDtypeStruct}``,
each with the sharding it must land in) one at a time, already placed: orbax reads each device's shard of a
leaf straight from storage (a partial restore per leaf); PyTorch tensors are read and converted on the host one
leaf at a time and placed shard by shard (``jax.make_array_from_callback``). No device ever holds a whole
model it does not own a shard of, and the host holds one leaf at a time.

Both check the wanted tree against what is stored (missing, unexpected, shapes) before any tensor is read.
An orbax tree written in the other block layout (stacked over layers vs one entry per layer) is relaid on
the devices as it streams.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from kaleido_jax.convert import common


class WeightsError(ValueError):
  """Stored weights do not fit the model they are loaded into; the message names the first problems."""


def _short(items: list[str], n: int = 6) -> str:
  return str(items[:n]) + (f' ... and {len(items) - n} more' if len(items) > n else '')


def _leading(sharding: Any, add: bool) -> Any:
  """The sharding of a leaf with a leading (layers) axis added or removed; that axis is never sharded."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  return NamedSharding(sharding.mesh, P(*((None,) + spec if add else spec[1:])))


@functools.lru_cache(maxsize=None)
def _stacker(sharding: Any) -> Callable:
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _slicer(sharding: Any) -> Callable:
  return jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), out_shardings=sharding)


def place(host: np.ndarray, sharding: Any) -> jax.Array:
  """A host array as a jax.Array in ``sharding``: each device receives only its own shard."""
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _nested(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


_flat = common.flatten_paths


class OrbaxSource:
  """The leaves under ``prefix`` of an orbax pytree checkpoint (``StandardCheckpointer`` / a manager's item).

  ``scheme``: the quantization its linears were written in ('none' for float weights).
  """

  def __init__(self, directory: str, *, prefix: str = '', scheme: str = 'none', where: str = ''):
    self.directory, self.prefix, self.scheme = directory, prefix, scheme
    self.where = where or directory
    try:
      tree = common.orbax_tree(directory)
    except (FileNotFoundError, ValueError) as e:
      raise WeightsError(f'{self.where!r} holds no readable orbax checkpoint ({e})') from e
    if prefix:
      if prefix not in tree:
        raise WeightsError(f'{self.where!r} has no {prefix!r} entry (it has {sorted(tree)})')
      tree = tree[prefix]
    self.stored = {k: (tuple(getattr(v, 'shape', ())), getattr(v, 'dtype', None)) for k, v in _flat(tree).items()}

  def _plan(self, wanted: Mapping[str, Any]) -> tuple[list, list[str]]:
    """Reads to make: ('same', path) | ('stack', wanted path, stored paths) | ('slice', stored, wanted paths)."""
    jobs, problems, used, slices = [], [], set(), {}
    for path, want in wanted.items():
      parts = path.split('/')
      if path in self.stored:
        jobs.append(('same', path))
        used.add(path)
        if self.stored[path][0] != tuple(want.shape):
          problems.append(f'{path} is {self.stored[path][0]}, the model wants {tuple(want.shape)}')
      elif parts[0] == 'blocks' and len(parts) > 2 and parts[1].isdigit() and \
          '/'.join(['blocks'] + parts[2:]) in self.stored:  # stored stacked, wanted per layer
        stored = '/'.join(['blocks'] + parts[2:])
        shape = self.stored[stored][0]
        if shape[1:] != tuple(want.shape) or int(parts[1]) >= shape[0]:
          problems.append(f'{path}: stored stacked as {stored} {shape}, the model wants layer {parts[1]} '
                          f'of shape {tuple(want.shape)}')
        used.add(stored)
        slices.setdefault(stored, []).append(path)
      elif parts[0] == 'blocks' and f'blocks/0/{"/".join(parts[1:])}' in self.stored:  # stored per layer
        layers = [f'blocks/{i}/{"/".join(parts[1:])}' for i in range(want.shape[0])]
        absent = [p for p in layers if p not in self.stored]
        if absent:
          problems.append(f'{path}: the model has {want.shape[0]} layers, {self.where!r} lacks {absent[:2]}')
          continue
        if any(self.stored[p][0] != tuple(want.shape[1:]) for p in layers):
          problems.append(f'{path}: stored per layer as {self.stored[layers[0]][0]}, the model wants '
                          f'{tuple(want.shape[1:])} per layer')
        used.update(layers)
        jobs.append(('stack', path, layers))
      else:
        problems.append(f'missing {path}')
    jobs.extend(('slice', stored, paths) for stored, paths in slices.items())
    extra = sorted(set(self.stored) - used)
    if extra:
      problems.append(f'unexpected {_short(extra)}')
    return jobs, problems

  def check(self, wanted: Mapping[str, Any]) -> None:
    problems = self._plan(wanted)[1]
    if problems:
      raise WeightsError(f'{self.where!r} does not fit the model: ' + '; '.join(problems[:8]) +
                         (f' ... and {len(problems) - 8} more' if len(problems) > 8 else ''))

  def _read(self, leaves: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """A partial restore of ``leaves`` (stored paths), each device reading only its shard."""
    full = {(f'{self.prefix}/{k}' if self.prefix else k): v for k, v in leaves.items()}
    item = _nested(full)
    out = common.orbax_restore(self.directory, ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
    flat = _flat(out)
    return {k: flat[f'{self.prefix}/{k}' if self.prefix else k] for k in leaves}

  def stream(self, wanted: Mapping[str, Any]) -> Iterator[tuple[str, jax.Array]]:
    jobs, problems = self._plan(wanted)
    if problems:
      self.check(wanted)
    for job in jobs:
      if job[0] == 'same':
        path = job[1]
        w = wanted[path]
        yield path, self._read({path: jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=w.sharding)})[path]
      elif job[0] == 'stack':
        _, path, layers = job
        w = wanted[path]
        one = _leading(w.sharding, add=False)
        parts = self._read({p: jax.ShapeDtypeStruct(w.shape[1:], w.dtype, sharding=one) for p in layers})
        stacked = _stacker(w.sharding)(*(parts.pop(p) for p in layers))
        yield path, stacked
      else:
        _, stored, paths = job
        w = wanted[paths[0]]
        shape = self.stored[stored][0]
        whole = self._read({stored: jax.ShapeDtypeStruct(shape, w.dtype,
                                                         sharding=_leading(w.sharding, add=True))})[stored]
        for path in paths:
          yield path, _slicer(wanted[path].sharding)(whole, int(path.split('/')[1]))
        del whole


class TorchSource:
  """PyTorch-side tensors (safetensors files / shards, ``.pth`` / DeepSpeed pickles) through a converter plan
  (``{our/path: convert.common.Source}``), read, transformed and cast on the host one leaf at a time."""

  scheme = 'none'

  def __init__(self, reader: common.CheckpointReader, plan: Mapping[str, common.Source], *, where: str,
               ignore_unused: tuple[str, ...] = ()):
    self.reader, self.plan, self.where, self.ignore_unused = reader, plan, where, ignore_unused

  def check(self, wanted: Mapping[str, Any]) -> None:
    try:
      common.check_plan(self.reader, wanted, self.plan, ignore_unused=self.ignore_unused, what=self.where)
    except common.ConversionError as e:
      raise WeightsError(str(e)) from e

  def stream(self, wanted: Mapping[str, Any]) -> Iterator[tuple[str, jax.Array]]:
    self.check(wanted)
    for path, w in wanted.items():
      host = common.read_leaf(self.reader, self.plan[path], w, name=path, what=self.where)
      yield path, place(host, w.sharding)
      del host


class HostSource:
  """Leaves already in host memory (a pure dict of numpy / jax arrays): random or in-memory weights."""

  scheme = 'none'

  def __init__(self, pure: Mapping[str, Any], *, where: str = 'in-memory weights', scheme: str = 'none'):
    self.flat, self.where, self.scheme = _flat(pure), where, scheme

  def check(self, wanted: Mapping[str, Any]) -> None:
    missing = sorted(set(wanted) - set(self.flat))
    extra = sorted(set(self.flat) - set(wanted))
    bad = [f'{p} is {tuple(np.shape(self.flat[p]))}, the model wants {tuple(w.shape)}'
           for p, w in wanted.items() if p in self.flat and tuple(np.shape(self.flat[p])) != tuple(w.shape)]
    problems = ([f'missing {_short(missing)}'] if missing else []) + (
        [f'unexpected {_short(extra)}'] if extra else []) + bad
    if problems:
      raise WeightsError(f'{self.where} do not fit the model: ' + '; '.join(problems[:8]))

  def stream(self, wanted: Mapping[str, Any]) -> Iterator[tuple[str, jax.Array]]:
    self.check(wanted)
    for path, w in wanted.items():
      yield path, place(np.asarray(self.flat[path], w.dtype), w.sharding)
