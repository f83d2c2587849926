"""Raw video in: PyAV decoding at a fixed frame rate, shot (scene-cut) detection, training windows.

Kaleido's pipeline starts from long, variable-frame-rate web videos; the rest of `prepare` wants short clips of
one shot at `data.prepare.fps`. `decode` resamples by presentation time (the frame on screen at t = k / fps, so
variable frame rate and any container rate come out evenly spaced), `shot_cuts` finds the cuts from colour
histograms with an adaptive threshold (a cut is a jump far above the frames around it, as PySceneDetect's
adaptive detector judges it), and `windows` slices each shot into `num_frames` windows.
"""

from __future__ import annotations

import dataclasses
import os

import av
import numpy as np

from kaleido_jax import storage

VIDEO_EXTENSIONS = ('.mp4', '.webm', '.mkv', '.mov', '.gif')


class VideoError(ValueError):
  """A file that cannot be decoded (corrupt, truncated, no video stream); the message says which."""


@dataclasses.dataclass
class Decoded:
  frames: np.ndarray  # (F, H, W, 3) uint8
  fps: float          # the rate the frames are spaced at (the requested one, or the stream's average)
  source_fps: float   # the stream's average rate
  duration: float     # seconds covered by the frames


def list_videos(input_dir: str) -> list[str]:
  """Video files under `input_dir` (a directory or a bucket prefix, recursive), relative paths in sorted order."""
  return [rel for rel in storage.walk_files(input_dir)
          if rel.lower().endswith(VIDEO_EXTENSIONS) and not os.path.basename(rel).startswith('.')]


def _scaled(w: int, h: int, short_side: int) -> tuple[int, int]:
  if not short_side or min(w, h) <= short_side:
    return w, h
  r = short_side / min(w, h)
  return max(2, int(round(w * r / 2)) * 2), max(2, int(round(h * r / 2)) * 2)


def decode(path: str, fps: float = 0.0, *, short_side: int = 0, max_seconds: float = 0.0) -> Decoded:
  """Frames of the first video stream of any container FFmpeg reads (mp4 / webm / mkv / mov / gif).

  fps > 0: frame k is the one on screen at t0 + k / fps (repeated or skipped as needed), so a variable-rate
  stream comes out evenly spaced; fps = 0 keeps every decoded frame. short_side > 0 downscales (aspect kept)
  while decoding, so a long 1080p video never sits in memory at full size. max_seconds > 0 stops early.
  Raises VideoError naming the file for anything undecodable, including a stream cut short mid-file.
  """
  with storage.local_copy(path) as local:  # FFmpeg reads local files: a bucket object is downloaded first
    try:
      return _decode(local, fps, short_side=short_side, max_seconds=max_seconds)
    except VideoError as e:
      if local == str(path):
        raise
      raise VideoError(str(e).replace(local, str(path))) from None


def _decode(path: str, fps: float, *, short_side: int, max_seconds: float) -> Decoded:
  try:
    container = av.open(path)
  except (av.FFmpegError, OSError) as e:
    raise VideoError(f'{os.path.basename(path)}: cannot open ({type(e).__name__}: {e})') from None
  out: list[np.ndarray] = []
  try:
    if not container.streams.video:
      raise VideoError(f'{os.path.basename(path)}: no video stream')
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    rate = float(stream.average_rate or stream.guessed_rate or 0) or 0.0
    t0 = None
    last, last_t = None, None
    k = 0
    try:
      for frame in container.decode(stream):
        t = frame.time if frame.time is not None else (len(out) / rate if rate else 0.0)
        if t0 is None:
          t0 = t
        if max_seconds and t - t0 >= max_seconds:
          break
        w, h = _scaled(frame.width, frame.height, short_side)
        arr = frame.to_ndarray(format='rgb24', width=w, height=h)
        if fps <= 0:
          out.append(arr)
        else:
          # Every target time before this frame's shows the previous frame.
          while last is not None and t0 + k / fps < t - 1e-6:
            out.append(last)
            k += 1
        last, last_t = arr, t
    except av.FFmpegError as e:
      raise VideoError(f'{os.path.basename(path)}: decoding stopped after {len(out)} frames '
                       f'({type(e).__name__}: {e}); the file is corrupt or truncated') from None
    if fps > 0 and last is not None:
      end = last_t + (1.0 / rate if rate else 1.0 / fps)  # the last frame stays on screen one frame period
      while t0 + k / fps < end - 1e-6:
        out.append(last)
        k += 1
  finally:
    container.close()
  if not out:
    raise VideoError(f'{os.path.basename(path)}: no frames decoded')
  step = fps if fps > 0 else (rate or 1.0)
  return Decoded(frames=np.stack(out), fps=float(step), source_fps=rate, duration=len(out) / step)


