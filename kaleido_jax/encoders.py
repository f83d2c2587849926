"""The frozen encoders around the DiT: video codec, umT5 + tokenizer, and what they make of a batch.

One object serves the trainer (pixel batches -> latents, captions -> embeddings, when the data were not
prepared with precomputed latents), the sampling pipeline and the exporter, so all three see the same
normalisation, padding and reference encoding:

  enc = Encoders.from_config(config, workdir=...)
  enc.text(prompts)                    -> (B, L, D) float32, zeros past each prompt (Wan's padding)
  enc.video(video)                     -> (B, f, h, w, z) normalised latents of (B, F, H, W, 3) in [-1, 1]
  enc.references(refs, ref_mask)       -> (B, R, h, w, z) normalised latents, padded slots zero
  enc.decode(latents)                  -> (B, F, H, W, 3) in [-1, 1]
  enc.encode_batch(batch)              -> the trainer's latent keys for a pixel batch of the data pipeline

Weights: `config.init_from.vae` / `.text_encoder` (converted directories or PyTorch-side checkpoints, via
kaleido_jax.convert) or, when empty, a random initialisation from a fixed seed, so that the trainer and a
later sampling process build the *same* random encoders (the CPU demo). Tokenizer: `text_encoder.
tokenizer_path`, or for the synthetic data set a sentencepiece model fit to its captions
(data.synthetic.train_caption_tokenizer), cached under WORKDIR/tokenizer.
"""

from __future__ import annotations

import os
import tempfile
import threading
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kaleido_jax import config as kcfg
from kaleido_jax import storage
from kaleido_jax.convert import vae as convert_vae
from kaleido_jax.convert import text_encoder as convert_te
from kaleido_jax.data import references as refs_lib
from kaleido_jax.data import synthetic
from kaleido_jax.model import codec as codec_lib
from kaleido_jax.model import text_encoder as te

RANDOM_ENCODER_SEED = 0  # random (not loaded) encoders are drawn from this seed, whatever config.seed is


def _tokenizer_cache(url: str) -> str:
  """This process's local directory for the sentencepiece model at a bucket `url` (sentencepiece reads local files;
  one per process, so processes of one host never write the same file)."""
  d = os.path.join(tempfile.gettempdir(), 'kaleido_jax', 'remote-tokenizer',
                   f'{zlib.crc32(url.encode()):08x}-{os.getpid()}')
  os.makedirs(d, exist_ok=True)
  return d


def tokenizer_file(config: ml_collections.ConfigDict, workdir: str | None = None) -> str:
  """The sentencepiece model the config asks for; builds the synthetic-caption one when none is named."""
  path = config.text_encoder.tokenizer_path
  if path:
    try:
      found = te.find_tokenizer_file(path, lambda p: storage.path(p).is_file(), storage.join)
    except FileNotFoundError as e:
      raise kcfg.ConfigError(str(e)) from None
    if not storage.is_remote(found):
      return found
    # sentencepiece reads local files: a bucket's model is fetched into a local cache.
    return storage.local_file(found, _tokenizer_cache(found))
  if config.data.source != 'synthetic':
    raise kcfg.ConfigError(
        'config.text_encoder.tokenizer_path is empty; point it at the umT5 sentencepiece model '
        "(Wan: google/umt5-xxl/spiece.model, diffusers: tokenizer/spiece.model)")
  root = workdir or os.path.join(tempfile.gettempdir(), 'kaleido_jax')
  train = lambda path: synthetic.train_caption_tokenizer(path, num_identities=max(64, config.data.num_identities),
                                                         seed=config.data.synthetic_seed)
  if not storage.is_remote(root):
    return train(os.path.join(root, 'tokenizer', 'spiece.model'))
  # A bucket workdir: sentencepiece reads local files, so the model is built (deterministically: every host gets
  # the same bytes) or fetched in a local cache and kept in the bucket beside the checkpoints.
  remote = storage.join(root, 'tokenizer', 'spiece.model')
  cache = _tokenizer_cache(remote)
  if storage.path(remote).exists():
    return storage.local_file(remote, cache)
  local = train(os.path.join(cache, 'spiece.model'))
  storage.upload(local, remote)
  return local


def load_codec(config: ml_collections.ConfigDict) -> Any:
  if config.vae.get('kind', 'wan') == 'pixel' or not config.init_from.vae:
    return codec_lib.make_codec(config.vae, rngs=nnx.Rngs(RANDOM_ENCODER_SEED))
  return convert_vae.load_vae(config.init_from.vae, config.init_from.vae_format, config.vae)


TEXT_ENCODER_DEVICES = ('accelerator', 'host')


def text_encoder_device(config: ml_collections.ConfigDict) -> Any:
  """The device umT5 lives and runs on (`sample.text_encoder_device`): the first local one, or the host CPU.

  'host' keeps the 5.7B encoder out of HBM for good (prompts are encoded by the host's CPU, once each:
  the prompt cache): what lets a 16 GiB chip hold the DiT alone.
  """
  where = config.sample.get('text_encoder_device', 'accelerator')
  if where not in TEXT_ENCODER_DEVICES:
    raise ValueError(f'config.sample.text_encoder_device={where!r}; choose one of {TEXT_ENCODER_DEVICES}')
  return jax.local_devices(backend='cpu')[0] if where == 'host' else jax.local_devices()[0]


