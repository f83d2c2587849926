"""Where each KaleidoDiT parameter lives in a diffusers, original Wan2.1 or Kaleido SAT checkpoint: the plans the
one weight loader (kaleido_jax/weights) reads PyTorch files by, and the converter (convert/transformer.py) writes with.

Key layouts (learned from the public code; facts, not copies):
- diffusers ``WanTransformer3DModel``: ``blocks.{i}.attn1.to_q`` ..., ``attn1.to_out.0``, ``attn1.norm_q``,
  ``attn2.*`` (cross), ``norm2`` (affine cross-attn norm), ``ffn.net.0.proj`` / ``ffn.net.2``,
  ``blocks.{i}.scale_shift_table``, ``condition_embedder.{time_embedder.linear_1/2, time_proj,
  text_embedder.linear_1/2}``, ``patch_embedding``, ``proj_out``, ``scale_shift_table`` (head).
- Wan2.1 release: ``blocks.{i}.self_attn.{q,k,v,o,norm_q,norm_k}``, ``cross_attn.*``, ``norm3`` is the
  affine cross-attn norm (diffusers' ``norm2``: the names are swapped), ``ffn.0`` / ``ffn.2``,
  ``blocks.{i}.modulation``, ``text_embedding.0/2``, ``time_embedding.0/2``, ``time_projection.1``,
  ``head.head``, ``head.modulation``, ``patch_embedding``.
- Kaleido SAT (``convert_ckpt_init_wan2sat.py`` in zai-org/Kaleido): everything under
  ``model.diffusion_model.``; self-attention q/k/v fused row-wise into ``attention.query_key_value``,
  cross-attention k/v fused into ``cross_attention.key_value``; norms under ``mixins.adaln_layer.*_list.{i}``;
  modulation ``mixins.adaln_layer.adaLN_modulations.{i}``; head ``mixins.final_layer``. The file is a
  DeepSpeed ``{dir}/{latest}/mp_rank_00_model_states.pt`` holding ``{'module': state_dict}`` beside RNG states
  and other objects (read safely: common._torch_load), or an FSDP2 run's ``fsdp2_rank_0000_checkpoint.pt``;
  the DiT's keys may sit beside the conditioner's / VAE's (``IGNORED_PREFIXES``).
"""

from __future__ import annotations

import json
import os
from typing import Callable

import ml_collections

from kaleido_jax import config as kcfg
from kaleido_jax.convert import common
from kaleido_jax.convert.common import conv_weight, linear_weight, one, stacked

FORMATS = ("diffusers", "wan", "kaleido")
SAT = "model.diffusion_model."

