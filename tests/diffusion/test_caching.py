"""Caches in the one-jit sampler: threshold 0 is the uncached sampler, a positive threshold skips (counted) and
stays close, the CFG cache with period 1 is plain CFG, the text K/V cache changes nothing, and calibration
records what the step caches read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kaleido_jax import config as kcfg
from kaleido_jax.diffusion import caching, sampler
from kaleido_jax.model.dit import KaleidoDiT

STEPS = 12


@pytest.fixture(scope='module')
def setup():
  cfg = kcfg.model_config(num_heads=2, head_dim=16, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=16,
                          in_channels=4, out_channels=4, max_refs=2)
  graphdef, state = nnx.split(KaleidoDiT(cfg, rngs=nnx.Rngs(0)))
  r = np.random.default_rng(1)
  noise = sampler.initial_noise([3, 4], (3, 8, 8, 4))
  text_c = jnp.asarray(r.standard_normal((2, 5, 32)), jnp.float32)
  text_u = jnp.asarray(r.standard_normal((1, 5, 32)), jnp.float32)
  refs = jnp.asarray(r.standard_normal((2, 2, 8, 8, 4)), jnp.float32)
  mask = jnp.array([[True, False], [True, True]])
  return graphdef, state, (noise, text_c, text_u, refs, mask)


def _cfg(**kw):
  return kcfg.sample_config(num_steps=STEPS, shift=5.0, guidance_scale=5.0, **kw)


def _run(setup, cfg, **kw):
  graphdef, state, args = setup
  return sampler.sample(graphdef, state, *args, cfg=cfg, return_stats=True, **kw)


@pytest.fixture(scope='module')
def calibration(setup):
  graphdef, state, args = setup
  _, stats = sampler.sample(graphdef, state, *args, cfg=_cfg(), calibrate=True)
  assert int(stats['model_calls']) == 2 * STEPS
  per_run = {k: np.asarray(stats[k]) for k in ('mag_ratio', 'input_change', 'output_change')}
  return caching.fit_calibration([per_run], num_steps=STEPS, solver='euler', shift=5.0)


@pytest.fixture(scope='module')
def plain(setup):
  return _run(setup, _cfg())


def test_calibration_records_ratios_and_a_fitted_rescaling(calibration, tmp_path):
  assert len(calibration['mag_ratios']) == STEPS and calibration['mag_ratios'][0] == 1.0
  assert all(0.2 < r < 5 for r in calibration['mag_ratios'])
  assert len(calibration['teacache_coefficients']) == caching.TEACACHE_DEGREE + 1
  # The fit maps input change to output change: at the recorded inputs it is close to the recorded outputs.
  x, y = np.array(calibration['input_change'][1:]), np.array(calibration['output_change'][1:])
  assert np.abs(np.polyval(calibration['teacache_coefficients'], x) - y).mean() < 0.5 * np.abs(y).mean()
  path = caching.save_calibration(calibration, str(tmp_path / caching.CALIBRATION_FILE))
  assert caching.load_calibration(path) == calibration


def test_uncached_run_counts_two_calls_per_step(plain):
  _, stats = plain
  assert int(stats['model_calls']) == 2 * STEPS and np.all(np.asarray(stats['step_calls']) == 2)


@pytest.mark.parametrize('kind', ['magcache', 'teacache'])
def test_threshold_zero_is_the_uncached_sampler(setup, plain, calibration, kind):
  out, stats = _run(setup, _cfg(cache=kind, **{f'{kind}_threshold': 0.0}), calibration=calibration)
  assert int(stats['model_calls']) == 2 * STEPS
  np.testing.assert_allclose(np.asarray(out), np.asarray(plain[0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize('kind,threshold', [('magcache', 0.5), ('teacache', 1.0)])
def test_a_positive_threshold_skips_steps_and_stays_close(setup, plain, calibration, kind, threshold):
  out, stats = _run(setup, _cfg(cache=kind, **{f'{kind}_threshold': threshold, f'{kind}_retention': 0.2}),
                    calibration=calibration)
  calls = np.asarray(stats['step_calls'])
  assert int(stats['model_calls']) < 2 * STEPS and int(stats['model_calls']) == calls.sum()
  assert np.all(calls[:2] == 2)  # the retained first 20% of the steps always compute
  if kind == 'teacache':
    assert calls[-1] == 2  # and TeaCache's last step
  ref = np.asarray(plain[0])
  err = np.abs(np.asarray(out) - ref).mean() / np.abs(ref).mean()
  assert 0 < err < 0.25, err


def test_one_compilation_serves_every_threshold(setup, calibration):
  graphdef, state, args = setup
  before = sampler._jit_nnx._cache_size()  # pylint: disable=protected-access
  for t in (0.0, 0.3, 0.9):
    sampler.sample(graphdef, state, *args, cfg=_cfg(cache='magcache', magcache_threshold=t, magcache_max_skip=3),
                   calibration=calibration)
  assert sampler._jit_nnx._cache_size() - before <= 1  # pylint: disable=protected-access


def test_magcache_without_a_calibration_says_how_to_make_one(setup):
  with pytest.raises(caching.CacheError, match='--mode calibrate'):
    _run(setup, _cfg(cache='magcache'))
  with pytest.raises(caching.CacheError, match='choose one of'):
    _run(setup, _cfg(cache='deepcache'))


def test_cfg_cache_period_one_is_plain_cfg_and_period_two_halves_the_uncond_calls(setup, plain):
  out, stats = _run(setup, _cfg(cfg_cache=True, cfg_cache_period=1))
  assert int(stats['model_calls']) == 2 * STEPS
  np.testing.assert_allclose(np.asarray(out), np.asarray(plain[0]), rtol=0, atol=1e-6)
  out2, stats2 = _run(setup, _cfg(cfg_cache=True, cfg_cache_period=2, cfg_cache_start=0.25))
  calls = np.asarray(stats2['step_calls'])
  # 3 full steps first, then full / conditional-only alternating: 3*2 + (2 + 1) * 4 + ... = 21 of 24.
  assert list(calls) == [2, 2, 2] + [2, 1] * 4 + [2]
  ref = np.asarray(plain[0])
  # A random tiny model at guidance 5: close, not equal (the trained demo model is measured in bench/sample.py).
  assert np.abs(np.asarray(out2) - ref).mean() / np.abs(ref).mean() < 0.25


def test_cfg_cache_on_a_plain_callable(setup):
  # A callable denoiser takes the CFG cache too (the step caches need the model's parts and say so).
  # Per row, the text moves the velocity by a constant: v_c − v_u is the same at every step.
  fn = lambda x, t, text, r, m: -0.5 * x + 0.01 * text.mean((1, 2)).reshape(-1, 1, 1, 1, 1)
  noise, text_c, text_u, refs, mask = setup[2]
  a = sampler.sample_fn(fn, noise, text_c, text_u, refs, mask, cfg=_cfg())
  b, stats = sampler.sample_fn(fn, noise, text_c, text_u, refs, mask, cfg=_cfg(cfg_cache=True, cfg_cache_period=3),
                               return_stats=True)
  assert int(stats['model_calls']) < 2 * STEPS
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)  # text enters linearly: exact up to rounding
  with pytest.raises(caching.CacheError, match='NNX model'):
    sampler.sample_fn(fn, noise, text_c, text_u, refs, mask, cfg=_cfg(cache='teacache'))


def test_text_kv_cache_changes_nothing(setup, plain):
  out, stats = _run(setup, _cfg(text_kv_cache=True))
  assert int(stats['model_calls']) == 2 * STEPS
  np.testing.assert_allclose(np.asarray(out), np.asarray(plain[0]), rtol=0, atol=1e-5)


def test_caches_combine(setup, plain, calibration):
  out, stats = _run(setup, _cfg(cache='magcache', magcache_threshold=0.5, cfg_cache=True, text_kv_cache=True),
                    calibration=calibration)
  assert int(stats['model_calls']) < 20
  ref = np.asarray(plain[0])
  assert np.abs(np.asarray(out) - ref).mean() / np.abs(ref).mean() < 0.3


def test_nearest_interp_of_ratios():
  np.testing.assert_array_equal(caching.nearest_interp(np.arange(5.0), 3), [0.0, 2.0, 4.0])
  np.testing.assert_array_equal(caching.nearest_interp(np.arange(3.0), 5), [0.0, 0.0, 1.0, 2.0, 2.0])
  assert jax.numpy.isclose(caching.rel_l1(jnp.ones(4) * 2, jnp.ones(4)), 1.0)
