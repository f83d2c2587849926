"""OpenS2V-Eval's GmeScore: GME-Qwen2-VL (Alibaba-NLP/gme-Qwen2-VL-7B-Instruct) text and frame embeddings in Flax
NNX, loaded from the model's own directory (safetensors, tokenizer.json).

Facts from the benchmark's `eval/get_gmescore.py` and `eval/utils/gme/gme_model.py` (PKU-YuanGroup/OpenS2V-Nexus):
- frames: `np.linspace(0, n - 1, 32, dtype=int)` of the decoded RGB video (the script's default `--num_frames 32`);
- query: the prompt under the instruction "Find an image that matches the given text."; each frame a corpus item
  under "You are a helpful assistant."; the chat template `<|im_start|>system\\n{instruction}<|im_end|>\\n
  <|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n<|endoftext|>`, a frame's input being
  `<|vision_start|><|image_pad|><|vision_end|>` with the pad repeated once per merged vision token;
- a frame is made RGB and resized by GME's `fetch_image` (its own smart_resize: sides multiples of 28, between
  4 x 28^2 and 16384 x 28^2 pixels, PIL's default bicubic), then by the Qwen2-VL processor (sides multiples of 28,
  between 256 x 28^2 and 1280 x 28^2 pixels: GME's min / max image tokens), scaled to [0, 1], normalised by CLIP's
  mean / std, cut into 14 x 14 patches, each repeated over the 2-frame temporal patch;
- the embedding: GME's forward merges the vision tokens into the token embeddings and runs the language model with
  no position ids, so its three M-RoPE sections share the token's 1-D position (plain RoPE); the last token's final
  hidden state (all sequences of a call have the same length: no padding), L2-normalised;
- the score: the mean over frames of <query, frame>.

Architecture (Qwen2-VL; transformers' `modeling_qwen2_vl.py` for the facts): vision — a bias-free patch projection
(Conv3d kernel = stride = (2, 14, 14)), `depth` blocks of pre-LayerNorm (eps 1e-6) attention (fused qkv with bias,
2-D rotary over (row, column) with theta 10000 on half the head dim each) and a quick-GELU MLP (`mlp_ratio`), then the
merger: LayerNorm, 2 x 2 neighbouring tokens concatenated, Linear-GELU-Linear to the language model's width; the
patches are laid out block-major over those 2 x 2 blocks. Language model — Qwen2: RMSNorm (eps from config),
grouped-query attention with q / k / v bias and no o bias, SwiGLU MLP, causal.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from kaleido_jax import storage
from kaleido_jax.convert import common
from kaleido_jax.eval import aesthetics
from kaleido_jax.eval import spread

NUM_FRAMES = 32
FACTOR = 28                                   # patch 14 x merge 2
FETCH_PIXELS = (4 * 28 * 28, 16384 * 28 * 28)  # gme_model.py MIN_PIXELS / MAX_PIXELS (fetch_image)
PIXELS = (256 * 28 * 28, 1280 * 28 * 28)       # GmeQwen2VL(min_image_tokens=256, max_image_tokens=1280)
MAX_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
QUERY_INSTRUCTION = 'Find an image that matches the given text.'
CORPUS_INSTRUCTION = 'You are a helpful assistant.'
IMAGE_INPUT = '<|vision_start|><|image_pad|><|vision_end|>'
PATCH_BUCKET = 256  # images are padded to a multiple of this many patches (64 merged tokens): one program a bucket
TEXT_BUCKET = 32    # texts to a multiple of this many tokens


def chat(text: str, instruction: str) -> str:
  return (f'<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n'
          '<|im_start|>assistant\n<|endoftext|>')


# ---------------------------------------------------------------------------------------------- preprocessing


def fetch_size(height: int, width: int) -> tuple[int, int]:
  """GME's own smart_resize in fetch_image (rounded sides, at least one factor)."""
  lo, hi = FETCH_PIXELS
  h, w = max(FACTOR, round(height / FACTOR) * FACTOR), max(FACTOR, round(width / FACTOR) * FACTOR)
  if h * w > hi:
    beta = math.sqrt(height * width / hi)
    h, w = math.floor(height / beta / FACTOR) * FACTOR, math.floor(width / beta / FACTOR) * FACTOR
  elif h * w < lo:
    beta = math.sqrt(lo / (height * width))
    h, w = math.ceil(height * beta / FACTOR) * FACTOR, math.ceil(width * beta / FACTOR) * FACTOR
  if max(h, w) / min(h, w) > MAX_RATIO:
    h, w = (w * MAX_RATIO, w) if h > w else (h, h * MAX_RATIO)
  return h, w


