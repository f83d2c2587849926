"""Sigma grids and solver coefficients for the flow-matching samplers (numpy, computed once per call).

Both grids start from a linear ramp in σ ∈ (0, 1] and apply Kaleido's / Wan's shift
σ' = s·σ / (1 + (s − 1)·σ). They reproduce, value for value in float32, what diffusers hands to Wan's
pipeline, so our samplers can be checked step by step against diffusers:

* Euler (`FlowMatchEulerDiscreteScheduler(shift=s)`, `set_timesteps(n)`): the scheduler's training grid
  is 1000 values σ_k = k/1000 already shifted (float32), and inference takes n points linearly spaced
  (float64) between its first and last entry, divided by 1000 and shifted *again* — so the last sigma is
  the shift applied twice to 1/1000. Timesteps = 1000·σ (float32); a terminal σ = 0 is appended.
* Kaleido (upstream zai-org/Kaleido's sampler, `hunyuan_schedule: True`, checked at 4c6c757): Euler on
  σ_k = shift(u_k), u = linspace(1, 0, n + 1) — the shift applied once to a uniform grid that ends at 0, so
  the last step runs from σ = s/(n + s − 1) (0.125 for s = 7, n = 50) to 0, where diffusers' Euler grid
  (shifted twice at the low end) ends at 0.047. Timesteps = 1000·σ.
* UniPC (`UniPCMultistepScheduler(prediction_type='flow_prediction', use_flow_sigmas=True,
  flow_shift=s, final_sigmas_type='zero')`): n points of linspace(1, 1/1000, n + 1)[:-1] (float64), shifted
  once; a first σ of exactly 1 is nudged down by 1e-6 (so log(1 − σ) stays finite); timesteps are
  1000·σ **truncated to integers** (diffusers stores them as int64 and Wan's pipeline feeds those to the
  transformer); a terminal σ = 0 is appended and the whole grid is cast to float32.

Public API:
  shift_sigmas_np(sigmas, shift) -> np.ndarray
  Schedule(sigmas (n + 1,) float32, timesteps (n,) float32)
  euler_schedule(num_steps, shift, num_train_timesteps=1000) -> Schedule
  unipc_schedule(num_steps, shift, num_train_timesteps=1000) -> Schedule
  kaleido_schedule(num_steps, shift, num_train_timesteps=1000) -> Schedule
  explicit_schedule(timesteps, shift=1, solver='euler') -> Schedule   an explicit list of model timesteps
  make_schedule(solver, num_steps, shift, timesteps=()) -> Schedule   solver: 'euler' | 'unipc' | 'kaleido'
  unipc_coefficients(sigmas, order=2, solver_type='bh2') -> dict of (n,) float32 arrays
    The UniPC-BH predictor/corrector (Zhao et al. 2023, data-prediction form, as in diffusers'
    `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update` with `lower_order_final=True`) reduced to
    per-step scalars, so the jitted loop only does multiply-adds (see sampler.py for the update).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

SOLVERS = ('euler', 'unipc', 'kaleido')  # 'kaleido': Euler steps on upstream Kaleido's grid


class Schedule(NamedTuple):
  """`sigmas` has one more entry than `timesteps` (the terminal σ = 0)."""
  sigmas: np.ndarray
  timesteps: np.ndarray


def shift_sigmas_np(sigmas: np.ndarray, shift: float) -> np.ndarray:
  """σ' = s·σ / (1 + (s − 1)·σ) in the input's dtype (same map as flow.shift_sigmas)."""
  sigmas = np.asarray(sigmas)
  s = np.asarray(shift, sigmas.dtype)
  one = np.asarray(1.0, sigmas.dtype)
  return s * sigmas / (one + np.asarray(shift - 1.0, sigmas.dtype) * sigmas)


def _check(num_steps: int, shift: float) -> None:
  if int(num_steps) < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}')
  if not shift > 0:
    raise ValueError(f'shift must be > 0, got {shift}')


def euler_schedule(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> Schedule:
  """diffusers FlowMatchEulerDiscreteScheduler(shift).set_timesteps(num_steps), see module docstring."""
  _check(num_steps, shift)
  # Training grid (float32, as the scheduler's __init__ builds it): σ_k = k / T for k = T..1, shifted.
  t32 = np.float32(num_train_timesteps)
  sigma_max = float(shift_sigmas_np(np.float32(num_train_timesteps) / t32, shift))
  sigma_min = float(shift_sigmas_np(np.float32(1.0) / t32, shift))
  # Inference: float64 linspace over timesteps, /T, shifted again, then float32.
  ts = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
  sigmas = shift_sigmas_np(ts / num_train_timesteps, shift).astype(np.float32)
  timesteps = (sigmas * np.float32(num_train_timesteps)).astype(np.float32)
  return Schedule(np.concatenate([sigmas, np.zeros(1, np.float32)]), timesteps)


def unipc_schedule(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> Schedule:
  """diffusers UniPCMultistepScheduler(use_flow_sigmas, flow_shift).set_timesteps(num_steps)."""
  _check(num_steps, shift)
  sigmas = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
  sigmas = shift_sigmas_np(sigmas, shift)
  if abs(sigmas[0] - 1.0) < 1e-6:  # diffusers: keep the first sigma strictly below 1
    sigmas[0] -= 1e-6
  timesteps = np.trunc(sigmas * num_train_timesteps).astype(np.float32)  # int64 cast = truncation
  sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
  return Schedule(sigmas, timesteps)


def kaleido_schedule(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> Schedule:
  """Upstream Kaleido's grid: σ = shift(linspace(1, 0, n + 1)) (float64, then float32); see module docstring."""
  _check(num_steps, shift)
  sigmas = shift_sigmas_np(np.linspace(1.0, 0.0, int(num_steps) + 1), shift).astype(np.float32)
  return Schedule(sigmas, sigmas[:-1] * np.float32(num_train_timesteps))


