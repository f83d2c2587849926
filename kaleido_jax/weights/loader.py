"""One loader for training and inference: a source's leaves land in the target's shardings, one at a time.

The *target* is a pure tree of ``jax.ShapeDtypeStruct`` with shardings: the trainer's parameter (or LoRA
base) entry of its abstract state, or the sampler's abstract model placed on its mesh (or on one device).
Its structure says everything the loader needs: the block layout (stacked or per layer), which linears are
quantized (``qvalue`` / ``scale`` pairs) and which are wrapped by a LoRA adapter (a ``base`` level).

Per leaf: read from the source into the sharding of its target (sources.py), add the LoRA updates that touch
it, quantize it (a float source into a quantized target) or cast it, and keep it. What a device holds during
the load is its shard of what has landed plus one leaf in flight: a 14B model never passes through one chip.
A float kernel quantized on load is read to the host's CPU device and quantized there: only its quantized pair
reaches the accelerator (a bf16 kernel is 2x its int8 pair, 4x int4), and the pair is bitwise what the offline
converter (``--quantization``, also on the host) writes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from kaleido_jax.convert import common
from kaleido_jax.model import lora as lora_lib
from kaleido_jax.model import quantization
from kaleido_jax.weights import sources as sources_lib
from kaleido_jax.weights.sources import WeightsError


def flat(tree: Mapping[Any, Any]) -> dict[str, Any]:
  """{'a': {0: x}} -> {'a/0': x} (pure dicts from nnx.to_pure_dict or orbax)."""
  return sources_lib._flat(tree)  # pylint: disable=protected-access


def nested_like(flat_values: Mapping[str, Any], like: Mapping[Any, Any], prefix: str = '') -> dict:
  """Inverse of :func:`flat` onto ``like``'s structure (its key types: int layer indices stay ints)."""
  out = {}
  for k, v in like.items():
    path = f'{prefix}/{k}' if prefix else str(k)
    out[k] = nested_like(flat_values, v, path) if isinstance(v, Mapping) else flat_values[path]
  return out


def canonical(path: str) -> str:
  """A target path without LoRA's ``base`` level: what the stored model calls that parameter."""
  return '/'.join(p for p in path.split('/') if p != 'base')


def abstract_target(abstract: Mapping[Any, Any], shardings: Any = None) -> dict:
  """A pure abstract tree with shardings: ``shardings`` a matching tree of shardings, or None for the default
  device."""
  if shardings is None:
    device = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def _scheme_of_dtype(dtype: Any) -> str:
  return {jnp.dtype(t): s for s, t in quantization.QTYPES.items()}[jnp.dtype(dtype)]


@functools.lru_cache(maxsize=None)
def _quantizer(scheme: str, scale_dtype: Any) -> Callable:
  """Float kernel -> (qvalue, scale), run where the kernel is (the host's CPU device, see ``load``)."""
  def q(kernel):
    out = quantization.quantize_kernel(kernel, scheme, scale_dtype)
    return out.qvalue, out.scale
  return jax.jit(q)


@functools.lru_cache(maxsize=None)
def _caster(dtype: Any, sharding: Any) -> Callable:
  return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)


