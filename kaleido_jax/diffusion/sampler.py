"""Jitted flow-matching samplers: Euler (Kaleido) and UniPC-BH2 (Wan), with classifier-free guidance.

The whole denoising loop is one `jax.lax.scan` inside one `jax.jit`: the model is traced once, whatever the
number of steps, and the sigma grid / solver coefficients are *arguments* (computed in numpy by
schedules.py), so changing the shift or a guidance scale reuses the compiled sampler; only the step count (an
array length) and the guidance branch count (a batch size) are static. Each step feeds the model timestep = 1000·σ
(diffusers' grid: float for Euler, truncated to an integer for UniPC, see schedules.py) broadcast to (B,).

The loop composes three parts that do not know each other: a solver (solvers.py: Euler on diffusers' or upstream
Kaleido's grid, UniPC-BH2; init / step objects that see only velocities), guidance (guidance.py: the branches
batched and combined, or the CFG cache's conditional-only steps) and the step caches (caching.cached_blocks: the
DiT's blocks run or skipped).

Public API:
  latent_shape(num_frames, height, width, *, z_dim=16, temporal_stride=4, spatial_stride=8)
      -> (F, H, W, C) of the Wan VAE latent (F = (num_frames − 1)/4 + 1); raises on bad sizes.
  initial_noise(seeds, shape, dtype=float32) -> (B, *shape)  one independent N(0, 1) draw per seed, so a
      sample does not depend on what else is in the batch (a batch of prompts = a list of seeds).
  sample_fn(denoise_fn, noise, text_cond, text_uncond=None, refs=None, ref_mask=None, *, cfg,
            return_trajectory=False) -> latents (B, F, H, W, C) float32 [, trajectory (steps, B, ...)]
      `denoise_fn(x, timestep, text, refs, ref_mask) -> velocity` is any JAX-traceable callable (it is a
      static argument of the jit: pass the same object to reuse the compilation).
  sample(graphdef, state, noise, text_cond, text_uncond=None, refs=None, ref_mask=None, *, cfg,
         return_trajectory=False, on_step=None)
      the same for an NNX model split with `nnx.split(model)`: the model call is
      `nnx.merge(graphdef, state)(x, timestep, text, refs=refs, ref_mask=ref_mask)` (CONTRIBUTING.md DiT
      signature), so the weights are a jit argument (shardable, exportable with jax.export).
  sample_traced(denoise_fn, noise, text_cond, text_uncond, refs, ref_mask, *, cfg) -> latents
      the loop without a jit of its own, for a caller tracing a larger program (kaleido_jax/export.py).
  Both take `return_stats=True` for a dict {model_calls: DiT passes per video, step_calls: per step}; `sample`
  also runs the caches of `cfg` (caching.py: sample.cache magcache | teacache with `calibration=`, cfg_cache,
  text_kv_cache; skip decisions are data in the scan, thresholds traced) and `calibrate=True` (an uncached run
  that returns the per-step statistics caching.fit_calibration takes).
  `cfg` is the `sample` config section (kaleido_jax.config.sample_config): solver ('euler' | 'unipc' | 'kaleido'),
  num_steps, shift, guidance_scale (text CFG; 1 = one branch), image_guidance_scale (0 = off; see
  guidance.py for the formula), unipc_order (1 | 2), timesteps (an explicit list of model timesteps, e.g.
  (1000, 750, 500, 250) for 4-step distilled LoRAs; replaces num_steps) and warp_timesteps (shift that list).
  `text_uncond` is the negative-prompt embedding, batch B or 1; `refs (B, N, h, w, C)`, `ref_mask (B, N)`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kaleido_jax.diffusion import caching, guidance, schedules, solvers

DenoiseFn = Callable[..., jax.Array]


def latent_shape(num_frames: int, height: int, width: int, *, z_dim: int = 16, temporal_stride: int = 4,
                 spatial_stride: int = 8) -> tuple[int, int, int, int]:
  """(F, H, W, C) of the latent of a `num_frames × height × width` video (Wan VAE: 4× time, 8× space)."""
  if num_frames < 1 or (num_frames - 1) % temporal_stride:
    raise ValueError(f'num_frames must be 1 + {temporal_stride}k, got {num_frames}')
  if height % spatial_stride or width % spatial_stride or height <= 0 or width <= 0:
    raise ValueError(f'height and width must be positive multiples of {spatial_stride}, '
                     f'got {height}x{width}')
  return ((num_frames - 1) // temporal_stride + 1, height // spatial_stride, width // spatial_stride, z_dim)


def initial_noise(seeds, shape, dtype=jnp.float32) -> jax.Array:
  """(len(seeds), *shape) standard normal, sample b drawn from `jax.random.key(seeds[b])` alone."""
  seeds = np.atleast_1d(np.asarray(seeds, np.uint32))
  keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))
  return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), dtype))(keys)


def step_schedule(cfg: ml_collections.ConfigDict) -> schedules.Schedule:
  """The σ grid of a `sample` config: `timesteps` when given (then `num_steps` = its length and `shift` applies
  only with `warp_timesteps`), else the solver's shifted grid of `num_steps`."""
  explicit = tuple(cfg.get('timesteps', ()) or ())
  if explicit:
    shift = float(cfg.shift) if cfg.get('warp_timesteps', False) else 1.0
    return schedules.make_schedule(cfg.solver, len(explicit), shift, explicit)
  return schedules.make_schedule(cfg.solver, int(cfg.num_steps), float(cfg.shift))


