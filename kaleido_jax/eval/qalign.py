"""OpenS2V-Eval's MotionSmoothness: Q-Align (`q-future/one-align`, mPLUG-Owl2 on LLaMA-2-7B) rates the quality of
every 3-frame window of the video, and the score is the share of frames not next to a jump in that rating.

Facts from the benchmark's `eval/get_motion_smoothness.py` and the Q-Align code it vendors
(`eval/utils/Q-Align/q_align/`), OpenS2V-Eval v1.1 (PKU-YuanGroup/OpenS2V-Nexus 8cb7427):
- windows: every frame t of the video as decoded; window size 3, `left = 1`, frames max(0, t - 1) .. min(T, t + 2),
  padded to 3 at the end by repeating the first index, and for t < left the first frame three times — so [f0, f0,
  f0], [f(t-1), f(t), f(t+1)], ..., [f(T-2), f(T-2), f(T-1)];
- each window is one Q-Align "video": each frame padded to a square with CLIP's mean colour (122, 116, 104) and
  centred (`expand2square`), then CLIPImageProcessor at 448 (bicubic), its visual tokens in the prompt's image slot;
- the prompt: "USER: How would you rate the quality of this video?\\n<|image|>\\nASSISTANT: The quality of the video
  is", tokenised as `tokenizer_image_token` does (the LLaMA tokenizer's ids of each side of the image slot, the
  second side without its BOS);
- the rating: the last position's logits at the tokens of "excellent", "good", "fair", "poor", "bad", a softmax over
  those five, dotted with (1, 0.75, 0.5, 0.25, 0);
- MotionSmoothness: frames t and t + 1 are artifacts where |rating(t + 1) - rating(t)| > 0.025, and the score is
  1 - (artifact frames) / (frames). Written to `motion_smoothness.json` as {id: {"motion_smoothness": x}}.

The network (mPLUG-Owl2 as Q-Align ships it, `q_align/model/`): a ViT-L/14 at 448 (`MplugOwlVisionModel`: bias-free
patch conv, class token, learned positions, pre-LayerNorm; pre-LN blocks with one packed qkv projection laid out per
head (q, k, v of head 0, then head 1, ...), quick-GELU MLP; the final LayerNorm on every token), the visual
abstractor (64 learned queries, 6 layers: the queries LayerNormed (eps 1e-5) become the residual stream, keys and
values over [queries; LayerNormed image tokens] with fixed sin-cos positions added to queries and keys only, a
SwiGLU MLP with a LayerNorm inside; then Linear to 4096 and a learned end token: 65 tokens a frame), and LLaMA-2 with
the modality-adaptive module (k / v projections and both RMSNorms of every layer in two copies, `multiway.0` for text
and `multiway.1` for visual tokens; everything else shared; RoPE and the causal mask over the whole sequence).

A frame's 65 visual tokens do not depend on its window, so each frame goes through the vision tower and abstractor
once and the language model runs once per window: the script's numbers. The benchmark runs float16; the weights
here are in `dtype` (bfloat16 by default in `--mode eval`), the ratings and the threshold test in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from kaleido_jax import storage
from kaleido_jax.convert import common
from kaleido_jax.eval import aesthetics
from kaleido_jax.eval import gme
from kaleido_jax.eval import spread

PROMPT = 'USER: How would you rate the quality of this video?\n<|image|>\nASSISTANT: The quality of the video is'
IMAGE_SLOT = '<|image|>'
LEVELS = ('excellent', 'good', 'fair', 'poor', 'bad')
LEVEL_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
WINDOW = 3
THRESHOLD = 0.025
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  vision_hidden: int = 1024
  vision_intermediate: int = 4096
  vision_layers: int = 24
  vision_heads: int = 16
  image_size: int = 448
  patch_size: int = 14
  vision_eps: float = 1e-6
  abstractor_hidden: int = 1024
  abstractor_intermediate: int = 2816
  abstractor_layers: int = 6
  abstractor_heads: int = 16
  num_queries: int = 64
  abstractor_eps: float = 1e-6

  @classmethod
  def from_dir(cls, path: str) -> 'Config':
    """one-align's config.json: the LLaMA fields at the top, `visual_config` {visual_model, visual_abstractor}."""
    cfg = storage.read_json(storage.join(path, 'config.json'))
    vis = (cfg.get('visual_config') or {}).get('visual_model') or {}
    ab = (cfg.get('visual_config') or {}).get('visual_abstractor') or {}
    d = cls()
    return cls(vocab_size=cfg.get('vocab_size', d.vocab_size), hidden_size=cfg.get('hidden_size', d.hidden_size),
               intermediate_size=cfg.get('intermediate_size', d.intermediate_size),
               num_layers=cfg.get('num_hidden_layers', d.num_layers),
               num_heads=cfg.get('num_attention_heads', d.num_heads),
               num_kv_heads=cfg.get('num_key_value_heads', cfg.get('num_attention_heads', d.num_kv_heads)),
               rms_norm_eps=cfg.get('rms_norm_eps', d.rms_norm_eps), rope_theta=cfg.get('rope_theta', d.rope_theta),
               vision_hidden=vis.get('hidden_size', d.vision_hidden),
               vision_intermediate=vis.get('intermediate_size', d.vision_intermediate),
               vision_layers=vis.get('num_hidden_layers', d.vision_layers),
               vision_heads=vis.get('num_attention_heads', d.vision_heads),
               image_size=vis.get('image_size', d.image_size), patch_size=vis.get('patch_size', d.patch_size),
               vision_eps=vis.get('layer_norm_eps', d.vision_eps),
               abstractor_hidden=ab.get('hidden_size', d.abstractor_hidden),
               abstractor_intermediate=ab.get('intermediate_size', d.abstractor_intermediate),
               abstractor_layers=ab.get('num_hidden_layers', d.abstractor_layers),
               abstractor_heads=ab.get('num_attention_heads', d.abstractor_heads),
               num_queries=ab.get('num_learnable_queries', d.num_queries),
               abstractor_eps=ab.get('layer_norm_eps', d.abstractor_eps))

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