def explicit_schedule(timesteps, shift: float = 1.0, solver: str = 'euler',
                      num_train_timesteps: int = 1000) -> Schedule:
  """A grid from an explicit list of model timesteps (few-step distilled LoRAs: 1000, 750, 500, 250).

  σ_i = t_i / 1000, shifted when `shift` ≠ 1 (CausVid / LightX2V's `warp_denoising_step` maps their list through
  the shifted training grid); a terminal σ = 0 is appended. For UniPC a first σ of 1 is nudged below 1 as
  diffusers does. Raises ValueError unless the list is strictly decreasing within (0, 1000].
  """
  t = np.asarray([float(x) for x in timesteps], np.float64)
  if t.ndim != 1 or not len(t) or np.any(t <= 0) or np.any(t > num_train_timesteps) or np.any(np.diff(t) >= 0):
    raise ValueError(f'sample.timesteps={tuple(timesteps)}: give model timesteps strictly decreasing within '
                     f'(0, {num_train_timesteps}], e.g. (1000, 750, 500, 250)')
  sigmas = t / num_train_timesteps
  if shift != 1.0:
    sigmas = shift_sigmas_np(sigmas, shift)
  if solver == 'unipc' and abs(sigmas[0] - 1.0) < 1e-6:
    sigmas[0] -= 1e-6
  sigmas = sigmas.astype(np.float32)
  return Schedule(np.concatenate([sigmas, np.zeros(1, np.float32)]), sigmas * np.float32(num_train_timesteps))


def make_schedule(solver: str, num_steps: int, shift: float, timesteps=()) -> Schedule:
  """The grid diffusers uses for `solver` ('euler' | 'unipc'), upstream Kaleido's ('kaleido'), or the explicit `timesteps` when given (their
  `shift` then applies only if the caller asks for it: see explicit_schedule)."""
  if len(timesteps):
    if solver not in SOLVERS:
      raise ValueError(f'unknown solver {solver!r}; expected one of {SOLVERS}')
    return explicit_schedule(timesteps, shift, solver)
  if solver == 'euler':
    return euler_schedule(num_steps, shift)
  if solver == 'unipc':
    return unipc_schedule(num_steps, shift)
  if solver == 'kaleido':
    return kaleido_schedule(num_steps, shift)
  raise ValueError(f'unknown solver {solver!r}; expected one of {SOLVERS}')