def num_steps(cfg: ml_collections.ConfigDict) -> int:
  """Denoising steps of a `sample` config (the explicit list's length when `timesteps` is given)."""
  explicit = tuple(cfg.get('timesteps', ()) or ())
  return len(explicit) if explicit else int(cfg.num_steps)


def _solver_args(cfg: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The per-step arrays the jitted loop scans over (numpy, so shift changes do not recompile)."""
  sched = step_schedule(cfg)
  return dict(index=np.arange(len(sched.timesteps), dtype=np.int32), timesteps=sched.timesteps,
              sigma=sched.sigmas[:-1], dt=(sched.sigmas[1:] - sched.sigmas[:-1]).astype(np.float32),
              **solvers.for_config(cfg).step_args(sched.sigmas))


def _plain_call(denoise_fn: DenoiseFn, batch: int):
  """A model call without step caches: (velocity, cache state with the calls counted, no statistics)."""
  def call(args, rows, cs, _):
    return denoise_fn(*args).astype(jnp.float32), {**cs, 'calls': cs['calls'] + rows // batch}, {}
  return call


def _guided_velocity(call, x, ts, s, cs, inputs, branches: int, text_scale: jax.Array, image_scale: jax.Array,
                     p: dict):
  """The guided velocity of one step from the model `call`: every guidance branch batched, or (CFG cache) the
  conditional branch alone with the others rebuilt from the differences kept on the last full step."""
  text_cond, text_uncond, refs, ref_mask = inputs
  b = x.shape[0]

  def full(c):
    args = guidance.batch_branches(x, ts, text_cond, text_uncond, refs, ref_mask, branches)
    v, c, stats = call(args, branches * b, c, s)
    guided_v, parts = guidance.combine_branches(v, branches, b, text_scale, image_scale)
    if 'cfg_delta' in c:
      c = {**c, 'cfg_delta': parts[:1] - parts[1:]}
    return guided_v, c, stats

  def conditional_only(c):
    v_c, c, stats = call((x, ts, text_cond, refs, ref_mask), b, c, s)
    others = v_c[None] - c['cfg_delta']
    return guidance.combine(v_c, others[0], others[1] if branches > 2 else None, text_scale, image_scale), c, stats

  if 'cfg_delta' in cs:
    return jax.lax.cond(caching.cfg_full_step(s['index'], p), full, conditional_only, cs)
  return full(cs)


def _loop(denoise_fn: DenoiseFn, solver: solvers.Euler | solvers.UniPC, branches: int,
          return_trajectory: bool, on_step: Callable[[Any], None] | None, steps: dict[str, jax.Array],
          scales: dict[str, jax.Array], noise, text_cond, text_uncond, refs, ref_mask, *,
          static: caching.Static = caching.Static(), model_fn: Callable[[], Any] | None = None,
          cache_params: dict[str, jax.Array] | None = None):
  """The scan over steps (traced once): the solver's state and the cache state are the carry; each step asks
  guidance for a velocity (through the step cache when one is on) and hands it to the solver. `branches` (1 | 2 |
  3, a batch size) is static; the guidance `scales` ({'text', 'image'}) are traced values, so another scale
  reuses the compiled sampler.

  Returns (x, trajectory or None, stats) with stats = {'model_calls': block passes per video, 'step_calls' (n,),
  and with static.calibrate the per-step statistics caching.fit_calibration takes}.
  """
  x0 = noise.astype(jnp.float32)
  b = x0.shape[0]
  text_scale, image_scale = scales['text'], scales['image']
  n = steps['index'].shape[0]
  if static.active and model_fn is None:
    if static.kind != 'none' or static.text_kv or static.calibrate:
      raise caching.CacheError('step caches and the text K/V cache need the NNX model sampler (sample(graphdef, '
                               'state, ...)); a plain denoise_fn only takes the CFG cache')
  if ref_mask is not None:
    ref_mask = ref_mask.astype(bool)
  inputs = (text_cond, text_uncond, refs, ref_mask)
  p = cache_params or {}
  use_model = model_fn is not None and static.active

  text_kv = None
  cstate: dict[str, jax.Array] = {'calls': jnp.zeros((), jnp.int32), 'have': jnp.zeros((), bool)}
  if use_model:
    m = model_fn()
    args0 = guidance.batch_branches(x0, jnp.zeros((b,), jnp.float32), *inputs, branches)
    with m.kernels():
      if static.text_kv:
        text_kv = m.text_key_values(m.embed_text(args0[2]))
      probe = jax.eval_shape(lambda: m.embed(*args0)['tokens'])
    cstate = caching.init_state(b * branches, probe.shape[1], probe.shape[2], probe.dtype, x0.shape, branches, static)
  elif static.cfg_cache and branches > 1:
    cstate = caching.init_state(b * branches, 0, 0, jnp.float32, x0.shape, branches, static)

  def body(carry, s):
    state, cs = carry
    if on_step is not None:  # host callback (progress bars); not exportable, so off by default
      jax.debug.callback(on_step, s['index'])
    ts = jnp.full((b,), s['timesteps'], jnp.float32)
    x = solver.current(state)
    if use_model:
      m = model_fn()
      call = functools.partial(caching.cached_blocks, m, static=static, p=p, text_kv=text_kv, num_steps=n, batch=b)
      with m.kernels():
        v, cs2, stats = _guided_velocity(call, x, ts, s, cs, inputs, branches, text_scale, image_scale, p)
    else:
      v, cs2, stats = _guided_velocity(_plain_call(denoise_fn, b), x, ts, s, cs, inputs, branches, text_scale,
                                       image_scale, p)
    state = solver.step(state, v, s)
    out = solver.current(state) if return_trajectory else None
    return (state, cs2), (out, {'step_calls': cs2['calls'] - cs['calls'], **stats})

  (state, cs), (traj, ys) = jax.lax.scan(body, (solver.init(x0), cstate), steps)
  return solver.current(state), traj, {'model_calls': cs['calls'], **ys}


def _finish(out, return_trajectory: bool, return_stats: bool):
  x, traj, stats = out
  result = (x,) + ((traj,) if return_trajectory else ()) + ((stats,) if return_stats else ())
  return result if len(result) > 1 else x


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _jit_callable(denoise_fn, solver, branches, return_trajectory, on_step, static, steps, cache_params, scales,
                  noise, text_cond, text_uncond, refs, ref_mask):
  return _loop(denoise_fn, solver, branches, return_trajectory, on_step, steps, scales, noise, text_cond,
               text_uncond, refs, ref_mask, static=static, cache_params=cache_params)


def nnx_denoise_fn(graphdef: nnx.GraphDef, state: nnx.State) -> DenoiseFn:
  """`denoise_fn(x, t, text, refs, ref_mask)` of the model `nnx.merge(graphdef, state)` (traceable).

  The merge happens inside every call, i.e. inside the step loop's trace: NNX transforms in the model
  (nnx.scan over layers) refuse variables created at an outer trace level.
  """
  def denoise_fn(x, t, text, r, m):
    return nnx.merge(graphdef, state)(x, t, text, refs=r, ref_mask=m)
  return denoise_fn


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4, 5, 6))
def _jit_nnx(graphdef, state, solver, branches, return_trajectory, on_step, static, steps, cache_params, scales,
             noise, text_cond, text_uncond, refs, ref_mask):
  return _loop(nnx_denoise_fn(graphdef, state), solver, branches, return_trajectory, on_step, steps, scales,
               noise, text_cond, text_uncond, refs, ref_mask, static=static,
               model_fn=lambda: nnx.merge(graphdef, state), cache_params=cache_params)


def sample_traced(denoise_fn: DenoiseFn, noise: jax.Array, text_cond: jax.Array, text_uncond: jax.Array | None,
                  refs: jax.Array | None, ref_mask: jax.Array | None, *, cfg: ml_collections.ConfigDict) -> jax.Array:
  """The denoising loop without its own jit, for callers that trace a bigger program (the exporter)."""
  solver, branches, scales = _static(cfg)
  return _loop(denoise_fn, solver, branches, False, None, _solver_args(cfg), scales, noise, text_cond, text_uncond,
               refs, ref_mask)[0]


def _static(cfg: ml_collections.ConfigDict) -> tuple[solvers.Euler | solvers.UniPC, int, dict[str, np.ndarray]]:
  """The solver and the branch count (static), and the guidance scales (traced: no recompilation per scale)."""
  g_t, g_i = float(cfg.guidance_scale), float(cfg.get('image_guidance_scale', 0.0))
  return solvers.for_config(cfg), guidance.num_branches(g_t, g_i), {'text': np.float32(g_t), 'image': np.float32(g_i)}


def _cache_args(cfg: ml_collections.ConfigDict, calibration: dict[str, Any] | None, calibrate: bool):
  static = caching.static_settings(cfg, calibrate)
  steps = _solver_args(cfg)
  per_step, scalars = caching.params(cfg, len(steps['index']), calibration)
  return static, {**steps, **per_step}, scalars


def sample_fn(denoise_fn: DenoiseFn, noise: jax.Array, text_cond: jax.Array, text_uncond: jax.Array | None = None,
              refs: jax.Array | None = None, ref_mask: jax.Array | None = None, *,
              cfg: ml_collections.ConfigDict, return_trajectory: bool = False,
              on_step: Callable[[Any], None] | None = None, return_stats: bool = False) -> Any:
  """Denoise `noise` (B, F, H, W, C) from σ = 1 to 0 with a plain callable model (see module docstring).

  Of the caches only the CFG cache applies to a plain callable (the step caches need the model's parts).
  """
  solver, branches, scales = _static(cfg)
  if cfg.get('cache', 'none') != 'none' or cfg.get('text_kv_cache', False):
    raise caching.CacheError('sample.cache and sample.text_kv_cache need the NNX model sampler (sample(graphdef, '
                             'state, ...)); a plain denoise_fn only takes the CFG cache')
  static, steps, scalars = _cache_args(cfg, None, False)
  out = _jit_callable(denoise_fn, solver, branches, bool(return_trajectory), on_step, static, steps, scalars,
                      scales, noise, text_cond, text_uncond, refs, ref_mask)
  return _finish(out, return_trajectory, return_stats)


def sample(graphdef: nnx.GraphDef, state: nnx.State, noise: jax.Array, text_cond: jax.Array,
           text_uncond: jax.Array | None = None, refs: jax.Array | None = None,
           ref_mask: jax.Array | None = None, *, cfg: ml_collections.ConfigDict,
           return_trajectory: bool = False, on_step: Callable[[Any], None] | None = None,
           return_stats: bool = False, calibration: dict[str, Any] | None = None, calibrate: bool = False) -> Any:
  """Denoise `noise` with an NNX model given as `nnx.split(model)` (weights are a jit argument).

  `on_step(i)` (a hashable callable, e.g. a bound method) is called on the host as step i starts. The caches of
  `cfg` (caching.py) apply; `calibration` is the step-cache calibration record (caching.load_calibration) that
  magcache / teacache need. `calibrate=True` runs uncached and returns the per-step statistics in the stats.
  `return_stats=True` adds a dict: model_calls (block passes per video), step_calls (per step) [, calibration].
  """
  solver, branches, scales = _static(cfg)
  if calibrate:
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.cache, cfg.cfg_cache = 'none', False
  static, steps, scalars = _cache_args(cfg, calibration, calibrate)
  out = _jit_nnx(graphdef, state, solver, branches, bool(return_trajectory), on_step, static, steps, scalars,
                 scales, noise, text_cond, text_uncond, refs, ref_mask)
  return _finish(out, return_trajectory, return_stats or calibrate)
