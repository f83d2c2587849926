"""The attention kernels against textbook softmax attention: the blocked `xla` kernel (custom flash-style
backward) and splash (TPU Pallas, run in interpret mode on CPU).

Kaleido's token counts are not multiples of the kernel's 128-lane blocks (37440 self-attention tokens,
512 text keys), so the lengths here are not either; a key mask hides some keys as padded references do.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from flax import nnx

from kaleido_jax import config as kcfg
from kaleido_jax.model import attention, cpu
from kaleido_jax.model.dit import KaleidoDiT


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
  monkeypatch.setattr(attention, "SPLASH_INTERPRET", True)


def _qkv(lq, lk, *, b=2, h=2, d=64, seed=0):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.standard_normal((b, n, h, d)), jnp.float32) for n in (lq, lk, lk))
  mask = jnp.asarray(r.random((b, lk)) > 0.3).at[:, 0].set(True)  # every row keeps at least one key
  return q, k, v, mask


# Query counts below, at and across XLA_QUERY_BLOCK (256): one block, padded blocks (513 -> 3 x 171),
# several whole blocks (768); key counts as in self-attention and as text. On the CPU the kernel loops over
# groups of cpu.HEADS_PER_ITERATION heads (at any key count here): one, two and all four heads per iteration;
# with one head it may take longer query blocks (cpu.HEAD_LOOP_BLOCK_SCORES; 0 keeps 256, 2**19 gives 2 x 300).
@pytest.mark.parametrize("lq,lk,masked,heads_per_iteration,block_scores",
                         [(200, 200, True, 1, 0), (513, 513, True, 2, 0), (768, 77, False, 4, 0),
                          (600, 9, True, 1, 0), (513, 513, True, 3, 0), (600, 600, True, 1, 2 ** 19)])
def test_xla_kernel_matches_textbook_attention_and_its_gradients(lq, lk, masked, heads_per_iteration,
                                                                 block_scores, monkeypatch):
  monkeypatch.setattr(cpu, "HEADS_PER_ITERATION", heads_per_iteration)
  monkeypatch.setattr(cpu, "HEAD_LOOP_MIN_KEYS", {"forward": 0, "backward": 0})
  monkeypatch.setattr(cpu, "HEAD_LOOP_BLOCK_SCORES", block_scores)
  if block_scores:
    assert attention._query_blocks(lq, attention._query_block(2, 4, lk, "backward", True)) == (2, 300)
  q, k, v, mask = _qkv(lq, lk, h=4, d=32)
  mask = mask if masked else None
  out = jax.jit(attention.dot_product_attention)(q, k, v, mask=mask)
  assert out.shape == q.shape
  _close(out, attention.reference_attention(q, k, v, mask))
  co = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  grads = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * co), argnums=(0, 1, 2)))(q, k, v)
  ours = grads(lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mask))
  theirs = grads(lambda q, k, v: attention.reference_attention(q, k, v, mask))
  for a, b in zip(ours, theirs):
    _close(a, b)
  if mask is not None:  # hidden keys get no gradient
    hidden = ~np.asarray(mask)
    assert np.abs(np.asarray(ours[1])[hidden]).max() == 0 and np.abs(np.asarray(ours[2])[hidden]).max() == 0


def test_xla_kernel_forward_and_backward_may_block_differently(monkeypatch):
  # Backward one head at a time with 2 x 257-query blocks (513 queries padded to 514); forward all heads at once
  # with 256-query blocks, 3 x 172, so it pads 514 to 516 itself and drops the extra rows again.
  monkeypatch.setattr(cpu, "HEADS_PER_ITERATION", 1)
  monkeypatch.setattr(cpu, "HEAD_LOOP_MIN_KEYS", {"forward": 10 ** 9, "backward": 0})
  monkeypatch.setattr(cpu, "HEAD_LOOP_BLOCK_SCORES", 2 ** 19)
  assert attention._query_blocks(513, attention._query_block(2, 4, 513, "backward", True)) == (2, 257)
  assert attention._query_blocks(514, attention._query_block(2, 4, 513, "forward", True)) == (3, 172)
  q, k, v, mask = _qkv(513, 513, h=4, d=32)
  co = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  grads = lambda fn: jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * co), argnums=(0, 1, 2)))(
      q, k, v)
  ours = grads(lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mask))
  theirs = grads(lambda q, k, v: attention.reference_attention(q, k, v, mask))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    _close(a, b)


def test_xla_kernel_in_bfloat16_stays_within_bfloat16_rounding():
  q, k, v, mask = _qkv(513, 513, d=64)
  ref = attention.reference_attention(q, k, v, mask)
  out = attention.dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), mask=mask)
  assert out.dtype == jnp.bfloat16
  # bf16 keeps 8 bits of mantissa: inputs and probabilities rounded at 2^-8 relative.
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=2e-2 * float(jnp.abs(ref).max()))


def _splash(q, k, v, mask):
  return attention.dot_product_attention(q, k, v, mask=mask, implementation="splash")


def _close(out, ref):
  scale = float(jnp.abs(ref).max())
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("lq,lk,masked", [(200, 200, True), (200, 77, False), (200, 77, True)])
def test_splash_matches_xla(lq, lk, masked):
  q, k, v, mask = _qkv(lq, lk)
  mask = mask if masked else None
  out = jax.jit(_splash)(q, k, v, mask)
  assert out.shape == q.shape
  _close(out, attention.dot_product_attention(q, k, v, mask=mask))


def test_splash_gradients_match_xla():
  q, k, v, mask = _qkv(200, 77)
  loss = lambda impl: lambda q, k, v: jnp.sum(jnp.square(
      attention.dot_product_attention(q, k, v, mask=mask, implementation=impl)))
  ours = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
  theirs = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(ours, theirs):
    _close(a, b)


# (data, fsdp, context, tensor): all axes used; and heads (2) not divisible by tensor (4) -> replicated heads.
@pytest.mark.parametrize("shape", [(2, 1, 2, 2), (1, 2, 1, 4)])
def test_splash_under_mesh_runs_per_device(shape):
  mesh = jax.make_mesh(shape, ("data", "fsdp", "context", "tensor"), axis_types=(AxisType.Auto,) * 4)
  q, k, v, mask = _qkv(200, 200)
  ref = attention.dot_product_attention(q, k, v, mask=mask)
  with jax.set_mesh(mesh):
    heads = "tensor" if q.shape[2] % mesh.shape["tensor"] == 0 else None
    shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    qs = shard(q, P(("data", "fsdp"), "context", heads))
    ks, vs = (shard(x, P(("data", "fsdp"), None, heads)) for x in (k, v))
    fn = jax.jit(_splash)
    assert "shard_map" in str(jax.make_jaxpr(_splash)(qs, ks, vs, mask))
    out = fn(qs, ks, vs, mask)
  _close(out, ref)


def test_padding_keeps_kaleido_lengths_on_large_blocks():
  # 32760 video + 3 x 1560 reference tokens (Kaleido-14B at 480x832, 81 frames); 512 text keys.
  assert attention._pad_and_block(37440) == (37888, 512)
  assert attention._pad_and_block(512) == (512, 512)
  assert attention._pad_and_block(200) == (256, 256)
  assert attention._pad_and_block(77) == (128, 128)
  assert attention._pad_and_block(200, shards=2) == (256, 128)


def test_dit_with_splash_matches_xla():
  # The whole model: self-attention over [refs | video] with a padded reference slot, cross-attention on text.
  tiny = dict(num_heads=2, head_dim=16, in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64,
              num_layers=2)
  r = np.random.default_rng(0)
  video = jnp.asarray(r.normal(size=(2, 3, 8, 12, 4)), jnp.float32)
  refs = jnp.asarray(r.normal(size=(2, 2, 8, 12, 4)), jnp.float32)
  text = jnp.asarray(r.normal(size=(2, 7, 32)), jnp.float32)
  t, ref_mask = jnp.asarray([10.0, 500.0]), jnp.asarray([[True, False], [True, True]])
  outs = [KaleidoDiT(kcfg.model_config(**tiny, attention=impl), rngs=nnx.Rngs(0))(
      video, t, text, refs=refs, ref_mask=ref_mask) for impl in ("xla", "splash")]
  _close(outs[1], outs[0])


def test_cpu_head_loop_only_on_the_cpu_path_and_per_device_under_a_mesh(monkeypatch):
  # Long self-attention loops over heads on the CPU path (model/cpu.py); text-length keys do not, nor does the
  # plain (TPU / GPU) kernel. Under a mesh the kernel runs per device on its own heads (shard_map), so heads
  # sharded over `tensor` loop locally: the result is the one of the unsharded call.
  monkeypatch.setattr(cpu, "HEADS_PER_ITERATION", 1)
  assert attention._heads_per_iteration(8, 1792, "forward", True) == 1
  assert attention._heads_per_iteration(8, 512, "forward", True) == 8
  assert attention._heads_per_iteration(8, 512, "backward", True) == 1
  assert attention._heads_per_iteration(8, 77, "backward", True) == 8
  assert attention._heads_per_iteration(8, 1792, "forward", False) == 8
  assert attention._query_block(1, 8, 1792, "forward", False) == attention.XLA_QUERY_BLOCK
  mesh = jax.make_mesh((2, 1, 1, 4), ("data", "fsdp", "context", "tensor"), axis_types=(AxisType.Auto,) * 4)
  q, k, v, mask = _qkv(300, 300, h=4, d=32)
  co = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  loss = lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, mask=mask) * co)
  ref = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
  with jax.set_mesh(mesh):
    spec = NamedSharding(mesh, P("data", None, "tensor"))
    out = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*(jax.device_put(x, spec) for x in (q, k, v)))
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    _close(a, b)


# (data, fsdp, context, tensor): context 4 with data 2; context 2 with fsdp 2 and heads over tensor 2. 203 tokens
# divide by neither context size nor any splash block, so the call pads and masks.
@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("context_parallel", ["gather", "ulysses", "ring"])
@pytest.mark.parametrize("shape", [(2, 1, 4, 1), (1, 2, 2, 2)])
def test_context_parallel_self_attention_matches_textbook_attention(shape, context_parallel, impl):
  q, k, v, mask = _qkv(203, 203, h=4, d=32)
  co = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  grads = lambda fn: jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * co), argnums=(0, 1, 2)))(
      q, k, v)
  ref = grads(lambda q, k, v: attention.reference_attention(q, k, v, mask))
  mesh = jax.make_mesh(shape, ("data", "fsdp", "context", "tensor"), axis_types=(AxisType.Auto,) * 4)
  fn = lambda q, k, v: attention.dot_product_attention(q, k, v, mask=mask, implementation=impl,
                                                       context_parallel=context_parallel)
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(fn)(q, k, v))
    out = grads(fn)
  assert "shard_map" in jaxpr
  collective = {"gather": "all_gather", "ulysses": "all_to_all", "ring": "ppermute"}[context_parallel]
  assert collective in jaxpr
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    _close(a, b)


def test_auto_picks_the_platform_kernel():
  assert attention.resolve_implementation("auto", jnp.float32, "tpu") == "splash"
  assert attention.resolve_implementation("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert attention.resolve_implementation("auto", jnp.float32, "gpu") == "xla"  # cuDNN takes no float32
  assert attention.resolve_implementation("auto", jnp.bfloat16, "cpu") == "xla"
  assert attention.resolve_implementation("splash", jnp.float32, "cpu") == "splash"


def test_splash_blocks_follow_the_generation_and_are_clamped_to_the_length():
  # v5p's backward blocks (maxdiffusion) on Kaleido-14B's padded 37888 tokens: 3072 does not divide 37888, the
  # largest 128-multiple below it that does is 1024 (37888 = 2^10 x 37); compute blocks tile their memory block.
  b = attention.splash_block_sizes(37888, 37888, generation="v5p")
  assert (b.block_q, b.block_kv, b.block_q_dkv, b.block_kv_dkv, b.block_kv_dkv_compute) == (512, 512, 1024, 1024,
                                                                                            256)
  b = attention.splash_block_sizes(37888, 512, generation="v6e")  # cross-attention: 512 text keys
  assert (b.block_q, b.block_kv, b.block_kv_compute) == (1024, 512, 512)  # 3024 -> 1024, 2048 -> 512 keys
  b = attention.splash_block_sizes(256, 256, {"block_q": 1024, "block_kv_dq": 128}, generation="v5p")
  assert (b.block_q, b.block_kv_dq) == (256, 128)
  with pytest.raises(ValueError, match="unknown splash block"):
    attention.splash_block_sizes(256, 256, {"block_z": 128})


def test_dots_and_attention_saves_splash_residuals_instead_of_rerunning_its_forward():
  # Pallas calls in the lowered gradient of a rematerialised DiT: the forward kernel once per attention, plus
  # the backward's dq / dkv kernels; dots_no_batch cannot save splash's (out, logsumexp), so its backward
  # re-runs the forward kernel, dots_and_attention saves them by name as the un-rematerialised step keeps them.
  tiny = dict(num_heads=2, head_dim=16, in_channels=4, out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64,
              num_layers=1, attention="splash")
  r = np.random.default_rng(1)
  video = jnp.asarray(r.normal(size=(1, 2, 8, 8, 4)), jnp.float32)
  text = jnp.asarray(r.normal(size=(1, 7, 32)), jnp.float32)

  def kernels(policy):
    graphdef, state = nnx.split(KaleidoDiT(kcfg.model_config(**tiny, remat_policy=policy), rngs=nnx.Rngs(0)))
    grad = jax.jit(jax.grad(lambda s: jnp.mean(nnx.merge(graphdef, s)(video, jnp.asarray([3.0]), text) ** 2)))
    return str(jax.make_jaxpr(grad)(state)).count("pallas_call")
  assert kernels("dots_and_attention") == kernels("none") < kernels("dots_no_batch")
