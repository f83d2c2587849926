"""Subject grounding: frames (+ subject phrases) -> per-subject tracks, the boxes and masks `prepare` consumes.

`Grounder` is the interface (frames, phrases -> list[Track]); two implementations:
  - `MotionGrounder`: no weights, for static-camera footage: a per-pixel median background of the shot,
    foreground = pixels far from it, connected components per frame (scipy.ndimage), linked across frames by
    mask IoU (Hungarian assignment). Finds what moves; a subject that never moves is background to it.
  - `TransformersGrounder` (grounding_transformers.py): an open-vocabulary detector prompted with the phrases
    and SAM masks, both loaded from local directories.
Identity across shots of one source video (for cross-pairing) is a descriptor of each track's cut-out, clustered
per source (`assign_identities`); the descriptor is pluggable (`Embedder`), a colour + gradient-orientation
histogram by default.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Callable, Protocol, Sequence

import numpy as np
from scipy import ndimage
from scipy import optimize


@dataclasses.dataclass
class Track:
  """One subject through a shot: boxes (F, 4) x0, y0, x1, y1 in pixels (NaN where absent), masks (F, H, W).

  grounder: which grounder made it ('motion', 'people', 'transformers'); face_boxes (F, 4) for a person whose
  face was seen; embedding: an identity vector compared across shots by Euclidean distance under
  `embedding_threshold` (a face embedding), where both tracks have one; else the cut-outs' descriptors.
  """
  boxes: np.ndarray
  masks: np.ndarray
  phrase: str = ''
  score: float = 1.0
  subject_id: int = -1
  grounder: str = ''
  face_boxes: np.ndarray | None = None
  embedding: np.ndarray | None = None
  embedding_threshold: float = 0.0

  @property
  def presence(self) -> np.ndarray:
    return self.masks.reshape(len(self.masks), -1).any(1)

  def best_frame(self) -> int:
    return int(np.argmax(self.masks.reshape(len(self.masks), -1).sum(1)))


class Grounder(Protocol):
  def __call__(self, frames: np.ndarray, phrases: Sequence[str]) -> list[Track]:
    """frames (F, H, W, 3) uint8 of one shot; phrases: the subjects to look for (may be empty)."""


Embedder = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (frame (H, W, 3) uint8, mask (H, W)) -> (D,)


def mask_box(mask: np.ndarray) -> np.ndarray:
  """x0, y0, x1, y1 (exclusive) of a mask, NaN when it is empty."""
  ys, xs = np.nonzero(mask)
  if not len(ys):
    return np.full(4, np.nan, np.float32)
  return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of two x0, y0, x1, y1 boxes (0 when either is absent)."""
  if np.isnan(a).any() or np.isnan(b).any():
    return 0.0
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return float(inter / union) if union > 0 else 0.0


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _split_merged(comps: list[np.ndarray], last: list[np.ndarray], share: float = 0.3) -> list[np.ndarray]:
  """A component covering `share` of two or more live tracks' last masks is two subjects that touched: each of
  its pixels goes to the nearest of those masks (so a track is not swallowed by its neighbour)."""
  out, edt = [], {}  # each live mask's distance transform, once per frame
  for c in comps:
    owners = [k for k, m in enumerate(last) if m.sum() and (c & m).sum() >= share * m.sum()]
    if len(owners) < 2:
      out.append(c)
      continue
    for k in owners:
      if k not in edt:
        edt[k] = ndimage.distance_transform_edt(~last[k])
    dist = np.stack([edt[k] for k in owners])
    nearest = dist.argmin(0)
    out += [c & (nearest == k) for k in range(len(owners)) if (c & (nearest == k)).any()]
  return out


