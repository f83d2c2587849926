"""umT5 text encoder (Wan2.1 uses umT5-XXL), its sentencepiece tokenizer, and Wan's prompt padding.

The architecture facts below were checked against transformers' ``models/umt5/modeling_umt5.py`` and
Wan2.1's ``wan/modules/t5.py``:

- Every layer owns its relative-position bias table (``num_buckets x heads``); plain T5 shares layer 0's.
- Attention scores are ``q . k`` with **no** 1/sqrt(d) scaling, plus the bias, plus the padding mask.
- RMSNorm (T5 ``LayerNorm``) has a weight only, no mean subtraction, and its statistics are in float32.
- FFN is gated GELU with the tanh approximation (``gelu_new``): ``wo(gelu(wi_0 x) * wi_1 x)``.
- Pre-norm residual blocks, then a final RMSNorm. The encoder is bidirectional.

Wan encodes a prompt padded to 512 tokens with a mask, keeps the first ``len`` rows (EOS included) and
zero-pads back to 512 (``WanModel.forward``), so :func:`encode_prompts` returns zeros beyond each length.
"""

from __future__ import annotations

import functools
import hashlib
import html
import math
import os
import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sentencepiece as spm
from flax import nnx

from kaleido_jax.model import quantization


_F32 = jnp.float32


def _normal(stddev: float):
  return nnx.initializers.normal(stddev=stddev)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket of ``key_pos - query_pos`` for every pair: (query_length, key_length) int32.

  Half the buckets hold the sign; within a half, distances below ``num_buckets // 4`` get their own bucket
  and larger ones share logarithmically wider buckets up to ``max_distance`` (then the last bucket).
  Computed on the host in float32 like the reference (``torch.log`` on a float32 tensor, truncating cast),
  so the bucket boundaries agree exactly; shapes are static, so this is a trace-time constant.
  """
  rel = np.arange(key_length, dtype=np.int64)[None, :] - np.arange(query_length, dtype=np.int64)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  rel = np.abs(rel)
  max_exact = half // 2
  is_small = rel < max_exact
  safe = np.maximum(rel, 1).astype(np.float32)
  with np.errstate(divide="ignore"):
    ratio = np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
  large = max_exact + (ratio * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


class RMSNorm(nnx.Module):
  """T5 layer norm: x / rms(x) * weight, statistics in float32, no bias, no mean subtraction."""

  def __init__(self, dim: int, eps: float, *, dtype: Any):
    self.weight = nnx.Param(jnp.ones((dim,), dtype), out_sharding=("embed",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(_F32)
    var = jnp.mean(jnp.square(xf), -1, keepdims=True)
    y = xf * jax.lax.rsqrt(var + self.eps)
    w = self.weight[...]
    # As the references: normalised values are cast to the weight's dtype before the scale (one bf16
    # rounding each, like transformers / Wan), exact in fp32.
    return (w * y.astype(w.dtype)).astype(x.dtype)


def _linear(din: int, dout: int, names: tuple[str, str], dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=dtype,
                    kernel_init=nnx.with_partitioning(_normal(din ** -0.5), names), rngs=rngs)


class UMT5Block(nnx.Module):
  """One encoder layer: pre-norm self-attention with its own relative bias, pre-norm gated-GELU FFN."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
    self.attn_norm = RMSNorm(d, cfg.eps, dtype=dtype)
    self.q = _linear(d, inner, ("embed", "heads"), dtype, rngs)
    self.k = _linear(d, inner, ("embed", "heads"), dtype, rngs)
    self.v = _linear(d, inner, ("embed", "heads"), dtype, rngs)
    self.o = _linear(inner, d, ("heads", "embed"), dtype, rngs)
    # (num_buckets, heads), as transformers' nn.Embedding(relative_attention_num_buckets, n_heads).
    self.relative_bias = nnx.Param(
        _normal(d ** -0.5)(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads), dtype),
        out_sharding=(None, "heads"))
    self.ffn_norm = RMSNorm(d, cfg.eps, dtype=dtype)
    self.wi_0 = _linear(d, cfg.d_ff, ("embed", "mlp"), dtype, rngs)
    self.wi_1 = _linear(d, cfg.d_ff, ("embed", "mlp"), dtype, rngs)
    self.wo = _linear(cfg.d_ff, d, ("mlp", "embed"), dtype, rngs)

  def __call__(self, x: jax.Array, buckets: jax.Array, mask_bias: jax.Array) -> jax.Array:
    b, l, _ = x.shape
    h = self.attn_norm(x)
    split = lambda t: t.reshape(b, l, self.num_heads, self.d_kv)
    q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
    # No 1/sqrt(d_kv) scaling (T5 / umT5: Mesh TF folds it into q's initialisation, std (d*d_kv)^-0.5).
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_F32)
    pos_bias = jnp.take(self.relative_bias[...].astype(_F32), buckets, axis=0)  # (L, L, H)
    scores = scores + jnp.transpose(pos_bias, (2, 0, 1))[None] + mask_bias
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    att = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, self.num_heads * self.d_kv)
    x = x + self.o(att)
    h = self.ffn_norm(x)
    h = jax.nn.gelu(self.wi_0(h), approximate=True) * self.wi_1(h)
    return x + self.wo(h)


