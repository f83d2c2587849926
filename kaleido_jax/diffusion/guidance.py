"""Classifier-free guidance for subject-to-video: text CFG with the references in every branch.

Kaleido guides on text only (scale 6): the unconditional branch sees the negative prompt and the *same*
references as the conditional one, so guidance sharpens the prompt without pushing away from the subjects
(DESIGN.md, "Sampling and training"). All branches go through ONE model call: they are concatenated on the
batch axis (cond first), which is what makes guided sampling cost one (bigger) forward pass per step.

Branches (each row of the doubled / tripled batch):
  c  (text_cond,   refs, ref_mask)            conditional
  u  (text_uncond, refs, ref_mask)            unconditional text, same references
  n  (text_uncond, refs, ref_mask all False)  no references (only with image guidance)

Combination (g_t = text scale, g_i = image scale):
  v = v_u + g_t·(v_c − v_u) + g_i·(v_u − v_n)
The first two terms are diffusers' / Wan's CFG (`uncond + scale·(cond − uncond)`). The image term is our
extension: it pushes along the direction the references add to the unconditional prediction; it equals
InstructPix2Pix's two-scale guidance v_n + s_I·(v_u − v_n) + s_T·(v_c − v_u) with s_I = 1 + g_i, s_T = g_t,
so g_i = 0 is "off". Static branch count: g_t = 1 and g_i = 0 → a single branch (no doubled batch, v = v_c);
g_i = 0 → two branches; otherwise three.

Public API:
  num_branches(text_scale, image_scale) -> int
  combine(v_cond, v_uncond, v_noref, text_scale, image_scale) -> v   (the formula above; v_noref may be
                                                                      None when image_scale == 0)
  batch_branches(x, timestep, text_cond, text_uncond, refs, ref_mask, branches)
      -> (x, timestep, text, refs, ref_mask) concatenated on batch in the order c, u, n
  combine_branches(v, branches, batch, text_scale, image_scale) -> (v, per-branch parts) of one batched output
  guided_velocity(denoise_fn, x, timestep, text_cond, text_uncond, refs, ref_mask, *,
                  text_scale, image_scale) -> v   one call of
      denoise_fn(x, timestep, text, refs, ref_mask) -> velocity   (the DiT signature, timestep (B,) in
      [0, 1000]); `text_uncond` may have batch 1 (one negative prompt for all), refs/ref_mask may be None.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

DenoiseFn = Callable[..., jax.Array]


def num_branches(text_scale: float, image_scale: float) -> int:
  """1 (plain conditional), 2 (text CFG) or 3 (text + image guidance); static, decided from the scales."""
  if image_scale != 0.0:
    return 3
  return 1 if text_scale == 1.0 else 2


def combine(v_cond: jax.Array, v_uncond: jax.Array | None, v_noref: jax.Array | None,
            text_scale: float | jax.Array, image_scale: float | jax.Array) -> jax.Array:
  """v = v_u + g_t·(v_c − v_u) + g_i·(v_u − v_n); terms whose branch is absent are skipped."""
  if v_uncond is None:
    return v_cond
  v = v_uncond + text_scale * (v_cond - v_uncond)
  if v_noref is not None:
    v = v + image_scale * (v_uncond - v_noref)
  return v


def batch_branches(x: jax.Array, timestep: jax.Array, text_cond: jax.Array, text_uncond: jax.Array | None,
                   refs: jax.Array | None, ref_mask: jax.Array | None, branches: int) -> tuple:
  """Stack the c / u / n branches on the batch axis (see module docstring)."""
  b = x.shape[0]
  if branches == 1:
    return x, timestep, text_cond, refs, ref_mask
  if text_uncond is None:
    raise ValueError('guidance needs text_uncond (the negative-prompt embedding)')
  text_uncond = jnp.broadcast_to(text_uncond, (b,) + text_uncond.shape[1:]).astype(text_cond.dtype)
  if branches == 3 and (refs is None or ref_mask is None):
    raise ValueError('image guidance needs references and ref_mask')
  texts = [text_cond, text_uncond] + ([text_uncond] if branches == 3 else [])
  xs = jnp.concatenate([x] * branches, axis=0)
  ts = jnp.concatenate([timestep] * branches, axis=0)
  text = jnp.concatenate(texts, axis=0)
  if refs is None:
    return xs, ts, text, None, None
  refs_b = jnp.concatenate([refs] * branches, axis=0)
  masks = [ref_mask, ref_mask] + ([jnp.zeros_like(ref_mask)] if branches == 3 else [])
  return xs, ts, text, refs_b, jnp.concatenate(masks, axis=0)


def guided_velocity(denoise_fn: DenoiseFn, x: jax.Array, timestep: jax.Array, text_cond: jax.Array,
                    text_uncond: jax.Array | None, refs: jax.Array | None, ref_mask: jax.Array | None,
                    *, text_scale: float, image_scale: float = 0.0) -> jax.Array:
  """The guided velocity with every branch in one `denoise_fn` call."""
  branches = num_branches(text_scale, image_scale)
  if ref_mask is not None:
    ref_mask = ref_mask.astype(bool)
  args = batch_branches(x, timestep, text_cond, text_uncond, refs, ref_mask, branches)
  return combine_branches(denoise_fn(*args).astype(jnp.float32), branches, x.shape[0], text_scale, image_scale)[0]


def combine_branches(v: jax.Array, branches: int, batch, text_scale: float, image_scale: float
                     ) -> tuple[jax.Array, jax.Array]:
  """(guided velocity, per-branch velocities (branches, batch, ...)) of one batched call's output (c, u, n)."""
  parts = v.reshape((branches, batch) + v.shape[1:])  # a reshape, not jnp.split: symbolic batch sizes
  return combine(parts[0], parts[1] if branches > 1 else None, parts[2] if branches > 2 else None,
                 text_scale, image_scale), parts
