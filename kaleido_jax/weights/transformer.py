"""The DiT's weights from any path a user gives, into a target: the one entry the trainer and the sampler use.

A path is one of
- a training checkpoint: a workdir, its ``checkpoints/`` folder, or one step folder; its ``ema`` (or
  ``params``) entry is read. A LoRA fine-tune's checkpoint holds adapters only: they are merged into
  ``base`` (``init_from.transformer``) as it loads;
- a directory written by ``python -m kaleido_jax.convert`` (float, or quantized with ``--quantization``), in
  either block layout;
- a PyTorch-side checkpoint (diffusers / Wan / Kaleido SAT; ``fmt``), converted leaf by leaf on the host.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from kaleido_jax import storage
from kaleido_jax.convert import common
from kaleido_jax.convert import lora as lora_conv
from kaleido_jax.convert import transformer_plan as conv
from kaleido_jax.model import dit
from kaleido_jax.model import lora as lora_lib
from kaleido_jax.weights import loader
from kaleido_jax.weights import sources
from kaleido_jax.weights.sources import WeightsError

CONFIG_FILE = 'config.json'   # what convert.common.save_converted writes beside STATE_DIR
STATE_DIR = 'state'


def training_checkpoint_dir(path: str) -> tuple[str, int | None] | None:
  """(CheckpointManager directory, step or None = latest) when ``path`` is a training checkpoint."""
  p = epath.Path(path)
  for root in (p / 'checkpoints', p):
    if root.is_dir() and any(d.name.isdigit() and (d / STATE_DIR).is_dir() for d in root.iterdir()):
      return str(root), None
  if p.name.isdigit() and (p / STATE_DIR).is_dir():
    return str(p.parent), int(p.name)
  return None


def is_converted(path: str) -> bool:
  p = epath.Path(path)
  return (p / CONFIG_FILE).exists() and (p / STATE_DIR).is_dir()


def converted_meta(path: str) -> dict:
  return json.loads((epath.Path(path) / CONFIG_FILE).read_text())


@dataclasses.dataclass
class Opened:
  """A source and what the caller reports: where it is, and a LoRA checkpoint's adapters (or None)."""
  source: Any
  where: str
  adapters: dict | None = None


def _latest_step(root: str) -> int | None:
  with ocp.CheckpointManager(root, item_handlers={'state': ocp.StandardCheckpointHandler()}) as mngr:
    return mngr.latest_step()


def open_source(path: str, *, fmt: str, model_cfg: ml_collections.ConfigDict, use_ema: bool = True) -> Opened:
  """The source behind ``path`` (see the module docstring); WeightsError / FileNotFoundError naming it."""
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'checkpoint {path!r} does not exist; check the path')
  training = training_checkpoint_dir(path)
  if training:
    root, step = training
    step = _latest_step(root) if step is None else step
    if step is None:
      raise WeightsError(f'checkpoint directory {root!r} holds no finished step; train first or pass another '
                         '--checkpoint')
    state_dir = str(epath.Path(root) / str(step) / STATE_DIR)
    where = f'{root} step {step}'
    probe = sources.OrbaxSource(state_dir, where=where)
    prefix = 'ema' if use_ema and any(k.startswith('ema/') for k in probe.stored) else 'params'
    src = sources.OrbaxSource(state_dir, prefix=prefix, where=where)
    if src.stored and all(k.rsplit('/', 1)[-1] in ('lora_a', 'lora_b') for k in src.stored):
      cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend='cpu')[0])
      adapters = src._read({k: jax.ShapeDtypeStruct(s, d, sharding=cpu)  # pylint: disable=protected-access
                            for k, (s, d) in src.stored.items()})
      return Opened(None, where, sources._nested(adapters))  # pylint: disable=protected-access
    return Opened(src, where)
  if is_converted(path):
    meta = converted_meta(path)
    if meta.get('component') != 'transformer':
      raise WeightsError(f'{path!r} holds a {meta.get("component")!r} checkpoint, not a transformer')
    scheme = meta.get('config', {}).get('quantization', 'none') or 'none'
    return Opened(sources.OrbaxSource(str(epath.Path(path) / STATE_DIR), scheme=scheme, where=path), path)
  float_cfg = conv.float_config(model_cfg)
  resolved = conv.resolve_path(storage.fetched(path), fmt)  # PyTorch-side files are read locally
  try:
    reader = common.CheckpointReader(resolved)
    plan = conv.make_plan(float_cfg, fmt)
  except common.ConversionError as e:
    raise WeightsError(str(e)) from e
  return Opened(sources.TorchSource(reader, plan, where=f'{fmt} checkpoint {resolved!r}',
                                    ignore_unused=conv.IGNORED_PREFIXES[fmt]), path)


def float_abstract(model_cfg: ml_collections.ConfigDict) -> dict:
  """The float KaleidoDiT's pure abstract parameters (the dtypes a float source is cast to before quantizing)."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: dit.KaleidoDiT(conv.float_config(model_cfg), rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def lora_updates(specs: Sequence[str], num_layers: int) -> list[lora_lib.Update]:
  """The updates of LoRA files 'path[:scale]' (``sample.loras``), each scaled by its strength."""
  out: list[lora_lib.Update] = []
  try:
    for path, scale in lora_conv.check_specs(tuple(specs)):
      for u in lora_conv.read_lora(path, num_layers):
        out.append(u._replace(scale=u.scale * scale, dense=None if u.dense is None else u.dense * scale))
  except common.ConversionError as e:
    raise WeightsError(str(e)) from e
  return out


def load_transformer(path: str, target: Mapping[Any, Any], *, model_cfg: ml_collections.ConfigDict,
                     fmt: str = 'diffusers', loras: Sequence[str] = (), use_ema: bool = True, base: str = '',
                     adapter_alpha: float = 0.0, rslora: bool = False,
                     on_leaf: Callable[[str], None] | None = None) -> tuple[dict, str]:
  """(the weights at ``path`` in ``target``'s structure, dtypes and shardings, where they came from).

  ``loras``: LoRA files merged as the weights land. A LoRA training checkpoint's adapters are merged into
  ``base`` (its ``init_from.transformer``; ``adapter_alpha`` / ``rslora`` from its ``train.lora``).
  """
  opened = open_source(path, fmt=fmt, model_cfg=model_cfg, use_ema=use_ema)
  num_layers = int(model_cfg.num_layers)
  updates = lora_updates(loras, num_layers)
  where = opened.where
  if opened.adapters is not None:
    if not base:
      raise WeightsError(f'{where} is a LoRA fine-tune (adapters only); its base weights come from '
                         'config.init_from.transformer, which is empty: pass the training config (--config) or '
                         '--config.init_from.transformer=BASE')
    updates += lora_lib.updates_from_adapters(opened.adapters, adapter_alpha, rslora)
    base_opened = open_source(base, fmt=fmt, model_cfg=model_cfg, use_ema=use_ema)
    if base_opened.adapters is not None:
      raise WeightsError(f'the base {base!r} of {where} is itself a LoRA checkpoint')
    where = f'{base_opened.where} + LoRA adapters of {where}'
    opened = base_opened
  needs_float = opened.source.scheme == 'none' and any(
      k.endswith('/qvalue') for k in loader.flat(target))
  pure = loader.load(opened.source, target, float_like=float_abstract(model_cfg) if needs_float else None,
                     updates=updates, num_layers=num_layers, on_leaf=on_leaf)
  return pure, where + (f' + LoRA {", ".join(loras)}' if loras else '')
