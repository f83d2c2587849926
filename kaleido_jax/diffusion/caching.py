"""Fewer DiT calls per video inside the one-jit sampler: step caches (MagCache, TeaCache), a CFG cache, a text
K/V cache, and the calibration the step caches read.

**Step caches** (``sample.cache``). A step whose DiT blocks are skipped reuses the residual ``blocks(x) − x`` of
the last computed step (the embedding and the head still run: they are ~1% of a 14B step). The decision is data
inside the ``lax.scan`` (a ``lax.cond`` around the blocks), so one compilation serves every threshold:
- ``magcache`` (Ma et al. 2025, MagCache4Wan2.1): per-step magnitude ratios γ_t = mean over tokens of
  ‖r_t‖ / ‖r_{t−1}‖, calibrated once per model. At step t (after the first ``retention`` fraction of steps):
  ratio ← ratio·γ_t, err ← err + |1 − ratio|, skipped ← skipped + 1; skip while err < threshold and
  skipped ≤ K, else compute and reset (ratio 1, err 0, skipped 0). Their Wan2.1 defaults: threshold 0.12,
  K = 2, retention 0.2; calibrated ratios of another step count are nearest-interpolated.
- ``teacache`` (Liu et al. 2025): the relative L1 change of the first block's modulated input between
  consecutive steps, mapped through a polynomial fitted once per model (output change vs input change),
  accumulates; skip while the sum stays below the threshold, else compute and reset it. The first
  ``retention`` fraction and the last step always compute.
**CFG cache** (``sample.cfg_cache``, FasterCache-style): on a full-guidance step the differences
``v_c − v_b`` of the conditional and each other branch are kept; the next ``cfg_cache_period − 1`` steps run
only the conditional branch and rebuild the others as ``v_c − Δ_b``, then guide as usual. Period 1 is plain CFG.
**Text K/V cache** (``sample.text_kv_cache``): every block's cross-attention keys / values of the prompt are
computed once before the loop instead of at every step (same numbers).

``model_calls`` counts block passes per video: a computed step adds its branch count (batched branches count
one each), a skipped step adds 0.

Calibration (``python -m kaleido_jax.main --mode calibrate``, kaleido_jax/cli/calibrate.py) runs the uncached sampler,
records per step γ_t and TeaCache's input / output changes, and writes :data:`CALIBRATION_FILE` next to the
weights (the workdir); :func:`load_calibration` reads it when sampling.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kaleido_jax import storage

CACHES = ('none', 'magcache', 'teacache')
CALIBRATION_FILE = 'step_cache.json'
TEACACHE_DEGREE = 4   # TeaCache fits a degree-4 polynomial (their Wan2.1 coefficients have 5 terms)


class CacheError(ValueError):
  """A cache setting the sampler cannot use; the message names the key and the fix."""


class Static(NamedTuple):
  """What changes the program (static jit arguments); thresholds and periods are traced (cache_params)."""
  kind: str = 'none'
  cfg_cache: bool = False
  text_kv: bool = False
  calibrate: bool = False

  @property
  def active(self) -> bool:
    return self.kind != 'none' or self.cfg_cache or self.text_kv or self.calibrate


def static_settings(cfg: ml_collections.ConfigDict, calibrate: bool = False) -> Static:
  kind = cfg.get('cache', 'none')
  if kind not in CACHES:
    raise CacheError(f'sample.cache={kind!r}; choose one of {CACHES}')
  return Static(kind=kind, cfg_cache=bool(cfg.get('cfg_cache', False)), text_kv=bool(cfg.get('text_kv_cache', False)),
                calibrate=bool(calibrate))


def nearest_interp(values: np.ndarray, length: int) -> np.ndarray:
  """``values`` resampled to ``length`` entries by nearest index (MagCache's rule for another step count)."""
  values = np.asarray(values, np.float32)
  if length == 1:
    return values[-1:]
  idx = np.round(np.arange(length) * (len(values) - 1) / (length - 1)).astype(int)
  return values[idx]


def load_calibration(path: str) -> dict[str, Any]:
  return storage.read_json(path)


def calibration_path(cfg: ml_collections.ConfigDict, workdir: str | None) -> str:
  """``sample.cache_calibration``, else WORKDIR/step_cache.json."""
  path = cfg.get('cache_calibration', '')
  return path or storage.join(workdir or '.', CALIBRATION_FILE)


def params(cfg: ml_collections.ConfigDict, num_steps: int, calibration: dict[str, Any] | None
           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(per-step arrays, scalars) the jitted loop takes for ``cfg``'s caches; CacheError when one cannot run."""
  kind = cfg.get('cache', 'none')
  per_step: dict[str, np.ndarray] = {}
  scalars: dict[str, np.ndarray] = {
      'threshold': np.float32(0.0), 'max_skip': np.int32(0), 'retain': np.int32(num_steps),
      'coeffs': np.zeros(TEACACHE_DEGREE + 1, np.float32),
      'cfg_period': np.int32(max(1, int(cfg.get('cfg_cache_period', 2)))),
      'cfg_start': np.int32(round(float(cfg.get('cfg_cache_start', 0.2)) * num_steps)),
  }
  if kind == 'magcache':
    ratios = _calibrated(calibration, 'mag_ratios', cfg)
    per_step['mag_ratio'] = nearest_interp(ratios, num_steps) if len(ratios) != num_steps else np.asarray(
        ratios, np.float32)
    scalars.update(threshold=np.float32(cfg.magcache_threshold), max_skip=np.int32(cfg.magcache_max_skip),
                   retain=np.int32(round(float(cfg.magcache_retention) * num_steps)))
  elif kind == 'teacache':
    coeffs = np.asarray(_calibrated(calibration, 'teacache_coefficients', cfg), np.float32)
    scalars.update(threshold=np.float32(cfg.teacache_threshold),
                   retain=np.int32(round(float(cfg.teacache_retention) * num_steps)),
                   coeffs=np.pad(coeffs, (TEACACHE_DEGREE + 1 - len(coeffs), 0)))
  if kind != 'none' and float(scalars['threshold']) < 0:
    raise CacheError(f'sample.{kind}_threshold must be >= 0, got {float(scalars["threshold"])}')
  return per_step, scalars


def _calibrated(calibration: dict[str, Any] | None, key: str, cfg: ml_collections.ConfigDict) -> list[float]:
  if not calibration or key not in calibration:
    raise CacheError(f'sample.cache={cfg.cache!r} needs a calibration with {key!r}: run `python -m kaleido_jax.main '
                     '--mode calibrate` with this model (it writes step_cache.json to the workdir) or point '
                     'sample.cache_calibration at one')
  return list(calibration[key])


# --------------------------------------------------------------------------------------------------
# Traced pieces of the loop
# --------------------------------------------------------------------------------------------------


def init_state(rows: int, tokens: int, dim: int, dtype, v_shape: tuple[int, ...], branches: int,
               static: Static) -> dict[str, jax.Array]:
  """The cache carry of the step scan (zeros: nothing cached yet)."""
  f32 = jnp.float32
  state: dict[str, jax.Array] = {'calls': jnp.zeros((), jnp.int32), 'have': jnp.zeros((), bool)}
  if static.kind != 'none' or static.calibrate:
    state['residual'] = jnp.zeros((rows, tokens, dim), dtype)
  if static.kind == 'magcache':
    state.update(ratio=jnp.ones((), f32), err=jnp.zeros((), f32), skipped=jnp.zeros((), jnp.int32))
  if static.kind == 'teacache' or static.calibrate:
    state.update(prev_input=jnp.zeros((rows, tokens, dim), dtype), acc=jnp.zeros((), f32))
  if static.cfg_cache and branches > 1:
    state['cfg_delta'] = jnp.zeros((branches - 1,) + v_shape, f32)
  return state


def rel_l1(new: jax.Array, old: jax.Array) -> jax.Array:
  """mean |new − old| / mean |old| (TeaCache's change measure), float32."""
  new, old = new.astype(jnp.float32), old.astype(jnp.float32)
  return jnp.mean(jnp.abs(new - old)) / jnp.maximum(jnp.mean(jnp.abs(old)), 1e-12)


def magnitude_ratio(new: jax.Array, old: jax.Array) -> jax.Array:
  """mean over tokens of ‖new‖ / ‖old‖ (MagCache's γ), float32."""
  n = jnp.linalg.norm(new.astype(jnp.float32), axis=-1)
  o = jnp.linalg.norm(old.astype(jnp.float32), axis=-1)
  return jnp.mean(n / jnp.maximum(o, 1e-12))


def magcache_decide(state: dict, i: jax.Array, ratio_t: jax.Array, p: dict) -> tuple[jax.Array, dict]:
  """(skip, updated accumulators) for step i (see the module docstring)."""
  ratio = state['ratio'] * ratio_t
  err = state['err'] + jnp.abs(1.0 - ratio)
  skipped = state['skipped'] + 1
  skip = state['have'] & (i >= p['retain']) & (err < p['threshold']) & (skipped <= p['max_skip'])
  return skip, {'ratio': jnp.where(skip, ratio, 1.0), 'err': jnp.where(skip, err, 0.0),
                'skipped': jnp.where(skip, skipped, 0)}


def teacache_decide(state: dict, i: jax.Array, change: jax.Array, last: jax.Array, p: dict
                    ) -> tuple[jax.Array, dict]:
  acc = state['acc'] + jnp.polyval(p['coeffs'], change)
  skip = state['have'] & (i >= p['retain']) & (i < last) & (acc < p['threshold'])
  return skip, {'acc': jnp.where(skip, acc, 0.0)}


def cached_blocks(m, args, rows: int, cs: dict, s: dict, *, static: Static, p: dict, text_kv, num_steps: int,
                  batch: int) -> tuple[jax.Array, dict, dict]:
  """One DiT pass (``m``: the merged KaleidoDiT) over ``rows`` batch rows under the step cache: (velocity, cache
  state, per-step statistics). A skipped step adds the last computed residual instead of running the blocks."""
  emb = m.embed(*args)
  kv = None if text_kv is None else jax.tree.map(lambda a: a[:, :rows], text_kv)
  x_in = emb['tokens']

  def run():
    return m.run_blocks(x_in, emb['mod'], emb['text'], emb['rope'], emb['mask'], kv)

  new, stats = dict(cs), {}
  if static.kind == 'none' and not static.calibrate:
    out, computed = run(), jnp.ones((), bool)
  else:
    skip = jnp.zeros((), bool)
    if 'prev_input' in cs:
      inp = m.modulated_input(emb).astype(cs['prev_input'].dtype)
      change = rel_l1(inp, cs['prev_input'][:rows])
      new['prev_input'] = cs['prev_input'].at[:rows].set(inp)
    if static.kind == 'magcache':
      skip, acc = magcache_decide(cs, s['index'], s['mag_ratio'], p)
      new.update(acc)
    elif static.kind == 'teacache':
      skip, acc = teacache_decide(cs, s['index'], change, num_steps - 1, p)
      new.update(acc)
    prev = cs['residual'][:rows]

    def computed_blocks():
      out = run()
      return out, (out - x_in).astype(prev.dtype)

    out, res = jax.lax.cond(skip, lambda: ((x_in + prev).astype(x_in.dtype), prev), computed_blocks)
    new['residual'] = cs['residual'].at[:rows].set(res)
    computed = ~skip
    if static.calibrate:
      have = cs['have']
      stats = {'mag_ratio': jnp.where(have, magnitude_ratio(res, prev), 1.0),
               'input_change': jnp.where(have, change, 0.0),
               'output_change': jnp.where(have, rel_l1(res, prev), 0.0)}
  new['have'] = jnp.ones((), bool)
  new['calls'] = cs['calls'] + jnp.where(computed, rows // batch, 0).astype(jnp.int32)
  return m.head(out, emb), new, stats


def cfg_full_step(i: jax.Array, p: dict) -> jax.Array:
  """Whether step i runs every guidance branch (else only the conditional one, from the cached differences)."""
  return (p['cfg_period'] <= 1) | (i < p['cfg_start']) | ((i - p['cfg_start']) % p['cfg_period'] == 0)


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------


def fit_calibration(stats: list[dict[str, np.ndarray]], *, num_steps: int, solver: str, shift: float,
                    what: str = '') -> dict[str, Any]:
  """The calibration record from the per-step statistics of one or more uncached runs.

  ``stats`` items: 'mag_ratio' (n,) γ_t (γ_0 = 1), 'input_change' / 'output_change' (n,) TeaCache's relative L1
  changes of the modulated input and of the blocks' residual (entry 0 unused). Ratios are averaged over runs;
  the TeaCache polynomial is a least-squares fit of output change on input change over every run's steps 1..n−1.
  """
  mag = np.mean([np.asarray(s['mag_ratio'], np.float64) for s in stats], axis=0)
  x = np.concatenate([np.asarray(s['input_change'], np.float64)[1:] for s in stats])
  y = np.concatenate([np.asarray(s['output_change'], np.float64)[1:] for s in stats])
  degree = int(min(TEACACHE_DEGREE, max(len(x) - 1, 0)))
  coeffs = np.polyfit(x, y, degree) if len(x) > degree else np.array([1.0, 0.0])
  return {'num_steps': int(num_steps), 'solver': solver, 'shift': float(shift), 'runs': len(stats), 'what': what,
          'mag_ratios': [round(float(v), 6) for v in mag],
          'teacache_coefficients': [float(c) for c in coeffs],
          'input_change': [round(float(v), 6) for v in np.mean([s['input_change'] for s in stats], axis=0)],
          'output_change': [round(float(v), 6) for v in np.mean([s['output_change'] for s in stats], axis=0)]}


def save_calibration(record: dict[str, Any], path: str) -> str:
  storage.path(path).parent.mkdir(parents=True, exist_ok=True)
  storage.write_bytes(path, json.dumps(record, indent=1).encode())
  return path
