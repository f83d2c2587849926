"""Context-parallel training is exact: gather / ulysses / ring on 8 CPU devices give the 1-device step.

The sequence is [ref_0 | ref_1 | video] with 63 tokens (2 x 9 reference + 5 x 9 video tokens), which no
context size here divides, so the attention call pads and masks; samples carry 1 or 2 references (a masked
slot). Parameters are sharded over context as well as fsdp. The per-device kernel is `xla` (the CPU's), and
splash in Pallas interpret mode for ring.
"""

import jax
import numpy as np
import pytest

from tests.train.common import tiny_config
from tests.train.test_step import _train


def _config(context_parallel):
  config = tiny_config(real_dit=True)
  config.data.update(height=12, width=12)  # pixel codec / 2, patch 2: 3 x 3 tokens per frame
  config.model.context_parallel = context_parallel
  return config


@pytest.fixture(scope='module')
def single():
  return _train(_config('gather'), {}, jax.devices()[:1], 2)


def _max_param_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(b['params'])))


@pytest.mark.slow
@pytest.mark.parametrize('context_parallel', ['gather', 'ulysses', 'ring'])
@pytest.mark.parametrize('mesh', [dict(data=2, context=4), dict(fsdp=2, context=4)])
def test_context_parallel_step_matches_single_device(single, mesh, context_parallel):
  assert jax.device_count() == 8
  ref_losses, ref_state, _ = single
  losses, state, spec = _train(_config(context_parallel), mesh, jax.devices()[:8], 2)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  diff = _max_param_diff(state, ref_state)
  print(f'{context_parallel} {mesh}: max |param diff| vs 1 device = {diff:.3g}')
  assert diff < 0.03 * 1e-3 * 2  # the tolerance of test_step.test_sharded_step_matches_single_device
  # Weights are sharded over context too (embed -> (context, fsdp)): no context group holds a full copy.
  specs = [str(s.spec) for s in jax.tree.leaves(spec.shardings['params'])]
  assert any('context' in s for s in specs), specs


@pytest.mark.slow
def test_ring_with_the_splash_kernel_matches_single_device(single, monkeypatch):
  # The TPU path (Pallas splash in interpret mode), ring: its backward calls splash's own backward kernels with
  # the merged output and log-sum-exp, key block by key block.
  from kaleido_jax.model import attention
  monkeypatch.setattr(attention, 'SPLASH_INTERPRET', True)
  ref_losses, ref_state, _ = single
  config = _config('ring')
  config.model.attention = 'splash'
  losses, state, _ = _train(config, dict(fsdp=2, context=4), jax.devices()[:8], 2)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert _max_param_diff(state, ref_state) < 0.03 * 1e-3 * 2


def test_ulysses_refuses_heads_that_context_does_not_divide():
  with pytest.raises(ValueError, match="ulysses.*heads per device"):
    _train(_config('ulysses'), dict(data=1, context=8), jax.devices()[:8], 1)
