"""OpenS2V-Eval's Aesthetics in JAX: the CLIP ViT image tower (`CLIPVisionModelWithProjection`, Flax NNX) and the
LAION improved-aesthetic MLP, loaded from the folders the benchmark uses (a transformers CLIP directory such as
openai/clip-vit-large-patch14, and `aesthetic-model.pth`).

As the benchmark's `get_aesscore.py` computes it: 32 frames at `linspace(0, F - 1, 32)` (truncated to int), each
through CLIPProcessor (shortest side to 224 with PIL bicubic, centre crop 224, /255, CLIP's mean / std), the
projected image embedding L2-normalised, the MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1; its dropouts are identity
at inference), the mean over the frames. transformers 5 has no Flax CLIP: this tower is ours, checked against the
PyTorch one on random weights (tests/eval/test_aesthetics.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from kaleido_jax import storage
from kaleido_jax.convert import common
from kaleido_jax.eval import spread

# LAION's MLP: Linear layers at these indices of its nn.Sequential (dropouts between them).
MLP_LAYERS = (0, 2, 4, 6, 7)
NUM_FRAMES = 32  # get_aesscore.py's --num_frames default


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_attention_heads: int = 16
  num_hidden_layers: int = 24
  image_size: int = 224
  patch_size: int = 14
  projection_dim: int = 768
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_dir(cls, path: str) -> 'VisionConfig':
    cfg = storage.read_json(storage.join(path, 'config.json'))
    cfg = cfg.get('vision_config', cfg)
    if cfg.get('hidden_act', 'quick_gelu') != 'quick_gelu':
      raise ValueError(f'{path}: hidden_act {cfg["hidden_act"]!r}; the CLIP tower here is quick_gelu (OpenAI CLIP)')
    fields = {f.name for f in dataclasses.fields(cls)}
    top = storage.read_json(storage.join(path, 'config.json'))
    out = {k: v for k, v in cfg.items() if k in fields}
    if 'projection_dim' not in cfg and 'projection_dim' in top:
      out['projection_dim'] = top['projection_dim']
    return cls(**out)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


class EncoderLayer(nnx.Module):
  def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.heads = cfg.num_attention_heads
    self.layer_norm1 = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.layer_norm2 = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))
    self.fc1 = nnx.Linear(d, cfg.intermediate_size, rngs=rngs)
    self.fc2 = nnx.Linear(cfg.intermediate_size, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    h = self.layer_norm1(x)
    split = lambda t: t.reshape(b, n, self.heads, d // self.heads)
    att = jax.nn.dot_product_attention(split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h)))
    x = x + self.out_proj(att.reshape(b, n, d))
    return x + self.fc2(quick_gelu(self.fc1(self.layer_norm2(x))))


class CLIPVisionTower(nnx.Module):
  """pixel_values (B, H, W, 3) normalised -> image_embeds (B, projection_dim), as CLIPVisionModelWithProjection."""

  def __init__(self, cfg: VisionConfig, rngs: nnx.Rngs):
    d, p = cfg.hidden_size, cfg.patch_size
    self.cfg = cfg
    self.patch_embedding = nnx.Conv(3, d, (p, p), strides=(p, p), padding='VALID', use_bias=False, rngs=rngs)
    self.class_embedding = nnx.Param(jnp.zeros((d,)))
    self.position_embedding = nnx.Param(jnp.zeros(((cfg.image_size // p) ** 2 + 1, d)))
    self.pre_layrnorm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.layers = nnx.List([EncoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
    self.post_layernorm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
    self.visual_projection = nnx.Linear(d, cfg.projection_dim, use_bias=False, rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    x = self.patch_embedding(pixels)
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...][None]
    x = self.pre_layrnorm(x)
    for layer in self.layers:
      x = layer(x)
    return self.visual_projection(self.post_layernorm(x[:, 0]))


class AestheticMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, dims: tuple[int, ...] = (768, 1024, 128, 64, 16, 1)):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x[..., 0]


def set_param(module: Any, attr: str, value: np.ndarray, dtype: Any = jnp.float32) -> None:
  """A checkpoint tensor into a module's parameter, its shape checked (shared by the eval networks' loaders)."""
  param = getattr(module, attr)
  if tuple(param.shape) != tuple(value.shape):
    raise ValueError(f'{type(module).__name__}.{attr}: the checkpoint has {value.shape}, the model {param.shape}')
  param.set_value(jnp.asarray(value, dtype))  # also fills a module built abstractly (nnx.eval_shape)


def load_linear(layer: nnx.Linear, get, prefix: str, dtype: Any = jnp.float32) -> None:
  """A PyTorch Linear (`prefix.weight` (out, in), `prefix.bias`) into an nnx.Linear."""
  set_param(layer, 'kernel', get(prefix + '.weight').T, dtype)
  if layer.bias is not None:
    set_param(layer, 'bias', get(prefix + '.bias'), dtype)


def load_norm(norm: nnx.LayerNorm, get, prefix: str, dtype: Any = jnp.float32) -> None:
  set_param(norm, 'scale', get(prefix + '.weight'), dtype)
  set_param(norm, 'bias', get(prefix + '.bias'), dtype)


def load_clip(path: str) -> CLIPVisionTower:
  """A transformers CLIP directory (CLIPModel or CLIPVisionModelWithProjection; safetensors) -> the tower."""
  if not storage.exists(storage.join(path, 'config.json')):
    raise FileNotFoundError(f'{path!r} is not a transformers CLIP directory (no config.json)')
  cfg = VisionConfig.from_dir(path)
  reader = common.CheckpointReader(path)
  get = lambda k: np.asarray(reader.get(k), np.float32)
  tower = CLIPVisionTower(cfg, nnx.Rngs(0))
  v = 'vision_model.'
  set_param(tower.patch_embedding, 'kernel', get(v + 'embeddings.patch_embedding.weight').transpose(2, 3, 1, 0))
  set_param(tower, 'class_embedding', get(v + 'embeddings.class_embedding'))
  set_param(tower, 'position_embedding', get(v + 'embeddings.position_embedding.weight'))
  load_norm(tower.pre_layrnorm, get, v + 'pre_layrnorm')
  load_norm(tower.post_layernorm, get, v + 'post_layernorm')
  for i, layer in enumerate(tower.layers):
    p = f'{v}encoder.layers.{i}.'
    for name in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      load_linear(getattr(layer, name), get, p + 'self_attn.' + name)
    load_linear(layer.fc1, get, p + 'mlp.fc1')
    load_linear(layer.fc2, get, p + 'mlp.fc2')
    load_norm(layer.layer_norm1, get, p + 'layer_norm1')
    load_norm(layer.layer_norm2, get, p + 'layer_norm2')
  load_linear(tower.visual_projection, get, 'visual_projection')
  return tower


def load_mlp(path: str) -> AestheticMLP:
  """`aesthetic-model.pth` (a state dict of `layers.{0,2,4,6,7}.weight/bias`) -> the MLP."""
  reader = common.CheckpointReader(path)
  get = lambda k: np.asarray(reader.get(k), np.float32)
  dims = [reader.shape(f'layers.{MLP_LAYERS[0]}.weight')[1]] + [reader.shape(f'layers.{i}.weight')[0]
                                                               for i in MLP_LAYERS]
  mlp = AestheticMLP(nnx.Rngs(0), tuple(dims))
  for layer, i in zip(mlp.layers, MLP_LAYERS):
    load_linear(layer, get, f'layers.{i}')
  return mlp


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """CLIPImageProcessor's steps for one image: shortest side to `size` (PIL, `resample`), centre crop, /255,
  mean / std."""
  size: int = 224
  crop: int = 224
  mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
  std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
  resample: int = 3  # PIL bicubic

  @classmethod
  def from_dir(cls, path: str) -> 'Preprocess':
    p = storage.join(path, 'preprocessor_config.json')
    if not storage.exists(p):
      return cls()
    c = storage.read_json(p)
    size = c.get('size', 224)
    crop = c.get('crop_size', size)
    return cls(size=int(size.get('shortest_edge', 224) if isinstance(size, dict) else size),
               crop=int(crop.get('height', 224) if isinstance(crop, dict) else crop),
               mean=tuple(c.get('image_mean', cls.mean)), std=tuple(c.get('image_std', cls.std)),
               resample=int(c.get('resample', 3)))

  def __call__(self, image: np.ndarray) -> np.ndarray:
    img = Image.fromarray(np.asarray(image)[..., :3])
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(self.size * long / short)  # transformers' get_resize_output_image_size truncates
    img = img.resize((self.size, new_long) if w <= h else (new_long, self.size), resample=self.resample)
    w, h = img.size
    top, left = (h - self.crop) // 2, (w - self.crop) // 2
    x = np.asarray(img, np.float32)[top:top + self.crop, left:left + self.crop] / 255.0
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


class AestheticScorer:
  """frames (F, H, W, 3) uint8 -> the benchmark's aes_score (module docstring)."""

  def __init__(self, clip_dir: str, mlp_path: str, *, batch_size: int = 8):
    for what, p, key in (('CLIP ViT-L/14 directory', clip_dir, 'aesthetic_clip'),
                         ('aesthetic MLP', mlp_path, 'aesthetic_mlp')):
      if not p:
        raise FileNotFoundError(f'Aesthetics needs the {what}: give eval.{key}')
      if not storage.exists(p):
        raise FileNotFoundError(f'Aesthetics needs the {what} {p!r}, which does not exist (eval.{key})')
    self._build(load_clip(clip_dir), load_mlp(mlp_path), Preprocess.from_dir(clip_dir), batch_size)

  @classmethod
  def from_modules(cls, tower: CLIPVisionTower, mlp: AestheticMLP, preprocess: Preprocess | None = None, *,
                   batch_size: int = 8) -> 'AestheticScorer':
    """A scorer of modules already built (bench/opens2v.py times ViT-L/14 on random weights this way)."""
    scorer = cls.__new__(cls)
    scorer._build(tower, mlp, preprocess or Preprocess(), batch_size)  # pylint: disable=protected-access
    return scorer

  def _build(self, tower: CLIPVisionTower, mlp: AestheticMLP, preprocess: Preprocess, batch_size: int) -> None:
    self.preprocess, self.batch_size = preprocess, batch_size
    graph, state = nnx.split((tower, mlp))

    def score(state, pixels):
      tower, mlp = nnx.merge(graph, state)
      embed = tower(pixels)
      return mlp(embed / jnp.linalg.norm(embed, axis=-1, keepdims=True))
    self._score = spread.OverDevices(score, state, num_batched=1)  # a batch over this host's devices

  def frame_scores(self, images: np.ndarray) -> np.ndarray:
    pixels = np.stack([self.preprocess(x) for x in images])
    out = []
    for i in range(0, len(pixels), self.batch_size):
      chunk = pixels[i:i + self.batch_size]
      pad = self.batch_size - len(chunk)  # one program for every chunk
      out.append(np.asarray(self._score(np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])))
                 [:len(chunk)])
    return np.concatenate(out)

  def __call__(self, frames: np.ndarray) -> float:
    idx = np.linspace(0, len(frames) - 1, NUM_FRAMES, dtype=int)
    return float(np.mean(self.frame_scores(frames[idx])))
