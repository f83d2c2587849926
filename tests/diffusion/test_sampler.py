"""Samplers: sigma grids and every intermediate latent vs diffusers' schedulers, one compile, NNX models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kaleido_jax import config as kcfg
from kaleido_jax.diffusion import sampler, schedules
from kaleido_jax.model.dit import KaleidoDiT

A, B, K = -0.7, 0.9, 0.013  # fake velocity v = A·x + B·sin(K·t) (+ text / refs terms when given)
SHAPE = (2, 3, 4, 4, 4)


def _fake_jax(x, t, text, refs=None, ref_mask=None):
  return A * x + B * jnp.sin(K * t).reshape((-1,) + (1,) * (x.ndim - 1))


def _torch_schedulers():
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  return torch, diffusers


def _diffusers_scheduler(solver, steps, shift):
  _, diffusers = _torch_schedulers()
  if solver == 'euler':
    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
  else:
    # Wan2.1's diffusers scheduler config (Wan-AI/Wan2.1-T2V-*-Diffusers, scheduler_config.json).
    sch = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type='flow_prediction', use_flow_sigmas=True, flow_shift=shift,
        solver_order=2, solver_type='bh2', predict_x0=True, lower_order_final=True,
        final_sigmas_type='zero', timestep_spacing='linspace')
  sch.set_timesteps(steps)
  return sch


def _diffusers_trajectory(solver, steps, shift, noise):
  torch, _ = _torch_schedulers()
  sch = _diffusers_scheduler(solver, steps, shift)
  x = torch.from_numpy(np.asarray(noise))
  traj = []
  for t in sch.timesteps:
    tf = t.to(torch.float32)
    v = A * x + B * torch.sin(K * tf)
    x = sch.step(v, t, x, return_dict=False)[0]
    traj.append(x.numpy().copy())
  return np.stack(traj)


def _cfg(solver, steps, shift, guidance=1.0):
  return kcfg.sample_config(solver=solver, num_steps=steps, shift=shift, guidance_scale=guidance)


@pytest.mark.torch
@pytest.mark.parametrize('solver', ['euler', 'unipc'])
@pytest.mark.parametrize('steps,shift', [(1, 7.0), (2, 3.0), (7, 1.0), (13, 5.0), (50, 7.0)])
def test_schedule_matches_diffusers(solver, steps, shift):
  sch = _diffusers_scheduler(solver, steps, shift)
  ours = schedules.make_schedule(solver, steps, shift)
  np.testing.assert_array_equal(ours.sigmas, sch.sigmas.numpy().astype(np.float32))
  np.testing.assert_array_equal(ours.timesteps, sch.timesteps.numpy().astype(np.float32))
  assert ours.sigmas[-1] == 0 and np.all(np.diff(ours.sigmas) < 0)


@pytest.mark.torch
@pytest.mark.parametrize('solver,steps,shift', [
    ('euler', 50, 7.0), ('euler', 8, 3.0), ('euler', 3, 1.0),
    ('unipc', 50, 5.0), ('unipc', 10, 3.0), ('unipc', 4, 7.0), ('unipc', 2, 1.0), ('unipc', 1, 3.0)])
def test_trajectory_matches_diffusers(solver, steps, shift):
  noise = np.random.default_rng(steps).standard_normal(SHAPE).astype(np.float32)
  ref = _diffusers_trajectory(solver, steps, shift, noise)
  text = jnp.zeros((SHAPE[0], 2, 3))
  final, traj = sampler.sample_fn(_fake_jax, noise, text, cfg=_cfg(solver, steps, shift),
                                  return_trajectory=True)
  assert traj.shape == (steps,) + SHAPE
  scale = np.abs(ref).max(axis=tuple(range(1, ref.ndim)), keepdims=True)
  err = np.abs(np.asarray(traj) - ref) / scale
  assert err.max() < 1e-5, (solver, steps, shift, err.max(axis=tuple(range(1, err.ndim))))
  np.testing.assert_array_equal(np.asarray(final), np.asarray(traj[-1]))


def test_unipc_coefficients_reject_bad_settings():
  sig = schedules.unipc_schedule(5, 3.0).sigmas
  with pytest.raises(ValueError, match='order'):
    schedules.unipc_coefficients(sig, order=3)
  with pytest.raises(ValueError, match='bh2'):
    schedules.unipc_coefficients(sig, solver_type='bh1')
  with pytest.raises(ValueError, match='unknown solver'):
    schedules.make_schedule('ddim', 5, 3.0)
  with pytest.raises(ValueError, match='num_steps'):
    schedules.euler_schedule(0, 3.0)


@pytest.mark.parametrize('solver,order', [('euler', 2), ('unipc', 1), ('unipc', 2)])
def test_straight_path_is_integrated_exactly(solver, order):
  # On the straight flow path x_σ = (1 − σ)·x0 + σ·ε the velocity ε − x0 is constant and the data
  # prediction x − σ·v is x0 at every step, so Euler and UniPC (any order) must end at x_start − σ_0·v.
  r = np.random.default_rng(2)
  eps = jnp.asarray(r.standard_normal(SHAPE), jnp.float32)
  x0 = jnp.asarray(r.standard_normal(SHAPE), jnp.float32)
  fn = lambda x, t, text, refs, mask: jnp.broadcast_to(eps - x0, x.shape)
  cfg = kcfg.sample_config(solver=solver, unipc_order=order, num_steps=9, shift=3.0, guidance_scale=1.0)
  out = sampler.sample_fn(fn, eps, jnp.zeros((2, 1, 1)), cfg=cfg)
  sigma0 = float(schedules.make_schedule(solver, 9, 3.0).sigmas[0])
  np.testing.assert_allclose(np.asarray(out), np.asarray(eps - sigma0 * (eps - x0)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('solver', ['euler', 'unipc'])
def test_one_trace_for_all_steps_and_shifts(solver):
  traces = []

  def fn(x, t, text, refs, mask):
    traces.append(1)  # Python side effect: runs once per trace, never per step
    return -x + jnp.cos(t).reshape(-1, 1, 1, 1, 1)

  noise = jnp.ones(SHAPE)
  text = jnp.zeros((2, 1, 1))
  a = sampler.sample_fn(fn, noise, text, cfg=_cfg(solver, 12, 3.0))
  assert len(traces) == 1
  b = sampler.sample_fn(fn, noise, text, cfg=_cfg(solver, 12, 7.0))  # new shift: same compiled loop
  assert len(traces) == 1
  assert not np.allclose(np.asarray(a), np.asarray(b))
  sampler.sample_fn(fn, noise, text, cfg=_cfg(solver, 5, 3.0))  # new step count: one more trace
  assert len(traces) == 2


class _TinyDiT(nnx.Module):
  """Stand-in with the DiT call signature: conditions on time, text and (masked) references."""

  def __init__(self, c, text_dim, *, rngs):
    self.lin = nnx.Linear(c, c, rngs=rngs)
    self.text = nnx.Linear(text_dim, c, rngs=rngs)

  def __call__(self, video, timestep, text, refs=None, ref_mask=None):
    h = self.lin(video) + jnp.sin(timestep / 100.0).reshape(-1, 1, 1, 1, 1)
    h = h + self.text(text.mean(1))[:, None, None, None, :]
    if refs is not None:
      w = ref_mask.astype(video.dtype)[:, :, None, None, None]
      pooled = (refs * w).sum(1).mean((1, 2)) / jnp.maximum(w.sum(1).reshape(-1, 1), 1.0)
      h = h + 0.5 * pooled[:, None, None, None, :]
    return h


@pytest.mark.parametrize('solver', ['euler', 'unipc'])
def test_nnx_model_matches_callable(solver):
  model = _TinyDiT(4, 6, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  r = np.random.default_rng(1)
  noise = sampler.initial_noise([3, 4], SHAPE[1:])
  text_c = jnp.asarray(r.standard_normal((2, 5, 6)), jnp.float32)
  text_u = jnp.zeros((1, 5, 6))
  refs = jnp.asarray(r.standard_normal((2, 2, 4, 4, 4)), jnp.float32)
  mask = jnp.array([[True, False], [True, True]])
  cfg = kcfg.sample_config(solver=solver, num_steps=6, shift=5.0, guidance_scale=6.0)
  out = sampler.sample(graphdef, state, noise, text_c, text_u, refs, mask, cfg=cfg)
  fn = lambda x, t, text, rr, m: model(x, t, text, refs=rr, ref_mask=m)
  ref = sampler.sample_fn(fn, noise, text_c, text_u, refs, mask, cfg=cfg)
  assert out.shape == SHAPE and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # Guidance and references actually matter.
  plain = sampler.sample(graphdef, state, noise, text_c, text_u, refs, mask,
                         cfg=kcfg.sample_config(solver=solver, num_steps=6, shift=5.0, guidance_scale=1.0))
  assert not np.allclose(np.asarray(out), np.asarray(plain), atol=1e-3)
  other = sampler.sample(graphdef, state, noise, text_c, text_u, refs, jnp.zeros_like(mask), cfg=cfg)
  assert not np.allclose(np.asarray(out), np.asarray(other), atol=1e-3)


def test_initial_noise_per_seed_and_latent_shape():
  a = sampler.initial_noise([7, 8], (2, 3, 3, 4))
  b = sampler.initial_noise([8], (2, 3, 3, 4))
  assert a.shape == (2, 2, 3, 3, 4) and a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[0]))  # independent of the batch
  assert not np.allclose(np.asarray(a[0]), np.asarray(a[1]))
  assert sampler.latent_shape(81, 480, 832) == (21, 60, 104, 16)
  with pytest.raises(ValueError, match='1 \\+ 4k'):
    sampler.latent_shape(80, 480, 832)
  with pytest.raises(ValueError, match='multiples'):
    sampler.latent_shape(81, 481, 832)


def test_nnx_sampler_exports_with_jax_export():
  # The exported sampler (issue 6) wraps `sample` with the weights as a pure-dict argument.
  model = _TinyDiT(4, 6, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  cfg = kcfg.sample_config(solver='unipc', num_steps=4, shift=5.0, guidance_scale=6.0)

  def run(weights, noise, text_c, text_u, refs, mask):
    st = nnx.clone(state)
    nnx.replace_by_pure_dict(st, weights)
    return sampler.sample(graphdef, st, noise, text_c, text_u, refs, mask, cfg=cfg)

  weights = nnx.to_pure_dict(state)
  args = (weights, jnp.ones(SHAPE), jnp.ones((2, 5, 6)), jnp.zeros((1, 5, 6)), jnp.ones((2, 2, 4, 4, 4)),
          jnp.array([[True, False], [True, True]]))
  exported = jax.export.deserialize(jax.export.export(jax.jit(run))(*args).serialize())
  np.testing.assert_allclose(np.asarray(exported.call(*args)), np.asarray(run(*args)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('warp', [False, True])
def test_explicit_timesteps_run_euler_on_that_grid(warp):
  # Few-step distilled LoRAs: 4 model calls at t = 1000, 750, 500, 250 (shifted by 5 when warped), then σ = 0.
  ts = (1000.0, 750.0, 500.0, 250.0)
  cfg = kcfg.sample_config(solver='euler', timesteps=ts, warp_timesteps=warp, shift=5.0, guidance_scale=1.0)
  sched = sampler.step_schedule(cfg)
  sig = np.asarray(ts) / 1000
  if warp:
    sig = 5 * sig / (1 + 4 * sig)
  np.testing.assert_allclose(sched.sigmas, np.concatenate([sig, [0.0]]), rtol=1e-6)
  assert sampler.num_steps(cfg) == 4
  noise = jax.random.normal(jax.random.key(0), SHAPE)
  x = np.asarray(noise, np.float64)
  for i in range(4):  # the Euler update by hand, with the fake velocity
    v = A * x + B * np.sin(K * sched.timesteps[i])
    x = x + (sched.sigmas[i + 1] - sched.sigmas[i]) * v
  out = sampler.sample_fn(_fake_jax, noise, jnp.zeros((2, 1, 1)), cfg=cfg)
  np.testing.assert_allclose(np.asarray(out), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('bad', [(250.0, 500.0), (1200.0, 10.0), (0.0,), (500.0, 500.0)])
def test_bad_explicit_timesteps_are_refused(bad):
  with pytest.raises(ValueError, match='strictly decreasing'):
    sampler.step_schedule(kcfg.sample_config(timesteps=bad))


def test_unipc_takes_an_explicit_grid_starting_at_1000():
  sched = sampler.step_schedule(kcfg.sample_config(solver='unipc', timesteps=(1000.0, 500.0, 100.0)))
  assert sched.sigmas[0] < 1.0 and np.all(np.isfinite(schedules.unipc_coefficients(sched.sigmas)['p_a']))


def test_kaleido_grid_is_upstreams_formula():
  # Upstream Kaleido (hunyuan_schedule, shift_scale 7): σ_k = 7u / (1 + 6u), u = linspace(1, 0, N + 1).
  for n, s in ((50, 7.0), (4, 7.0), (13, 3.0)):
    u = np.linspace(1.0, 0.0, n + 1)
    sched = sampler.step_schedule(kcfg.sample_config(solver='kaleido', num_steps=n, shift=s))
    np.testing.assert_allclose(sched.sigmas, s * u / (1 + (s - 1) * u), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sched.timesteps, 1000 * sched.sigmas[:-1], rtol=1e-6)
  last = sampler.step_schedule(kcfg.sample_config(num_steps=50)).sigmas[-2]
  assert abs(last - 0.125) < 1e-6  # the last step runs from 0.125 (diffusers' Euler grid: from 0.047)
  assert sampler.step_schedule(kcfg.sample_config(solver='euler', num_steps=50, shift=7.0)).sigmas[-2] < 0.05


def test_kaleido_defaults_are_upstreams():
  from configs import kaleido_14b_sample
  for s in (kcfg.sample_config(), kaleido_14b_sample.get_config().sample):
    assert (s.solver, s.num_steps, s.shift, s.guidance_scale) == ('kaleido', 50, 7.0, 6.0)
    assert (s.height, s.width, s.num_frames) == (512, 896, 81)  # sampling_image_size [512, 896], 21 latent frames
    assert s.negative_prompt == kcfg.WAN_NEGATIVE_PROMPT.replace('画得不好的脸部，', '')
    assert '画得不好的脸部' not in s.negative_prompt and '画得不好的手部' in s.negative_prompt


def test_golden_trajectory_of_upstreams_loop():
  """Our sampler with the Kaleido settings, step by step, against upstream's loop written here in NumPy from its
  equations: Euler on σ = 7u/(1+6u), u = linspace(1, 0, N+1); model timestep 1000σ; CFG uncond + s(cond − uncond)
  with the references in both branches."""
  model = KaleidoDiT(kcfg.model_config(num_heads=2, head_dim=16, in_channels=4, out_channels=4, text_dim=6,
                                       freq_dim=16, ffn_dim=32, num_layers=2), rngs=nnx.Rngs(5))
  graphdef, state = nnx.split(model)
  r = np.random.default_rng(2)
  noise = np.asarray(sampler.initial_noise([11, 12], SHAPE[1:]))
  text_c = r.standard_normal((2, 5, 6)).astype(np.float32)
  text_u = r.standard_normal((1, 5, 6)).astype(np.float32)  # the negative prompt's embedding
  refs = r.standard_normal((2, 2, 4, 4, 4)).astype(np.float32)
  mask = np.array([[True, False], [True, True]])
  n, s, g = 6, 7.0, 6.0
  cfg = kcfg.sample_config(num_steps=n)  # the defaults: kaleido grid, shift 7, guidance 6
  cfg.guidance_scale = g
  _, traj = sampler.sample(graphdef, state, jnp.asarray(noise), jnp.asarray(text_c), jnp.asarray(text_u),
                           jnp.asarray(refs), jnp.asarray(mask), cfg=cfg, return_trajectory=True)
  velocity = jax.jit(lambda x, t, text: model(x, t, text, refs=jnp.asarray(refs), ref_mask=jnp.asarray(mask)))
  u = np.linspace(1.0, 0.0, n + 1)
  sigma = s * u / (1.0 + (s - 1.0) * u)
  x = noise.astype(np.float64)
  for k in range(n):
    t = np.full((2,), 1000.0 * sigma[k], np.float32)
    v_c = np.asarray(velocity(jnp.asarray(x, jnp.float32), t, jnp.asarray(text_c)), np.float64)
    v_u = np.asarray(velocity(jnp.asarray(x, jnp.float32), t, jnp.asarray(np.repeat(text_u, 2, 0))), np.float64)
    x = x + (sigma[k + 1] - sigma[k]) * (v_u + g * (v_c - v_u))
    scale = max(1.0, float(np.abs(x).max()))
    np.testing.assert_allclose(np.asarray(traj[k]), x, rtol=0, atol=2e-5 * scale, err_msg=f'step {k}')