# Our per-block leaf -> source key template (per format). Linear entries name the module; the
# converter appends .weight / .bias. None marks leaves handled specially (fused tensors).
BLOCK_LINEARS = {
    "diffusers": {
        "self_attn/to_q": "attn1.to_q", "self_attn/to_k": "attn1.to_k", "self_attn/to_v": "attn1.to_v",
        "self_attn/to_out": "attn1.to_out.0",
        "cross_attn/to_q": "attn2.to_q", "cross_attn/to_k": "attn2.to_k", "cross_attn/to_v": "attn2.to_v",
        "cross_attn/to_out": "attn2.to_out.0",
        "ffn/proj_in": "ffn.net.0.proj", "ffn/proj_out": "ffn.net.2",
    },
    "wan": {
        "self_attn/to_q": "self_attn.q", "self_attn/to_k": "self_attn.k", "self_attn/to_v": "self_attn.v",
        "self_attn/to_out": "self_attn.o",
        "cross_attn/to_q": "cross_attn.q", "cross_attn/to_k": "cross_attn.k", "cross_attn/to_v": "cross_attn.v",
        "cross_attn/to_out": "cross_attn.o",
        "ffn/proj_in": "ffn.0", "ffn/proj_out": "ffn.2",
    },
}
BLOCK_VECTORS = {
    "diffusers": {"self_attn/norm_q/scale": "attn1.norm_q.weight", "self_attn/norm_k/scale": "attn1.norm_k.weight",
                  "cross_attn/norm_q/scale": "attn2.norm_q.weight",
                  "cross_attn/norm_k/scale": "attn2.norm_k.weight",
                  "norm2_scale": "norm2.weight", "norm2_bias": "norm2.bias",
                  "scale_shift_table": "scale_shift_table"},
    "wan": {"self_attn/norm_q/scale": "self_attn.norm_q.weight", "self_attn/norm_k/scale": "self_attn.norm_k.weight",
            "cross_attn/norm_q/scale": "cross_attn.norm_q.weight",
            "cross_attn/norm_k/scale": "cross_attn.norm_k.weight",
            "norm2_scale": "norm3.weight", "norm2_bias": "norm3.bias",   # Wan's norm3 == diffusers' norm2
            "scale_shift_table": "modulation"},
}
TOP = {
    "diffusers": {"patch": "patch_embedding", "time_linear_1": "condition_embedder.time_embedder.linear_1",
                  "time_linear_2": "condition_embedder.time_embedder.linear_2",
                  "time_proj": "condition_embedder.time_proj",
                  "text_linear_1": "condition_embedder.text_embedder.linear_1",
                  "text_linear_2": "condition_embedder.text_embedder.linear_2",
                  "proj_out": "proj_out", "head_table": "scale_shift_table"},
    "wan": {"patch": "patch_embedding", "time_linear_1": "time_embedding.0", "time_linear_2": "time_embedding.2",
            "time_proj": "time_projection.1", "text_linear_1": "text_embedding.0",
            "text_linear_2": "text_embedding.2", "proj_out": "head.head", "head_table": "head.modulation"},
    "kaleido": {"patch": SAT + "mixins.patch_embed.proj", "time_linear_1": SAT + "time_embed.0",
                "time_linear_2": SAT + "time_embed.2", "time_proj": SAT + "adaln_projection.1",
                "text_linear_1": SAT + "text_embedding.0", "text_linear_2": SAT + "text_embedding.2",
                "proj_out": SAT + "mixins.final_layer.linear",
                "head_table": SAT + "mixins.final_layer.adaLN_modulation"},
}


def _rows(start: int, stop: int, then: Callable = lambda x: x) -> Callable:
  """Slice rows [start, stop) of a fused torch tensor, then transform (fused q|k|v in SAT checkpoints)."""
  return lambda x: then(x[start:stop])


def _kaleido_block(i: int, dim: int) -> dict[str, tuple[str, Callable]]:
  """(source key, transform) for every per-block leaf of the Kaleido SAT layout."""
  layer, adaln = f"{SAT}transformer.layers.{i}.", f"{SAT}mixins.adaln_layer."
  qkv, kv = layer + "attention.query_key_value", layer + "cross_attention.key_value"
  out: dict[str, tuple[str, Callable]] = {}
  for j, name in enumerate(("to_q", "to_k", "to_v")):
    out[f"self_attn/{name}/kernel"] = (qkv + ".weight", _rows(j * dim, (j + 1) * dim, linear_weight))
    out[f"self_attn/{name}/bias"] = (qkv + ".bias", _rows(j * dim, (j + 1) * dim))
  for j, name in enumerate(("to_k", "to_v")):
    out[f"cross_attn/{name}/kernel"] = (kv + ".weight", _rows(j * dim, (j + 1) * dim, linear_weight))
    out[f"cross_attn/{name}/bias"] = (kv + ".bias", _rows(j * dim, (j + 1) * dim))
  plain = {"self_attn/to_out": layer + "attention.dense", "cross_attn/to_q": layer + "cross_attention.query",
           "cross_attn/to_out": layer + "cross_attention.dense", "ffn/proj_in": layer + "mlp.dense_h_to_4h",
           "ffn/proj_out": layer + "mlp.dense_4h_to_h"}
  for ours, theirs in plain.items():
    out[f"{ours}/kernel"] = (theirs + ".weight", linear_weight)
    out[f"{ours}/bias"] = (theirs + ".bias", lambda x: x)
  vectors = {"self_attn/norm_q/scale": f"{adaln}query_layernorm_list.{i}.weight",
             "self_attn/norm_k/scale": f"{adaln}key_layernorm_list.{i}.weight",
             "cross_attn/norm_q/scale": f"{adaln}cross_query_layernorm_list.{i}.weight",
             "cross_attn/norm_k/scale": f"{adaln}cross_key_layernorm_list.{i}.weight",
             "norm2_scale": layer + "post_cross_attention_layernorm.weight",
             "norm2_bias": layer + "post_cross_attention_layernorm.bias",
             "scale_shift_table": f"{adaln}adaLN_modulations.{i}"}
  out.update({k: (v, lambda x: x) for k, v in vectors.items()})
  return out