def load_text_encoder(config: ml_collections.ConfigDict) -> te.UMT5Encoder:
  device = text_encoder_device(config)
  if not config.init_from.text_encoder:
    with jax.default_device(device):
      return te.UMT5Encoder(config.text_encoder, rngs=nnx.Rngs(RANDOM_ENCODER_SEED))
  return convert_te.load_text_encoder(config.init_from.text_encoder, config.init_from.text_encoder_format,
                                      config.text_encoder, device=device)


class Encoders:
  """Codec + text encoder + tokenizer with a prompt cache (see the module docstring)."""

  def __init__(self, codec: Any, text_encoder: te.UMT5Encoder, tokenizer: te.Tokenizer, text_len: int):
    self.codec, self.text_encoder, self.tokenizer, self.text_len = codec, text_encoder, tokenizer, text_len
    self.prompt_cache = te.PromptCache(text_encoder, tokenizer, text_len)
    # One caller at a time: NNX modules are not to be traversed by two threads at once, and batch sampling's
    # device groups (kaleido_jax/batch.py) share one host's encoders.
    self._lock = threading.RLock()

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, workdir: str | None = None) -> 'Encoders':
    return cls(load_codec(config), load_text_encoder(config), te.Tokenizer(tokenizer_file(config, workdir)),
               int(config.text_encoder.max_length))

  def release_text_encoder(self) -> None:
    """Drops umT5 (its weights leave the device once nothing else holds them); cached prompts still work.

    The one-shot memory plan of `--mode sample`: encode the prompts, release the encoder, then load the DiT.
    """
    self.text_encoder = None
    self.prompt_cache.encoder = None

  def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    return tuple(self.codec.latent_shape(num_frames, height, width))

  def text(self, prompts: Sequence[str] | str) -> np.ndarray:
    if isinstance(prompts, str):
      prompts = [prompts]
    with self._lock:
      return self.prompt_cache(list(prompts)).astype(np.float32)

  def video(self, video: Any) -> jnp.ndarray:
    with self._lock:
      return self.codec.normalize(self.codec.encode(jnp.asarray(video, jnp.float32)))

  def references(self, refs: Any, ref_mask: Any) -> jnp.ndarray:
    """(B, R, H, W, 3) images in [-1, 1] -> (B, R, h, w, z); each encoded alone as a 1-frame video."""
    with self._lock:
      z = refs_lib.encode_references(self.codec.encode, jnp.asarray(refs, jnp.float32))
      z = self.codec.normalize(z)
    mask = jnp.asarray(ref_mask, bool).reshape(z.shape[:2] + (1, 1, 1))
    return jnp.where(mask, z, 0.0)

  def decode(self, latents: Any, **decode_options: Any) -> jnp.ndarray:
    with self._lock:
      return self.codec.decode(self.codec.denormalize(jnp.asarray(latents, jnp.float32)), **decode_options)

  def encode_batch(self, batch: dict[str, Any], empty_prompt: str = '') -> dict[str, np.ndarray]:
    """A pixel batch of data.pipeline (video, refs, ref_mask, caption) -> the trainer's latent keys.

    Adds `empty_text_embedding` (the empty prompt, B copies) for the objective's text dropout.
    """
    b = len(batch['caption'])
    out = dict(video_latents=np.asarray(self.video(batch['video'])),
               ref_latents=np.asarray(self.references(batch['refs'], batch['ref_mask'])),
               ref_mask=np.asarray(batch['ref_mask'], bool),
               text_embedding=self.text(list(batch['caption'])))
    out['empty_text_embedding'] = np.repeat(self.text([empty_prompt]), b, axis=0)
    if 'subject_weight' in batch:
      out['subject_weight'] = pool_to_latents(np.asarray(batch['subject_weight'], np.float32),
                                              out['video_latents'].shape[1:4])
    return out


def pool_to_latents(x: np.ndarray, latent_grid: tuple[int, int, int]) -> np.ndarray:
  """(B, F, H, W) pixel map -> (B, f, h, w) latent map: area mean over each latent's pixels.

  Spatially s x s blocks; in time the causal codecs' grouping (Wan: latent 0 <- frame 0, latent j <- frames
  4j-3 .. 4j), i.e. frame 0 alone and then groups of (F - 1) / (f - 1).
  """
  b, f_px, h_px, w_px = x.shape
  f, h, w = latent_grid
  x = x.reshape(b, f_px, h, h_px // h, w, w_px // w).mean((3, 5))
  if f == f_px:
    return x
  group = (f_px - 1) // max(f - 1, 1)
  rest = x[:, 1:1 + group * (f - 1)].reshape(b, f - 1, group, h, w).mean(2)
  return np.concatenate([x[:, :1], rest], axis=1)


def to_uint8(video: Any) -> np.ndarray:
  """[-1, 1] floats -> uint8 frames (rounded, clipped)."""
  return np.clip(np.round((np.asarray(video, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
