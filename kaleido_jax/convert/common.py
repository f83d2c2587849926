"""What every converter shares: streaming checkpoint reading, key-plan filling, atomic saving.

A converter is a *plan*: for each leaf of our NNX state, which source tensor(s) it comes from and how
they are transformed (transpose, stack over layers, ...). :func:`fill_from_plan` executes a plan one
tensor at a time against a lazy :class:`CheckpointReader`, so a 14B checkpoint is never held twice: the
only full copy in memory is the output state being filled.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from etils import epath
import orbax.checkpoint as ocp
from flax import nnx
from safetensors import safe_open

from kaleido_jax import storage
from kaleido_jax.model import quantization


class ConversionError(ValueError):
  """A checkpoint does not match the architecture it is being converted into."""


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class CheckpointReader:
  """Lazy access to the tensors of a PyTorch-side checkpoint.

  Accepts a single ``*.safetensors`` file, a directory holding a ``*.safetensors.index.json``
  (sharded diffusers / transformers layout), a directory of ``*.safetensors`` shards, a directory of
  transformers' ``pytorch_model*.bin`` shards (with or without their index), or a ``*.pth`` / ``*.pt`` file
  (original Wan release; read with torch, which is then required, as for the ``.bin`` shards).
  Tensors are read one at a time, on demand, as float32/bfloat16 numpy arrays.
  """

  def __init__(self, path: str, *, subfolder: str | None = None):
    if subfolder:
      path = storage.join(path, subfolder)
    self.path = path
    if not storage.exists(path):
      raise FileNotFoundError(f"checkpoint not found: {path!r} (give a .safetensors file, a directory "
                              "with .safetensors shards / an index json, or a .pth file)")
    path = storage.fetched(path)  # safetensors / torch read local files: a bucket's are downloaded first
    self._where: dict[str, str] = {}     # tensor name -> file
    self._torch_state: dict[str, Any] | None = None
    if os.path.isdir(path) and self._pickles_in_dir(path):  # transformers' PyTorch shards, no safetensors
      files, self._torch_state = [], {}
      for f in self._pickles_in_dir(path):
        for k, v in _torch_load(f).items():
          if k in self._torch_state:
            raise ConversionError(f"tensor {k!r} appears in two shards: {self._where[k]} and {f}")
          self._torch_state[k], self._where[k] = v, f
    elif os.path.isdir(path):
      files = self._shards_in_dir(path)
    elif path.endswith((".pth", ".pt", ".bin")):
      files = []
      self._torch_state = _torch_load(path)
      for k in self._torch_state:
        self._where[k] = path
    else:
      files = [path]
    for f in files:
      for k in _safetensors_keys(f):
        if k in self._where:
          raise ConversionError(f"tensor {k!r} appears in two shards: {self._where[k]} and {f}")
        self._where[k] = f

  @staticmethod
  def _shards_in_dir(path: str) -> list[str]:
    indexes = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
    if indexes:
      with open(os.path.join(path, indexes[0])) as fh:
        weight_map = json.load(fh)["weight_map"]
      files = sorted({os.path.join(path, f) for f in weight_map.values()})
      missing = [f for f in files if not os.path.exists(f)]
      if missing:
        raise FileNotFoundError(f"{indexes[0]} in {path!r} lists shards that are missing: {missing}")
      return files
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
      raise FileNotFoundError(f"no .safetensors files (and no index json) in {path!r}")
    return files

  @staticmethod
  def _pickles_in_dir(path: str) -> list[str]:
    """`pytorch_model*.bin` shards (their index's, or all of them) of a directory without safetensors."""
    names = os.listdir(path)
    if any(f.endswith(".safetensors") for f in names):
      return []
    if "pytorch_model.bin.index.json" in names:
      with open(os.path.join(path, "pytorch_model.bin.index.json")) as fh:
        return sorted({os.path.join(path, f) for f in json.load(fh)["weight_map"].values()})
    return sorted(os.path.join(path, f) for f in names if f.startswith("pytorch_model") and f.endswith(".bin"))

  def keys(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, key: str) -> bool:
    return key in self._where

  def shape(self, key: str) -> tuple[int, ...]:
    if key not in self._where:
      raise ConversionError(f"checkpoint {self.path!r} has no tensor {key!r}: is it of another format or "
                            f"architecture? (it has {len(self._where)} tensors, e.g. {self.keys()[:3]})")
    if self._torch_state is not None:
      return tuple(self._torch_state[key].shape)
    with safe_open(self._where[key], framework="np") as f:
      return tuple(f.get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    """A tensor's dtype name ('bfloat16', 'float32', ...) from the file's metadata, without reading it."""
    if self._torch_state is not None:
      return str(self._torch_state[key].dtype).replace("torch.", "")
    with safe_open(self._where[key], framework="np") as f:
      return _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype(), "other")

  def float_dtype(self) -> str:
    """The dtype most of the checkpoint's floating tensors have: what a conversion keeps by default."""
    counts = collections.Counter(d for d in map(self.dtype, self.keys()) if d in ("bfloat16", "float16", "float32"))
    return counts.most_common(1)[0][0] if counts else "float32"

  def get(self, key: str) -> np.ndarray:
    """One tensor as a numpy array (bfloat16 stays bfloat16 through ml_dtypes)."""
    if key not in self._where:
      raise ConversionError(f"checkpoint {self.path!r} has no tensor {key!r}: is it of another format or "
                            "architecture?")
    if self._torch_state is not None:
      t = self._torch_state[key]
      if str(t.dtype) == "torch.bfloat16":
        return t.float().numpy().astype(ml_dtypes.bfloat16)
      return t.numpy()
    # numpy, not flax: the flax backend would put every tensor on the default device (a whole leaf on one
    # chip); safetensors >= 0.7 gives bfloat16 as ml_dtypes.bfloat16.
    with safe_open(self._where[key], framework="np") as f:
      return np.asarray(f.get_tensor(key))


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8",
                       "U8": "uint8", "I32": "int32", "I64": "int64", "BOOL": "bool"}


