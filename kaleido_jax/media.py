"""Writing generated videos: mp4 (mediapy + ffmpeg), GIF, and a PNG strip of frames; atomically.

mediapy drives an `ffmpeg` binary: the system one when installed (Debian's `ffmpeg` package), else the one
the imageio-ffmpeg wheel ships, so a fresh `pip install` can write mp4. Every file is written under a
temporary name in the target directory and renamed into place when complete, so an interrupted or failed
write never leaves a partial file where the output should be.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Sequence

import imageio_ffmpeg
import mediapy
import numpy as np

from kaleido_jax import storage

VIDEO_EXTENSIONS = ('.mp4', '.gif', '.webm', '.mov')


def use_available_ffmpeg() -> None:
  if shutil.which('ffmpeg') is None:
    mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A temporary path with `path`'s extension; renamed to `path` if the block succeeds, removed otherwise (a
  bucket `path`: written locally, then uploaded)."""
  if storage.is_remote(path):
    with tempfile.TemporaryDirectory() as d:
      tmp = os.path.join(d, os.path.basename(str(path)))
      yield tmp
      storage.upload(tmp, path)
    return
  directory = os.path.dirname(os.path.abspath(path)) or '.'
  os.makedirs(directory, exist_ok=True)
  base, ext = os.path.splitext(os.path.basename(path))
  fd, tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix=f'.partial{ext}', dir=directory)
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def check_video(frames: np.ndarray) -> np.ndarray:
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f'expected uint8 frames (F, H, W, 3), got {frames.dtype} {frames.shape}')
  return frames


def write_video(path: str, frames: np.ndarray, fps: float) -> str:
  """mp4 / webm / mov / gif through mediapy (ffmpeg). Returns `path`."""
  frames = check_video(frames)
  ext = os.path.splitext(path)[1].lower()
  if ext not in VIDEO_EXTENSIONS:
    raise ValueError(f'--out {path!r}: unknown video extension {ext!r}; use one of {VIDEO_EXTENSIONS}')
  use_available_ffmpeg()
  with atomic_path(path) as tmp:
    if ext == '.gif':
      mediapy.write_video(tmp, frames, fps=fps, codec='gif')
    else:
      mediapy.write_video(tmp, frames, fps=fps, qp=10)
  return path


def strip(rows: Sequence[np.ndarray], gap: int = 2) -> np.ndarray:
  """Rows of images (each (N, H, W, 3), N may differ) -> one image, white gaps between cells."""
  h = max(r.shape[1] for r in rows)
  w = max(r.shape[2] for r in rows)
  n = max(r.shape[0] for r in rows)
  out = np.full((len(rows) * (h + gap) - gap, n * (w + gap) - gap, 3), 255, np.uint8)
  for i, r in enumerate(rows):
    for j, img in enumerate(r):
      out[i * (h + gap):i * (h + gap) + img.shape[0], j * (w + gap):j * (w + gap) + img.shape[1]] = img
  return out


def write_image(path: str, image: np.ndarray) -> str:
  with atomic_path(path) as tmp:
    mediapy.write_image(tmp, np.asarray(image, np.uint8))
  return path


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling for viewing tiny (32x32) demo videos."""
  if factor <= 1:
    return frames
  return np.repeat(np.repeat(frames, factor, axis=-3), factor, axis=-2)
