"""Tiny randomly initialised diffusers WanTransformer3DModel references, saved for the converter."""

from __future__ import annotations

import json
import os

import numpy as np


def make_diffusers_model(heads=2, head_dim=16, layers=2, patch=(1, 2, 2), in_ch=4, out_ch=4, text_dim=32,
                         freq_dim=16, ffn=64, seed=0):
  import torch
  from diffusers import WanTransformer3DModel
  torch.manual_seed(seed)
  model = WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_ch,
                                out_channels=out_ch, text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn,
                                num_layers=layers, patch_size=patch, rope_max_seq_len=128).eval()
  # Non-trivial affine norms (diffusers initialises them to 1 / 0).
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def run_diffusers(model, video, timestep, text) -> np.ndarray:
  """video (B, F, H, W, C) channels-last numpy -> velocity channels-last numpy."""
  import torch
  with torch.no_grad():
    out = model(torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3))),
                torch.from_numpy(timestep), torch.from_numpy(text), return_dict=False)[0]
  return out.numpy().transpose(0, 2, 3, 4, 1)


def to_wan_state_dict(model) -> dict:
  """Rename a diffusers state dict to the original Wan2.1 release layout."""
  import re
  renames = [
      (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
      (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
      (r"^condition_embedder\.time_proj\.", "time_projection.1."),
      (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
      (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
      (r"^proj_out\.", "head.head."),
      (r"^scale_shift_table$", "head.modulation"),
      (r"\.attn1\.to_out\.0\.", ".self_attn.o."), (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
      (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."), (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
      (r"\.attn1\.norm_", ".self_attn.norm_"), (r"\.attn2\.norm_", ".cross_attn.norm_"),
      (r"\.norm2\.", ".norm3."), (r"\.ffn\.net\.0\.proj\.", ".ffn.0."), (r"\.ffn\.net\.2\.", ".ffn.2."),
      (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
  ]
  out = {}
  for k, v in model.state_dict().items():
    for pat, rep in renames:
      k = re.sub(pat, rep, k)
    out[k] = v.contiguous()
  return out


def save_diffusers(model, directory: str) -> str:
  model.save_pretrained(directory, safe_serialization=True)
  return directory


def save_wan(model, directory: str) -> str:
  from safetensors.torch import save_file
  os.makedirs(directory, exist_ok=True)
  save_file(to_wan_state_dict(model), os.path.join(directory, "diffusion_pytorch_model.safetensors"))
  c = model.config
  with open(os.path.join(directory, "config.json"), "w") as fh:  # the Wan2.1 release's config keys
    json.dump({"_class_name": "WanModel", "model_type": "t2v", "dim": c.num_attention_heads * c.attention_head_dim,
               "num_heads": c.num_attention_heads, "num_layers": c.num_layers, "ffn_dim": c.ffn_dim,
               "freq_dim": c.freq_dim, "in_dim": c.in_channels, "out_dim": c.out_channels, "eps": c.eps}, fh)
  return directory
