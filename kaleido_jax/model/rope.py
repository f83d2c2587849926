"""R-RoPE: position ids for ``[ref_0 | ... | ref_{N-1} | video]`` and the 3D rotary tables they give.

Two pure functions keep the scheme as *data*: :func:`position_ids` builds an ``(L, 3)`` integer grid of
(t, h, w) ids; :func:`rope_tables` turns any such grid into cos/sin tables. Ids can be sliced or sharded
(context parallelism) without changing either function, and new schemes are a few lines of numpy.

Schemes for reference i with a (h, w) token grid; the video's token (k, y, x) always gets (k, y, x), as Wan:
  kaleido   (i, shift + y, shift + x): Kaleido's released config (shift 80 = max latent h/w / 2 for <= 1280
            px), references outside every video position, told apart by t = i.
  temporal  (F + i, y, x): Phantom-style, references continue the video in time on its h/w grid.
  none      (0, 0, 0): no rotation for reference tokens (cos 1, sin 0).

Head dim d splits into t/h/w parts h = w = 2 * (d // 6), t = d - h - w (44/42/42 for d = 128), each rotated
by theta^(-2j / part) on interleaved pairs (x[2j], x[2j+1]) (diffusers WanRotaryPosEmbed, theta 10000).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

SCHEMES = ("kaleido", "temporal", "none")


def axis_dims(head_dim: int) -> tuple[int, int, int]:
  """(t, h, w) rotary dims of a head: h = w = 2 * (d // 6), t = the rest (Wan2.1)."""
  hw = 2 * (head_dim // 6)
  return head_dim - 2 * hw, hw, hw


def _grid(t: int, h: int, w: int) -> np.ndarray:
  return np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 3)


def position_ids(video_grid: Sequence[int], ref_grids: Sequence[Sequence[int]] = (), *,
                 scheme: str = "kaleido", ref_shift: int = 80) -> np.ndarray:
  """(L, 3) int32 ids of ``[ref_0 | ... | ref_{N-1} | video]`` tokens, row-major within each part.

  Args:
    video_grid: (F, H, W) of the video in *tokens* (after patching).
    ref_grids: (h, w) token grid of each reference, in sequence order.
    scheme: kaleido | temporal | none (see module docstring).
    ref_shift: the h/w offset of reference tokens in the kaleido scheme.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"unknown R-RoPE scheme {scheme!r}; choose one of {SCHEMES}")
  f, h, w = (int(v) for v in video_grid)
  parts = []
  for i, (rh, rw) in enumerate(ref_grids):
    ids = _grid(1, int(rh), int(rw))
    if scheme == "kaleido":
      ids = ids + np.array([i, ref_shift, ref_shift])
    elif scheme == "temporal":
      ids = ids + np.array([f + i, 0, 0])
    else:
      ids = np.zeros_like(ids)
    parts.append(ids)
  parts.append(_grid(f, h, w))
  return np.concatenate(parts, 0).astype(np.int32)


def rope_tables(ids, head_dim: int, theta: float = 10000.0):
  """cos, sin of shape (L, head_dim // 2) in float32: one angle per interleaved pair."""
  ids = jnp.asarray(ids)
  angles = []
  for axis, dim in enumerate(axis_dims(head_dim)):
    inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)
    angles.append(ids[:, axis, None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32))
  angle = jnp.concatenate(angles, -1)
  return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x, cos, sin):
  """Rotates interleaved pairs of x (B, L, H, D) by the (L, D/2) tables; computed in float32."""
  dtype = x.dtype
  x = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  x1, x2 = x[..., 0], x[..., 1]
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1)
  return out.reshape(out.shape[:-2] + (-1,)).astype(dtype)