def _block_sources(fmt: str, i: int, dim: int) -> dict[str, tuple[str, Callable]]:
  if fmt == "kaleido":
    return _kaleido_block(i, dim)
  prefix = f"blocks.{i}."
  out = {}
  for ours, theirs in BLOCK_LINEARS[fmt].items():
    out[f"{ours}/kernel"] = (prefix + theirs + ".weight", linear_weight)
    out[f"{ours}/bias"] = (prefix + theirs + ".bias", lambda x: x)
  out.update({k: (prefix + v, lambda x: x) for k, v in BLOCK_VECTORS[fmt].items()})
  return out


def make_plan(cfg: ml_collections.ConfigDict, fmt: str) -> dict[str, common.Source]:
  """Flat ``{our/param/path: Source}`` for a model config and checkpoint format."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown transformer format {fmt!r}; choose one of {FORMATS}")
  dim = cfg.num_heads * cfg.head_dim
  top = TOP[fmt]
  plan = {
      "patch_kernel": one(top["patch"] + ".weight", conv_weight),
      "patch_bias": one(top["patch"] + ".bias"),
      "head_table": one(top["head_table"]),
  }
  for name in ("time_linear_1", "time_linear_2", "time_proj", "text_linear_1", "text_linear_2", "proj_out"):
    plan[f"{name}/kernel"] = one(top[name] + ".weight", linear_weight)
    plan[f"{name}/bias"] = one(top[name] + ".bias")
  per_layer = [_block_sources(fmt, i, dim) for i in range(cfg.num_layers)]
  leaves = per_layer[0].keys() if per_layer else ()
  if not cfg.cross_attn_norm:
    leaves = [k for k in leaves if not k.startswith("norm2_")]
  for leaf in leaves:
    transform = per_layer[0][leaf][1]
    if cfg.scan_layers:
      plan[f"blocks/{leaf}"] = stacked([p[leaf][0] for p in per_layer], transform)
    else:
      for i, p in enumerate(per_layer):
        plan[f"blocks/{i}/{leaf}"] = one(p[leaf][0], p[leaf][1])
  return plan


# --------------------------------------------------------------------------------------------------


# The files a Kaleido training run writes: DeepSpeed / SAT's model shard, or an FSDP2 run's rank-0 full state.
KALEIDO_FILES = ("mp_rank_00_model_states.pt", "fsdp2_rank_0000_checkpoint.pt")
# Keys a released Kaleido file may carry beside the DiT that are not the DiT (upstream loads with strict=False):
# the text conditioner, the first-stage (VAE) model and the loss / denoiser modules of SAT's diffusion engine.
# Any other key the plan does not use is named in an error.
IGNORED_PREFIXES = {"kaleido": ("conditioner.", "first_stage_model.", "denoiser.", "loss_fn."), "diffusers": (),
                    "wan": ()}


def resolve_path(path: str, fmt: str) -> str:
  """Kaleido directories hold ``latest`` naming the step folder with the DeepSpeed shard (or an FSDP2 rank-0
  file), or the file itself."""
  if fmt == "kaleido" and os.path.isdir(path):
    latest = os.path.join(path, "latest")
    step = open(latest).read().strip() if os.path.exists(latest) else ""
    for name in KALEIDO_FILES:
      for candidate in (os.path.join(path, step, name), os.path.join(path, name)):
        if os.path.exists(candidate):
          return candidate
  if fmt == "diffusers" and os.path.isdir(os.path.join(path, "transformer")):
    return os.path.join(path, "transformer")  # a whole pipeline directory
  return path


def config_from_checkpoint(path: str, fmt: str, reader: common.CheckpointReader,
                           base: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """Model config from diffusers' config.json when present, else inferred from tensor shapes."""
  cfg = kcfg.model_config() if base is None else base.copy_and_resolve_references()
  cfg_file = os.path.join(path, "config.json") if os.path.isdir(path) else ""
  if fmt == "diffusers" and cfg_file and os.path.exists(cfg_file):
    with open(cfg_file) as fh:
      d = json.load(fh)
    cfg.update(num_heads=d["num_attention_heads"], head_dim=d["attention_head_dim"],
               in_channels=d["in_channels"], out_channels=d["out_channels"], text_dim=d["text_dim"],
               freq_dim=d["freq_dim"], ffn_dim=d["ffn_dim"], num_layers=d["num_layers"],
               patch_size=tuple(d["patch_size"]), eps=d["eps"], cross_attn_norm=d["cross_attn_norm"])
    if d.get("image_dim") or d.get("added_kv_proj_dim"):
      raise common.ConversionError(f"{path!r} is an image-to-video Wan model (image_dim / added_kv_proj_dim); "
                                   "Kaleido builds on the text-to-video model")
    return cfg
  wan_heads = None
  if fmt == "wan" and cfg_file and os.path.exists(cfg_file):
    with open(cfg_file) as fh:
      wan_heads = json.load(fh).get("num_heads")  # Wan2.1 release config.json: dim, num_heads, ...
  top = TOP[fmt]
  dim, cin, pt, ph, pw = reader.shape(top["patch"] + ".weight")
  text_dim = reader.shape(top["text_linear_1"] + ".weight")[1]
  freq_dim = reader.shape(top["time_linear_1"] + ".weight")[1]
  ffn_key = {"diffusers": "blocks.0.ffn.net.0.proj.weight", "wan": "blocks.0.ffn.0.weight",
             "kaleido": SAT + "transformer.layers.0.mlp.dense_h_to_4h.weight"}[fmt]
  ffn_dim = reader.shape(ffn_key)[0]
  layer_prefix = {"diffusers": "blocks.", "wan": "blocks.", "kaleido": SAT + "transformer.layers."}[fmt]
  layers = {int(k[len(layer_prefix):].split(".")[0]) for k in reader.keys() if k.startswith(layer_prefix)}
  out_dim = reader.shape(top["proj_out"] + ".weight")[0]
  if wan_heads:
    head_dim = dim // wan_heads
  elif dim % cfg.head_dim == 0:
    head_dim = cfg.head_dim  # 128 in every released Wan / Kaleido model
  else:
    raise common.ConversionError(
        f"cannot infer the head count of {path!r} (dim {dim} is not a multiple of head_dim {cfg.head_dim}); "
        "pass a model config with num_heads / head_dim")
  cfg.update(num_heads=dim // head_dim, head_dim=head_dim, in_channels=cin, out_channels=out_dim // (pt * ph * pw),
             text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=len(layers),
             patch_size=(pt, ph, pw))
  return cfg


def float_config(config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict | None:
  """`config` with float weights: what a PyTorch checkpoint holds."""
  if config is None or config.get("quantization", "none") == "none":
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.quantization = "none"
  return config
