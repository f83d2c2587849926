"""Wan2.1 VAE checkpoints -> WanVAE. Formats: diffusers ``AutoencoderKLWan`` (safetensors) and the original
``Wan2.1_VAE.pth`` release layout.

Our module tree mirrors diffusers' names, so the key of a leaf is its path with ``/`` -> ``.``,
``kernel`` -> ``weight`` and the per-frame 2D resample conv at ``resample.1`` (diffusers wraps it in a
Sequential after the upsample / zero-pad). Conv weights (out, in, *k) become channels-last (*k, in, out);
RMS-norm ``gamma`` of shape (C, 1, 1[, 1]) becomes (C,).

The original release (facts from diffusers' ``scripts/convert_wan_to_diffusers.py``) names the same tensors
differently: ``{encoder,decoder}.conv1`` / ``head.0`` (norm) / ``head.2`` (conv) for conv_in / norm_out /
conv_out; ``middle.{0,1,2}`` for resnet / attention / resnet; residual blocks as ``residual.{0,2,3,6}`` (norm1,
conv1, norm2, conv2) and ``shortcut``; the decoder's up blocks flattened into ``decoder.upsamples.{n}`` (each
stage's resnets, then its resample); top-level ``conv1`` / ``conv2`` for quant_conv / post_quant_conv.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kaleido_jax import config as kcfg
from kaleido_jax import storage
from kaleido_jax.convert import common
from kaleido_jax.model.vae import WanVAE

FORMATS = ("diffusers", "wan")
COMPONENT = "vae"


def _source_key(path: str) -> str:
  key = path.replace("/", ".")
  key = key.replace(".resample.kernel", ".resample.1.kernel").replace(".resample.bias", ".resample.1.bias")
  return key[: -len("kernel")] + "weight" if key.endswith("kernel") else key


def _transform(path: str):
  if path.endswith("kernel"):
    return common.conv_weight
  if path.endswith("gamma"):
    return lambda x: x.reshape(-1)
  return common.identity


_RESIDUAL = {"norm1.gamma": "residual.0.gamma", "conv1.": "residual.2.", "norm2.gamma": "residual.3.gamma",
             "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}


def _residual(rest: str) -> str:
  for ours, theirs in _RESIDUAL.items():
    if rest.startswith(ours):
      return theirs + rest[len(ours):]
  return rest


def wan_key(key: str, cfg: ml_collections.ConfigDict) -> str:
  """diffusers AutoencoderKLWan key -> the original Wan2.1 release key."""
  top = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2."}
  for ours, theirs in top.items():
    if key.startswith(ours):
      return theirs + key[len(ours):]
  part, rest = key.split(".", 1)
  for ours, theirs in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
    if rest.startswith(ours):
      return f"{part}.{theirs}{rest[len(ours):]}"
  if rest.startswith("mid_block."):
    kind, idx, sub = rest[len("mid_block."):].split(".", 2)
    n = {"resnets": {"0": 0, "1": 2}, "attentions": {"0": 1}}[kind][idx]
    return f"{part}.middle.{n}.{_residual(sub) if kind == 'resnets' else sub}"
  if rest.startswith("down_blocks."):
    idx, sub = rest[len("down_blocks."):].split(".", 1)
    return f"{part}.downsamples.{idx}.{_residual(sub)}"
  if rest.startswith("up_blocks."):
    stage, kind, idx, sub = rest[len("up_blocks."):].split(".", 3)
    per_stage = cfg.num_res_blocks + 2            # resnets + one resample (every stage but the last)
    flat = int(stage) * per_stage + (int(idx) if kind == "resnets" else cfg.num_res_blocks + 1)
    return f"{part}.upsamples.{flat}.{_residual(sub) if kind == 'resnets' else sub}"
  return key


def make_plan(targets, fmt: str = "diffusers", cfg: ml_collections.ConfigDict | None = None):
  key = _source_key if fmt == "diffusers" else (lambda p: wan_key(_source_key(p), cfg))
  return {p: common.one(key(p), _transform(p)) for p in targets}


def config_from_checkpoint(path: str) -> ml_collections.ConfigDict:
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise common.ConversionError(f"{path!r} has no config.json: pass a vae config (kaleido_jax.config.vae_config)")
  with open(cfg_file) as fh:
    d = json.load(fh)
  if d.get("is_residual") or d.get("patch_size") or d.get("in_channels", 3) != 3:
    raise common.ConversionError(f"{path!r} is a Wan2.2-style VAE (residual / patchified); only the Wan2.1 VAE "
                                 "is supported")
  return kcfg.vae_config(base_dim=d["base_dim"], z_dim=d["z_dim"], dim_mult=tuple(d["dim_mult"]),
                         num_res_blocks=d["num_res_blocks"], attn_scales=tuple(d["attn_scales"]),
                         temporal_downsample=tuple(d["temperal_downsample"]),
                         latents_mean=tuple(d["latents_mean"]), latents_std=tuple(d["latents_std"]))


def convert_state(path: str, fmt: str = "diffusers", config: ml_collections.ConfigDict | None = None):
  if fmt not in FORMATS:
    raise ValueError(f"unknown vae format {fmt!r}; choose one of {FORMATS}")
  if os.path.isdir(os.path.join(path, "vae")):
    path = os.path.join(path, "vae")  # a whole pipeline directory
  reader = common.CheckpointReader(path)
  if config is None:
    # The Wan release ships no config: it is the Wan2.1 VAE (kaleido_jax.config.vae_config defaults).
    config = config_from_checkpoint(path) if fmt == "diffusers" else kcfg.vae_config()
  abstract = nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0)))
  like = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  targets = common.flatten_paths(like)
  flat = common.fill_from_plan(reader, targets, make_plan(targets, fmt, config),
                               what=f"{fmt} VAE checkpoint {path!r}")
  return common.unflatten_paths(flat, like), config


def load_vae(path: str, format: str = "diffusers", config: ml_collections.ConfigDict | None = None):  # noqa: A002
  """A ready WanVAE from a diffusers checkpoint or from a directory written by this converter."""
  if common.is_converted(path):
    state, saved = common.load_converted(path, component=COMPONENT)
    config = saved if config is None else config
  else:
    state, config = convert_state(storage.fetched(path), format, config)  # PyTorch-side files are read locally
  graphdef, params, rest = nnx.split(WanVAE(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
  # On the default device once, in the module's dtypes: every jitted encode / decode then takes device arrays
  # (host numpy weights would cross to the device on each of the ~21 decode chunks of a video).
  like = nnx.to_pure_dict(params)
  flat = common.flatten_paths(state)
  cast = {k: jnp.asarray(np.asarray(flat.pop(k)), a.dtype) for k, a in common.flatten_paths(like).items()}
  nnx.replace_by_pure_dict(params, common.unflatten_paths(cast, like))
  return nnx.merge(graphdef, params, rest)


def convert(input_path: str, output_dir: str, fmt: str, config: ml_collections.ConfigDict | None = None) -> str:
  """Converts and writes an orbax directory (the Wan release ships no config: ``config`` or the Wan2.1 VAE's)."""
  state, cfg = convert_state(input_path, fmt, config)
  return common.save_converted(output_dir, state, cfg, component=COMPONENT, source=f"{fmt}:{input_path}")
