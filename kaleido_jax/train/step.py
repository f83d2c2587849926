"""The functional training step: pure dict params → nnx.merge inside the loss → grads → AdamW.

`make_train_step` returns a `jax.jit`-ed `step(state, batch, rng) -> (state, metrics)` with explicit
in/out NamedShardings (train state per `StateSpec.shardings`, batch over `(data, fsdp)` with the latent
frame axis over `context` when it divides, metrics replicated) and the state donated.

Numerics: master weights stay float32; when `config.model.dtype` is bfloat16 the parameters are cast to
bf16 inside the loss (so the cast is differentiated and gradients arrive in fp32) and the inputs too, except
those the precision policy `config.model.fp32_params` keeps in float32 (model/precision.py).
Gradient accumulation scans over `grad_accum` micro-batches of the per-step batch and averages.
The per-step key is `fold_in(rng, step)`, so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from kaleido_jax.diffusion import flow
from kaleido_jax.model import precision
from kaleido_jax.parallel import shardings
from kaleido_jax.train import state as state_lib

BATCH_KEYS = ('video_latents', 'ref_latents', 'ref_mask', 'text_embedding', 'subject_weight')


def batch_shardings(batch_shapes: Mapping[str, Any], mesh: Mesh) -> dict:
  """Batch dim over (data, fsdp); `video_latents` over context on the first of F, H, W it divides.

  (Wan's 21 latent frames are odd, so frames alone would rarely shard; the DiT's own activation
  constraints on `activation_length` then keep the token sequence split over `context`.)
  """
  out = {}
  for k, x in batch_shapes.items():
    seq = None
    if k == 'video_latents':
      seq = next((a for a in (1, 2, 3) if x.shape[a] % mesh.shape['context'] == 0), None)
    out[k] = shardings.batch_sharding(mesh, x.shape, seq)
  return out


def make_loss_fn(config: ml_collections.ConfigDict, spec: state_lib.StateSpec) -> Callable:
  """loss(params, batch, rng) -> (loss, aux): the flow-matching objective of the merged model."""
  compute_dtype = jnp.dtype(config.model.dtype)
  patch = tuple(config.model.patch_size)
  fp32 = tuple(config.model.get('fp32_params', precision.DEFAULT_FP32))

  def loss_fn(params, batch, rng, frozen=None):
    if compute_dtype != jnp.float32:
      params = precision.cast(params, compute_dtype, fp32)
      frozen = None if frozen is None else precision.cast(frozen, compute_dtype, fp32)
    model = state_lib.merge_model(spec, params, frozen)
    empty = batch.get('empty_text_embedding')
    batch = {k: v for k, v in batch.items() if k in BATCH_KEYS}
    return flow.flow_matching_loss(model, batch, rng, config.diffusion, patch_size=patch,
                                   empty_text=None if empty is None else empty[0],
                                   compute_dtype=None if compute_dtype == jnp.float32 else compute_dtype)
  return loss_fn


def train_step_fn(config: ml_collections.ConfigDict, spec: state_lib.StateSpec) -> Callable:
  """The un-jitted step (also what tools/aot.py lowers)."""
  loss_fn = make_loss_fn(config, spec)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  accum = int(config.train.grad_accum)
  schedule = state_lib.make_schedule(config.train)
  ema_decay = float(config.train.ema_decay)

  def step(state, batch, rng):
    rng = jax.random.fold_in(rng, state['step'])
    params = state['params']
    frozen = state.get('frozen')  # LoRA: the base weights, an input that takes no gradient
    if accum == 1:
      (loss, _), grads = grad_fn(params, batch, rng, frozen)
    else:
      def micro(x):
        b = x.shape[0]
        if b % accum:
          raise ValueError(f'batch {b} is not divisible by grad_accum={accum}')
        # Strided split keeps each micro-batch spread over the batch shards.
        return jnp.moveaxis(x.reshape((b // accum, accum) + x.shape[1:]), 1, 0)
      micro_batches = jax.tree.map(micro, batch)

      def body(carry, xs):
        g_sum, l_sum = carry
        i, mb = xs
        (l, _), g = grad_fn(params, mb, jax.random.fold_in(rng, i), frozen)
        return (jax.tree.map(jnp.add, g_sum, g), l_sum + l), None
      zeros = jax.tree.map(jnp.zeros_like, params)
      (g_sum, l_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                       (jnp.arange(accum), micro_batches))
      grads = jax.tree.map(lambda g: g / accum, g_sum)
      loss = l_sum / accum
    grad_norm = optax.global_norm(grads)
    updates, opt_state = spec.tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {'step': state['step'] + 1, 'params': new_params, 'opt_state': opt_state}
    if frozen is not None:
      new_state['frozen'] = frozen
    if 'ema' in state:
      new_state['ema'] = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                      state['ema'], new_params)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': jnp.asarray(schedule(state['step']), jnp.float32)}
    return new_state, metrics
  return step


def make_train_step(config: ml_collections.ConfigDict, spec: state_lib.StateSpec, mesh: Mesh,
                    batch_shapes: Mapping[str, Any], donate: bool = True):
  """jax.jit of the step with explicit in/out shardings; returns (jitted_fn, batch_shardings)."""
  b_sh = batch_shardings(batch_shapes, mesh)
  rep = shardings.replicated(mesh)
  metric_sh = {'loss': rep, 'grad_norm': rep, 'lr': rep}
  step = train_step_fn(config, spec)

  jitted = jax.jit(step, in_shardings=(spec.shardings, b_sh, rep),
                   out_shardings=(spec.shardings, metric_sh), donate_argnums=(0,) if donate else ())
  return jitted, b_sh