def _heads(x: jax.Array, heads: int) -> jax.Array:
  return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


# ---------------------------------------------------------------------------------------------- vision tower


class VisionLayer(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype):
    d = cfg.vision_hidden
    self.heads = cfg.vision_heads
    ln = lambda: nnx.LayerNorm(d, epsilon=cfg.vision_eps, rngs=rngs, param_dtype=dtype)
    self.input_layernorm, self.post_attention_layernorm = ln(), ln()
    self.query_key_value = nnx.Linear(d, 3 * d, rngs=rngs, param_dtype=dtype)
    self.dense = nnx.Linear(d, d, rngs=rngs, param_dtype=dtype)
    self.fc1 = nnx.Linear(d, cfg.vision_intermediate, rngs=rngs, param_dtype=dtype)
    self.fc2 = nnx.Linear(cfg.vision_intermediate, d, rngs=rngs, param_dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    qkv = self.query_key_value(self.input_layernorm(x)).reshape(b, n, self.heads, 3, d // self.heads)  # per head
    att = jax.nn.dot_product_attention(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :])
    x = x + self.dense(att.reshape(b, n, d))
    return x + self.fc2(aesthetics.quick_gelu(self.fc1(self.post_attention_layernorm(x))))


class Vision(nnx.Module):
  """pixels (B, 448, 448, 3) normalised -> (B, 1 + 32 * 32, 1024), the final LayerNorm on every token."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype):
    d, p = cfg.vision_hidden, cfg.patch_size
    self.patch_embed = nnx.Conv(3, d, (p, p), strides=(p, p), padding='VALID', use_bias=False, rngs=rngs,
                                param_dtype=dtype)
    self.cls_token = nnx.Param(jnp.zeros((d,), dtype))
    self.position_embedding = nnx.Param(jnp.zeros((cfg.grid ** 2 + 1, d), dtype))
    self.pre_layernorm = nnx.LayerNorm(d, epsilon=cfg.vision_eps, rngs=rngs, param_dtype=dtype)
    self.layers = nnx.List([VisionLayer(cfg, rngs, dtype) for _ in range(cfg.vision_layers)])
    self.post_layernorm = nnx.LayerNorm(d, epsilon=cfg.vision_eps, rngs=rngs, param_dtype=dtype)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    x = self.patch_embed(pixels.astype(self.cls_token.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (b, 1, x.shape[-1])), x], axis=1)
    x = self.pre_layernorm(x + self.position_embedding[...][None])
    for layer in self.layers:
      x = layer(x)
    return self.post_layernorm(x)


# ---------------------------------------------------------------------------------------------- abstractor


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """MAE's 1-D sin-cos table: (M, dim) = [sin | cos] of pos x 1 / 10000^(i / (dim / 2))."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
  out = np.einsum('m,d->md', pos.reshape(-1).astype(np.float32), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """MAE's 2-D table with a zero row for the class token: (1 + grid^2, dim), the first half of the dims from the
  column index (meshgrid puts w first), the second from the row."""
  cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  return np.concatenate([np.zeros((1, dim)), emb], axis=0)


class AbstractorLayer(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype):
    d, i = cfg.abstractor_hidden, cfg.abstractor_intermediate
    self.heads = cfg.abstractor_heads
    ln = lambda n, eps: nnx.LayerNorm(n, epsilon=eps, rngs=rngs, param_dtype=dtype)
    lin = lambda a, b: nnx.Linear(a, b, rngs=rngs, param_dtype=dtype)
    self.norm1, self.normk, self.norm2 = ln(d, 1e-5), ln(d, 1e-5), ln(d, 1e-5)  # nn.LayerNorm's default eps
    self.query, self.key, self.value = lin(d, d), lin(cfg.vision_hidden, d), lin(cfg.vision_hidden, d)
    self.out_proj = lin(d, d)
    self.w1, self.w3, self.w2 = lin(d, i), lin(d, i), lin(i, d)
    self.ffn_ln = ln(i, cfg.abstractor_eps)

  def __call__(self, q: jax.Array, image: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    h = self.norm1(q)  # the normalised queries are the residual stream from here on
    kv = jnp.concatenate([h, self.normk(image)], axis=1)
    key = self.key(kv + jnp.concatenate([q_pos, k_pos], axis=0)[None])
    att = jax.nn.dot_product_attention(_heads(self.query(h + q_pos[None]), self.heads), _heads(key, self.heads),
                                       _heads(self.value(kv), self.heads))
    x = h + self.out_proj(att.reshape(h.shape))
    n = self.norm2(x)
    return x + self.w2(self.ffn_ln(jax.nn.silu(self.w1(n)) * self.w3(n)))


class Abstractor(nnx.Module):
  """vision tokens (B, 1025, 1024) -> (B, num_queries + 1, hidden_size): the queries' states through `visual_fc`,
  then the end token."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype):
    d = cfg.abstractor_hidden
    self.query_embeds = nnx.Param(jnp.zeros((cfg.num_queries, d), dtype))
    self.layers = nnx.List([AbstractorLayer(cfg, rngs, dtype) for _ in range(cfg.abstractor_layers)])
    self.visual_fc = nnx.Linear(d, cfg.hidden_size, rngs=rngs, param_dtype=dtype)
    self.vit_eos = nnx.Param(jnp.zeros((cfg.hidden_size,), dtype))
    self.q_pos = nnx.Variable(jnp.asarray(sincos_1d(d, np.arange(cfg.num_queries)), dtype))  # buffers, not weights
    self.k_pos = nnx.Variable(jnp.asarray(sincos_2d(d, cfg.grid), dtype))

  def __call__(self, image: jax.Array) -> jax.Array:
    b = image.shape[0]
    q = jnp.broadcast_to(self.query_embeds[...], (b,) + self.query_embeds.shape)
    for layer in self.layers:
      q = layer(q, image, self.q_pos[...], self.k_pos[...])
    out = self.visual_fc(q)
    return jnp.concatenate([out, jnp.broadcast_to(self.vit_eos[...], (b, 1, out.shape[-1]))], axis=1)


# ---------------------------------------------------------------------------------------------- language model


class Multiway(nnx.Module):
  """Two copies of a module, `multiway.0` for text tokens and `multiway.1` for visual ones (mPLUG-Owl2's MAM)."""

  def __init__(self, make):
    self.multiway = nnx.List([make(), make()])

  def __call__(self, x: jax.Array, visual: jax.Array) -> jax.Array:
    return jnp.where(visual[..., None], self.multiway[1](x), self.multiway[0](x))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype):
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    self.heads, self.kv_heads = cfg.num_heads, cfg.num_kv_heads
    lin = lambda a, b: nnx.Linear(a, b, use_bias=False, rngs=rngs, param_dtype=dtype)
    norm = lambda: gme.RMSNorm(d, cfg.rms_norm_eps, dtype)
    self.input_layernorm, self.post_attention_layernorm = Multiway(norm), Multiway(norm)
    self.q_proj, self.o_proj = lin(d, cfg.num_heads * hd), lin(cfg.num_heads * hd, d)
    self.k_proj = Multiway(lambda: lin(d, cfg.num_kv_heads * hd))
    self.v_proj = Multiway(lambda: lin(d, cfg.num_kv_heads * hd))
    self.gate_proj, self.up_proj = lin(d, cfg.intermediate_size), lin(d, cfg.intermediate_size)
    self.down_proj = lin(cfg.intermediate_size, d)

  def __call__(self, x: jax.Array, visual: jax.Array, angles: jax.Array) -> jax.Array:
    h = self.input_layernorm(x, visual)
    q = gme.rotate(_heads(self.q_proj(h), self.heads), angles)
    k = gme.rotate(_heads(self.k_proj(h, visual), self.kv_heads), angles)
    att = jax.nn.dot_product_attention(q, k, _heads(self.v_proj(h, visual), self.kv_heads), is_causal=True)
    x = x + self.o_proj(att.reshape(x.shape[:2] + (-1,)))
    h = self.post_attention_layernorm(x, visual)
    return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))


class QAlign(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs | None = None, dtype=jnp.float32):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    self.vision = Vision(cfg, rngs, dtype)
    self.abstractor = Abstractor(cfg, rngs, dtype)
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, param_dtype=dtype)
    self.layers = nnx.List([DecoderLayer(cfg, rngs, dtype) for _ in range(cfg.num_layers)])
    self.norm = gme.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.lm_head = nnx.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, rngs=rngs, param_dtype=dtype)

  def frame_tokens(self, pixels: jax.Array) -> jax.Array:
    """(F, 448, 448, 3) normalised frames -> (F, 65, hidden) visual tokens."""
    return self.abstractor(self.vision(pixels))

  def last_logits(self, before: jax.Array, visual: jax.Array, after: jax.Array, ids: jax.Array) -> jax.Array:
    """Token ids before (Lb,) and after (La,) the image slot, visual tokens (B, V, hidden) -> the logits (B, K) of
    the tokens `ids` at the last position."""
    b = visual.shape[0]
    emb = lambda t: jnp.broadcast_to(self.embed_tokens(t)[None], (b,) + t.shape + (self.cfg.hidden_size,))
    x = jnp.concatenate([emb(before), visual.astype(self.embed_tokens.embedding.dtype), emb(after)], axis=1)
    n = x.shape[1]
    is_visual = jnp.zeros((n,), bool).at[before.shape[0]:before.shape[0] + visual.shape[1]].set(True)
    is_visual = jnp.broadcast_to(is_visual[None], (b, n))
    hd = self.cfg.hidden_size // self.cfg.num_heads
    inv = 1.0 / (self.cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    angles = jnp.asarray(np.arange(n, dtype=np.float32)[:, None] * inv)
    for layer in self.layers:
      x = layer(x, is_visual, angles)
    last = self.norm(x[:, -1])
    head = jnp.take(self.lm_head.kernel[...], ids, axis=1)  # (hidden, K): only the level words' logits
    return (last @ head).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------- loading


def load(path: str, dtype=jnp.float32) -> QAlign:
  """one-align's directory (config.json, safetensors or .bin shards) -> QAlign with its weights in `dtype`."""
  if not storage.exists(storage.join(path, 'config.json')):
    raise FileNotFoundError(f'{path!r} is not a Q-Align (one-align) directory (no config.json)')
  cfg = Config.from_dir(path)
  reader = common.CheckpointReader(storage.fetched(path))
  get = lambda k: np.asarray(reader.get(k), np.float32)
  if 'model.vision_model.embeddings.patch_embed.weight' not in reader:
    raise ValueError(f'{path!r} has no model.vision_model tensors: not an mPLUG-Owl2 / Q-Align checkpoint')
  model = nnx.eval_shape(lambda: QAlign(cfg, nnx.Rngs(0), dtype))
  set_ = lambda m, attr, v: aesthetics.set_param(m, attr, v, dtype)
  lin = lambda layer, key: aesthetics.load_linear(layer, get, key, dtype)
  norm = lambda layer, key: aesthetics.load_norm(layer, get, key, dtype)
  v, p = model.vision, 'model.vision_model.'
  set_(v.patch_embed, 'kernel', get(p + 'embeddings.patch_embed.weight').transpose(2, 3, 1, 0))
  set_(v, 'cls_token', get(p + 'embeddings.cls_token').reshape(-1))
  set_(v, 'position_embedding', get(p + 'embeddings.position_embedding')[0])
  norm(v.pre_layernorm, p + 'embeddings.pre_layernorm')
  norm(v.post_layernorm, p + 'post_layernorm')
  for i, layer in enumerate(v.layers):
    q = f'{p}encoder.layers.{i}.'
    norm(layer.input_layernorm, q + 'input_layernorm')
    norm(layer.post_attention_layernorm, q + 'post_attention_layernorm')
    lin(layer.query_key_value, q + 'self_attn.query_key_value')
    lin(layer.dense, q + 'self_attn.dense')
    lin(layer.fc1, q + 'mlp.fc1')
    lin(layer.fc2, q + 'mlp.fc2')
  a, p = model.abstractor, 'model.visual_abstractor.'
  set_(a, 'q_pos', sincos_1d(cfg.abstractor_hidden, np.arange(cfg.num_queries)))  # fixed tables, not read
  set_(a, 'k_pos', sincos_2d(cfg.abstractor_hidden, cfg.grid))
  set_(a, 'query_embeds', get(p + 'query_embeds')[0])
  set_(a, 'vit_eos', get(p + 'vit_eos').reshape(-1))
  lin(a.visual_fc, p + 'visual_fc')
  for i, layer in enumerate(a.layers):
    q = f'{p}encoder.layers.{i}.crossattention.'
    for name in ('query', 'key', 'value'):
      lin(getattr(layer, name), q + 'attention.' + name)
    norm(layer.norm1, q + 'norm1')
    norm(layer.normk, q + 'normk')
    lin(layer.out_proj, q + 'output.out_proj')
    norm(layer.norm2, q + 'output.norm2')
    for name in ('w1', 'w2', 'w3'):
      lin(getattr(layer, name), q + 'output.mlp.' + name)
    norm(layer.ffn_ln, q + 'output.mlp.ffn_ln')
  set_(model.embed_tokens, 'embedding', get('model.embed_tokens.weight'))
  for i, layer in enumerate(model.layers):
    q = f'model.layers.{i}.'
    lin(layer.q_proj, q + 'self_attn.q_proj')
    lin(layer.o_proj, q + 'self_attn.o_proj')
    for w in (0, 1):
      lin(layer.k_proj.multiway[w], f'{q}self_attn.k_proj.multiway.{w}')
      lin(layer.v_proj.multiway[w], f'{q}self_attn.v_proj.multiway.{w}')
      set_(layer.input_layernorm.multiway[w], 'weight', get(f'{q}input_layernorm.multiway.{w}.weight'))
      set_(layer.post_attention_layernorm.multiway[w], 'weight', get(f'{q}post_attention_layernorm.multiway.{w}.weight'))
    for name in ('gate_proj', 'up_proj', 'down_proj'):
      lin(getattr(layer, name), f'{q}mlp.{name}')
  set_(model.norm, 'weight', get('model.norm.weight'))
  lin(model.lm_head, 'lm_head')
  return model


# ---------------------------------------------------------------------------------------------- the score


class Tokenizer:
  """The model directory's LLaMA SentencePiece model (`tokenizer.model`), as the slow LlamaTokenizer Q-Align loads
  (`use_fast=False`) encodes plain text: BOS (1) then the pieces."""

  def __init__(self, path: str):
    import sentencepiece  # lazy: only this metric reads a LLaMA tokenizer here
    file = storage.join(path, 'tokenizer.model')
    if not storage.exists(file):
      raise FileNotFoundError(f'{path!r} has no tokenizer.model')
    self.sp = sentencepiece.SentencePieceProcessor(model_file=storage.fetched(file))
    self.bos = self.sp.bos_id()

  def __call__(self, text: str) -> list[int]:
    return [self.bos] + list(self.sp.encode(text))

  def prompt(self) -> tuple[list[int], list[int]]:
    """`tokenizer_image_token(PROMPT)`: the ids before the image slot (with BOS) and after it (without)."""
    before, after = PROMPT.split(IMAGE_SLOT)
    return self(before), self(after)[1:]

  def levels(self) -> list[int]:
    """`[tokenizer(word).input_ids[1] for word in LEVELS]`: each word's first piece after BOS."""
    return [self(word)[1] for word in LEVELS]


def windows(num_frames: int, size: int = WINDOW) -> list[list[int]]:
  """`load_video_sliding_window`'s frame indices for every frame (module docstring)."""
  left = (size - 1) // 2
  right = size - 1 - left
  out = []
  for t in range(num_frames):
    start, end = max(0, t - left), min(num_frames, t + right + 1)
    idx = list(range(start, end))
    while len(idx) < size:
      if start == 0:
        idx.append(idx[-1])
      else:
        idx.insert(0, idx[0])
    out.append([idx[0]] * size if t < left else idx)
  return out


def smoothness(ratings: Sequence[float], threshold: float = THRESHOLD) -> float:
  """1 - (frames next to a rating jump above `threshold`) / (frames): `get_artifacts_frames` and the script's score."""
  jumps = np.nonzero(np.abs(np.diff(np.asarray(ratings, np.float64))) > threshold)[0]
  return 1.0 - len(np.unique(np.concatenate([jumps, jumps + 1]))) / len(ratings)


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
  w, h = image.size
  if w == h:
    return image
  side = max(w, h)
  out = Image.new(image.mode, (side, side), background)
  out.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
  return out


class MotionSmoothnessScorer:
  """frames (F, H, W, 3) RGB uint8, every frame of the video -> the benchmark's motion_smoothness; `ratings` gives
  Q-Align's rating of every window."""

  def __init__(self, path: str, dtype=jnp.bfloat16, batch: int = 8):
    model = load(path, jnp.dtype(dtype))  # first: a folder that is not one-align is named by its missing config
    self.tokenizer = Tokenizer(path)
    self._build(model, aesthetics.Preprocess.from_dir(path), batch)

  @classmethod
  def from_modules(cls, model: QAlign, tokenizer: Tokenizer, preprocess: aesthetics.Preprocess | None = None,
                   batch: int = 8) -> 'MotionSmoothnessScorer':
    scorer = cls.__new__(cls)
    scorer.tokenizer = tokenizer
    scorer._build(model, preprocess or aesthetics.Preprocess(size=448, crop=448), batch)  # pylint: disable=protected-access
    return scorer

  def _build(self, model: QAlign, preprocess: aesthetics.Preprocess, batch: int) -> None:
    self.preprocess, self.batch = preprocess, batch
    self.background = tuple(int(x * 255) for x in preprocess.mean)  # expand2square's fill: CLIP's mean colour
    before, after = self.tokenizer.prompt()
    self.before, self.after = np.asarray(before, np.int32), np.asarray(after, np.int32)
    self.levels = np.asarray(self.tokenizer.levels(), np.int32)
    graph, state = nnx.split(model)
    self._tokens = spread.OverDevices(lambda s, px: nnx.merge(graph, s).frame_tokens(px), state, num_batched=1)
    self._logits = spread.OverDevices(
        lambda s, v: nnx.merge(graph, s).last_logits(jnp.asarray(self.before), v, jnp.asarray(self.after),
                                                     jnp.asarray(self.levels)), state, num_batched=1)

  def pixels(self, frame: np.ndarray) -> np.ndarray:
    img = expand2square(Image.fromarray(np.asarray(frame, np.uint8)[..., :3]), self.background)
    return self.preprocess(np.asarray(img))

  def _padded(self, fn, x: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(x), self.batch):
      chunk = x[i:i + self.batch]
      pad = self.batch - len(chunk)  # one program for every chunk
      out.append(fn(np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]))[:len(chunk)])
    return np.concatenate(out)

  def ratings(self, frames: np.ndarray) -> np.ndarray:
    tokens = self._padded(self._tokens, np.stack([self.pixels(f) for f in frames]))  # (F, 65, hidden)
    seqs = np.stack([tokens[w].reshape(-1, tokens.shape[-1]) for w in windows(len(frames))])
    logits = self._padded(self._logits, seqs)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs @ np.asarray(LEVEL_WEIGHTS)

  def __call__(self, frames: np.ndarray) -> float:
    if len(frames) == 0:
      raise ValueError('MotionSmoothness needs at least one frame')
    return smoothness(self.ratings(frames))
