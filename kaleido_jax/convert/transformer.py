"""Transformer checkpoints -> KaleidoDiT: converted orbax directories and ready modules from diffusers, original
Wan2.1 and Kaleido SAT checkpoints (where each parameter lives in them: convert/transformer_plan.py)."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx

from kaleido_jax import weights
from kaleido_jax.convert import common
from kaleido_jax.convert.transformer_plan import (FORMATS, IGNORED_PREFIXES, config_from_checkpoint, make_plan,
                                                  resolve_path)
from kaleido_jax.model.dit import KaleidoDiT

COMPONENT = "transformer"


def _open(path: str, fmt: str, config: ml_collections.ConfigDict | None):
  """(resolved path, reader, model config: the given one, else the one the checkpoint's shapes give)."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown transformer format {fmt!r}; choose one of {FORMATS}")
  path = resolve_path(path, fmt)
  reader = common.CheckpointReader(path)
  return path, reader, config if config is not None else config_from_checkpoint(path, fmt, reader)


def convert_state(path: str, fmt: str = "diffusers", config: ml_collections.ConfigDict | None = None):
  """(pure nested state dict of numpy arrays, model config) from a PyTorch-side checkpoint."""
  path, reader, config = _open(path, fmt, config)
  abstract = nnx.eval_shape(lambda: KaleidoDiT(config, rngs=nnx.Rngs(0)))
  like = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  targets = common.flatten_paths(like)
  flat = common.fill_from_plan(reader, targets, make_plan(config, fmt), ignore_unused=IGNORED_PREFIXES[fmt],
                               what=f"{fmt} checkpoint {path!r}")
  return common.unflatten_paths(flat, like), config


def build_model(cfg: ml_collections.ConfigDict):
  """A KaleidoDiT of `cfg` (quantized as cfg.quantization says): the builder module_from_state fills."""
  return KaleidoDiT(cfg, rngs=nnx.Rngs(0))


def load_transformer(path: str, format: str = "diffusers",  # noqa: A002 - the CLI's name
                     config: ml_collections.ConfigDict | None = None, *, device: Any = "default"):
  """A ready KaleidoDiT from a PyTorch checkpoint, or from a directory written by this converter.

  Through the one weight loader (kaleido_jax/weights): a converted directory loads into either layer layout
  (``config.scan_layers``); ``config.quantization`` other than the checkpoint's: float weights are quantized
  leaf by leaf as they load; quantized weights load only into their own scheme. ``device``: 'default' (the
  default device), None (the host CPU device) or a device. Without ``config``: the converted directory's, or
  the one the PyTorch checkpoint's shapes give.
  """
  if config is None:
    if weights.is_converted(path):
      config = ml_collections.ConfigDict(common._lists_to_tuples(weights.transformer.converted_meta(path)["config"]))
    else:
      resolved = resolve_path(path, format)
      config = config_from_checkpoint(resolved, format, common.CheckpointReader(resolved))
  with nnx.use_eager_sharding(False):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(config)))
  where = jax.local_devices()[0] if device == "default" else common.host_device() if device is None else device
  sharding = jax.sharding.SingleDeviceSharding(where)
  target = weights.abstract_target(nnx.to_pure_dict(abstract), jax.tree.map(lambda _: sharding,
                                                                           nnx.to_pure_dict(abstract)))
  try:
    pure, _ = weights.load_transformer(path, target, model_cfg=config, fmt=format)
  except weights.WeightsError as e:
    raise common.ConversionError(str(e)) from e
  nnx.replace_by_pure_dict(abstract, pure)
  return nnx.merge(graphdef, abstract)


def convert(input_path: str, output_dir: str, fmt: str, quantization: str = "none",
            config: ml_collections.ConfigDict | None = None) -> tuple[str, ml_collections.ConfigDict]:
  """Converts and writes an orbax directory; returns (its path, the model config).

  Within a host's RAM: without ``config`` the weights keep the checkpoint's dtype (a bf16 release stays bf16:
  28 GB for the 14B model, not 57 GB of float32), and ``quantization`` quantizes each kernel as it is read
  (`common.fill_quantized`): the host holds the output and about one layer's kernel, never a float model.
  """
  path, reader, inferred = _open(input_path, fmt, config)
  cfg = ml_collections.ConfigDict(inferred.to_dict())
  if config is None:  # the checkpoint's own dtype
    cfg.param_dtype = "bfloat16" if reader.float_dtype() == "bfloat16" else "float32"
  cfg.quantization = "none"
  float_like = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param))
  targets = common.flatten_paths(float_like)
  what = f"{fmt} checkpoint {path!r}"
  plan = make_plan(cfg, fmt)
  if quantization and quantization != "none":  # a Colab session then loads 14 GB of int8, not 28 GB of bf16
    cfg.quantization = quantization
    like = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(cfg)), nnx.Param))
    flat = common.fill_quantized(reader, targets, common.flatten_paths(like), plan, quantization,
                                 ignore_unused=IGNORED_PREFIXES[fmt], what=what)
  else:
    like = float_like
    flat = common.fill_from_plan(reader, targets, plan, ignore_unused=IGNORED_PREFIXES[fmt], what=what)
  out = common.save_converted(output_dir, common.unflatten_paths(flat, like), cfg, component=COMPONENT,
                              source=f"{fmt}:{input_path}")
  return out, cfg
