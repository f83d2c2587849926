"""Reference images as Kaleido sees them: fit inside the video frame, pad with white, encode one by one.

Kaleido's preprocessing (zai-org/Kaleido ``data_video.py``, ``_load_reference_images``): the image is
resized with Lanczos so that it fits the ``height x width`` frame keeping its aspect ratio (the long side
relative to the frame fills it; the other side is ``int(...)``-truncated), then padded with white
(255, 255, 255) split as ``delta // 2`` before and the rest after, and mapped to [-1, 1] by
``(x - 127.5) / 127.5``. Kaleido converts every image with ``.convert('RGB')``, which drops alpha (a
transparent background turns into whatever colour the hidden pixels hold, often black); here alpha is
composited on white instead, so a cut-out subject sits on the same white as the padding. EXIF rotation is
applied (phone photos), palette transparency is honoured, 16-bit images are scaled to 8 bits.

Each reference is VAE-encoded on its own as a 1-frame video (DESIGN.md: Kaleido's released training path
stacked the references as frames of one video, so the causal VAE kept only the first).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any, Callable, Sequence, Union

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from kaleido_jax import storage

WHITE = (255, 255, 255)
# Pillow's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS, ~89.5 MP) as the default limit.
DEFAULT_MAX_PIXELS = 89_478_485

ReferenceSource = Union[str, os.PathLike, Image.Image, np.ndarray]


class ReferenceImageError(ValueError):
  """A reference image cannot be used; the message names the image and what to do about it."""


def _name(src: Any, index: int | None) -> str:
  where = f"reference #{index} " if index is not None else "reference "
  if isinstance(src, (str, os.PathLike)):
    return f"{where}{os.fspath(src)!r}"
  if isinstance(src, np.ndarray):
    return f"{where}(array {src.shape} {src.dtype})"
  if isinstance(src, Image.Image):
    return f"{where}(PIL image {src.mode} {src.size[0]}x{src.size[1]})"
  return f"{where}({type(src).__name__})"


def _check_size(w: int, h: int, name: str, max_pixels: int | None) -> None:
  if w <= 0 or h <= 0:
    raise ReferenceImageError(f"{name} is empty ({w}x{h} pixels); give a non-empty image")
  if max_pixels is not None and w * h > max_pixels:
    raise ReferenceImageError(
        f"{name} has {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}; downscale it first "
        "or raise max_pixels if the file is trusted")


def _open_file(path: str, name: str, max_pixels: int | None) -> Image.Image:
  p = storage.path(path)  # a local file or a bucket object
  if not p.exists():
    raise ReferenceImageError(f"{name} does not exist; check the path")
  if p.is_dir():
    raise ReferenceImageError(f"{name} is a directory; give an image file (PNG, JPEG, WebP, ...)")
  if p.stat().length == 0:
    raise ReferenceImageError(f"{name} is an empty file (0 bytes); re-export or re-download it")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      img = Image.open(path if not storage.is_remote(path) else io.BytesIO(p.read_bytes()))
  except Image.DecompressionBombError as e:
    raise ReferenceImageError(f"{name} is over Pillow's size limit ({e}); downscale it first") from e
  except UnidentifiedImageError as e:
    raise ReferenceImageError(f"{name} is not an image Pillow can read; give a PNG, JPEG or WebP "
                              "file") from e
  except OSError as e:
    raise ReferenceImageError(f"{name} cannot be opened ({e})") from e
  _check_size(img.size[0], img.size[1], name, max_pixels)  # header only: nothing decoded yet
  try:
    img.load()
  except (OSError, SyntaxError, ValueError) as e:
    raise ReferenceImageError(f"{name} is truncated or corrupt ({e}); re-export or re-download it") from e
  return img


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
  if arr.dtype != np.uint8:
    raise ReferenceImageError(f"{name}: arrays must be uint8 in [0, 255] (H, W), (H, W, 1), (H, W, 3) or "
                              "(H, W, 4); convert with (x * 255).round().astype(np.uint8) or pass a file")
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim == 2:
    mode = "L"
  elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
    mode = "RGB" if arr.shape[-1] == 3 else "RGBA"
  else:
    raise ReferenceImageError(f"{name}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}")
  _check_size(arr.shape[1], arr.shape[0], name, None)
  return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def _high_depth_to_8bit(img: Image.Image) -> Image.Image:
  """16-bit / 32-bit greyscale -> 'L'. 'I;16*' spans 0..65535; 'I' is read as 16-bit when it exceeds 255."""
  arr = np.asarray(img).astype(np.float64)
  if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
    arr = arr / 257.0
  elif img.mode == "F" and arr.max(initial=0) <= 1.0:
    arr = arr * 255.0
  return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb_on_white(img: Image.Image) -> Image.Image:
  """Any Pillow mode -> 8-bit RGB, transparent pixels composited over white."""
  if img.mode in ("I", "F") or img.mode.startswith("I;16"):
    img = _high_depth_to_8bit(img)
  has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
  if has_alpha:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return img.convert("RGB")


def fitted_size(src_w: int, src_h: int, width: int, height: int) -> tuple[int, int]:
  """(w, h) of the image scaled to fit ``width x height`` keeping its aspect ratio (Kaleido's rule)."""
  img_ratio, frame_ratio = src_w / src_h, width / height
  if img_ratio > frame_ratio:
    w, h = width, int(width / img_ratio)
  else:
    w, h = int(height * img_ratio), height
  return max(1, min(w, width)), max(1, min(h, height))


def fit_and_pad(img: Image.Image, height: int, width: int) -> np.ndarray:
  """RGB image -> (height, width, 3) uint8: Lanczos-resized to fit, centred on white."""
  w, h = fitted_size(img.size[0], img.size[1], width, height)
  if (w, h) != img.size:
    img = img.resize((w, h), Image.Resampling.LANCZOS)
  canvas = np.full((height, width, 3), 255, np.uint8)
  top, left = (height - h) // 2, (width - w) // 2
  canvas[top:top + h, left:left + w] = np.asarray(img, np.uint8)
  return canvas


def load_reference(src: ReferenceSource, height: int, width: int, *,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS, index: int | None = None) -> np.ndarray:
  """One reference (path, PIL image or uint8 array) -> (height, width, 3) float32 in [-1, 1].

  Raises ReferenceImageError naming the image for a missing / empty / truncated / non-image file, an
  empty image, an image over ``max_pixels`` (None = no limit) or an unusable array.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"frame size must be positive, got {height}x{width}")
  name = _name(src, index)
  if isinstance(src, (str, os.PathLike)):
    img = _open_file(os.fspath(src), name, max_pixels)
  elif isinstance(src, Image.Image):
    img = src
    _check_size(img.size[0], img.size[1], name, max_pixels)
  elif isinstance(src, np.ndarray):
    img = _from_array(src, name)
    _check_size(img.size[0], img.size[1], name, max_pixels)
  else:
    raise ReferenceImageError(f"{name}: expected a file path, a PIL image or a uint8 array, got "
                              f"{type(src).__name__}")
  try:
    img = ImageOps.exif_transpose(img)
    rgb = to_rgb_on_white(img)
  except (OSError, ValueError) as e:
    raise ReferenceImageError(f"{name} cannot be decoded ({e}); re-export it as PNG or JPEG") from e
  out = fit_and_pad(rgb, height, width).astype(np.float32)
  return (out - 127.5) / 127.5


def prepare_references(srcs: Sequence[ReferenceSource] | ReferenceSource, height: int, width: int,
                       max_refs: int | None = None, *,
                       max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """References -> (N, height, width, 3) float32 in [-1, 1]; N may be 0."""
  if isinstance(srcs, (str, os.PathLike, Image.Image)):
    srcs = [srcs]
  elif isinstance(srcs, np.ndarray) and (srcs.ndim == 2 or (srcs.ndim == 3 and not _looks_stacked(srcs))):
    srcs = [srcs]  # one image; a 4-D array (or 3-D (N, H, W)) is a stack
  srcs = list(srcs)
  if max_refs is not None and len(srcs) > max_refs:
    raise ReferenceImageError(f"got {len(srcs)} reference images but at most {max_refs} are allowed "
                              "(Kaleido's released limit is 3: config.model.max_refs / data.max_refs); "
                              "drop some references")
  if not srcs:
    return np.zeros((0, height, width, 3), np.float32)
  return np.stack([load_reference(s, height, width, max_pixels=max_pixels, index=i)
                   for i, s in enumerate(srcs)])


def _looks_stacked(arr: np.ndarray) -> bool:
  """A (N, H, W) uint8 array of greyscale images is ambiguous with one (H, W, C); only C in (1, 3, 4)
  reads as a single image."""
  return arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)


def pad_reference_slots(refs: np.ndarray, max_refs: int) -> tuple[np.ndarray, np.ndarray]:
  """(N, H, W, 3) -> ((max_refs, H, W, 3) with white in unused slots, (max_refs,) bool mask)."""
  n = refs.shape[0]
  if n > max_refs:
    raise ReferenceImageError(f"got {n} references but only {max_refs} slots; drop some references")
  out = np.ones((max_refs,) + refs.shape[1:], np.float32)
  out[:n] = refs
  mask = np.zeros((max_refs,), bool)
  mask[:n] = True
  return out, mask


def encode_references(vae_encode_fn: Callable[[Any], Any], images: Any, *,
                      batch_size: int | None = None) -> Any:
  """Each reference encoded on its own as a 1-frame video: (N, H, W, 3) -> (N, h, w, z).

  ``vae_encode_fn`` takes videos (B, F, H, W, 3) and returns latents (B, F', h, w, z) (``WanVAE.encode``
  or anything with that contract). References go in as B = N videos of F = 1, never as N frames of one
  video (the causal VAE would fold them into one latent frame). ``images`` may also be (B, N, H, W, 3);
  the result is then (B, N, h, w, z). ``batch_size`` bounds how many references one call sees.
  """
  shape = tuple(images.shape)
  if len(shape) not in (4, 5) or shape[-1] != 3:
    raise ReferenceImageError(f"references must be (N, H, W, 3) or (B, N, H, W, 3) in [-1, 1], got {shape}")
  lead = shape[:-3]
  n = int(np.prod(lead)) if lead else 1
  videos = images.reshape((n, 1) + shape[-3:])
  if n == 0:
    raise ReferenceImageError("no references to encode; skip the VAE call when N = 0")
  step = batch_size or n
  chunks = []
  for start in range(0, n, step):
    z = vae_encode_fn(videos[start:start + step])
    zs = tuple(z.shape)
    if len(zs) != 5 or zs[0] != min(step, n - start) or zs[1] != 1:
      raise ReferenceImageError(f"vae_encode_fn returned {zs} for input {tuple(videos[start:start + step].shape)};"
                                " expected (B, 1, h, w, z) for 1-frame videos")
    chunks.append(z[:, 0])
  if len(chunks) == 1:
    out = chunks[0]
  else:
    xp = _array_module(chunks[0])
    out = xp.concatenate(chunks, axis=0)
  return out.reshape(lead + tuple(out.shape[1:]))


def _array_module(x: Any):
  if isinstance(x, np.ndarray):
    return np
  return jnp
