"""Classifier-free guidance: exact combination, one batched call == separate calls, references in all branches."""

import jax.numpy as jnp
import numpy as np
import pytest

from kaleido_jax import config as kcfg
from kaleido_jax.diffusion import guidance, sampler

B, N = 2, 3


def _inputs(seed=0):
  r = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
  return dict(x=f(B, 2, 4, 4, 3), t=jnp.array([700.0, 700.0]), text_c=f(B, 5, 6), text_u=f(1, 5, 6),
              refs=f(B, N, 4, 4, 3), mask=jnp.array([[True, True, False], [True, False, False]]))


class _Recorder:
  """A deterministic nonlinear stand-in model that records the batches it was called with."""

  def __init__(self):
    self.calls = []

  def __call__(self, x, t, text, refs, ref_mask):
    self.calls.append((x, t, text, refs, ref_mask))
    v = jnp.tanh(x) * 0.3 + jnp.sin(t / 300.0).reshape(-1, 1, 1, 1, 1)
    v = v + jnp.cos(text.sum((1, 2))).reshape(-1, 1, 1, 1, 1)
    if refs is not None:
      w = ref_mask.astype(x.dtype)[:, :, None, None, None]
      v = v + jnp.tanh((refs * w).sum(1)).mean((1, 2))[:, None, None, None, :]
    return v


def test_combine_formulas():
  r = np.random.default_rng(0)
  vc, vu, vn = (r.standard_normal((2, 3)) for _ in range(3))
  np.testing.assert_allclose(guidance.combine(vc, vu, None, 6.0, 0.0), vu + 6.0 * (vc - vu), rtol=1e-12)
  np.testing.assert_allclose(guidance.combine(vc, vu, vn, 5.0, 1.5),
                             vu + 5.0 * (vc - vu) + 1.5 * (vu - vn), rtol=1e-12)
  # == InstructPix2Pix two-scale guidance with s_I = 1 + g_i.
  np.testing.assert_allclose(guidance.combine(vc, vu, vn, 5.0, 1.5),
                             vn + 2.5 * (vu - vn) + 5.0 * (vc - vu), rtol=1e-12)
  np.testing.assert_allclose(guidance.combine(vc, vu, None, 1.0, 0.0), vc, rtol=1e-12)
  np.testing.assert_array_equal(guidance.combine(vc, None, None, 6.0, 0.0), vc)
  assert [guidance.num_branches(g, i) for g, i in [(1.0, 0.0), (6.0, 0.0), (1.0, 2.0), (5.0, 1.0)]] == \
      [1, 2, 3, 3]


@pytest.mark.parametrize('text_scale,image_scale', [(6.0, 0.0), (5.0, 1.5), (1.0, 2.0)])
def test_batched_call_equals_separate_calls(text_scale, image_scale):
  d = _inputs()
  model = _Recorder()
  v = guidance.guided_velocity(model, d['x'], d['t'], d['text_c'], d['text_u'], d['refs'], d['mask'],
                               text_scale=text_scale, image_scale=image_scale)
  branches = guidance.num_branches(text_scale, image_scale)
  assert len(model.calls) == 1  # all branches in one model call
  x, t, text, refs, mask = model.calls[0]
  assert x.shape[0] == t.shape[0] == text.shape[0] == refs.shape[0] == mask.shape[0] == branches * B
  # Same references (and mask) in the conditional and unconditional branches; none in the third.
  np.testing.assert_array_equal(np.asarray(refs[:B]), np.asarray(refs[B:2 * B]))
  np.testing.assert_array_equal(np.asarray(mask[:B]), np.asarray(d['mask']))
  np.testing.assert_array_equal(np.asarray(mask[B:2 * B]), np.asarray(d['mask']))
  if branches == 3:
    assert not np.asarray(mask[2 * B:]).any()
  # Separate, unbatched calls with the documented formula.
  text_u = jnp.broadcast_to(d['text_u'], d['text_c'].shape)
  vc = model(d['x'], d['t'], d['text_c'], d['refs'], d['mask'])
  vu = model(d['x'], d['t'], text_u, d['refs'], d['mask'])
  vn = model(d['x'], d['t'], text_u, d['refs'], jnp.zeros_like(d['mask']))
  expect = vu + text_scale * (vc - vu) + image_scale * (vu - vn)
  np.testing.assert_allclose(np.asarray(v), np.asarray(expect), rtol=1e-6, atol=1e-6)


def test_guidance_one_is_a_single_unguided_branch():
  d = _inputs()
  model = _Recorder()
  v = guidance.guided_velocity(model, d['x'], d['t'], d['text_c'], d['text_u'], d['refs'], d['mask'],
                               text_scale=1.0)
  assert len(model.calls) == 1 and model.calls[0][0].shape[0] == B  # no doubled batch
  np.testing.assert_array_equal(np.asarray(v), np.asarray(model(d['x'], d['t'], d['text_c'], d['refs'],
                                                                 d['mask'])))
  # Through the sampler: guidance 1 with a negative prompt == no negative prompt at all.
  cfg = kcfg.sample_config(solver='euler', num_steps=4, shift=7.0, guidance_scale=1.0)
  a = sampler.sample_fn(model, d['x'], d['text_c'], d['text_u'], d['refs'], d['mask'], cfg=cfg)
  b = sampler.sample_fn(model, d['x'], d['text_c'], None, d['refs'], d['mask'], cfg=cfg)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cfg_sampler_equals_manual_guided_euler_loop():
  d = _inputs(1)
  model = _Recorder()
  cfg = kcfg.sample_config(solver='euler', num_steps=5, shift=7.0, guidance_scale=6.0)
  out = sampler.sample_fn(model, d['x'], d['text_c'], d['text_u'], d['refs'], d['mask'], cfg=cfg)
  from kaleido_jax.diffusion import schedules
  sch = schedules.euler_schedule(5, 7.0)
  x = d['x']
  text_u = jnp.broadcast_to(d['text_u'], d['text_c'].shape)
  for i in range(5):
    t = jnp.full((B,), sch.timesteps[i])
    vc = model(x, t, d['text_c'], d['refs'], d['mask'])
    vu = model(x, t, text_u, d['refs'], d['mask'])
    x = x + (sch.sigmas[i + 1] - sch.sigmas[i]) * (vu + 6.0 * (vc - vu))
  np.testing.assert_allclose(np.asarray(out), np.asarray(x), rtol=1e-5, atol=1e-5)


def test_guidance_without_references_and_errors():
  d = _inputs()
  model = _Recorder()
  v = guidance.guided_velocity(model, d['x'], d['t'], d['text_c'], d['text_u'], None, None, text_scale=6.0)
  assert model.calls[0][3] is None and model.calls[0][4] is None and model.calls[0][0].shape[0] == 2 * B
  assert v.shape == d['x'].shape
  with pytest.raises(ValueError, match='image guidance needs references'):
    guidance.guided_velocity(model, d['x'], d['t'], d['text_c'], d['text_u'], None, None,
                             text_scale=6.0, image_scale=1.0)
  with pytest.raises(ValueError, match='text_uncond'):
    guidance.guided_velocity(model, d['x'], d['t'], d['text_c'], None, d['refs'], d['mask'], text_scale=6.0)