def processor_size(height: int, width: int) -> tuple[int, int]:
  """The Qwen2-VL image processor's smart_resize with GME's pixel bounds."""
  lo, hi = PIXELS
  h, w = round(height / FACTOR) * FACTOR, round(width / FACTOR) * FACTOR
  if h * w > hi:
    beta = math.sqrt(height * width / hi)
    h = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
    w = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
  elif h * w < lo:
    beta = math.sqrt(lo / (height * width))
    h, w = math.ceil(height * beta / FACTOR) * FACTOR, math.ceil(width * beta / FACTOR) * FACTOR
  return h, w


def grid_of(height: int, width: int, patch: int = 14) -> tuple[int, int, int]:
  """The (1, gh, gw) patch grid `preprocess` gives an image of this size, without resizing it."""
  h, w = processor_size(*fetch_size(height, width))
  return 1, h // patch, w // patch


def preprocess(rgb: np.ndarray, patch: int = 14, temporal: int = 2, merge: int = 2) -> tuple[np.ndarray, tuple]:
  """One RGB uint8 frame -> (patches (gh * gw, 3 * temporal * patch^2) float32, (1, gh, gw))."""
  img = Image.fromarray(np.asarray(rgb, np.uint8)[..., :3]).convert('RGB')
  for size in (fetch_size, processor_size):
    h, w = size(img.height, img.width)
    if (w, h) != img.size:
      img = img.resize((w, h), Image.BICUBIC)
  x = (np.asarray(img, np.float32) / 255.0 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
  x = x.transpose(2, 0, 1)  # C, H, W
  c, hh, ww = x.shape
  gh, gw = hh // patch, ww // patch
  x = x.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch)
  x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # block row, block col, row in block, col in block, C, py, px
  x = np.repeat(x[:, :, :, :, :, None], temporal, axis=5)  # C, T, py, px: one image fills the temporal patch
  return x.reshape(gh * gw, c * temporal * patch * patch).astype(np.float32), (1, gh, gw)


# ---------------------------------------------------------------------------------------------- the network


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  rms_norm_eps: float
  rope_theta: float
  image_token_id: int
  vision_depth: int
  vision_dim: int
  vision_heads: int
  vision_mlp_ratio: float
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2

  @classmethod
  def from_dir(cls, path: str) -> 'Config':
    """config.json as transformers 4 (flat) or 5 (`text_config`) writes it."""
    cfg = storage.read_json(storage.join(path, 'config.json'))
    text, vision = cfg.get('text_config') or cfg, cfg['vision_config']
    rope = text.get('rope_parameters') or {}
    if vision.get('hidden_act', 'quick_gelu') != 'quick_gelu':
      raise ValueError(f'{path}: vision hidden_act {vision["hidden_act"]!r}; Qwen2-VL uses quick_gelu')
    return cls(vocab_size=text['vocab_size'], hidden_size=text['hidden_size'],
               intermediate_size=text['intermediate_size'], num_layers=text['num_hidden_layers'],
               num_heads=text['num_attention_heads'], num_kv_heads=text['num_key_value_heads'],
               rms_norm_eps=text.get('rms_norm_eps', 1e-6),
               rope_theta=float(rope.get('rope_theta', text.get('rope_theta', 1e6))),
               image_token_id=cfg.get('image_token_id', text.get('image_token_id', 151655)),
               vision_depth=vision['depth'], vision_dim=vision['embed_dim'], vision_heads=vision['num_heads'],
               vision_mlp_ratio=vision.get('mlp_ratio', 4), patch_size=vision.get('patch_size', 14),
               temporal_patch_size=vision.get('temporal_patch_size', 2),
               spatial_merge_size=vision.get('spatial_merge_size', 2))


def _rotate_half(x: jax.Array) -> jax.Array:
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-b, a], axis=-1)


def rotate(x: jax.Array, angles: jax.Array) -> jax.Array:
  """x (..., N, heads, d) rotated by angles (N, d / 2) or (B, N, d / 2) (each angle on dims i and i + d / 2)."""
  emb = jnp.concatenate([angles, angles], axis=-1)[..., None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  xf = x.astype(jnp.float32)
  return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)


