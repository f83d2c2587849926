"""Wan2.1 VAE checkpoints -> WanVAE. Format: diffusers ``AutoencoderKLWan`` (safetensors).

Our module tree mirrors diffusers' names, so the key of a leaf is its path with ``/`` -> ``.``,
``kernel`` -> ``weight`` and the per-frame 2D resample conv at ``resample.1`` (diffusers wraps it in a
Sequential after the upsample / zero-pad). Conv weights (out, in, *k) become channels-last (*k, in, out);
RMS-norm ``gamma`` of shape (C, 1, 1[, 1]) becomes (C,).
"""

from __future__ import annotations

import argparse
import json
import os

import ml_collections
from flax import nnx

from kaleido_jax import config as kcfg
from kaleido_jax.convert import common

FORMATS = ("diffusers",)
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


def make_plan(targets) -> dict[str, common.Source]:
  return {p: common.one(_source_key(p), _transform(p)) for p in targets}


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
  from kaleido_jax.model.vae import WanVAE
  if fmt not in FORMATS:
    raise ValueError(f"unknown vae format {fmt!r}; choose one of {FORMATS}")
  if os.path.isdir(os.path.join(path, "vae")):
    path = os.path.join(path, "vae")  # a whole pipeline directory
  reader = common.CheckpointReader(path)
  config = config_from_checkpoint(path) if config is None else config
  abstract = nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0)))
  like = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  targets = common.flatten_paths(like)
  flat = common.fill_from_plan(reader, targets, make_plan(targets), what=f"{fmt} VAE checkpoint {path!r}")
  return common.unflatten_paths(flat, like), config


def load_vae(path: str, format: str = "diffusers", config: ml_collections.ConfigDict | None = None):  # noqa: A002
  """A ready WanVAE from a diffusers checkpoint or from a directory written by this converter."""
  from kaleido_jax.model.vae import WanVAE
  if os.path.exists(os.path.join(path, common.CONFIG_FILE)) and os.path.isdir(os.path.join(path, common.STATE_DIR)):
    state, saved = common.load_converted(path, component=COMPONENT)
    config = saved if config is None else config
  else:
    state, config = convert_state(path, format, config)
  vae = WanVAE(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
  nnx.replace_by_pure_dict(params, state)
  return nnx.merge(graphdef, params, rest)


def convert_cli(args: argparse.Namespace) -> str:
  state, cfg = convert_state(args.input, args.format)
  out = common.save_converted(args.output, state, cfg, component=COMPONENT, source=f"{args.format}:{args.input}")
  print(f"wrote {out}")
  return out
