"""KaleidoDiT equals diffusers' WanTransformer3DModel; references behave as Kaleido's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kaleido_jax import config as kcfg
from kaleido_jax.convert import transformer as convert_tf
from kaleido_jax.model import cpu
from kaleido_jax.model.dit import KaleidoDiT, param_count
from tests.model import dit_reference as ref

TINY = dict(num_heads=2, head_dim=16, in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64,
            num_layers=2)


def _inputs(rng, b=2, f=3, h=8, w=12, c=4, text_len=7, text_dim=32):
  video = rng.normal(size=(b, f, h, w, c)).astype(np.float32)
  t = rng.uniform(0, 1000, size=(b,)).astype(np.float32)
  text = rng.normal(size=(b, text_len, text_dim)).astype(np.float32)
  return video, t, text


def _scale_atol(expected, rel=2e-5):
  return rel * max(1.0, float(np.abs(expected).max()))


PARITY_CASES = [
    # (diffusers kwargs, input kwargs)
    (dict(heads=2, head_dim=16, layers=2, patch=(1, 2, 2)), dict(b=2, f=3, h=8, w=12)),
    (dict(heads=3, head_dim=12, layers=3, patch=(1, 2, 2), ffn=48), dict(b=1, f=2, h=6, w=4, text_len=5)),
    (dict(heads=2, head_dim=24, layers=1, patch=(2, 2, 2), in_ch=3, out_ch=5), dict(b=3, f=4, h=4, w=8, c=3)),
]


@pytest.mark.torch
@pytest.mark.parametrize("case", range(len(PARITY_CASES)))
@pytest.mark.parametrize("scan,cpu_kernels", [(True, "auto"), (False, "auto"), (True, "off")])
def test_parity_with_diffusers(tmp_path, case, scan, cpu_kernels):
  # `auto` on this CPU runs model/cpu.py's rewrites; `off` the plain program TPUs and GPUs run.
  dkw, ikw = PARITY_CASES[case]
  torch_model = ref.make_diffusers_model(**dkw, seed=case)
  path = ref.save_diffusers(torch_model, str(tmp_path / "wan"))
  cfg = kcfg.model_config(rope_scheme="none")
  state, cfg = convert_tf.convert_state(path, "diffusers", None)
  cfg.scan_layers = scan
  cfg.cpu_kernels = cpu_kernels
  model = convert_tf.load_transformer(path, "diffusers", cfg)
  rng = np.random.default_rng(case)
  video, t, text = _inputs(rng, **ikw)
  expected = ref.run_diffusers(torch_model, video, t, text)
  got = np.asarray(model(jnp.asarray(video), jnp.asarray(t), jnp.asarray(text)))
  assert got.shape == expected.shape and got.dtype == np.float32
  err = np.abs(got - expected).max()
  assert err <= _scale_atol(expected), f"max abs err {err:.2e} (output scale {np.abs(expected).max():.2f})"


def _model(**kw):
  cfg = kcfg.model_config(**{**TINY, **kw})
  return KaleidoDiT(cfg, rngs=nnx.Rngs(0))


def test_cpu_kernels_give_the_plain_programs_values_and_gradients():
  # model/cpu.py's rewrites (dot-product sums and broadcasts, token-matrix linears, the attention head loop)
  # against the plain jnp program, on the same weights: forward and every parameter's gradient, fp32.
  rng = np.random.default_rng(3)
  video, t, text = _inputs(rng)
  refs = jnp.asarray(rng.normal(size=(2, 2, 8, 12, 4)).astype(np.float32))
  ref_mask = jnp.asarray([[True, False], [True, True]])
  models = {k: _model(cpu_kernels=k) for k in ("on", "off")}
  nnx.update(models["off"], nnx.state(models["on"]))

  def loss(m):
    return jnp.mean(m(video, t, text, refs=refs, ref_mask=ref_mask) ** 2)
  out = {k: m(video, t, text, refs=refs, ref_mask=ref_mask) for k, m in models.items()}
  np.testing.assert_allclose(out["on"], out["off"], atol=1e-5 * float(jnp.abs(out["off"]).max()))
  grads = {k: jax.tree.leaves(nnx.grad(loss)(m)) for k, m in models.items()}
  for a, b in zip(grads["on"], grads["off"]):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()) + 1e-12)
  # The switch really switches: the CPU program has the custom-VJP broadcasts (cpu.broadcast_to); the plain one
  # only the attention kernel's two custom VJPs (self- and cross-attention in the scanned layer).
  def custom_vjps(k):
    g, s = nnx.split(models[k])
    return str(jax.make_jaxpr(lambda s: nnx.merge(g, s)(video, t, text))(s)).count("custom_vjp_call")
  assert custom_vjps("off") == 2 and custom_vjps("on") > 20
  with pytest.raises(ValueError, match="config.model.cpu_kernels='fast'"):
    _model(cpu_kernels="fast")


def test_references_change_the_output_and_their_order_matters():
  model = _model()
  rng = np.random.default_rng(1)
  video, t, text = _inputs(rng)
  refs = jnp.asarray(rng.normal(size=(2, 2, 8, 12, 4)).astype(np.float32))
  plain = model(video, t, text)
  with_refs = model(video, t, text, refs=refs)
  swapped = model(video, t, text, refs=refs[:, ::-1])
  assert with_refs.shape == plain.shape
  assert np.abs(with_refs - plain).max() > 1e-3
  assert np.abs(with_refs - swapped).max() > 1e-4


def test_swapping_references_is_invisible_without_rope_ids():
  """With the `none` scheme references are an unordered set: swapping them changes nothing."""
  model = _model(rope_scheme="none")
  rng = np.random.default_rng(2)
  video, t, text = _inputs(rng)
  refs = jnp.asarray(rng.normal(size=(2, 2, 8, 12, 4)).astype(np.float32))
  np.testing.assert_allclose(model(video, t, text, refs=refs), model(video, t, text, refs=refs[:, ::-1]),
                             atol=1e-5)


def test_a_masked_reference_slot_influences_nothing():
  model = _model()
  rng = np.random.default_rng(3)
  video, t, text = _inputs(rng)
  real = rng.normal(size=(2, 1, 8, 12, 4)).astype(np.float32)
  junk = rng.normal(size=(2, 1, 8, 12, 4)).astype(np.float32) * 5
  one = model(video, t, text, refs=jnp.asarray(real))
  padded = model(video, t, text, refs=jnp.asarray(np.concatenate([real, junk], 1)),
                 ref_mask=jnp.asarray([[True, False], [True, False]]))
  np.testing.assert_allclose(padded, one, atol=2e-5)
  none = model(video, t, text, refs=jnp.asarray(junk), ref_mask=jnp.zeros((2, 1), bool))
  np.testing.assert_allclose(none, model(video, t, text), atol=2e-5)


def test_too_many_references_is_a_clear_error():
  model = _model(max_refs=2)
  video, t, text = _inputs(np.random.default_rng(0))
  with pytest.raises(ValueError, match="3 references given but config.model.max_refs=2"):
    model(video, t, text, refs=jnp.zeros((2, 3, 8, 12, 4)))


def test_bf16_matches_fp32_within_bf16_tolerance():
  rng = np.random.default_rng(4)
  video, t, text = _inputs(rng)
  refs = jnp.asarray(rng.normal(size=(2, 1, 8, 12, 4)).astype(np.float32))
  fp32 = _model()
  bf16 = _model(dtype="bfloat16")
  nnx.update(bf16, nnx.state(fp32))
  a = np.asarray(fp32(video, t, text, refs=refs))
  b = np.asarray(bf16(video, t, text, refs=refs))
  assert b.dtype == np.float32
  rel = np.abs(a - b).max() / np.abs(a).max()
  assert rel < 5e-2, rel


@pytest.mark.parametrize("policy", ["full", "dots_no_batch", "dots_and_attention", "offload", "offload_attention"])
def test_remat_policies_give_the_same_gradients(policy):
  rng = np.random.default_rng(5)
  video, t, text = _inputs(rng, b=1)
  base = _model()
  remat = _model(remat_policy=policy)

  def loss(m):
    return jnp.mean(m(video, t, text) ** 2)
  g0 = nnx.grad(loss)(base)
  g1 = nnx.grad(loss)(remat)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_offload_policy_moves_block_inputs_to_host_memory():
  # On the CPU host and device memory are one, so lowering drops the placement; the traced gradient shows it:
  # one device_put to host per layer input (saved in the forward), none under `full`.
  rng = np.random.default_rng(5)
  video, t, text = _inputs(rng, b=1)

  def host_puts(policy):
    graphdef, state = nnx.split(_model(remat_policy=policy))
    grad = jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(video, t, text) ** 2))
    return str(jax.make_jaxpr(grad)(state)).count("MemorySpace.Host")
  assert host_puts("full") == 0 and host_puts("offload") >= 1
  assert host_puts("offload_attention") > host_puts("offload")  # the attention residuals go to host too


def test_scan_unroll_gives_the_same_outputs_and_gradients_without_the_layer_loop(monkeypatch):
  # All heads in one attention call, so the only loop left is the one over layers (CPU attention loops over
  # heads otherwise).
  monkeypatch.setattr(cpu, "HEAD_LOOP_MIN_KEYS", {"forward": 10**9, "backward": 10**9})
  rng = np.random.default_rng(7)
  video, t, text = _inputs(rng, b=1)
  models = {u: _model(num_layers=4, remat_policy="dots_and_attention", scan_unroll=u) for u in (1, 2, 64)}

  def loss(m):
    return jnp.mean(m(video, t, text) ** 2)
  g1 = nnx.grad(loss)(models[1])
  for u in (2, 64):
    np.testing.assert_allclose(models[1](video, t, text), models[u](video, t, text), atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(nnx.grad(loss)(models[u]))):
      np.testing.assert_allclose(a, b, atol=1e-6)
    # Same stacked parameter layout, so checkpoints move between the settings.
    assert jax.tree.map(jnp.shape, nnx.state(models[1])) == jax.tree.map(jnp.shape, nnx.state(models[u]))

  def loops(m):
    graphdef, state = nnx.split(m)
    return jax.jit(lambda s: nnx.merge(graphdef, s)(video, t, text)).lower(state).as_text().count("stablehlo.while")
  # 72 tokens fit one attention query block, so the only loop is the one over layers: gone when unrolled.
  assert [loops(models[u]) for u in (1, 2, 64)] == [1, 1, 0]


@pytest.mark.parametrize("bad", [0, -2])
def test_scan_unroll_must_be_a_positive_int(bad):
  with pytest.raises(ValueError, match="config.model.scan_unroll"):
    _model(scan_unroll=bad)


@pytest.mark.parametrize("key,bad", [("attention", "flash"), ("context_parallel", "allgather")])
def test_unknown_attention_settings_are_refused_by_name(key, bad):
  with pytest.raises(ValueError, match=f"config.model.{key}={bad!r}"):
    _model(**{key: bad})


def _exp_count(policy):
  """Exponentials in the lowered gradient: softmax's exp runs once per attention forward or recompute."""
  rng = np.random.default_rng(6)
  video, t, text = _inputs(rng, b=1)
  graphdef, state = nnx.split(_model(remat_policy=policy))
  grad = jax.jit(jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(video, t, text) ** 2)))
  return grad.lower(state).as_text().count("stablehlo.exponential")


