"""Solvers are small init / step objects that see only velocities (the sampler's scan composes them with guidance
and the caches): the config picks one, Euler is x + dt·v, and UniPC's first step (no history yet) is Euler's."""

import jax.numpy as jnp
import numpy as np
import pytest

from kaleido_jax import config as kcfg
from kaleido_jax.diffusion import sampler
from kaleido_jax.diffusion import solvers


def test_the_config_picks_the_solver():
  cfg = kcfg.sample_config()
  for name, kind in (('euler', solvers.Euler), ('kaleido', solvers.Euler), ('unipc', solvers.UniPC)):
    cfg.solver = name
    assert isinstance(solvers.for_config(cfg), kind)
  cfg.solver, cfg.unipc_order = 'unipc', 1
  assert solvers.for_config(cfg) == solvers.UniPC(1)  # frozen dataclasses: hashable static jit arguments
  cfg.solver = 'heun'
  with pytest.raises(ValueError, match='unknown solver'):
    solvers.for_config(cfg)


@pytest.mark.parametrize('name', ['euler', 'unipc'])
def test_first_step_is_an_euler_step(name):
  cfg = kcfg.sample_config(solver=name, num_steps=4, shift=3.0)
  steps = sampler._solver_args(cfg)  # pylint: disable=protected-access
  solver = solvers.for_config(cfg)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3)), jnp.float32)
  v = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3)), jnp.float32)
  s0 = {k: jnp.asarray(a[0]) for k, a in steps.items()}
  out = solver.current(solver.step(solver.init(x), v, s0))
  np.testing.assert_allclose(out, x + s0['dt'] * v, rtol=1e-6, atol=1e-6)