def histograms(frames: np.ndarray, bins: int = 16) -> np.ndarray:
  """(F, 3 * bins) per-channel colour histograms, each channel's summing to 1. (A lookup table to the bin and a
  bincount per frame and channel: 9x faster than binning the whole clip as int32 at once, same counts.)"""
  f = frames.shape[0]
  to_bin = (np.arange(256) * bins // 256).astype(np.uint8)
  out = np.zeros((f, 3, bins), np.float32)
  for i in range(f):
    for c in range(3):
      out[i, c] = np.bincount(to_bin[frames[i, :, :, c]].ravel(), minlength=bins)
  out /= frames.shape[1] * frames.shape[2]
  return out.reshape(f, 3 * bins)


def cut_scores(frames: np.ndarray, bins: int = 16) -> np.ndarray:
  """(F - 1,) histogram distance between consecutive frames: half the L1 distance averaged over channels, 0..1."""
  h = histograms(frames, bins)
  return 0.5 * np.abs(np.diff(h, axis=0)).sum(1) / 3.0


def shot_cuts(frames: np.ndarray, *, threshold: float = 0.5, min_score: float = 0.08, ratio: float = 3.0,
              window: int = 3, min_shot: int = 4, bins: int = 16) -> list[int]:
  """Frame indices where a new shot starts.

  A cut at i (between frames i - 1 and i) when its histogram distance is above `threshold`, or above
  `min_score` and `ratio` times the mean distance of the `window` frame pairs on either side (the adaptive
  rule: a pan or a fast subject moves the histogram steadily, a cut jumps once). Cuts closer than `min_shot`
  frames to the previous one (or the start) are dropped (flashes, dissolves counted once).
  """
  s = cut_scores(frames, bins)
  cuts: list[int] = []
  for i, v in enumerate(s):
    around = np.concatenate([s[max(0, i - window):i], s[i + 1:i + 1 + window]])
    local = float(around.mean()) if around.size else 0.0
    if v >= threshold or (v >= min_score and v >= ratio * max(local, 1e-6)):
      if i + 1 - (cuts[-1] if cuts else 0) >= min_shot:
        cuts.append(i + 1)
  return cuts


def shots(num_frames: int, cuts: list[int]) -> list[tuple[int, int]]:
  """[(start, end)) frame ranges between the cuts."""
  edges = [0] + [c for c in cuts if 0 < c < num_frames] + [num_frames]
  return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def windows(start: int, end: int, num_frames: int, stride: int = 0) -> list[tuple[int, int]]:
  """[(s, s + num_frames)) training windows inside a shot: one centred window (stride 0) or every `stride`."""
  n = end - start
  if n < num_frames:
    return []
  if stride <= 0:
    s = start + (n - num_frames) // 2
    return [(s, s + num_frames)]
  return [(s, s + num_frames) for s in range(start, end - num_frames + 1, stride)]


def cut_accuracy(found: list[int], true: list[int], tolerance: int = 1) -> dict[str, float]:
  """Precision / recall of detected cuts against known ones (a hit within `tolerance` frames)."""
  hits = sum(any(abs(f - t) <= tolerance for f in found) for t in true)
  correct = sum(any(abs(f - t) <= tolerance for t in true) for f in found)
  return dict(precision=correct / len(found) if found else 1.0, recall=hits / len(true) if true else 1.0,
              found=len(found), true=len(true))