def test_dots_and_attention_policy_does_not_recompute_attention():
  # dots_no_batch drops the attention kernel's residuals (its dots have batch dims), so the backward re-runs
  # the forward softmax; dots_and_attention saves them by name like the un-rematerialised step does.
  assert _exp_count("dots_and_attention") == _exp_count("none") < _exp_count("dots_no_batch")
  # offload_attention: the same residuals, kept in host memory (maxdiffusion's HIDDEN_STATE_WITH_OFFLOAD).
  assert _exp_count("offload_attention") == _exp_count("none") < _exp_count("offload")


def test_parameters_carry_logical_axis_names():
  model = nnx.eval_shape(lambda: _model())
  names = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names["/".join(map(str, path))] = var.get_metadata().get("out_sharding")
  assert names["blocks/self_attn/to_q/kernel"] == ("layers", "embed", "heads")
  assert names["blocks/ffn/proj_in/kernel"] == ("layers", "embed", "mlp")
  assert names["patch_kernel"][-1] == "embed"


@pytest.mark.torch
@pytest.mark.parametrize("name,sizes", [("14B", kcfg.WAN_14B), ("1.3B", kcfg.WAN_1_3B)])
def test_real_configs_count_what_diffusers_counts(name, sizes):
  import torch
  from diffusers import WanTransformer3DModel
  cfg = kcfg.model_config(**sizes)
  ours = param_count(nnx.eval_shape(lambda: KaleidoDiT(cfg, rngs=nnx.Rngs(0))))
  with torch.device("meta"):
    theirs = WanTransformer3DModel(num_attention_heads=sizes["num_heads"], attention_head_dim=128,
                                   ffn_dim=sizes["ffn_dim"], num_layers=sizes["num_layers"])
  assert ours == sum(p.numel() for p in theirs.parameters()), name