def link(components: list[list[np.ndarray]], min_iou: float = 0.1) -> list[list[tuple[int, np.ndarray]]]:
  """Per-frame component masks -> tracks [(frame, mask)], by Hungarian assignment on IoU with each track's last
  mask; a component that two live tracks run into is split between them first."""
  tracks: list[list[tuple[int, np.ndarray]]] = []
  for t, comps in enumerate(components):
    live = [k for k, tr in enumerate(tracks) if t - tr[-1][0] <= 2]  # a track survives two missed frames
    comps = _split_merged(comps, [tracks[k][-1][1] for k in live])
    used = set()
    if live and comps:
      cost = np.asarray([[-_mask_iou(tracks[k][-1][1], c) for c in comps] for k in live])
      rows, cols = optimize.linear_sum_assignment(cost)
      for r, c in zip(rows, cols):
        if -cost[r, c] >= min_iou:
          tracks[live[r]].append((t, comps[c]))
          used.add(c)
    tracks += [[(t, c)] for j, c in enumerate(comps) if j not in used]
  return tracks


# The largest short side (px) flow is computed at: a 720p decode's flow at 128 px costs 1/31 of its own; 64 px
# lost bigbuckbunny's rabbit in its last frames (IoU 0.0 at frame 42, 0.62 at 128 px).
FLOW_SIDE = 128


