"""Flow-matching objective: interpolation, target, shift, timestep scaling, dropouts, padded refs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kaleido_jax import config as kcfg
from kaleido_jax.diffusion import flow


def _batch(b=3, refs=2, seed=0):
  r = np.random.default_rng(seed)
  return {'video_latents': r.standard_normal((b, 3, 4, 4, 4)).astype(np.float32),
          'ref_latents': r.standard_normal((b, refs, 4, 4, 4)).astype(np.float32),
          'ref_mask': np.array([[True, False], [True, True], [False, False]][:b]),
          'text_embedding': r.standard_normal((b, 5, 8)).astype(np.float32)}


class Recorder:
  """A 'model' that records its inputs and returns a fixed function of the video input only."""

  def __init__(self):
    self.calls = []

  def __call__(self, video, timestep, text, refs=None, ref_mask=None):
    self.calls.append(dict(video=video, timestep=timestep, text=text, refs=refs, ref_mask=ref_mask))
    return 0.5 * video


def test_interpolation_and_target():
  x0 = jnp.arange(6.0).reshape(2, 3)
  eps = jnp.ones((2, 3))
  s = jnp.array([0.0, 0.25])
  xt = flow.interpolate(x0, eps, s)
  np.testing.assert_allclose(xt[0], x0[0])
  np.testing.assert_allclose(xt[1], 0.75 * x0[1] + 0.25)
  np.testing.assert_allclose(flow.velocity_target(x0, eps), eps - x0)
  # The target is the derivative of the path in sigma.
  d = jax.jacfwd(lambda t: flow.interpolate(x0, eps, jnp.full((2,), t)))(0.3)
  np.testing.assert_allclose(d, eps - x0, rtol=1e-6)


def test_shift_formula_and_resolution_mu():
  cfg = kcfg.diffusion_config()
  assert flow.resolution_mu(256, cfg) == pytest.approx(0.5)
  assert flow.resolution_mu(4096, cfg) == pytest.approx(1.15)
  assert flow.resolution_mu(2176, cfg) == pytest.approx(0.825)
  assert flow.resolution_mu(32760, cfg) == pytest.approx(1.15)  # video token counts clamp at the top
  assert flow.resolution_mu(16, cfg) == pytest.approx(0.5)
  s = jnp.linspace(0.0, 1.0, 11)
  np.testing.assert_allclose(flow.shift_sigmas(s, 1.0), s, atol=1e-7)
  shifted = flow.shift_sigmas(s, 7.0)
  np.testing.assert_allclose(shifted, 7 * s / (1 + 6 * s), rtol=1e-6)
  assert shifted[0] == 0 and shifted[-1] == pytest.approx(1.0)
  assert bool(jnp.all(shifted[1:-1] > s[1:-1]))


def test_sample_sigmas_logit_normal_with_shift():
  cfg = kcfg.diffusion_config(use_resolution_shift=False)
  s = flow.sample_sigmas(jax.random.key(0), 20000, cfg)
  assert bool(jnp.all((s > 0) & (s < 1)))
  assert float(jnp.median(s)) == pytest.approx(0.5, abs=0.02)
  cfg = kcfg.diffusion_config()
  s2 = flow.sample_sigmas(jax.random.key(0), 20000, cfg, num_tokens=4096)
  np.testing.assert_allclose(s2, flow.shift_sigmas(s, math.exp(1.15)), rtol=1e-5)
  # Median of the shifted distribution is the shifted median.
  assert float(jnp.median(s2)) == pytest.approx(math.exp(1.15) / (1 + math.exp(1.15)), abs=0.02)


def test_loss_matches_manual_computation_and_timestep_is_1000_sigma():
  cfg = kcfg.diffusion_config(text_dropout=0.0)
  batch = _batch()
  rng = jax.random.key(3)
  model = Recorder()
  loss, aux = flow.flow_matching_loss(model, batch, rng, cfg, patch_size=(1, 2, 2))
  k_sigma, k_noise, _, _ = jax.random.split(rng, 4)
  tokens = 3 * 2 * 2
  sig = flow.sample_sigmas(k_sigma, 3, cfg, tokens)
  eps = jax.random.normal(k_noise, batch['video_latents'].shape)
  x0 = batch['video_latents']
  xt = flow.interpolate(x0, eps, sig)
  want = jnp.mean(jnp.square(0.5 * xt - (eps - x0)))
  assert float(loss) == pytest.approx(float(want), rel=1e-6)
  np.testing.assert_allclose(model.calls[0]['timestep'], 1000.0 * sig, rtol=1e-6)
  np.testing.assert_allclose(model.calls[0]['video'], xt, rtol=1e-6)
  assert aux['per_sample_loss'].shape == (3,)


def test_text_dropout_uses_empty_embedding():
  batch = _batch()
  empty = np.full((5, 8), 7.0, np.float32)
  model = Recorder()
  flow.flow_matching_loss(model, batch, jax.random.key(0), kcfg.diffusion_config(text_dropout=1.0),
                          empty_text=empty)
  np.testing.assert_array_equal(model.calls[0]['text'], np.broadcast_to(empty, (3, 5, 8)))
  model = Recorder()
  flow.flow_matching_loss(model, batch, jax.random.key(0), kcfg.diffusion_config(text_dropout=0.0))
  np.testing.assert_array_equal(model.calls[0]['text'], batch['text_embedding'])
  # p = 0.5 drops about half of a large batch, per sample.
  big = {k: np.repeat(v, 200, axis=0) for k, v in _batch(1).items()}
  model = Recorder()
  flow.flow_matching_loss(model, big, jax.random.key(1), kcfg.diffusion_config(text_dropout=0.5))
  dropped = np.all(np.asarray(model.calls[0]['text']) == 0, axis=(1, 2))
  assert 0.35 < dropped.mean() < 0.65


def test_ref_dropout_only_removes_real_refs():
  batch = _batch()
  model = Recorder()
  flow.flow_matching_loss(model, batch, jax.random.key(0), kcfg.diffusion_config(ref_dropout=1.0))
  assert not np.asarray(model.calls[0]['ref_mask']).any()
  model = Recorder()
  flow.flow_matching_loss(model, batch, jax.random.key(0), kcfg.diffusion_config(ref_dropout=0.0))
  np.testing.assert_array_equal(model.calls[0]['ref_mask'], batch['ref_mask'])


def test_all_refs_dropout_drops_whole_samples():
  """The image-guidance branch's condition: a sample keeps all its references or loses all of them."""
  model = Recorder()
  flow.flow_matching_loss(model, _batch(), jax.random.key(0), kcfg.diffusion_config(all_refs_dropout=1.0))
  assert not np.asarray(model.calls[0]['ref_mask']).any()
  assert not np.asarray(model.calls[0]['refs']).any()  # dropped slots are zeroed like padding
  big = {k: np.repeat(v[1:2], 400, axis=0) for k, v in _batch().items()}  # every sample has 2 real refs
  model = Recorder()
  flow.flow_matching_loss(model, big, jax.random.key(2), kcfg.diffusion_config(all_refs_dropout=0.3))
  mask = np.asarray(model.calls[0]['ref_mask'])
  assert set(map(tuple, mask.tolist())) == {(True, True), (False, False)}  # never one of the two
  assert 0.22 < (~mask[:, 0]).mean() < 0.38
  model = Recorder()
  flow.flow_matching_loss(model, big, jax.random.key(2), kcfg.diffusion_config(all_refs_dropout=0.0))
  assert np.asarray(model.calls[0]['ref_mask']).all()