def load(source: Any, target: Mapping[Any, Any], *, float_like: Mapping[Any, Any] | None = None,
         updates: Sequence[lora_lib.Update] = (), num_layers: int = 0,
         on_leaf: Callable[[str], None] | None = None) -> dict:
  """The weights of ``source`` as ``target`` asks (structure, dtypes, shardings); see the module docstring.

  ``float_like``: the float model's pure abstract tree, whose kernel dtypes a float source is cast to before
  it is quantized into a quantized target (needed only then). ``updates``: LoRA updates merged as the leaves
  land (``lora.index_updates`` checks them all first). ``on_leaf(path)`` runs after each leaf lands.
  Raises :class:`WeightsError` before any tensor is read when the source does not fit.
  """
  targets = flat(target)
  by_canon = {canonical(p): p for p in targets}
  quantized = {c[:-len('/qvalue')] for c in by_canon if c.endswith('/qvalue') and
               c[:-len('/qvalue')] + '/scale' in by_canon}
  schemes = {_scheme_of_dtype(targets[by_canon[q + '/qvalue']].dtype) for q in quantized}
  scheme = schemes.pop() if schemes else 'none'
  if source.scheme not in ('none', scheme):
    raise WeightsError(f'{source.where!r} holds {source.scheme} weights but config.model.quantization='
                       f'{scheme!r}; set --config.model.quantization={source.scheme} or convert the float '
                       'checkpoint again')
  requantize = source.scheme == 'none' and scheme != 'none'
  float_flat = flat(float_like) if float_like is not None else {}
  host = SingleDeviceSharding(common.host_device())  # where float kernels are quantized on load
  wanted: dict[str, jax.ShapeDtypeStruct] = {}
  for c, p in by_canon.items():
    parent, _, name = c.rpartition('/')
    if requantize and parent in quantized and name in ('qvalue', 'scale'):
      if name == 'qvalue':
        kernel = parent + '/kernel'
        if kernel not in float_flat:
          raise WeightsError(f'quantizing {source.where!r} on load needs the float model (float_like) for {kernel}')
        wanted[kernel] = jax.ShapeDtypeStruct(targets[p].shape, float_flat[kernel].dtype, sharding=host)
      continue
    wanted[c] = targets[p]
  try:
    by_leaf = lora_lib.index_updates(updates, {k: tuple(v.shape) for k, v in wanted.items()},
                                     num_layers=num_layers) if updates else {}
  except lora_lib.LoRAMismatch as e:
    raise WeightsError(f'a LoRA does not fit the model: {e}') from e
  stacked = lora_lib.stacked_blocks(wanted)
  source.check(wanted)

  out: dict[str, jax.Array] = {}
  pending_q: dict[str, dict[str, jax.Array]] = {}  # parent -> the quantized pair as it arrives
  for path, value in source.stream(wanted):
    parent, _, name = path.rpartition('/')
    in_stack = stacked and path.startswith('blocks/')
    if requantize and parent in quantized and name == 'kernel':  # float kernel -> the target's quantized pair
      if path in by_leaf:
        value = lora_lib.apply_updates(value, by_leaf[path], in_stack)
      qt, st = targets[by_canon[parent + '/qvalue']], targets[by_canon[parent + '/scale']]
      qv, sc = _quantizer(scheme, jnp.dtype(st.dtype))(value)
      del value
      # Each device receives its shard of the pair from this host (every process quantizes the leaf it read).
      out[by_canon[parent + '/qvalue']] = sources_lib.place(np.asarray(qv), qt.sharding)
      out[by_canon[parent + '/scale']] = sources_lib.place(np.asarray(sc), st.sharding)
      del qv, sc
    elif parent + '/kernel' in by_leaf and name in ('qvalue', 'scale'):  # LoRA into stored quantized weights
      pair = pending_q.setdefault(parent, {})
      pair[name] = value
      if len(pair) < 2:
        continue
      del pending_q[parent]
      qv, sc = lora_lib.apply_to_quantized(pair['qvalue'], pair['scale'], by_leaf[parent + '/kernel'], in_stack)
      for n, v in (('qvalue', qv), ('scale', sc)):
        t = targets[by_canon[f'{parent}/{n}']]
        out[by_canon[f'{parent}/{n}']] = jax.device_put(v, t.sharding)
    else:
      if path in by_leaf:
        value = lora_lib.apply_updates(value, by_leaf[path], in_stack)
      t = targets[by_canon[path]]
      if value.dtype != t.dtype:
        value = _caster(jnp.dtype(t.dtype), t.sharding)(value)
      out[by_canon[path]] = jax.device_put(value, t.sharding)
    if on_leaf is not None:
      on_leaf(path)
  return nested_like(out, target)