def camera_and_residual_flow(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per consecutive pair: the camera's motion (a 2x3 similarity fitted with RANSAC to Farneback flow sampled on an
  8-px grid) and the flow left once it is removed, (F-1, 2, 3) and (F-1, h, w, 2), in pixels of the frames scaled
  to a FLOW_SIDE short side (as they are when smaller)."""
  try:
    import cv2  # lazy: an optional dependency (the grounding extra)
  except ImportError as e:
    raise ImportError('the motion grounder on moving cameras needs OpenCV: pip install -e ".[grounding]"') from e
  scale = min(1.0, FLOW_SIDE / min(frames.shape[1:3]))
  size = (max(int(round(frames.shape[2] * scale)), 8), max(int(round(frames.shape[1] * scale)), 8))
  grey = [cv2.cvtColor(np.ascontiguousarray(x[..., :3]), cv2.COLOR_RGB2GRAY) for x in frames]
  if scale < 1:
    grey = [cv2.resize(g, size, interpolation=cv2.INTER_AREA) for g in grey]
  h, w = grey[0].shape
  ys, xs = np.mgrid[0:h:8, 0:w:8]
  pts = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  affines, residual = [], []
  for a, b in zip(grey[:-1], grey[1:]):
    flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    affine, inliers = cv2.estimateAffinePartial2D(pts, pts + flow[ys.ravel(), xs.ravel()], method=cv2.RANSAC,
                                                  ransacReprojThreshold=1.0)
    if affine is None or inliers.mean() < 0.5:  # no motion most of the frame shares: the camera is still
      affine = np.eye(2, 3)
    camera = np.stack([affine[0, 0] * xx + affine[0, 1] * yy + affine[0, 2] - xx,
                       affine[1, 0] * xx + affine[1, 1] * yy + affine[1, 2] - yy], -1)
    affines.append(affine)
    residual.append(flow - camera)
  return np.asarray(affines, np.float32), np.asarray(residual, np.float32)


@dataclasses.dataclass
class MotionGrounder:
  """Background subtraction + connected components + IoU linking, for static-camera shots (see module doc).

  threshold: max-channel |frame - background| (0..255) above which a pixel is foreground; min_area: the smallest
  component kept, as a fraction of the frame; min_presence: the fraction of frames a track must appear in;
  max_tracks: tracks kept per shot (the largest on average).
  """
  threshold: float = 30.0
  min_area: float = 0.004
  min_presence: float = 0.5
  max_tracks: int = 4
  background_frames: int = 64
  max_box_area: float = 0.9  # a track whose median box covers more of the frame is the scene moving, not a subject
  method: str = 'auto'  # 'background' | 'flow' | 'auto' (see `choose`)
  flow_threshold: float = 1.0  # px of coherent residual motion over `flow_window` frame pairs, at a 128-px side
  flow_window: int = 4
  camera_motion: float = 0.5  # px per frame of global motion (flow's scale) above which the camera moves
  min_trusted: float = 0.5  # the fraction of a static shot's pixels that must be clean background

  def choose(self, frames: np.ndarray) -> str:
    """'background' for a static camera over a clean background (the synthetic clips: exact there); 'flow' where
    the camera moves, or where too little of the frame stays still to complete a background from (swaying grass,
    water, a subject that covers its pixels the whole shot)."""
    return self._decide(frames)[0]

  def _decide(self, frames: np.ndarray) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """(method, the residual flow and the background where they were computed on the way)."""
    if self.method == 'background' or len(frames) < 2:
      return 'background', None, None
    affines, residual = camera_and_residual_flow(frames)
    if self.method == 'flow':
      return 'flow', residual, None
    # A camera move lasts: the median over the shot's frame pairs (one pair's fit can lock onto a subject).
    if np.median(np.abs(affines[:, :, 2]).max(-1)) > self.camera_motion:
      return 'flow', residual, None
    x, med, trusted = self._trusted(frames)
    if trusted.mean() < self.min_trusted:  # too little clean background to complete one from
      return 'flow', residual, None
    return 'background', residual, self._completed(x, med, trusted)

  def flow_foreground(self, frames: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
    """(F, H, W) pixels whose motion, after the camera's (a similarity fitted to the flow with RANSAC) is removed,
    adds up over `flow_window` frame pairs: an object moves one way for a while, grass and water sway back and
    forth and cancel (Farneback flow also smooths their fine texture away)."""
    f, h, w = frames.shape[:3]
    if residual is None:
      _, residual = camera_and_residual_flow(frames)
    csum = np.concatenate([np.zeros_like(residual[:1]), np.cumsum(residual, 0)])  # (F, h, w, 2) at flow scale
    half = max(self.flow_window // 2, 1)
    threshold = self.flow_threshold * min(residual.shape[1:3]) / 128
    st = ndimage.generate_binary_structure(2, 1)
    yi = np.minimum(np.arange(h) * residual.shape[1] // h, residual.shape[1] - 1)  # nearest, back to frame size
    xi = np.minimum(np.arange(w) * residual.shape[2] // w, residual.shape[2] - 1)
    out = np.empty((f, h, w), bool)
    for t in range(f):
      a, b = max(t - half, 0), min(t + half, f - 1)
      m = np.linalg.norm(csum[b] - csum[a], axis=-1) > threshold
      m = ndimage.binary_opening(m, st)
      out[t] = ndimage.binary_fill_holes(ndimage.binary_closing(m, st, iterations=2))[yi][:, xi]
    return out

  def background(self, frames: np.ndarray) -> np.ndarray:
    return self._background(frames)[0]

  def _background(self, frames: np.ndarray) -> tuple[np.ndarray, float]:
    """(H, W, 3) float32 background of a static shot.

    The per-pixel median alone fails where a subject covers a pixel in most frames (a slow or spinning subject
    becomes background and leaves a ghost where it was). So: pixels that (almost) never leave the median, in
    regions that reach the border, are trusted; every other pixel takes, of the values it shows over the shot, the one closest to the nearest
    trusted pixel's background, or that neighbour's value itself when it never shows anything close (a subject
    that covers it throughout).
    """
    x, med, trusted = self._trusted(frames)
    return self._completed(x, med, trusted), float(trusted.mean())

  def _trusted(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sampled frames, their median, the trusted pixels) of `_background`."""
    idx = np.linspace(0, len(frames) - 1, min(len(frames), self.background_frames)).round().astype(int)
    x = frames[idx].astype(np.float32)
    med = np.median(x, axis=0)
    off = (np.abs(x - med).max(-1) > self.threshold).mean(0)
    stable, _ = ndimage.label(off <= 0.1)
    # Only stable regions reaching the frame's border are trusted: a subject that shrinks or spins in place is
    # stable at its core too, but an island ringed by change.
    edge = np.unique(np.concatenate([stable[0], stable[-1], stable[:, 0], stable[:, -1]]))
    return x, med, np.isin(stable, edge[edge > 0])

  def _completed(self, x: np.ndarray, med: np.ndarray, trusted: np.ndarray) -> np.ndarray:
    if trusted.all() or not trusted.any():
      return med
    _, (iy, ix) = ndimage.distance_transform_edt(~trusted, return_indices=True)
    ref = med[iy, ix]
    dist = np.abs(x - ref).max(-1)
    best = dist.argmin(0)
    seen = np.take_along_axis(x, best[None, :, :, None], 0)[0]
    fill = np.where((dist.min(0) <= self.threshold)[..., None], seen, ref)
    return np.where(trusted[..., None], med, fill)

  def foreground(self, frames: np.ndarray) -> np.ndarray:
    method, residual, bg = self._decide(frames)
    if method == 'flow':
      return self.flow_foreground(frames, residual)
    if bg is None:
      bg = self.background(frames)
    fg = np.abs(frames.astype(np.float32) - bg).max(-1) > self.threshold
    st = ndimage.generate_binary_structure(2, 1)
    out = np.empty_like(fg)
    for t in range(len(fg)):
      m = ndimage.binary_opening(fg[t], st)
      m = ndimage.binary_closing(m, st, iterations=2)
      out[t] = ndimage.binary_fill_holes(m)
    return out

  def __call__(self, frames: np.ndarray, phrases: Sequence[str] = ()) -> list[Track]:
    f, h, w = frames.shape[:3]
    fg = self.foreground(frames)
    comps = []
    for t in range(f):
      lab, n = ndimage.label(fg[t])
      sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
      comps.append([lab == k + 1 for k in range(n) if sizes[k] >= self.min_area * h * w])
    tracks = []
    for tr in link(comps):
      if len(tr) < self.min_presence * f:
        continue
      masks = np.zeros((f, h, w), bool)
      for t, m in tr:
        masks[t] |= m
      boxes = np.stack([mask_box(m) for m in masks])
      area = np.nanmedian((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) / (h * w)
      if area > self.max_box_area:  # swaying grass, water or a camera move merged into one frame-wide component
        continue
      tracks.append(Track(boxes=boxes, masks=masks, score=float(len(tr) / f), grounder='motion'))
    tracks.sort(key=lambda tr: -tr.masks.sum())
    tracks = tracks[:self.max_tracks]
    # Phrases cannot be told apart by motion alone: only a single subject gets the single phrase.
    if len(tracks) == 1 and len(phrases) == 1:
      tracks[0].phrase = phrases[0]
    return tracks


def mask_overlap(a: Track, b: Track) -> float:
  """The fraction of ``a``'s mask pixels (over the shot) that ``b``'s masks also cover."""
  n = a.masks.sum()
  return float(np.logical_and(a.masks, b.masks).sum() / n) if n else 0.0


@dataclasses.dataclass
class CombinedGrounder:
  """Several grounders in order of trust (grounding='auto': people, then what moves): a later grounder's track that
  lies mostly (`overlap`) on an earlier one's is the same subject and dropped; phrases an earlier grounder gave
  out are not offered to the next, and once the caption's every phrase is given out the rest do not run."""
  grounders: Sequence[Grounder]
  max_tracks: int = 4
  overlap: float = 0.5

  def __call__(self, frames: np.ndarray, phrases: Sequence[str] = ()) -> list[Track]:
    out: list[Track] = []
    for g in self.grounders:
      given = {t.phrase for t in out}
      if phrases and given >= set(phrases):  # every subject the caption names is found: nothing left to look for
        break
      for tr in g(frames, [p for p in phrases if p not in given]):
        if not any(mask_overlap(tr, o) > self.overlap for o in out):
          out.append(tr)
    return out[:self.max_tracks]


# ---------------------------------------------------------------------------------------------- phrases

_VERBS = frozenset('''is are was were be moves move moving runs run running walks walk walking jumps jump spins spin
spinning rotates rotate turns turn zooms zoom shrinks shrink grows grow circles circle flies fly sits sit stands
stand plays play holds hold looks look talks talk dances dance rides ride swims swim eats eat drives drive goes go
comes come appears appear stays stay rolls roll slides slide falls fall rises rise floats float partly'''.split())
_ARTICLES = ('a ', 'an ', 'the ', 'one ', 'two ', 'three ', 'some ')


def subject_phrases(caption: str, max_subjects: int = 4) -> list[str]:
  """The subjects a caption names: each clause (split at ',', ';', ' and ', ' with ', ' while ') that starts with
  an article, up to its first verb. A heuristic for English captions; give the phrases instead (`subjects` in
  the captions jsonl) where it is wrong."""
  clauses = re.split(r'[,;.]| and | with | while ', caption.lower())
  out = []
  for c in clauses:
    c = c.strip()
    if not c.startswith(_ARTICLES):
      continue
    words = c.split()
    keep = [words[0]]
    for word in words[1:]:
      if word in _VERBS:
        break
      keep.append(word)
    if len(keep) > 1 and ' '.join(keep) not in out:
      out.append(' '.join(keep))
  return out[:max_subjects]


# ---------------------------------------------------------------------------------------------- identity

ORIENTATION_BINS = 8


def colour_texture_descriptor(frame: np.ndarray, mask: np.ndarray, colour_bins: int = 4,
                              orientation_bins: int = ORIENTATION_BINS) -> np.ndarray:
  """A cut-out's joint RGB histogram (colour_bins^3) and magnitude-weighted gradient-orientation histogram,
  each normalised to sum 1, concatenated (the default `Embedder`)."""
  px = frame[mask].astype(np.int32)
  if not len(px):
    return np.zeros(colour_bins ** 3 + orientation_bins, np.float32)
  q = (px * colour_bins) // 256
  col = np.bincount((q[:, 0] * colour_bins + q[:, 1]) * colour_bins + q[:, 2], minlength=colour_bins ** 3)
  grey = frame.astype(np.float32).mean(-1)
  gy, gx = np.gradient(grey)
  mag, ang = np.hypot(gx, gy)[mask], np.mod(np.arctan2(gy, gx), np.pi)[mask]
  ori = np.bincount(np.minimum((ang / np.pi * orientation_bins).astype(int), orientation_bins - 1),
                    weights=mag, minlength=orientation_bins)
  col = col / max(col.sum(), 1e-9)
  ori = ori / max(ori.sum(), 1e-9)
  return np.concatenate([col, ori]).astype(np.float32)


def descriptor_distance(a: np.ndarray, b: np.ndarray, colour_weight: float = 0.75) -> float:
  """Half-L1 distance, colour and orientation parts weighted (0: same, 1: disjoint)."""
  n = len(a) - ORIENTATION_BINS
  dc = 0.5 * np.abs(a[:n] - b[:n]).sum()
  do = 0.5 * np.abs(a[n:] - b[n:]).sum()
  return float(colour_weight * dc + (1 - colour_weight) * do)


def subject_id(source: str, cluster: int) -> int:
  """A stable int32 id for cluster `cluster` of source video `source` (the same whatever else is in the set)."""
  return int(zlib.crc32(f'{source}#{cluster}'.encode()) & 0x7FFFFFFF)


def assign_identities(source: str, shots: Sequence[tuple[np.ndarray, Sequence[Track]]], *,
                      threshold: float = 0.35, embed: Embedder = colour_texture_descriptor) -> list[list[int]]:
  """Subject ids for every track of every shot (frames, tracks) of one source video.

  A track whose descriptor (of its best frame's cut-out) is within `threshold` of a cluster's first member joins
  the nearest such cluster, greedily in shot order; two tracks of one shot never share a cluster. Where both
  carry an embedding (a face), the embedding's distance under its own threshold decides instead. Sets
  `track.subject_id` and returns the ids per shot.
  """
  centres: list[tuple[np.ndarray, np.ndarray | None, float]] = []  # (descriptor, embedding, its threshold)
  out = []
  for frames, tracks in shots:
    ids, taken = [], set()
    for tr in tracks:
      b = tr.best_frame()
      d = embed(frames[b], tr.masks[b])
      best, best_score = -1, 1.0  # score: distance / threshold (under 1 = the same subject)
      for k, (c, emb, emb_threshold) in enumerate(centres):
        if tr.embedding is not None and emb is not None:  # two faces: the face embedding decides
          score = float(np.linalg.norm(tr.embedding - emb)) / emb_threshold
        else:
          score = descriptor_distance(d, c) / threshold
        if k not in taken and score < best_score:
          best, best_score = k, score
      if best < 0:
        centres.append((d, tr.embedding, tr.embedding_threshold))
        best = len(centres) - 1
      taken.add(best)
      tr.subject_id = subject_id(source, best)
      ids.append(tr.subject_id)
    out.append(ids)
  return out
