"""The analytic FLOP count against the matmuls a traced step actually runs (flops.matmul_census)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kaleido_jax import config as kcfg
from kaleido_jax.model.dit import REMAT_POLICIES, KaleidoDiT
from kaleido_jax.train import flops

TINY = dict(num_heads=2, head_dim=16, in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64,
            num_layers=2)
B, F, H, W, T, REFS = 2, 3, 8, 12, 7, 2


def _model_fns(**overrides):
  cfg = kcfg.model_config(**{**TINY, **overrides})
  graphdef, state = nnx.split(KaleidoDiT(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  video = jnp.asarray(rng.normal(size=(B, F, H, W, 4)), jnp.float32)
  refs = jnp.asarray(rng.normal(size=(B, REFS, 8, 8, 4)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(B, T, 32)), jnp.float32)
  t = jnp.asarray([3.0, 500.0])

  def forward(s):
    return nnx.merge(graphdef, s)(video, t, text, refs=refs)

  step = jax.value_and_grad(lambda s: jnp.mean(forward(s) ** 2))
  return cfg, state, forward, step


def _matrix_flops(census):
  """FLOPs of true matrix products: model/cpu.py writes sums as products with a ones vector (m, n or k = 1)."""
  return sum(m.flops * n for m, n in census.items() if min(m.sizes[1:]) > 1)


def _step_matrix_flops(**overrides):
  _, state, _, step = _model_fns(**overrides)
  return _matrix_flops(flops.matmul_census(step, state))


@pytest.mark.parametrize("scan", [True, False])
def test_forward_census_equals_the_analytic_count(scan):
  cfg, state, forward, _ = _model_fns(scan_layers=scan)
  video_tokens, ref_tokens = flops.tokens((F, H, W), REFS, (8, 8), cfg.patch_size)
  assert _matrix_flops(flops.matmul_census(forward, state)) == B * flops.forward_flops(
      cfg, video_tokens, ref_tokens, T)


def test_train_step_census_is_three_forwards_plus_recompute_minus_input_gradients():
  """Backward = 2 x forward, except: the `xla` attention kernel recomputes its scores (self and cross), and no
  gradient flows into the inputs of the patch embedding and the text and time MLPs' first layers."""
  cfg = kcfg.model_config(**TINY)
  video_tokens, ref_tokens = flops.tokens((F, H, W), REFS, (8, 8), cfg.patch_size)
  length, d = video_tokens + ref_tokens, cfg.num_heads * cfg.head_dim
  forward = flops.forward_flops(cfg, video_tokens, ref_tokens, T)
  recompute = cfg.num_layers * 2 * length * (length + T) * d
  no_input_grad = (2 * length * cfg.in_channels * int(np.prod(cfg.patch_size)) * d + 2 * T * cfg.text_dim * d
                   + 2 * cfg.freq_dim * d)
  expected = B * (3 * forward + recompute - no_input_grad)
  assert _step_matrix_flops() == expected
  assert flops.train_step_flops(cfg, B, video_tokens, ref_tokens, T) == B * 3 * forward


@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_remat_policy_applies_to_both_layer_layouts(policy):
  """scan_layers=False rematerialises exactly what the scanned layers do (it once ignored the policy)."""
  scanned = _step_matrix_flops(scan_layers=True, remat_policy=policy)
  assert _step_matrix_flops(scan_layers=False, remat_policy=policy) == scanned
  no_remat = _step_matrix_flops(remat_policy="none")
  if policy in ("full", "dots_no_batch", "offload"):  # re-run the layers' forward matmuls / attention in the backward
    assert scanned > no_remat
  elif policy == "offload_attention":  # re-runs the layers' matmuls, not attention's forward
    assert no_remat < scanned < _step_matrix_flops(remat_policy="offload")
  else:  # nothing that was saved is recomputed
    assert scanned == no_remat


def test_census_counts_scan_lengths_and_the_larger_cond_branch():
  x = jnp.ones((4, 8))
  w = jnp.ones((8, 8))

  def fn(x, w, flag):
    x, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)
    return jax.lax.cond(flag, lambda x: (x @ w) @ w, lambda x: x @ w, x)

  census = flops.matmul_census(fn, x, w, True)
  assert census == collections.Counter({flops.Matmul((4, 8), (8, 8), (((1,), (0,)), ((), ())), "float32"): 7})
  assert sum(m.flops * n for m, n in census.items()) == 7 * 2 * 4 * 8 * 8


def test_census_refuses_a_matmul_in_a_while_loop():
  fn = lambda x, n: jax.lax.while_loop(lambda c: c[1] < n, lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0]
  with pytest.raises(ValueError, match="while loop"):
    flops.matmul_census(fn, jnp.ones((3, 3)), 4)