def _safetensors_keys(file: str) -> list[str]:
  try:
    with safe_open(file, framework="np") as f:
      return list(f.keys())
  except Exception as e:  # safetensors raises its own error types for truncated / non-safetensors files
    raise ConversionError(f"cannot read {file!r} as safetensors ({e}); is the file complete?") from e


# Wrappers around a state dict that training frameworks add to its keys: DeepSpeed's and DDP's `module.`,
# torch.compile's `_orig_mod.`, FSDP(2)'s and activation checkpointing's wrapped-module names.
_KEY_WRAPPERS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _torch_load(path: str) -> dict[str, Any]:
  """The tensors of a PyTorch pickle, keyed by name, whatever wraps them.

  Plain state dicts, `{'state_dict': ...}`, DeepSpeed / SAT `{'module': ..., <RNG states, args, ...>}` and FSDP2
  full-state files `{'model': ...}` all give their tensors. torch's `weights_only` loader is tried first; a file
  whose other entries hold objects it refuses (DeepSpeed's numpy RNG state, an argparse Namespace) is read
  with an unpickler that builds tensors only and replaces every other object by an inert stand-in (`_Opaque`): no
  constructor or function of the file is ever run.
  """
  try:
    import torch  # lazy: optional dependency (torch, the [test] extra: PyTorch checkpoints only)
  except ImportError as e:
    raise ImportError(f"{path!r} is a PyTorch pickle; reading it needs torch (pip install "
                      "'kaleido_jax[test]'), or convert it to safetensors first") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except pickle.UnpicklingError:
    obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TensorsOnlyPickle, mmap=True)
  for key in ("state_dict", "module", "model"):  # the wrapper dicts, outermost first
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise ConversionError(f"{path!r} holds a {type(obj).__name__}, not a state dict of tensors")
  state = {}
  for k, v in obj.items():
    if not isinstance(v, torch.Tensor):
      continue
    name = str(k)
    while name.startswith(_KEY_WRAPPERS):
      name = name[next(len(w) for w in _KEY_WRAPPERS if name.startswith(w)):]
    for w in _KEY_WRAPPERS[1:]:  # FSDP / compile wrappers may also sit inside the name
      name = name.replace("." + w, ".")
    state[name] = v
  if not state:
    raise ConversionError(f"{path!r} holds no tensors (under 'module', 'model' or 'state_dict' either)")
  return state


class _Opaque:
  """What a pickled object other than a tensor becomes: it accepts any arguments and state and keeps none."""

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    del state

  def __call__(self, *args, **kwargs):
    return _Opaque()


