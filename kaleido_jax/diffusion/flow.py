"""Rectified-flow (flow-matching) training objective as Kaleido trains it.

DESIGN.md, "Sampling and training": x_σ = (1 − σ)·x0 + σ·ε, the model predicts v = ε − x0, the loss is
the MSE on video tokens only. σ is drawn from a logit-normal(mean, std) and then shifted with
s = e^μ, σ' = s·σ / (1 + (s − 1)·σ), where μ is linear in the number of video tokens: 0.5 at 256 tokens and
1.15 at 4096 tokens (the resolution-dependent shift of diffusers' `calculate_shift`, which extrapolates
linearly outside that range; we do the same). The model sees timestep = 1000·σ'.

Conditioning dropout: with probability `text_dropout` a sample's text embedding is replaced by the
empty-prompt embedding (what classifier-free guidance's unconditional branch sees at sampling time); with
probability `ref_dropout` each real reference is masked out, and with probability `all_refs_dropout` all
of a sample's references are (the condition the image-guidance branch of the sampler sees, guidance.py: as
InstructPix2Pix drops its image condition, so that the no-reference prediction is a trained one and not an
extrapolation). References are clean latents and are never
noised; padded reference slots (ref_mask False) are masked as attention keys by the model, and the loss
is taken over the video prediction only, so a padded slot cannot influence the loss.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections


def resolution_mu(num_tokens: int | float, cfg: ml_collections.ConfigDict) -> float:
  """μ linear in the token count: `shift_base` at `base_tokens`, `shift_max` at `max_tokens`, clamped there.

  Clamped because video token counts (32,760 at 480x832x81) lie far beyond the image range the line was fit
  on: extrapolating would give μ ≈ 6 (a sigma shift of ~400) and train almost only at σ ≈ 1.
  """
  slope = (cfg.shift_max - cfg.shift_base) / (cfg.max_tokens - cfg.base_tokens)
  mu = cfg.shift_base + slope * (num_tokens - cfg.base_tokens)
  return min(max(mu, cfg.shift_base), cfg.shift_max)


def shift_sigmas(sigmas: jax.Array, shift: float | jax.Array) -> jax.Array:
  """σ' = s·σ / (1 + (s − 1)·σ): moves mass towards high noise for s > 1 (same map as the sampler's)."""
  return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def sample_sigmas(rng: jax.Array, batch_size: int, cfg: ml_collections.ConfigDict,
                  num_tokens: int | None = None) -> jax.Array:
  """Per-sample σ in (0, 1): logit-normal(logit_mean, logit_std), then the resolution shift."""
  u = cfg.logit_mean + cfg.logit_std * jax.random.normal(rng, (batch_size,), jnp.float32)
  sigmas = jax.nn.sigmoid(u)
  if cfg.use_resolution_shift:
    if num_tokens is None:
      raise ValueError('use_resolution_shift needs the number of video tokens')
    sigmas = shift_sigmas(sigmas, math.exp(resolution_mu(num_tokens, cfg)))
  return sigmas


def num_video_tokens(video_shape: Sequence[int], patch_size: Sequence[int]) -> int:
  """Tokens of a `(B, F, H, W, C)` latent after patchifying with `patch_size = (pt, ph, pw)`."""
  _, f, h, w, _ = video_shape
  pt, ph, pw = patch_size
  return (f // pt) * (h // ph) * (w // pw)


def interpolate(x0: jax.Array, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
  """x_σ = (1 − σ)·x0 + σ·ε with σ broadcast over all but the batch axis."""
  s = sigmas.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
  return (1.0 - s) * x0 + s * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """d x_σ / d σ = ε − x0."""
  return noise - x0


def flow_matching_loss(model: Callable[..., jax.Array], batch: Mapping[str, Any], rng: jax.Array,
                       cfg: ml_collections.ConfigDict, *, patch_size: Sequence[int] = (1, 2, 2),
                       empty_text: jax.Array | None = None,
                       compute_dtype: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean flow-matching loss over a batch, and per-batch diagnostics.

  Args:
    model: `model(video, timestep, text, refs=None, ref_mask=None) -> velocity` (the KaleidoDiT contract).
    batch: `video_latents (B, F, H, W, C)`, `text_embedding (B, L, D)`, optional `ref_latents (B, R, h, w, C)`
      with `ref_mask (B, R)` bool (True = real reference), optional `subject_weight (B, F, H, W)` (the
      balanced subject map, used when `cfg.subject_loss_weight` > 0).
    rng: key for σ, noise and the dropouts.
    cfg: `config.diffusion`.
    patch_size: the DiT's patch size (for the resolution shift's token count).
    empty_text: `(L, D)` embedding of the empty prompt used for text dropout; zeros when None (what Wan's
      padding gives for every position beyond the prompt).
    compute_dtype: dtype the inputs are cast to before the model (bf16 training); the loss is float32.
  """
  x0 = jnp.asarray(batch['video_latents'], jnp.float32)
  text = jnp.asarray(batch['text_embedding'], jnp.float32)
  b = x0.shape[0]
  k_sigma, k_noise, k_text, k_ref = jax.random.split(rng, 4)

  sigmas = sample_sigmas(k_sigma, b, cfg, num_video_tokens(x0.shape, patch_size))
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = interpolate(x0, noise, sigmas)
  target = velocity_target(x0, noise)

  if cfg.text_dropout > 0:
    drop_text = jax.random.uniform(k_text, (b,)) < cfg.text_dropout
    empty = jnp.zeros(text.shape[1:], text.dtype) if empty_text is None else jnp.asarray(empty_text, text.dtype)
    text = jnp.where(drop_text[:, None, None], empty[None], text)

  refs = batch.get('ref_latents')
  ref_mask = batch.get('ref_mask')
  if refs is not None:
    refs = jnp.asarray(refs, jnp.float32)
    ref_mask = (jnp.ones(refs.shape[:2], bool) if ref_mask is None else jnp.asarray(ref_mask, bool))
    if cfg.ref_dropout > 0:
      keep = jax.random.uniform(k_ref, ref_mask.shape) >= cfg.ref_dropout
      ref_mask = ref_mask & keep
    if cfg.get('all_refs_dropout', 0.0) > 0:
      drop_all = jax.random.uniform(jax.random.fold_in(k_ref, 1), (b,)) < cfg.all_refs_dropout
      ref_mask = ref_mask & ~drop_all[:, None]
    # A padded slot's content must not matter even to a model that forgets the mask for some op: zero it.
    refs = jnp.where(ref_mask[:, :, None, None, None], refs, 0.0)

  if compute_dtype is not None:
    x_t = x_t.astype(compute_dtype)
    text = text.astype(compute_dtype)
    refs = None if refs is None else refs.astype(compute_dtype)

  timestep = cfg.timestep_scale * sigmas
  pred = model(x_t, timestep, text, refs=refs, ref_mask=ref_mask)
  err = jnp.square(pred.astype(jnp.float32) - target)
  lam = float(cfg.get('subject_loss_weight', 0.0))
  if lam > 0:
    if 'subject_weight' not in batch:
      raise KeyError('diffusion.subject_loss_weight > 0 needs a subject_weight map in the batch (the synthetic '
                     'source provides it)')
    w = 1.0 + lam * jnp.asarray(batch['subject_weight'], jnp.float32)  # (B, F, H, W) on the latent grid
    w = w / jnp.mean(w, axis=(1, 2, 3), keepdims=True)  # mean 1 per clip: the loss keeps its scale
    err = err * w[..., None]
  per_sample = jnp.mean(err, axis=tuple(range(1, err.ndim)))
  loss = jnp.mean(per_sample)
  return loss, {'sigma_mean': jnp.mean(sigmas), 'per_sample_loss': per_sample}