class VisionBlock(nnx.Module):
  def __init__(self, dim: int, heads: int, mlp: int, rngs: nnx.Rngs, dtype):
    self.heads = heads
    self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs, param_dtype=dtype)
    self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, rngs=rngs, param_dtype=dtype)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs, param_dtype=dtype)
    self.proj = nnx.Linear(dim, dim, rngs=rngs, param_dtype=dtype)
    self.fc1 = nnx.Linear(dim, mlp, rngs=rngs, param_dtype=dtype)
    self.fc2 = nnx.Linear(mlp, dim, rngs=rngs, param_dtype=dtype)

  def __call__(self, x: jax.Array, angles: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    b, n, d = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    att = jax.nn.dot_product_attention(rotate(q, angles), rotate(k, angles), v, key_value_seq_lengths=lengths)
    x = x + self.proj(att.reshape(b, n, d))
    h = self.fc1(self.norm2(x))
    return x + self.fc2(h * jax.nn.sigmoid(1.702 * h))  # quick_gelu


def vision_angles(cfg: Config, gh: int, gw: int) -> np.ndarray:
  """(gh * gw, head_dim / 2): row angles then column angles per patch (theta 10000), block-major like the
  patches."""
  hd, m = cfg.vision_dim // cfg.vision_heads, cfg.spatial_merge_size
  inv = 1.0 / (10000.0 ** (np.arange(0, hd // 2, 2, dtype=np.float32) / (hd // 2)))
  rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing='ij')
  order = lambda a: a.reshape(gh // m, m, gw // m, m).transpose(0, 2, 1, 3).reshape(-1)
  return np.concatenate([order(rows)[:, None] * inv, order(cols)[:, None] * inv], axis=-1).astype(np.float32)


class Vision(nnx.Module):
  """(B, N, 3 * 2 * 14^2) patches -> (B, N / 4, hidden_size); images of other sizes padded at the end to N patches,
  their pads masked out of attention by `lengths` (B,)."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype):
    d = cfg.vision_dim
    self.cfg = cfg
    self.patch = nnx.Linear(3 * cfg.temporal_patch_size * cfg.patch_size ** 2, d, use_bias=False, rngs=rngs,
                            param_dtype=dtype)
    self.blocks = nnx.List([VisionBlock(d, cfg.vision_heads, int(d * cfg.vision_mlp_ratio), rngs, dtype)
                            for _ in range(cfg.vision_depth)])
    m = d * cfg.spatial_merge_size ** 2
    self.ln_q = nnx.LayerNorm(d, epsilon=1e-6, rngs=rngs, param_dtype=dtype)
    self.merge1 = nnx.Linear(m, m, rngs=rngs, param_dtype=dtype)
    self.merge2 = nnx.Linear(m, cfg.hidden_size, rngs=rngs, param_dtype=dtype)

  def __call__(self, patches: jax.Array, angles: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
    """angles: `vision_angles(cfg, gh, gw)`, (N, d) for one size or (B, N, d) padded like the patches."""
    x = self.patch(patches)
    for block in self.blocks:
      x = block(x, angles, lengths)
    b, n, d = x.shape
    x = self.ln_q(x).reshape(b, n // self.cfg.spatial_merge_size ** 2, -1)
    return self.merge2(jax.nn.gelu(self.merge1(x), approximate=False))


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * y.astype(x.dtype)


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: Config, rngs: nnx.Rngs, dtype):
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_heads
    self.heads, self.kv_heads = cfg.num_heads, cfg.num_kv_heads
    lin = lambda a, b, bias=True: nnx.Linear(a, b, use_bias=bias, rngs=rngs, param_dtype=dtype)
    self.q, self.k, self.v = lin(d, cfg.num_heads * hd), lin(d, cfg.num_kv_heads * hd), lin(d, cfg.num_kv_heads * hd)
    self.o = lin(cfg.num_heads * hd, d, False)
    self.gate, self.up = lin(d, cfg.intermediate_size, False), lin(d, cfg.intermediate_size, False)
    self.down = lin(cfg.intermediate_size, d, False)
    self.norm1, self.norm2 = RMSNorm(d, cfg.rms_norm_eps, dtype), RMSNorm(d, cfg.rms_norm_eps, dtype)

  def __call__(self, x: jax.Array, angles: jax.Array) -> jax.Array:
    b, n, _ = x.shape
    h = self.norm1(x)
    q = self.q(h).reshape(b, n, self.heads, -1)
    k, v = self.k(h).reshape(b, n, self.kv_heads, -1), self.v(h).reshape(b, n, self.kv_heads, -1)
    x = x + self.o(jax.nn.dot_product_attention(rotate(q, angles), rotate(k, angles), v,  # grouped-query
                                                 is_causal=True).reshape(b, n, -1))
    h = self.norm2(x)
    return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class GME(nnx.Module):
  """The vision tower and the language model; `embed(ids, patches)` -> unit-norm last-token states (B, hidden)."""

  def __init__(self, cfg: Config, rngs: nnx.Rngs | None = None, dtype=jnp.float32):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    self.vision = Vision(cfg, rngs, dtype)
    self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, param_dtype=dtype)
    self.layers = nnx.List([DecoderLayer(cfg, rngs, dtype) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

  def embed(self, ids: jax.Array, patches: jax.Array | None = None, angles: jax.Array | None = None,
            lengths: jax.Array | None = None, last: jax.Array | None = None) -> jax.Array:
    """ids (B, L); patches (B, N, P) whose merged tokens fill the image-pad positions of each sequence in order,
    `angles` / `lengths` as Vision takes them; `last` (B,) the index of each sequence's final token (default L - 1).
    Sequences shorter than L are padded after `last`: under causal attention no real token sees a pad, and the
    positions of the real tokens are unchanged, so a padded sequence gives the same embedding."""
    x = self.embed_tokens(ids)
    if patches is not None:
      feats = self.vision(patches, angles, lengths).astype(x.dtype)  # (B, N / 4, D)
      slot = jnp.cumsum(ids == self.cfg.image_token_id, axis=1) - 1
      picked = jnp.take_along_axis(feats, jnp.clip(slot, 0, feats.shape[1] - 1)[..., None], axis=1)
      x = jnp.where((ids == self.cfg.image_token_id)[..., None], picked, x)
    hd = self.cfg.hidden_size // self.cfg.num_heads
    inv = 1.0 / (self.cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    angles = jnp.asarray(np.arange(ids.shape[1], dtype=np.float32)[:, None] * inv)  # 1-D positions (see above)
    for layer in self.layers:
      x = layer(x, angles)
    x = self.norm(x)
    final = x[:, -1] if last is None else jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    final = final.astype(jnp.float32)
    return final / jnp.linalg.norm(final, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------- loading


def _prefixes(keys: Sequence[str]) -> tuple[str, str]:
  """(vision prefix, language-model prefix) of a transformers 4 or 5 Qwen2-VL checkpoint."""
  vision = 'model.visual.' if any(k.startswith('model.visual.') for k in keys) else 'visual.'
  text = 'model.language_model.' if any(k.startswith('model.language_model.') for k in keys) else 'model.'
  return vision, text


def load(path: str, dtype=jnp.float32) -> GME:
  """A GME / Qwen2-VL directory (config.json, safetensors shards) -> GME with its weights in `dtype`."""
  if not storage.exists(storage.join(path, 'config.json')):
    raise FileNotFoundError(f'{path!r} is not a GME-Qwen2-VL directory (no config.json)')
  cfg = Config.from_dir(path)
  reader = common.CheckpointReader(storage.fetched(path))  # a bucket's shards are read from a local copy
  get = lambda k: np.asarray(reader.get(k), np.float32)
  vp, tp = _prefixes(reader.keys())
  model = nnx.eval_shape(lambda: GME(cfg, nnx.Rngs(0), dtype))  # no random init of 8B parameters: all are read
  lin = lambda layer, key: aesthetics.load_linear(layer, get, key, dtype)
  norm = lambda layer, key: aesthetics.load_norm(layer, get, key, dtype)
  v = model.vision
  aesthetics.set_param(v.patch, 'kernel', get(vp + 'patch_embed.proj.weight').reshape(cfg.vision_dim, -1).T, dtype)
  for i, blk in enumerate(v.blocks):
    p = f'{vp}blocks.{i}.'
    norm(blk.norm1, p + 'norm1')
    norm(blk.norm2, p + 'norm2')
    lin(blk.qkv, p + 'attn.qkv')
    lin(blk.proj, p + 'attn.proj')
    lin(blk.fc1, p + 'mlp.fc1')
    lin(blk.fc2, p + 'mlp.fc2')
  norm(v.ln_q, vp + 'merger.ln_q')
  lin(v.merge1, vp + 'merger.mlp.0')
  lin(v.merge2, vp + 'merger.mlp.2')
  aesthetics.set_param(model.embed_tokens, 'embedding', get(tp + 'embed_tokens.weight'), dtype)
  for i, layer in enumerate(model.layers):
    p = f'{tp}layers.{i}.'
    for mine, theirs in (('q', 'self_attn.q_proj'), ('k', 'self_attn.k_proj'), ('v', 'self_attn.v_proj'),
                         ('o', 'self_attn.o_proj'), ('gate', 'mlp.gate_proj'), ('up', 'mlp.up_proj'),
                         ('down', 'mlp.down_proj')):
      lin(getattr(layer, mine), p + theirs)
    aesthetics.set_param(layer.norm1, 'weight', get(p + 'input_layernorm.weight'), dtype)
    aesthetics.set_param(layer.norm2, 'weight', get(p + 'post_attention_layernorm.weight'), dtype)
  aesthetics.set_param(model.norm, 'weight', get(tp + 'norm.weight'), dtype)
  return model


class Tokenizer:
  """The model directory's tokenizer.json through `tokenizers` (no transformers at run time)."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as HFTokenizer  # lazy: an optional dependency of the GME metric
    file = storage.join(path, 'tokenizer.json')
    if not storage.exists(file):
      raise FileNotFoundError(f'{path!r} has no tokenizer.json')
    self.tok = HFTokenizer.from_str(storage.read_text(file))

  def __call__(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids


class GmeScorer:
  """GmeScore of a video (F, H, W, 3) RGB uint8 and its prompt; also the image and text embeddings NexusScore uses.

  Images of any size share a few programs: their patches are padded to a multiple of `PATCH_BUCKET` (pads masked
  out of the vision attention) and their token sequences to the bucket's length after the final token, in batches
  of `batch`; texts are padded to a multiple of `TEXT_BUCKET`. The embeddings are those of the unpadded inputs
  (GME.embed's docstring); without the buckets every crop size NexusScore meets would compile the 8B network anew."""

  def __init__(self, path: str, dtype=jnp.float32, batch: int = 8, num_frames: int = NUM_FRAMES):
    self.model, self.tokenizer = load(path, dtype), Tokenizer(path)
    self.batch, self.num_frames = batch, num_frames
    graph, state = nnx.split(self.model)
    # One copy of the weights on every device of this host; a batch split over them.
    self._image = spread.OverDevices(lambda s, ids, p, a, n, last: nnx.merge(graph, s).embed(ids, p, a, n, last),
                                     state, num_batched=5)
    self._text = spread.OverDevices(lambda s, ids, last: nnx.merge(graph, s).embed(ids, last=last), state,
                                    num_batched=2)

  def text_embedding(self, text: str, instruction: str = QUERY_INSTRUCTION) -> np.ndarray:
    ids = self.tokenizer(chat(text, instruction))
    padded = np.zeros((1, -(-len(ids) // TEXT_BUCKET) * TEXT_BUCKET), np.int32)
    padded[0, :len(ids)] = ids
    return self._text(padded, np.asarray([len(ids) - 1], np.int32))[0]

  def image_embeddings(self, images: Sequence[np.ndarray]) -> np.ndarray:
    """RGB images of any sizes -> (N, hidden) corpus embeddings, in their order."""
    cfg = self.model.cfg
    merge = cfg.spatial_merge_size ** 2
    out = np.zeros((len(images), cfg.hidden_size), np.float32)
    buckets: dict[int, list[int]] = {}
    for i, image in enumerate(images):  # grids from the sizes: the patches are made a batch at a time (memory)
      _, gh, gw = grid_of(*np.shape(image)[:2])
      buckets.setdefault(-(-gh * gw // PATCH_BUCKET) * PATCH_BUCKET, []).append(i)
    overhead = len(self.tokenizer(chat(IMAGE_INPUT, CORPUS_INSTRUCTION))) - 1  # the text around the image tokens

    def row(i, size):
      patches, grid = preprocess(images[i])
      n = patches.shape[0]
      ids = self.tokenizer(chat(IMAGE_INPUT.replace('<|image_pad|>', '<|image_pad|>' * (n // merge)),
                                CORPUS_INSTRUCTION))
      return (ids, np.pad(patches, ((0, size - n), (0, 0))), np.pad(vision_angles(cfg, *grid[1:]),
                                                                     ((0, size - n), (0, 0))), n)
    for size, members in sorted(buckets.items()):
      length = overhead + size // merge  # a full bucket's sequence
      for j in range(0, len(members), self.batch):
        part = [row(i, size) for i in members[j:j + self.batch]]
        part = part + [part[-1]] * (self.batch - len(part))  # one program per bucket
        ids = np.zeros((self.batch, length), np.int32)
        for k, r in enumerate(part):
          ids[k, :len(r[0])] = r[0]
        got = self._image(ids, np.stack([r[1] for r in part]), np.stack([r[2] for r in part]),
                          np.asarray([r[3] for r in part], np.int32),
                          np.asarray([len(r[0]) - 1 for r in part], np.int32))
        out[members[j:j + self.batch]] = got[:len(members[j:j + self.batch])]
    return out

  def __call__(self, frames: np.ndarray, prompt: str) -> float:
    idx = np.linspace(0, len(frames) - 1, self.num_frames, dtype=int)
    return float(np.mean(self.image_embeddings([frames[i] for i in idx]) @ self.text_embedding(prompt)))
