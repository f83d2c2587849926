"""Analytic FLOP count of one KaleidoDiT training step (for MFU), and peak chip throughput.

Per sample, with d = num_heads·head_dim, f = ffn_dim, N = layers, L = video + reference tokens,
T = text length, c_in = in_channels·prod(patch), c_out = out_channels·prod(patch), F = freq_dim:

  forward = N · [ 2·L·4d²                  self-attention q, k, v, o projections
                + 4·L²·d                   self-attention scores QKᵀ and values AV (2 matmuls · 2 flops/MAC)
                + 2·L·2d² + 2·T·2d²        cross-attention q, o on tokens; k, v on text
                + 4·L·T·d                  cross-attention scores and values
                + 2·L·2d·f ]               feed-forward in + out
          + 2·L·c_in·d + 2·L_video·d·c_out  patch embedding and output head
          + 2·T·(text_dim·d + d²)          text-embedding MLP
          + 2·(F·d + d² + 6d²)             timestep MLP and modulation projection
  train step = 3 · forward · B             backward ≈ 2 × forward; remat recomputation is not counted
                                           (MFU convention: model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import math

import ml_collections

# Dense bf16 peak TFLOP/s per chip (vendor spec sheets).
PEAK_TFLOPS = {
    'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5': 459.0, 'TPU v5p': 459.0,
    'TPU v6 lite': 918.0, 'TPU v6e': 918.0, 'NVIDIA H100': 989.0, 'NVIDIA H200': 989.0,
}


def tokens(video_latent_shape, num_refs: int, ref_hw, patch_size) -> tuple[int, int]:
  """(video tokens, reference tokens) for latent `(F, H, W)` and `num_refs` references of `(h, w)`."""
  pt, ph, pw = patch_size
  f, h, w = video_latent_shape[:3]
  video = (f // pt) * (h // ph) * (w // pw)
  refs = num_refs * (ref_hw[0] // ph) * (ref_hw[1] // pw)
  return video, refs


def forward_flops(model_cfg: ml_collections.ConfigDict, video_tokens: int, ref_tokens: int,
                  text_len: int) -> float:
  """FLOPs of one forward pass for one sample (formula in the module docstring)."""
  d = model_cfg.num_heads * model_cfg.head_dim
  f, n = model_cfg.ffn_dim, model_cfg.num_layers
  L, T = video_tokens + ref_tokens, text_len
  p = math.prod(model_cfg.patch_size)
  per_layer = (2 * L * 4 * d * d + 4 * L * L * d + 2 * L * 2 * d * d + 2 * T * 2 * d * d
               + 4 * L * T * d + 2 * L * 2 * d * f)
  head = 2 * L * model_cfg.in_channels * p * d + 2 * video_tokens * d * model_cfg.out_channels * p
  text = 2 * T * (model_cfg.text_dim * d + d * d)
  time = 2 * (model_cfg.freq_dim * d + d * d + 6 * d * d)
  return float(n * per_layer + head + text + time)


def train_step_flops(model_cfg, batch_size: int, video_tokens: int, ref_tokens: int,
                     text_len: int) -> float:
  """3 × forward × batch (see module docstring)."""
  return 3.0 * batch_size * forward_flops(model_cfg, video_tokens, ref_tokens, text_len)


def peak_flops_per_device(device_kind: str, override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: the override if > 0, else the table (longest matching prefix), else None."""
  if override_tflops and override_tflops > 0:
    return override_tflops * 1e12
  best = None
  for k, v in PEAK_TFLOPS.items():
    if device_kind.startswith(k) and (best is None or len(k) > len(best[0])):
      best = (k, v)
  return None if best is None else best[1] * 1e12
