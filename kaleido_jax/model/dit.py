"""KaleidoDiT: the Wan2.1 diffusion transformer with clean reference latents in front of the video.

Architecture facts (diffusers ``WanTransformer3DModel``, the parity reference; shared DESIGN.md §1):
- patch embed = 3D conv with kernel = stride = patch; here a matmul over patchified tokens with the conv's
  (pt, ph, pw, C_in, dim) kernel, which is the same operation;
- time: sinusoid of ``freq_dim`` ordered [cos, sin] -> Linear-SiLU-Linear (temb); a shared
  Linear(dim, 6 dim) on SiLU(temb) gives each block's modulation, added to its learned (1, 6, dim) table;
- text: Linear(text_dim, dim)-GELU(tanh)-Linear(dim, dim);
- block: LayerNorm (no affine) * (1 + scale) + shift -> self-attention (q/k RMSNorm over all heads, eps
  1e-6, 3D RoPE) -> gated residual; affine LayerNorm -> cross-attention to text (q/k RMSNorm) -> *ungated*
  residual; LayerNorm * (1 + scale) + shift -> FFN (GELU tanh) -> gated residual;
- head: (1, 2, dim) table + temb -> shift / scale, LayerNorm, Linear(dim, prod(patch) * C_out), unpatchify.
Norms, modulation and the time embedding run in float32; matmuls in ``config.dtype``. Their parameters stay
float32 too under a bf16 ``param_dtype`` (the precision policy ``config.fp32_params``, ``precision.py``).

Kaleido: reference latents (clean, never noised) are patch-embedded by the same kernel and put in front of
the video tokens, ``[ref_0 | ... | ref_{N-1} | video]``; they get the video's modulation, attend to the
text, carry R-RoPE position ids (``rope.py``) and are dropped before unpatchify. ``ref_mask`` hides padded
reference slots as attention keys, so a padded slot influences nothing.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from kaleido_jax.model import attention as attention_lib
from kaleido_jax.model import cpu
from kaleido_jax.model import precision
from kaleido_jax.model import quantization
from kaleido_jax.model import rope as rope_lib
from kaleido_jax.model.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Matmul outputs plus the `xla` attention kernel's output and log-sum-exp: the backward recomputes only
    # elementwise work (norms, modulation, GELU, RoPE), never attention or a matmul.
    "dots_and_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*attention_lib.ATTENTION_RESIDUALS)),
    # `full`, with each block's input kept in pinned host memory between the forward and the backward
    # instead of HBM (maxdiffusion's hidden-state offload; MaxText's `decoder_layer_input`): per chip the
    # layers' inputs, 40 x tokens x dim x 2 bytes for 14B in bf16 (15 GB at 480p + 3 refs), leave the device.
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("block_input",),
        offload_src="device", offload_dst="pinned_host"),
    # `offload`, and the attention kernels' outputs and log-sum-exps offloaded too (maxdiffusion's
    # HIDDEN_STATE_WITH_OFFLOAD offloads its self- and cross-attention residuals the same way): the backward's
    # recomputation of a block skips attention's forward, 4·S²·D FLOPs a layer (1.17e15 per chip per step at 720p
    # on v5p-8), for another S·D·2 bytes a layer and attention in host memory.
    "offload_attention": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=("block_input",) + attention_lib.ATTENTION_RESIDUALS,
        offload_src="device", offload_dst="pinned_host"),
}

_ACT = ("activation_batch", "activation_length", "activation_embed")


def _dtype(name: str):
  return jnp.dtype(name)


class Linear(nnx.Linear):
  """nnx.Linear; on the CPU path (model/cpu.py) the tokens multiply as one matrix."""

  def __call__(self, x):
    return cpu.linear(self, x) if cpu.active() else super().__call__(x)


def _linear(din: int, dout: int, names: tuple, cfg, rngs: nnx.Rngs) -> nnx.Linear:
  """Linear with logical axis names on kernel and bias (torch-like uniform init is irrelevant here)."""
  return Linear(
      din, dout, dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), names[-1:]), rngs=rngs)


def _layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine, in float32."""
  if cpu.active():
    return cpu.layer_norm(x, eps)
  x = x.astype(jnp.float32)
  x = x - jnp.mean(x, -1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
  """RMSNorm over the last dim (all heads together, as Wan's ``rms_norm_across_heads``)."""

  def __init__(self, dim: int, eps: float, names: tuple, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=names)

  def __call__(self, x):
    dtype = x.dtype
    scale = self.scale.value.astype(jnp.float32)
    if cpu.active():
      return (cpu.rms_scale(x, self.eps) * cpu.broadcast_like(scale, x)).astype(dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + self.eps)
    return (x * scale).astype(dtype)


class Attention(nnx.Module):
  """Multi-head attention with q/k RMSNorm; self-attention applies RoPE, cross-attention does not."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dim = cfg.num_heads * cfg.head_dim
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.implementation = cfg.attention
    self.context_parallel = cfg.get("context_parallel", "gather")
    self.splash_blocks = tuple(sorted(dict(cfg.get("splash_blocks", {})).items()))
    self.to_q = _linear(dim, dim, ("embed", "heads"), cfg, rngs)
    self.to_k = _linear(dim, dim, ("embed", "heads"), cfg, rngs)
    self.to_v = _linear(dim, dim, ("embed", "heads"), cfg, rngs)
    self.to_out = _linear(dim, dim, ("heads", "embed"), cfg, rngs)
    self.norm_q = RMSNorm(dim, cfg.eps, ("heads",), _dtype(cfg.param_dtype))
    self.norm_k = RMSNorm(dim, cfg.eps, ("heads",), _dtype(cfg.param_dtype))

  def key_value(self, context):
    """(k, v) of ``context``, (B, L, heads, head_dim) each: what the text cache holds per layer."""
    b, lk, _ = context.shape
    k = self.norm_k(self.to_k(context)).reshape(b, lk, self.num_heads, self.head_dim)
    return k, self.to_v(context).reshape(b, lk, self.num_heads, self.head_dim)

  def __call__(self, x, context=None, rope=None, mask=None, kv=None):
    # Self-attention (no context) runs context-parallel over the sequence; cross-attention keeps the text local.
    # ``kv``: the context's keys / values already projected (the sampler's text cache; they do not change per step).
    context_parallel = self.context_parallel if context is None and kv is None else None
    b, lq, _ = x.shape
    q = self.norm_q(self.to_q(x)).reshape(b, lq, self.num_heads, self.head_dim)
    k, v = kv if kv is not None else self.key_value(x if context is None else context)
    if rope is not None:
      cos, sin = rope
      q, k = rope_lib.apply_rope(q, cos, sin), rope_lib.apply_rope(k, cos, sin)
    out = attention_lib.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation,
                                              context_parallel=context_parallel,
                                              splash_blocks=dict(self.splash_blocks))
    return self.to_out(out.reshape(b, lq, -1))


class FeedForward(nnx.Module):

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dim = cfg.num_heads * cfg.head_dim
    self.proj_in = _linear(dim, cfg.ffn_dim, ("embed", "mlp"), cfg, rngs)
    self.proj_out = _linear(cfg.ffn_dim, dim, ("mlp", "embed"), cfg, rngs)

  def __call__(self, x):
    return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=True))


class WanBlock(nnx.Module):
  """One transformer block; ``mod`` is the (B, 6, dim) float32 time projection shared by all blocks."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    dim = cfg.num_heads * cfg.head_dim
    self.eps = cfg.eps
    self.dtype = _dtype(cfg.dtype)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.cross_attn = Attention(cfg, rngs=rngs)
    self.ffn = FeedForward(cfg, rngs=rngs)
    self.cross_attn_norm = cfg.cross_attn_norm
    pdt = _dtype(cfg.param_dtype)
    if cfg.cross_attn_norm:
      self.norm2_scale = nnx.Param(jnp.ones((dim,), pdt), out_sharding=("embed",))
      self.norm2_bias = nnx.Param(jnp.zeros((dim,), pdt), out_sharding=("embed",))
    # diffusers initialises the table as randn / sqrt(dim).
    self.scale_shift_table = nnx.Param(
        jax.random.normal(rngs.params(), (1, 6, dim), pdt) / math.sqrt(dim),
        out_sharding=(None, None, "embed"))

  def modulated_input(self, x, mod):
    """The self-attention's input LayerNorm(x)·(1 + scale) + shift (TeaCache's change signal, first block)."""
    shift, scale = jnp.split(self.scale_shift_table.value.astype(jnp.float32) + mod, 6, axis=1)[:2]
    return _layer_norm(x, self.eps) * (1 + scale) + shift

  def __call__(self, x, mod, text, rope, mask, text_kv=None):
    x = checkpoint_name(x, "block_input")  # what remat_policy='offload' moves to host memory
    m = self.scale_shift_table.value.astype(jnp.float32) + mod
    # Per-sample (B, 1, dim) vectors, broadcast over the tokens.
    mods = jnp.split(m, 6, axis=1)
    if cpu.active():
      mods = [cpu.broadcast_like(v, x) for v in mods]
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mods
    h = (_layer_norm(x, self.eps) * (1 + scale_sa) + shift_sa).astype(self.dtype)
    x = (x.astype(jnp.float32) + self.self_attn(h, rope=rope, mask=mask).astype(jnp.float32) * gate_sa)
    x = constrain(x.astype(self.dtype), _ACT)
    h = _layer_norm(x, self.eps)
    if self.cross_attn_norm:
      scale, bias = self.norm2_scale.value.astype(jnp.float32), self.norm2_bias.value.astype(jnp.float32)
      if cpu.active():
        scale, bias = cpu.broadcast_like(scale, h), cpu.broadcast_like(bias, h)
      h = h * scale + bias
    x = x + self.cross_attn(h.astype(self.dtype), context=text, kv=text_kv).astype(self.dtype)
    h = (_layer_norm(x, self.eps) * (1 + scale_ff) + shift_ff).astype(self.dtype)
    x = x.astype(jnp.float32) + self.ffn(h).astype(jnp.float32) * gate_ff
    return constrain(x.astype(self.dtype), _ACT)


def timestep_features(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal features [cos, sin] of dim ``dim`` (diffusers Timesteps, flip_sin_to_cos=True, shift 0)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)


class KaleidoDiT(nnx.Module):
  """``model(video, timestep, text, refs=None, ref_mask=None) -> velocity`` (channels-last, float32)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    # Logical axis names are metadata only; the trainer maps them to mesh axes and places the arrays.
    with nnx.use_eager_sharding(False):
      self._build(config, rngs)

  def _build(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs):
    # Frozen (hashable) so that the graphdef can be a static jit argument (the sampler's).
    cfg = ml_collections.FrozenConfigDict(config)
    self.config = cfg
    self.dim = dim = cfg.num_heads * cfg.head_dim
    self.patch = tuple(cfg.patch_size)
    self.dtype = _dtype(cfg.dtype)
    pdt = _dtype(cfg.param_dtype)
    if cfg.rope_scheme not in rope_lib.SCHEMES:
      raise ValueError(f"config.model.rope_scheme={cfg.rope_scheme!r}; choose one of {rope_lib.SCHEMES}")
    if not isinstance(cfg.scan_unroll, int) or isinstance(cfg.scan_unroll, bool) or cfg.scan_unroll < 1:
      raise ValueError(f"config.model.scan_unroll={cfg.scan_unroll!r}; it is a number of layers per scan "
                       "iteration, an int >= 1 (use num_layers to unroll them all)")
    cpu.enabled(cfg.get("cpu_kernels", "auto"))  # refuses an unknown setting now
    if cfg.attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"config.model.attention={cfg.attention!r}; choose one of {attention_lib.IMPLEMENTATIONS}")
    if cfg.get("context_parallel", "gather") not in attention_lib.CONTEXT_PARALLEL:
      raise ValueError(f"config.model.context_parallel={cfg.context_parallel!r}; choose one of "
                       f"{attention_lib.CONTEXT_PARALLEL}")
    if cfg.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"config.model.remat_policy={cfg.remat_policy!r}; choose one of "
                       f"{sorted(REMAT_POLICIES)}")
    fan_in = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2, 3),
                                               out_axis=4)
    self.patch_kernel = nnx.Param(fan_in(rngs.params(), self.patch + (cfg.in_channels, dim), pdt),
                                  out_sharding=(None, None, None, None, "embed"))
    self.patch_bias = nnx.Param(jnp.zeros((dim,), pdt), out_sharding=("embed",))
    f32 = ml_collections.ConfigDict(config).copy_and_resolve_references()
    f32.dtype = "float32"  # time embedding and modulation run in float32
    self.time_linear_1 = _linear(cfg.freq_dim, dim, (None, "embed"), f32, rngs)
    self.time_linear_2 = _linear(dim, dim, ("embed", None), f32, rngs)
    self.time_proj = _linear(dim, 6 * dim, ("embed", None), f32, rngs)
    self.text_linear_1 = _linear(cfg.text_dim, dim, (None, "embed"), cfg, rngs)
    self.text_linear_2 = _linear(dim, dim, ("embed", None), cfg, rngs)
    self.scan_layers = cfg.scan_layers
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_blocks(r):
        return WanBlock(cfg, rngs=r)
      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List([WanBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.head_table = nnx.Param(jax.random.normal(rngs.params(), (1, 2, dim), pdt) / math.sqrt(dim),
                                out_sharding=(None, None, "embed"))
    self.proj_out = _linear(dim, int(np.prod(self.patch)) * cfg.out_channels, ("embed", None), cfg, rngs)
    # model.quantization: the blocks' linears become qwix-quantized ones (model/quantization.py).
    fp32 = tuple(cfg.get("fp32_params", precision.DEFAULT_FP32))
    quantization.quantize(self, quantization.check_scheme(cfg.get("quantization", "none"), "config.model."
                                                          "quantization"),
                          activations=bool(cfg.get("quantize_activations", False)),
                          scale_dtype=jnp.float32 if precision.keeps_fp32(("scale",), fp32) else None)
    # The precision policy (model/precision.py): the leaves model.fp32_params names are stored in float32.
    precision.apply(self, fp32)

  # ---------------------------------------------------------------------------------------------

  def _patchify(self, x):
    """(B, F, H, W, C) -> (B, f*h*w, dim) tokens and the (f, h, w) token grid."""
    b, f, h, w, c = x.shape
    pt, ph, pw = self.patch
    if f % pt or h % ph or w % pw:
      raise ValueError(f"latent shape (F, H, W) = {(f, h, w)} is not divisible by the patch {self.patch}")
    x = x.reshape(b, f // pt, pt, h // ph, ph, w // pw, pw, c).astype(self.dtype)
    # The conv with kernel = stride = patch, as patches (rows of one (N, pt*ph*pw*C) matrix) times the flattened
    # kernel.
    patches = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, pt * ph * pw * c)
    kernel = self.patch_kernel.value.astype(self.dtype).reshape(pt * ph * pw * c, self.dim)
    tokens = patches @ kernel + self.patch_bias.value.astype(self.dtype)
    grid = (f // pt, h // ph, w // pw)
    return tokens.reshape(b, -1, self.dim), grid

  def _unpatchify(self, tokens, grid):
    b = tokens.shape[0]
    f, h, w = grid
    pt, ph, pw = self.patch
    x = tokens.reshape(b, f, h, w, pt, ph, pw, -1)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(b, f * pt, h * ph, w * pw, -1)

  def _layer_fn(self, graphdef, mod, text, rope, mask):
    """(x, layer state, layer's text k/v or None) -> x for one block, under jax.checkpoint (model.remat_policy)."""
    def layer(x, layer_state, text_kv):
      return nnx.merge(graphdef, layer_state)(x, mod, text, rope, mask, text_kv)

    if self.config.remat_policy == "none":
      return layer
    return jax.checkpoint(layer, policy=REMAT_POLICIES[self.config.remat_policy], prevent_cse=False)

  def run_blocks(self, x, mod, text, rope, mask, text_kv=None):
    """All blocks on the tokens ``x``; ``text_kv`` = :meth:`text_key_values` (a stacked (k, v) per layer) or None."""
    if not self.scan_layers:
      # The same remat per layer as the scan below (a functional split -> checkpoint -> merge per block).
      for i, block in enumerate(self.blocks):
        graphdef, state = nnx.split(block)
        kv = None if text_kv is None else (text_kv[0][i], text_kv[1][i])
        x = self._layer_fn(graphdef, mod, text, rope, mask)(x, state, kv)
      return x

    # A functional scan over the stacked block state (split -> lax.scan -> merge per layer) rather than
    # nnx.scan: it also runs when the model itself sits inside another scan (the sampler's step loop),
    # where nnx.scan refuses variables from the enclosing trace level.
    graphdef, state = nnx.split(self.blocks)
    layer = self._layer_fn(graphdef, mod, text, rope, mask)

    def body(carry, xs):
      layer_state, kv = xs
      return layer(carry, layer_state, kv), None

    # Unrolling drops the while loop: XLA:CPU then neither zero-fills and copies the per-layer residual stacks
    # nor slices the stacked weights per iteration (configs/demo.py train step, measured as bench/train.py
    # does: 350 vs 460 ms).
    x, _ = jax.lax.scan(body, x, (state, text_kv), length=self.config.num_layers,
                        unroll=min(self.config.scan_unroll, self.config.num_layers))
    return x

  def text_key_values(self, ctx):
    """Every block's cross-attention (k, v) of the embedded text ``ctx``, stacked on a leading layer axis.

    The text does not change across denoising steps, so the sampler computes these once (sample.text_kv_cache)
    instead of 2 x num_layers projections of 512 tokens per step.
    """
    with self.kernels():
      if not self.scan_layers:
        kvs = [block.cross_attn.key_value(ctx) for block in self.blocks]
        return jnp.stack([k for k, _ in kvs]), jnp.stack([v for _, v in kvs])
      graphdef, state = nnx.split(self.blocks)
      return jax.lax.map(lambda st: nnx.merge(graphdef, st).cross_attn.key_value(ctx), state)

  def kernels(self):
    """The context of this model's CPU-only rewrites (model/cpu.py): callers of embed / run_blocks / head enter it."""
    return cpu.kernels(self.config.get("cpu_kernels", "auto"))

  def __call__(self, video, timestep, text, refs=None, ref_mask=None):
    # CPU-only rewrites (model/cpu.py) for this trace: on where the program is built for the CPU.
    with self.kernels():
      emb = self.embed(video, timestep, text, refs, ref_mask)
      x = self.run_blocks(emb["tokens"], emb["mod"], emb["text"], emb["rope"], emb["mask"])
      return self.head(x, emb)

  def embed(self, video, timestep, text, refs=None, ref_mask=None) -> dict[str, Any]:
    """Everything the blocks take: tokens ``[refs | video]``, modulation, embedded text, RoPE tables, key mask.

    With :meth:`run_blocks` and :meth:`head` this is ``__call__`` in three parts, so a step cache can skip the
    blocks (the sampler's MagCache / TeaCache) and reuse their residual. ``grid`` is static (Python ints).
    """
    cfg = self.config
    b = video.shape[0]
    x, grid = self._patchify(video)
    ref_grids: list[tuple[int, int]] = []
    mask = None
    if refs is not None and refs.shape[1] > 0:
      n = refs.shape[1]
      if cfg.max_refs and n > cfg.max_refs:
        raise ValueError(f"{n} references given but config.model.max_refs={cfg.max_refs}; pass fewer "
                         "references or raise model.max_refs")
      r = refs.reshape((b * n, 1) + refs.shape[2:])
      ref_tokens, (_, rh, rw) = self._patchify(r)
      ref_grids = [(rh, rw)] * n
      x = jnp.concatenate([ref_tokens.reshape(b, n * rh * rw, self.dim), x], axis=1)
      if ref_mask is not None:
        key_mask = jnp.repeat(jnp.asarray(ref_mask, bool), rh * rw, axis=1)
        mask = jnp.concatenate([key_mask, jnp.ones((b, x.shape[1] - key_mask.shape[1]), bool)], 1)
    x = constrain(x, _ACT)
    ids = rope_lib.position_ids(grid, ref_grids, scheme=cfg.rope_scheme, ref_shift=cfg.rope_ref_shift)
    rope = rope_lib.rope_tables(ids, cfg.head_dim, cfg.rope_theta)

    temb = self.time_linear_2(jax.nn.silu(self.time_linear_1(
        timestep_features(jnp.asarray(timestep).reshape(b), cfg.freq_dim))))
    mod = self.time_proj(jax.nn.silu(temb)).astype(jnp.float32).reshape(b, 6, self.dim)
    return dict(tokens=x, mod=mod, temb=temb, text=self.embed_text(text), rope=rope, mask=mask, grid=grid)

  def embed_text(self, text):
    """umT5 states (B, L, text_dim) -> the blocks' context (B, L, dim)."""
    return self.text_linear_2(jax.nn.gelu(self.text_linear_1(text.astype(self.dtype)), approximate=True))

  def modulated_input(self, emb: dict[str, Any]) -> jax.Array:
    """The first block's modulated input (float32): what TeaCache measures the change of between steps."""
    first = jax.tree.map(lambda a: a[0], nnx.split(self.blocks)[1]) if self.scan_layers else None
    block = nnx.merge(nnx.split(self.blocks)[0], first) if self.scan_layers else self.blocks[0]
    return block.modulated_input(emb["tokens"], emb["mod"])

  def head(self, x, emb: dict[str, Any]) -> jax.Array:
    """Video tokens after the blocks -> velocity (B, F, H, W, C_out) float32 (reference tokens dropped)."""
    grid = emb["grid"]
    x = x[:, x.shape[1] - int(np.prod(grid)):]   # drop reference tokens
    shift, scale = jnp.split(self.head_table.value.astype(jnp.float32) + emb["temb"].astype(jnp.float32)[:, None],
                             2, axis=1)
    if cpu.active():
      shift, scale = cpu.broadcast_like(shift, x), cpu.broadcast_like(scale, x)
    x = (_layer_norm(x, self.config.eps) * (1 + scale) + shift).astype(self.dtype)
    out = self.proj_out(x)
    return self._unpatchify(out, grid).astype(jnp.float32)


def relayout_blocks(pure_state: dict, scan_layers: bool) -> dict:
  """A KaleidoDiT pure state dict with its ``blocks`` in the layout of ``model.scan_layers``.

  ``scan_layers=True`` stacks each block leaf on a leading layer axis (what nnx.vmap builds); ``False`` gives
  one ``{layer index: block}`` entry per layer (nnx.List). Same numbers either way, so a checkpoint written in
  one layout serves a model configured with the other (e.g. layers as a list, which slices no layer's weights
  out of a stack; bench/dit_step.py times both). A state already in the wanted layout comes back as it is
  (layer indices as ints). Stacking builds the stacked arrays on the host next to the per-layer ones.
  """
  blocks = pure_state["blocks"]
  per_layer = bool(blocks) and all(str(k).isdigit() for k in blocks)
  if per_layer != scan_layers:  # already in that layout (orbax may have restored layer indices as strings)
    return {**pure_state, "blocks": {int(k): v for k, v in blocks.items()}} if per_layer else pure_state
  if scan_layers:
    layers = [blocks[k] for k in sorted(blocks, key=int)]
    new_blocks = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
  else:
    n = len(jax.tree.leaves(blocks)[0])
    new_blocks = {i: jax.tree.map(lambda x, i=i: x[i], blocks) for i in range(n)}
  return {**pure_state, "blocks": new_blocks}


def param_count(module: Any) -> int:
  """Number of parameters of a (possibly abstract) module."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