@pytest.mark.torch
@pytest.mark.parametrize("case", range(len(PARITY_CASES)))
def test_bf16_parity_with_diffusers_in_bf16(tmp_path, case):
  """Both in bf16 as each ships it: diffusers from_pretrained(torch_dtype=bf16) keeps its _keep_in_fp32_modules
  (time_embedder, scale_shift_table, norm1/2/3) in fp32; ours keeps model.fp32_params (model/precision.py).

  Tolerance: bf16 carries 8 significant bits (relative step 2^-8 = 3.9e-3); through embedder, blocks and head
  each implementation lands 5e-3 .. 7e-3 (relative to the output scale) from the fp32 result and the two bf16
  outputs 7e-3 .. 8.5e-3 from each other (measured on these cases); asserted: the pair within 2e-2, and ours no
  further from fp32 than diffusers' own bf16 (within 1.5x + 2e-3).
  """
  import torch
  from diffusers import WanTransformer3DModel
  dkw, ikw = PARITY_CASES[case]
  torch_model = ref.make_diffusers_model(**dkw, seed=case)
  path = ref.save_diffusers(torch_model, str(tmp_path / "wan"))
  torch_bf16 = WanTransformer3DModel.from_pretrained(path, torch_dtype=torch.bfloat16).eval()
  assert torch_bf16.scale_shift_table.dtype == torch.float32  # diffusers' fp32 set, as shipped
  _, cfg = convert_tf.convert_state(path, "diffusers", None)
  cfg.dtype = cfg.param_dtype = "bfloat16"
  model = convert_tf.load_transformer(path, "diffusers", cfg)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for p, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(p)
    fp32 = any(k in name for k in ("time_linear", "time_proj", "scale_shift_table", "head_table", "norm"))
    assert leaf.dtype == (jnp.float32 if fp32 else jnp.bfloat16), name
  video, t, text = _inputs(np.random.default_rng(case), **ikw)
  expected = ref.run_diffusers(torch_model, video, t, text)

  def run_bf16(m, *xs):
    with torch.no_grad():
      v, tt, tx = (torch.from_numpy(np.ascontiguousarray(x)) for x in xs)
      out = m(v.permute(0, 4, 1, 2, 3).to(torch.bfloat16), tt, tx.to(torch.bfloat16), return_dict=False)[0]
    return out.float().numpy().transpose(0, 2, 3, 4, 1)
  theirs = run_bf16(torch_bf16, video, t, text)
  ours = np.asarray(model(jnp.asarray(video), jnp.asarray(t), jnp.asarray(text)))
  scale = max(1.0, float(np.abs(expected).max()))
  e_ours, e_theirs = np.abs(ours - expected).max() / scale, np.abs(theirs - expected).max() / scale
  e_pair = np.abs(ours - theirs).max() / scale
  assert e_pair < 2e-2, (e_pair, e_ours, e_theirs)
  assert e_ours <= 1.5 * e_theirs + 2e-3, (e_ours, e_theirs)