class RefSensitive(nnx.Module):
  """Output depends on every reference value it receives (mask ignored on purpose)."""

  def __call__(self, video, timestep, text, refs=None, ref_mask=None):
    return video + jnp.mean(refs, axis=(1, 2, 3))[:, None, None, None, :]


def test_padded_reference_slot_never_changes_loss():
  cfg = kcfg.diffusion_config()
  batch = _batch()
  other = dict(batch)
  junk = np.random.default_rng(9).standard_normal(batch['ref_latents'].shape).astype(np.float32) * 100
  other['ref_latents'] = np.where(batch['ref_mask'][:, :, None, None, None], batch['ref_latents'], junk)
  for model in (RefSensitive(), Recorder()):
    a, _ = flow.flow_matching_loss(model, batch, jax.random.key(0), cfg)
    b, _ = flow.flow_matching_loss(model, other, jax.random.key(0), cfg)
    assert float(a) == float(b)
  # A real reference does change it (the test above can fail).
  changed = dict(batch)
  changed['ref_latents'] = batch['ref_latents'] + 1.0
  a, _ = flow.flow_matching_loss(RefSensitive(), batch, jax.random.key(0), cfg)
  c, _ = flow.flow_matching_loss(RefSensitive(), changed, jax.random.key(0), cfg)
  assert float(a) != float(c)


def test_subject_loss_weight_reweights_elements_and_keeps_the_scale():
  batch = _batch()
  rng = jax.random.key(3)
  u = np.zeros((3, 3, 4, 4), np.float32)
  u[:, :, :2, :2] = 2.0  # a small subject in the top-left corner of every frame
  batch['subject_weight'] = u
  plain, _ = flow.flow_matching_loss(Recorder(), batch, rng, kcfg.diffusion_config(text_dropout=0.0))
  cfg = kcfg.diffusion_config(text_dropout=0.0, subject_loss_weight=1.5)
  loss, _ = flow.flow_matching_loss(Recorder(), batch, rng, cfg)
  k_sigma, k_noise, _, _ = jax.random.split(rng, 4)
  sig = flow.sample_sigmas(k_sigma, 3, cfg, 12)
  eps = jax.random.normal(k_noise, batch['video_latents'].shape)
  x0 = batch['video_latents']
  err = jnp.square(0.5 * flow.interpolate(x0, eps, sig) - (eps - x0))
  w = 1.0 + 1.5 * u
  w = w / w.mean(axis=(1, 2, 3), keepdims=True)
  assert float(loss) == pytest.approx(float(jnp.mean(err * w[..., None])), rel=1e-6)
  assert float(loss) != pytest.approx(float(plain), rel=1e-3)
  # A uniform map is no reweighting at all.
  batch['subject_weight'] = np.ones_like(u)
  same, _ = flow.flow_matching_loss(Recorder(), batch, rng, cfg)
  assert float(same) == pytest.approx(float(plain), rel=1e-6)
  del batch['subject_weight']
  with pytest.raises(KeyError, match='subject_weight'):
    flow.flow_matching_loss(Recorder(), batch, rng, cfg)
