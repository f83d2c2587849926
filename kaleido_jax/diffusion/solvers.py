"""Flow-matching solvers as small init / step objects the sampler's scan calls.

A solver sees only velocities: guidance and the caches (guidance.py, caching.py) make ``v`` and never touch the
solver's state; the solver never knows how ``v`` was made. Its per-step arrays (from the σ grid, numpy) ride in
the scan's ``xs`` next to the index, timestep and σ, so a shift change does not recompile.

  euler    x_{i+1} = x_i + (σ_{i+1} − σ_i)·v_i           (FlowMatchEulerDiscreteScheduler; on diffusers' grid
           for 'euler', on upstream Kaleido's for 'kaleido': schedules.py)
  unipc    UniPC-BH2 multistep, order 2, data prediction m_i = x_i − σ_i·v_i, corrector on every step but the
           first, first-order last step (UniPCMultistepScheduler, flow_prediction, use_flow_sigmas,
           lower_order_final); coefficients from schedules.unipc_coefficients.
Both are checked step by step against diffusers in tests/diffusion/test_sampler.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kaleido_jax.diffusion import schedules


@dataclasses.dataclass(frozen=True)
class Euler:
  """State: the sample itself."""

  def step_args(self, sigmas: np.ndarray) -> dict[str, np.ndarray]:
    del sigmas
    return {}

  def init(self, x0: jax.Array) -> Any:
    return x0

  def current(self, state: Any) -> jax.Array:
    return state

  def step(self, state: Any, v: jax.Array, s: dict[str, jax.Array]) -> Any:
    return state + s['dt'] * v


@dataclasses.dataclass(frozen=True)
class UniPC:
  """State: (sample, the last uncorrected sample, the last two data predictions)."""
  order: int = 2

  def step_args(self, sigmas: np.ndarray) -> dict[str, np.ndarray]:
    return schedules.unipc_coefficients(sigmas, order=self.order)

  def init(self, x0: jax.Array) -> Any:
    zeros = jnp.zeros_like(x0)
    return (x0, x0, zeros, zeros)

  def current(self, state: Any) -> jax.Array:
    return state[0]

  def step(self, state: Any, v: jax.Array, s: dict[str, jax.Array]) -> Any:
    x, last, m1, m2 = state
    m = x - s['sigma'] * v  # data prediction from the uncorrected sample
    corrected = s['c_a'] * last - s['c_m'] * m1 - s['c_f'] * (m2 - m1) - s['c_g'] * (m - m1)
    x = jnp.where(s['use_corr'] > 0, corrected, x)
    return (s['p_a'] * x - s['p_m'] * m - s['p_f'] * (m1 - m), x, m, m1)


def for_config(cfg: ml_collections.ConfigDict) -> Euler | UniPC:
  """The solver of a `sample` config (``sample.solver``; UniPC's order from ``sample.unipc_order``)."""
  if cfg.solver not in schedules.SOLVERS:
    raise ValueError(f'unknown solver {cfg.solver!r}; expected one of {schedules.SOLVERS}')
  return UniPC(int(cfg.get('unipc_order', 2))) if cfg.solver == 'unipc' else Euler()