def _tensor_globals() -> dict[tuple[str, str], Any]:
  import torch  # lazy: optional dependency (torch, the [test] extra: PyTorch checkpoints only)
  from torch import _utils  # lazy: optional dependency (torch, the [test] extra: PyTorch checkpoints only)
  allowed = {("collections", "OrderedDict"): collections.OrderedDict, ("torch", "Size"): torch.Size,
             ("torch", "device"): torch.device}
  for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
    if hasattr(_utils, name):
      allowed[("torch._utils", name)] = getattr(_utils, name)
  for name in dir(torch):
    value = getattr(torch, name, None)
    if name.endswith("Storage") or isinstance(value, torch.dtype):
      allowed[("torch", name)] = value
  allowed[("torch.storage", "UntypedStorage")] = torch.storage.UntypedStorage
  allowed[("torch.storage", "TypedStorage")] = torch.storage.TypedStorage
  return allowed


class _TensorsOnlyUnpickler(pickle.Unpickler):
  def find_class(self, module: str, name: str) -> Any:
    return _tensor_globals().get((module, name), _Opaque)


class _TensorsOnlyPickle:
  """A `pickle_module` for torch.load whose Unpickler resolves tensor machinery only (see `_torch_load`)."""
  Unpickler = _TensorsOnlyUnpickler
  load = staticmethod(lambda f, **kw: _TensorsOnlyUnpickler(f, **kw).load())
  __name__ = "kaleido_jax.tensors_only_pickle"


# --------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------

# Transforms use only array methods (.T, .transpose, .reshape) so that they also run on abstract
# values: shapes are checked with jax.eval_shape before any tensor is read.
Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
  return x


def linear_weight(x: np.ndarray) -> np.ndarray:
  """torch Linear (out, in) -> our (in, out)."""
  return x.T