def _lambda(sigma: np.ndarray) -> np.ndarray:
  """Half log-SNR for the flow parameterisation: α = 1 − σ, λ = log α − log σ (inf at σ = 0)."""
  with np.errstate(divide='ignore'):
    return np.log(1.0 - sigma) - np.log(sigma)


def unipc_coefficients(sigmas: np.ndarray, order: int = 2, solver_type: str = 'bh2'
                       ) -> dict[str, np.ndarray]:
  """Per-step scalars of UniPC-BH (data prediction, flow sigmas), for n = len(sigmas) − 1 steps.

  With m_i = x_i − σ_i·v_i the data prediction at step i, the loop does (all coefficients per step i):
    corrector (i ≥ 1):  x_i ← c_a·x_{i−1}' − c_m·m_{i−1} − c_f·(m_{i−2} − m_{i−1}) − c_g·(m_i − m_{i−1})
                        where x_{i−1}' is the (corrected) sample the previous predictor started from;
    predictor:          x_{i+1} = p_a·x_i − p_m·m_i − p_f·(m_{i−1} − m_i).
  Orders follow diffusers with lower_order_final=True: step 0 and the last step are first order; the
  corrector at step i uses the order of the predictor at step i − 1. Unused terms have coefficient 0.
  """
  if order not in (1, 2):
    raise ValueError(f'UniPC order must be 1 or 2, got {order}')
  if solver_type != 'bh2':
    # bh1 (B(h) = h) is not offered: with a terminal σ = 0, diffusers' bh1 multiplies B(h) = −inf by 0.
    raise ValueError(f"only solver_type 'bh2' (Wan's setting) is supported, got {solver_type!r}")
  # diffusers computes these in float32 tensors from the float32 grid; float64 here is within rounding.
  s = np.asarray(sigmas, np.float32).astype(np.float64)
  n = len(s) - 1
  lam = _lambda(s)
  alpha = 1.0 - s
  p_order = np.array([min(order, n - i, i + 1) for i in range(n)])

  def terms(t, s0, s1, k):
    """(a, m, f, g) of the BH update from σ_s0 to σ_t, order k, with the older point σ_s1."""
    h = lam[t] - lam[s0]
    hh = -h
    with np.errstate(invalid='ignore', divide='ignore'):
      h_phi_1 = np.expm1(hh)
      b_h = np.expm1(hh)  # bh2: B(h) = e^h − 1
      a = s[t] / s[s0]
      m = alpha[t] * h_phi_1
      h_phi_k = h_phi_1 / hh - 1.0
      b1 = h_phi_k / b_h
      b2 = (h_phi_k / hh - 0.5) * 2.0 / b_h
      rk = (lam[s1] - lam[s0]) / h if k == 2 else 1.0
    return a, m, alpha[t] * b_h, rk, b1, b2

  coef = {k: np.zeros(n) for k in ('p_a', 'p_m', 'p_f', 'c_a', 'c_m', 'c_f', 'c_g', 'use_corr')}
  for i in range(n):
    k = p_order[i]
    a, m, ab, rk, _, _ = terms(i + 1, i, i - 1, k)
    coef['p_a'][i], coef['p_m'][i] = a, m
    if k == 2:
      coef['p_f'][i] = ab * 0.5 / rk  # diffusers: rhos_p = 0.5 for order 2
    if i >= 1:
      kc = p_order[i - 1]
      a, m, ab, rk, b1, b2 = terms(i, i - 1, i - 2, kc)
      coef['use_corr'][i] = 1.0
      coef['c_a'][i], coef['c_m'][i] = a, m
      if kc == 1:
        coef['c_g'][i] = ab * 0.5  # diffusers: rhos_c = [0.5] for order 1
      else:
        rhos = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
        coef['c_f'][i] = ab * rhos[0] / rk
        coef['c_g'][i] = ab * rhos[1]
  for key, val in coef.items():
    if not np.all(np.isfinite(val)):
      raise ValueError(f'non-finite UniPC coefficient {key}: {val}')
  return {key: val.astype(np.float32) for key, val in coef.items()}