class UMT5Encoder(nnx.Module):
  """umT5 encoder stack: ``encoder(input_ids (B, L) int, attention_mask (B, L)) -> (B, L, d_model)``.

  Layers are built with ``nnx.vmap`` (parameters stacked on a leading ``layers`` axis) and run with
  ``nnx.scan``, so compiling the 24-layer XXL encoder costs one layer's compile.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    # Logical axis names are metadata only here (as in train/state.py); the trainer / a mesh-aware
    # caller maps them to mesh axes and places the arrays.
    with nnx.use_eager_sharding(False):
      self._build(cfg, rngs)

  def _build(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
    dtype = jnp.dtype(cfg.dtype)
    self.num_buckets = int(cfg.relative_attention_num_buckets)
    self.max_distance = int(cfg.relative_attention_max_distance)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=dtype,
                           embedding_init=nnx.with_partitioning(_normal(1.0), ("vocab", "embed")),
                           rngs=rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return UMT5Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    # text_encoder.quantization: the layers' linears become qwix-quantized ones (model/quantization.py).
    quantization.quantize(self, quantization.check_scheme(cfg.get("quantization", "none"),
                                                          "config.text_encoder.quantization"))
    self.final_norm = RMSNorm(cfg.d_model, cfg.eps, dtype=dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    input_ids = jnp.asarray(input_ids)
    _, l = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    x = self.embed(input_ids)
    buckets = jnp.asarray(relative_position_buckets(l, l, self.num_buckets, self.max_distance))
    # Padded keys get the most negative float32 added, as transformers' bidirectional mask does.
    mask_bias = jnp.where(jnp.asarray(attention_mask)[:, None, None, :] > 0, 0.0,
                          jnp.finfo(_F32).min).astype(_F32)

    @nnx.scan(in_axes=(nnx.Carry, 0, None, None), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def run(h, block, buckets, mask_bias):
      return block(h, buckets, mask_bias)

    x = run(x, self.blocks, buckets, mask_bias)
    return self.final_norm(x)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("spiece.model", "tokenizer.model")
_TOKENIZER_SUBDIRS = ("", "tokenizer", os.path.join("google", "umt5-xxl"))


def tokenizer_candidates(path: str, join=os.path.join) -> list[str]:
  """Where the sentencepiece model of ``path`` may be: the file itself, or in a checkpoint dir's subdirs."""
  return [path] + [join(path, sub, name) if sub else join(path, name)
                   for sub in _TOKENIZER_SUBDIRS for name in _TOKENIZER_FILES]


def find_tokenizer_file(path: str, isfile=os.path.isfile, join=os.path.join) -> str:
  """The sentencepiece model in ``path`` (a file, or a checkpoint dir / its ``tokenizer`` subdir)."""
  tried = tokenizer_candidates(path, join)
  for candidate in tried:
    if isfile(candidate):
      return candidate
  raise FileNotFoundError(f"no sentencepiece tokenizer found for {path!r}; looked for {tried[1:]}. Point "
                          "config.text_encoder.tokenizer_path at the umT5 'spiece.model' (Wan ships it in "
                          "google/umt5-xxl/, diffusers in tokenizer/)")


