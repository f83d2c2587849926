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

`matmul_census` counts the matmuls a traced program really runs (backward, recomputation, loop trip counts
included); tests/train/test_flops.py checks the formula above against it, and bench/dit_step.py times them.
"""

from __future__ import annotations

import collections
import math
from typing import NamedTuple

import jax
import ml_collections
from jax.extend import core as jax_core

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


class Matmul(NamedTuple):
  """One `dot_general` as traced: operand shapes, dimension numbers, operand dtype."""
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  dimension_numbers: tuple
  dtype: str

  @property
  def sizes(self) -> tuple[int, int, int, int]:
    """(batch, m, n, k): batch dims, lhs free dims, rhs free dims and contracting dims, each multiplied out."""
    (lc, _), (lb, _) = self.dimension_numbers
    k = math.prod(self.lhs[i] for i in lc)
    batch = math.prod(self.lhs[i] for i in lb)
    return batch, math.prod(self.lhs) // (k * batch), math.prod(self.rhs) // (k * batch), k

  @property
  def flops(self) -> int:
    """2 · batch · m · n · k."""
    return 2 * math.prod(self.sizes)


def matmul_census(fn, *args, **kwargs) -> collections.Counter:
  """Every matmul that `fn(*args, **kwargs)` runs, as a Counter of `Matmul` -> times run.

  Walks the traced jaxpr, so it counts what the program does, unlike the analytic count above: the
  backward's matmuls, remat or flash-attention recomputation, and scan bodies times their length (XLA's
  cost analysis counts a while loop's body once). Of a `cond`, the branch with most FLOPs counts; a matmul
  in a `while` loop has no static trip count and raises.
  """
  def walk(jaxpr, times, out):
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        lhs, rhs = (v.aval for v in eqn.invars)
        out[Matmul(tuple(lhs.shape), tuple(rhs.shape), eqn.params["dimension_numbers"], str(lhs.dtype))] += times
        continue
      subs = [p for v in eqn.params.values() for p in (v if isinstance(v, (list, tuple)) else (v,))
              if isinstance(p, (jax_core.ClosedJaxpr, jax_core.Jaxpr))]
      subs = [p.jaxpr if isinstance(p, jax_core.ClosedJaxpr) else p for p in subs]
      if name == "cond":
        branches = [walk(b, times, collections.Counter()) for b in subs]
        out.update(max(branches, key=lambda c: sum(m.flops * n for m, n in c.items())))
        continue
      inner = times * eqn.params["length"] if name == "scan" else times
      for sub in subs:
        found = walk(sub, inner, collections.Counter())
        if name == "while" and found:
          raise ValueError("matmul_census: a matmul inside a while loop has no static trip count; "
                           "use lax.scan (or lax.map) for loops to be counted")
        out.update(found)
    return out

  return walk(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr, 1, collections.Counter())