def conv_weight(x: np.ndarray) -> np.ndarray:
  """torch Conv{1,2,3}d (out, in, *k) -> channels-last kernel (*k, in, out)."""
  nd = x.ndim - 2
  return x.transpose(tuple(range(2, 2 + nd)) + (1, 0))


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one target leaf comes from.

  ``keys`` holds one source key, or one per layer when the target is stacked over layers
  (``nnx.vmap``-built scan layers): those are transformed one by one and stacked on axis 0.
  """
  keys: tuple[str, ...]
  transform: Transform = identity
  stacked: bool = False


def one(key: str, transform: Transform = identity) -> Source:
  return Source((key,), transform, stacked=False)


def stacked(keys: Sequence[str], transform: Transform = identity) -> Source:
  return Source(tuple(keys), transform, stacked=True)


def fill_from_plan(
    reader: CheckpointReader,
    targets: Mapping[str, Any],
    plan: Mapping[str, Source],
    *,
    dtype: Any = None,
    ignore_unused: Iterable[str] = (),
    what: str = "checkpoint",
) -> dict[str, np.ndarray]:
  """Fills every target leaf from the reader according to the plan.

  Args:
    reader: the source checkpoint.
    targets: flat ``{'a/b/c': ShapeDtypeStruct-like}`` of the state to produce (from ``nnx.eval_shape``).
    plan: flat ``{'a/b/c': Source}`` for every target.
    dtype: cast every leaf to this dtype (None keeps the target's dtype).
    ignore_unused: source keys (prefix match) that may be present without being used.
    what: a name for the checkpoint in error messages.

  Raises ConversionError listing *all* missing / unexpected keys and shape mismatches at once, before
  reading any tensor, so a wrong checkpoint fails in seconds rather than after minutes of reading.
  """
  check_plan(reader, targets, plan, ignore_unused=ignore_unused, what=what)
  return {name: read_leaf(reader, plan[name], target, dtype=dtype, name=name, what=what)
          for name, target in targets.items()}


def fill_quantized(
    reader: CheckpointReader,
    float_targets: Mapping[str, Any],
    quantized_targets: Mapping[str, Any],
    plan: Mapping[str, Source],
    scheme: str,
    *,
    ignore_unused: Iterable[str] = (),
    what: str = "checkpoint",
) -> dict[str, np.ndarray]:
  """`fill_from_plan` for a quantized module, leaf by leaf: every kernel that the quantized model holds as
  ``qvalue`` / ``scale`` is quantized as it is read (a stacked one layer by layer, into the output's buffers) and
  its float copy dropped; the rest is read as `fill_from_plan` reads it.

  ``float_targets`` / ``quantized_targets``: the flat abstract states of the float and the quantized module (the
  kernel is cast to its float target dtype, the scales take the quantized target's dtype, as
  ``quantization.quantize`` of the float module gives them). Peak host memory: the output plus about one layer's
  kernel (and its fp32 temporaries), never a float copy of the model.
  """
  check_plan(reader, float_targets, plan, ignore_unused=ignore_unused, what=what)
  out: dict[str, np.ndarray] = {}
  with jax.default_device(host_device()):
    for name, target in float_targets.items():
      base, _, leaf = name.rpartition("/")
      if leaf != "kernel" or f"{base}/qvalue" not in quantized_targets:
        out[name] = read_leaf(reader, plan[name], target, name=name, what=what)
        continue
      qv, sc = quantized_targets[f"{base}/qvalue"], quantized_targets[f"{base}/scale"]
      src = plan[name]
      if not src.stacked:
        q = quantization.quantize_kernel(jnp.asarray(read_leaf(reader, src, target, name=name, what=what)),
                                         scheme, sc.dtype)
        out[f"{base}/qvalue"], out[f"{base}/scale"] = np.asarray(q.qvalue), np.asarray(q.scale)
        continue
      qvalue, scale = np.empty(qv.shape, qv.dtype), np.empty(sc.shape, sc.dtype)
      for i, key in enumerate(src.keys):  # one layer at a time: its scales are its own (leading axes)
        q = quantization.quantize_kernel(jnp.asarray(src.transform(reader.get(key)).astype(target.dtype)), scheme,
                                         sc.dtype)
        qvalue[i], scale[i] = np.asarray(q.qvalue), np.asarray(q.scale)
      out[f"{base}/qvalue"], out[f"{base}/scale"] = qvalue, scale
  return out


def check_plan(reader: CheckpointReader, targets: Mapping[str, Any], plan: Mapping[str, Source], *,
               ignore_unused: Iterable[str] = (), what: str = "checkpoint") -> None:
  """ConversionError listing every missing / unexpected key and shape mismatch of a plan, from metadata only."""
  problems: list[str] = []
  missing_plan = sorted(set(targets) - set(plan))
  if missing_plan:
    problems.append(f"the converter has no source for parameters: {missing_plan}")
  needed = {k for src in plan.values() for k in src.keys}
  available = set(reader.keys())
  missing = sorted(needed - available)
  if missing:
    problems.append(f"missing keys in {what}: {_short(missing)}")
  unused = sorted(k for k in available - needed if not any(k.startswith(p) for p in ignore_unused))
  if unused:
    problems.append(f"unexpected keys in {what} (another architecture or config?): {_short(unused)}")
  # Shape checks from metadata only (no tensor read yet), for every leaf whose sources exist.
  for name, src in plan.items():
    if name not in targets or any(k not in available for k in src.keys):
      continue
    want = tuple(targets[name].shape)
    shapes = [reader.shape(k) for k in src.keys]
    if len(set(shapes)) > 1:
      problems.append(f"{name}: per-layer source tensors differ in shape: {sorted(set(shapes))}")
      continue
    got = _transformed_shape(shapes[0], len(shapes), src)
    if got is not None and got != want:
      problems.append(f"{name}: expected shape {want} but {what} gives {got} from {list(src.keys)[:2]}"
                      f"{'...' if len(src.keys) > 2 else ''} with shapes {shapes[:2]}")
  if problems:
    raise ConversionError("cannot convert " + what + ":\n  - " + "\n  - ".join(problems))


def read_leaf(reader: CheckpointReader, src: Source, target: Any, *, dtype: Any = None, name: str = "",
              what: str = "checkpoint") -> np.ndarray:
  """One target leaf as a host array: its source tensor(s) read, transformed (stacked over layers) and cast."""
  want_dtype = dtype or target.dtype
  if src.stacked:
    buf = np.empty(tuple(target.shape), dtype=want_dtype)
    for i, k in enumerate(src.keys):
      buf[i] = src.transform(reader.get(k)).astype(want_dtype)
    return buf
  arr = src.transform(reader.get(src.keys[0]))
  if tuple(arr.shape) != tuple(target.shape):
    raise ConversionError(f"{name}: expected shape {tuple(target.shape)}, got {arr.shape} from "
                          f"{src.keys[0]!r} in {what}")
  return np.asarray(arr, dtype=want_dtype)


def _transformed_shape(shape: tuple[int, ...], count: int, src: Source) -> tuple[int, ...]:
  """Shape after ``src.transform`` (traced abstractly: no tensor is read or allocated)."""
  one_shape = tuple(jax.eval_shape(src.transform, jax.ShapeDtypeStruct(shape, np.float32)).shape)
  return (count,) + one_shape if src.stacked else one_shape


def _short(keys: list[str], n: int = 12) -> str:
  return str(keys[:n]) + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


# --------------------------------------------------------------------------------------------------
# Flat <-> nested state helpers
# --------------------------------------------------------------------------------------------------


def flatten_paths(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}; works on nnx.to_pure_dict() output (int keys become strings) and on orbax
  metadata trees (lists / tuples, e.g. optimiser states, by index)."""
  flat: dict[str, Any] = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      flat.update(flatten_paths(v, path))
    elif isinstance(v, (list, tuple)) and not hasattr(v, "shape"):
      flat.update(flatten_paths(dict(enumerate(v)), path))
    else:
      flat[path] = v
  return flat


def unflatten_paths(flat: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of :func:`flatten_paths`, taking key types (int vs str) from ``like``."""
  out: dict[Any, Any] = {}
  for k, v in like.items():
    if isinstance(v, Mapping):
      sub = {p[len(str(k)) + 1:]: x for p, x in flat.items() if p.startswith(f"{k}/")}
      out[k] = unflatten_paths(sub, v)
    else:
      out[k] = flat[str(k)]
  return out


# --------------------------------------------------------------------------------------------------
# Saving / loading converted checkpoints
# --------------------------------------------------------------------------------------------------

CONFIG_FILE = "config.json"
STATE_DIR = "state"
SAVE_CONCURRENT_GB = 1  # orbax's bytes in flight while writing (its default, 96 GB, lets a save copy the whole state)


def save_converted(output_dir: str, pure_state: Mapping[str, Any], config: ml_collections.ConfigDict,
                   *, component: str, source: str = "") -> str:
  """Writes an orbax checkpoint of ``pure_state`` plus the component config, atomically (storage.atomic_dir:
  a local temporary renamed into place, or copied into a bucket, only when complete): an interrupted
  conversion leaves no partial ``output_dir`` behind."""
  output_dir = storage.absolute(output_dir)
  if storage.exists(output_dir):
    raise FileExistsError(f"{output_dir!r} already exists; choose a new --output or remove it")
  # Host numpy, not jax Arrays: orbax records an Array's device, and a process that lacks it (a TPU process
  # reading what a CPU host converted, or another device count) then refuses a plain restore.
  state = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), dict(pure_state))
  with storage.atomic_dir(output_dir) as tmp:
    with ocp.Checkpointer(ocp.StandardCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB)) as ckptr:
      ckptr.save(os.path.join(tmp, STATE_DIR), args=ocp.args.StandardSave(state))
    with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
      json.dump({"component": component, "source": source, "config": config.to_dict()}, fh, indent=1,
                default=list)
  return output_dir


def is_converted(path: str) -> bool:
  """A directory :func:`save_converted` wrote (local or in a bucket)."""
  return storage.exists(storage.join(path, CONFIG_FILE)) and storage.path(storage.join(path, STATE_DIR)).is_dir()


def load_converted(path: str, *, component: str) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
  """Reads what :func:`save_converted` wrote: (pure state dict of numpy arrays, component config)."""
  cfg_file = storage.join(path, CONFIG_FILE)
  if not storage.exists(cfg_file):
    raise FileNotFoundError(f"{path!r} is not a converted kaleido_jax checkpoint (no {CONFIG_FILE}); "
                            "run `python -m kaleido_jax.convert` on the PyTorch checkpoint first")
  meta = storage.read_json(cfg_file)
  if meta.get("component") != component:
    raise ConversionError(f"{path!r} holds a {meta.get('component')!r} checkpoint, not a {component!r}")
  state_dir = storage.join(storage.absolute(path), STATE_DIR)
  # Restored as numpy whatever devices the writer had (directories written before #37 hold jax Arrays whose
  # device this process may lack).
  numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), orbax_tree(state_dir))
  state = orbax_restore(state_dir, ocp.args.PyTreeRestore(restore_args=numpy))
  return state, ml_collections.ConfigDict(_lists_to_tuples(meta["config"]))


# An orbax pytree directory is read through its handler, not a Checkpointer: a Checkpointer also looks for the
# step-level _CHECKPOINT_METADATA, which an item inside a CheckpointManager step (a training checkpoint's
# `state`) does not have, and logs "Metadata file does not exist" for each read, which users take for an error.


def orbax_tree(directory: str) -> Any:
  """The stored tree (shapes, dtypes) of the orbax pytree at ``directory``."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(epath.Path(directory))
  finally:
    handler.close()
  return meta.tree if hasattr(meta, "tree") else meta


def orbax_restore(directory: str, args: Any) -> Any:
  """``PyTreeRestore`` ``args`` from the orbax pytree at ``directory``."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.restore(epath.Path(directory), args=args)
  finally:
    handler.close()


def _lists_to_tuples(d: Any) -> Any:
  if isinstance(d, dict):
    return {k: _lists_to_tuples(v) for k, v in d.items()}
  if isinstance(d, list):
    return tuple(_lists_to_tuples(v) for v in d)
  return d


# --------------------------------------------------------------------------------------------------
# Quantized weights
# --------------------------------------------------------------------------------------------------


def saved_quantization(path: str) -> str:
  """The `quantization` a converted directory was written with ('none' for float weights)."""
  return storage.read_json(storage.join(path, CONFIG_FILE)).get("config", {}).get("quantization", "none") or "none"


def host_device() -> Any:
  """This process's host CPU device for conversion work: the default device when one is set and is a CPU device,
  else the process's first local CPU device (never another process's, never an accelerator)."""
  d = jax.config.jax_default_device
  if d is not None and not isinstance(d, str) and d.platform == "cpu" and d.process_index == jax.process_index():
    return d
  return jax.local_devices(backend="cpu")[0]


def module_from_state(build: Callable[[ml_collections.ConfigDict], Any], cfg: ml_collections.ConfigDict,
                      pure: Mapping[str, Any], *, saved_scheme: str = "none", where: str = "",
                      section: str = "config.model", device: Any = "default") -> Any:
  """The module ``build(cfg)`` holding ``pure`` (a pure state dict), quantized as ``cfg.quantization`` asks.

  ``pure`` is either already in that scheme (a directory written with ``--quantization``) or float, and is
  then quantized here, on the host CPU device, so the float copy never reaches the accelerator: loading a
  float 14B checkpoint for int8 sampling puts 14 GB, not 57 GB, on the chip. Leaves are cast to the
  module's dtypes (a float32 directory loaded into a bfloat16 config halves host memory). The result is put
  on ``device`` ('default': the default device, uncommitted, so a mesh can still place it; None: left on the
  host CPU device; or a device).
  """
  wanted = quantization.check_scheme(cfg.get("quantization", "none") or "none", f"{section}.quantization")
  if saved_scheme not in ("none", wanted):
    raise ConversionError(f"{where!r} holds {saved_scheme} weights but {section}.quantization={wanted!r}; set "
                          f"--{section}.quantization={saved_scheme} or convert the float checkpoint again")
  load_cfg = ml_collections.ConfigDict(cfg.to_dict())
  if saved_scheme == "none":
    load_cfg.quantization = "none"
  graphdef, state = nnx.split(nnx.eval_shape(lambda: build(load_cfg)))
  like = nnx.to_pure_dict(state)
  flat = flatten_paths(pure)
  cpu = host_device()
  with jax.default_device(cpu):
    # Host copies are released one by one, so peak host memory stays near one model.
    cast = {k: jnp.asarray(flat.pop(k), dtype=v.dtype) for k, v in flatten_paths(like).items()}
    nnx.replace_by_pure_dict(state, unflatten_paths(cast, like))
    model = nnx.merge(graphdef, state)
    if saved_scheme != wanted:
      quantization.quantize(model, wanted, activations=bool(cfg.get("quantize_activations", False)))
      graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(cfg)))  # cfg's graph (its config says `wanted`)
  state = nnx.state(model)
  if device == "default":  # uncommitted on the default device (a trainer's mesh may still place it), leaf by leaf
    state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state)
  elif device is not None:
    state = jax.device_put(state, device)
  return nnx.merge(graphdef, state)