def clean_prompt(text: str) -> str:
  """Wan's ``clean='whitespace'``: HTML unescaping (ftfy too when installed), then collapsed whitespace."""
  try:
    import ftfy  # lazy: optional dependency (ftfy), as in Wan's tokenizers.py
    text = ftfy.fix_text(text)
  except ImportError:
    pass
  text = html.unescape(html.unescape(text)).strip()
  return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
  """The umT5 sentencepiece tokenizer: ``ids + [EOS]``, trimmed to ``max_length`` (EOS kept last)."""

  def __init__(self, path: str, *, clean: bool = True):
    self.path = find_tokenizer_file(path)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(self.path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{self.path!r} is not a sentencepiece model ({e})") from e
    self.clean = clean
    self.eos_id = int(self._sp.eos_id())
    pad = int(self._sp.pad_id())
    self.pad_id = pad if pad >= 0 else 0   # umT5: pad 0, eos 1, unk 2
    if self.eos_id < 0:
      raise ValueError(f"{self.path!r} has no EOS piece; umT5 needs one (train with eos_id >= 0)")

  @property
  def vocab_size(self) -> int:
    return int(self._sp.GetPieceSize())

  def tokenize(self, prompt: str, max_length: int) -> list[int]:
    """One prompt's ids: pieces trimmed to ``max_length - 1``, then EOS (transformers' truncation)."""
    text = clean_prompt(prompt) if self.clean else prompt
    ids = list(self._sp.EncodeAsIds(text))[:max_length - 1]
    return ids + [self.eos_id]

  def __call__(self, prompts: Sequence[str], max_length: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), both (B, max_length) int32, right-padded with the pad id."""
    if isinstance(prompts, str):
      prompts = [prompts]
    ids = np.full((len(prompts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), max_length), np.int32)
    for i, p in enumerate(prompts):
      t = self.tokenize(p, max_length)
      ids[i, :len(t)] = t
      mask[i, :len(t)] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------------
# Prompt encoding (Wan's padding) and caching
# --------------------------------------------------------------------------------------------------


def _encode_masked(encoder: UMT5Encoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
  # nnx.split -> jax.jit -> nnx.merge: the weights go in as arguments and nothing is written back (nnx.jit would
  # hand the module fresh copies of every weight after each call: for umT5-XXL, 11 GB moved per prompt batch).
  graphdef, state = nnx.split(encoder)
  return _encode_split(graphdef, state, ids, mask)


@functools.partial(jax.jit, static_argnums=0)
def _encode_split(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array) -> jax.Array:
  hidden = nnx.merge(graphdef, state)(ids, mask)
  return jnp.where(mask[..., None] > 0, hidden, jnp.zeros((), hidden.dtype))


def encode_prompts(encoder: UMT5Encoder, tokenizer: Tokenizer, prompts: Sequence[str],
                   max_length: int = 512, *, batch_size: int | None = None) -> jax.Array:
  """(B, max_length, d_model): each prompt encoded with its mask, rows beyond its length set to zero.

  Always padded to ``max_length`` so one compiled program serves every batch of the same size;
  ``batch_size`` encodes in chunks of exactly that many rows (the last one padded, its padding dropped), so a
  prompt's embedding is the same bits whichever prompts share its chunk: XLA's reductions may round differently
  for another batch shape (1.5e-6 on the demo's umT5, CPU), which a resumed run's prompt cache would otherwise
  see when it encodes a caption next to other captions than the uninterrupted run did.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  n = len(prompts)
  if n == 0:
    d_model = encoder.embed.features
    return jnp.zeros((0, max_length, d_model), encoder.embed.embedding[...].dtype)
  ids, mask = tokenizer(prompts, max_length)
  if not batch_size:
    return _encode_masked(encoder, jnp.asarray(ids), jnp.asarray(mask))
  out = []
  for start in range(0, n, batch_size):
    i, m = ids[start:start + batch_size], mask[start:start + batch_size]
    k = len(i)
    if k < batch_size:  # keep the compiled shape
      i = np.concatenate([i, np.full((batch_size - k, max_length), tokenizer.pad_id, np.int32)])
      m = np.concatenate([m, np.zeros((batch_size - k, max_length), np.int32)])
      m[k:, 0] = 1  # padding rows attend to one token; they are dropped below
    out.append(_encode_masked(encoder, jnp.asarray(i), jnp.asarray(m))[:k])
  return jnp.concatenate(out, axis=0)


def prompt_lengths(tokenizer: Tokenizer, prompts: Sequence[str], max_length: int = 512) -> list[int]:
  """Token count of each prompt including EOS, capped at ``max_length`` (Wan's ``seq_lens``)."""
  return [len(tokenizer.tokenize(p, max_length)) for p in prompts]


def pad_embedding(trimmed: np.ndarray, max_length: int = 512) -> np.ndarray:
  """(len, D) -> (max_length, D) with zero rows after ``len`` (Wan's padding of trimmed context)."""
  trimmed = np.asarray(trimmed)
  if trimmed.shape[0] > max_length:
    raise ValueError(f"embedding has {trimmed.shape[0]} rows, more than max_length={max_length}")
  out = np.zeros((max_length,) + trimmed.shape[1:], trimmed.dtype)
  out[:trimmed.shape[0]] = trimmed
  return out


class PromptCache:
  """Prompt -> text embedding, computed once. Stores trimmed (len, D) float arrays; returns padded ones.

  Misses are encoded in fixed chunks of ``batch_size`` (`encode_prompts`): an embedding does not depend on which
  other prompts missed at the same time, so a run resumed with an empty cache feeds the same bits.

  Trimmed storage keeps a 100-token prompt at 100 x 4096 instead of 512 x 4096. ``save``/``load`` use a
  single ``.npz`` keyed by a hash of (prompt, max_length), so the training data can carry embeddings.
  """

  def __init__(self, encoder: UMT5Encoder | None, tokenizer: Tokenizer | None, max_length: int = 512,
               *, batch_size: int = 8, dtype: Any = np.float32):
    self.encoder, self.tokenizer = encoder, tokenizer
    self.max_length, self.batch_size, self.dtype = max_length, batch_size, dtype
    self._store: dict[str, np.ndarray] = {}

  def key(self, prompt: str) -> str:
    return hashlib.sha1(f"{self.max_length}\0{prompt}".encode("utf-8")).hexdigest()

  def __len__(self) -> int:
    return len(self._store)

  def __contains__(self, prompt: str) -> bool:
    return self.key(prompt) in self._store

  def add(self, prompts: Iterable[str]) -> None:
    """Encodes the prompts not cached yet, in jitted batches."""
    todo = list(dict.fromkeys(p for p in prompts if self.key(p) not in self._store))
    if not todo:
      return
    if self.encoder is None or self.tokenizer is None:
      raise KeyError(f"{len(todo)} prompt(s) are not cached and this cache has no encoder, e.g. {todo[0]!r}")
    emb = np.asarray(encode_prompts(self.encoder, self.tokenizer, todo, self.max_length,
                                    batch_size=self.batch_size))
    for p, e, n in zip(todo, emb, prompt_lengths(self.tokenizer, todo, self.max_length)):
      self._store[self.key(p)] = e[:n].astype(self.dtype)

  def trimmed(self, prompt: str) -> np.ndarray:
    self.add([prompt])
    return self._store[self.key(prompt)]

  def __call__(self, prompts: Sequence[str]) -> np.ndarray:
    """(B, max_length, D) padded embeddings, encoding only what is missing."""
    if isinstance(prompts, str):
      prompts = [prompts]
    self.add(prompts)
    return np.stack([pad_embedding(self._store[self.key(p)], self.max_length) for p in prompts])

  def save(self, path: str) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, **self._store)
    os.replace(tmp, path)

  def load(self, path: str) -> "PromptCache":
    with np.load(path) as data:
      for k in data.files:
        self._store[k] = data[k]
    return self
