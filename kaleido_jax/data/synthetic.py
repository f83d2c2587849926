"""A procedural multi-subject video set: the embedded default for the demo, tests and evaluation.

No downloads are possible here, yet the cross-paired pipeline needs subjects that recur across clips. Every
identity (shape, pattern, two colours) is fixed by the table seed; a clip is a pure function of
(seed, split, clip index): 1..max_subjects identities from its split's pool, each moving along its own path
(translation, circling, zoom, spin) over a panning procedural background, with an optional occluding bar.
Rendering is vectorised numpy over (frames, H, W), so the trainer can generate clips on the fly.

Splits: identities ``[0, N - heldout)`` are 'train', the last ``heldout`` identities are 'heldout' (never seen
in training). :func:`export_clips` writes clips in the `prepare` input format (mp4 + mask npz + jsonl), so the
real construction path is the tested path; :class:`SyntheticSource` serves cross-paired records in memory in
the same record format the prepared TFDS shards hold.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from typing import Any, Sequence

import av
import numpy as np
import sentencepiece as spm
from PIL import Image

from kaleido_jax.data import nuisance
from kaleido_jax.data import pairing
from kaleido_jax.data import synthesis

SHAPES = ('circle', 'square', 'triangle', 'star', 'ring', 'diamond', 'cross', 'hexagon')
PATTERNS = ('plain', 'striped', 'checkered', 'dotted', 'banded')
COLOURS = {
    'red': (220, 40, 40), 'orange': (245, 140, 20), 'yellow': (240, 215, 30), 'green': (40, 170, 60),
    'teal': (20, 160, 160), 'blue': (40, 80, 220), 'purple': (140, 50, 190), 'pink': (240, 110, 180),
    'brown': (120, 70, 30), 'black': (25, 25, 25),
}
MOTIONS = ('moves right', 'moves left', 'moves down', 'moves up', 'circles around', 'zooms in',
           'shrinks away', 'spins in place')
SPLITS = {'train': 0, 'heldout': 1}
BACKGROUNDS = ('procedural', 'plain', 'grey')
PAIRINGS = ('cross', 'same_clip')


def identity_table(num_identities: int, seed: int = 0) -> list[dict[str, Any]]:
  """The fixed identity of every subject id: distinct (shape, pattern, colour, colour) combinations."""
  names = list(COLOURS)
  combos = [c for c in itertools.product(range(len(SHAPES)), range(len(PATTERNS)), range(len(names)),
                                         range(len(names))) if c[2] != c[3]]
  if num_identities > len(combos):
    raise ValueError(f'at most {len(combos)} distinct identities, asked for {num_identities}')
  order = np.random.default_rng([seed, 0x1D]).permutation(len(combos))[:num_identities]
  table = []
  for k, j in enumerate(order):
    s, p, c1, c2 = combos[j]
    name = f'{names[c1]} {SHAPES[s]}' if PATTERNS[p] == 'plain' else \
        f'{names[c1]} {SHAPES[s]} {PATTERNS[p]} with {names[c2]}'
    table.append(dict(id=k, shape=SHAPES[s], pattern=PATTERNS[p], colour=np.array(COLOURS[names[c1]]),
                      colour2=np.array(COLOURS[names[c2]]), name=name))
  return table


def split_identities(num_identities: int, heldout: int, split: str) -> np.ndarray:
  """Identity ids of a split; 'train' and 'heldout' are disjoint by construction."""
  if not 0 <= heldout < num_identities:
    raise ValueError(f'heldout_identities={heldout} must be in [0, {num_identities})')
  if split == 'train':
    return np.arange(num_identities - heldout)
  if split == 'heldout':
    return np.arange(num_identities - heldout, num_identities)
  raise ValueError(f'unknown split {split!r}; use one of {sorted(SPLITS)}')


def clip_plan(seed: int, split: str, index: int, pool: np.ndarray, max_subjects: int, *,
              background: str = 'procedural', occluder_prob: float = 0.3,
              subject_scale: float = 1.0, clip_nuisance: float = 0.0) -> dict[str, Any]:
  """Everything random about one clip (cheap: no pixels), a pure function of (seed, split, index).

  `background`: 'procedural' (panning two-colour waves with grain), 'plain' (one flat random colour) or
  'grey' (the same flat light grey in every clip: the CPU demo's easiest setting, all capacity goes to the
  subjects); `occluder_prob`: chance of a passing grey bar; `subject_scale` multiplies every
  subject's size; `clip_nuisance` (0..1): the strength of the clip's own look (data/nuisance.py: grade, focus,
  grain, the subjects' stretch, the cut-out halo; 0 = none, the world before it). None of them changes the random
  draws, so the subjects and their motion are the same whatever the style.
  """
  if background not in BACKGROUNDS:
    raise ValueError(f'unknown background {background!r}; use one of {BACKGROUNDS}')
  rng = np.random.default_rng([seed, SPLITS[split], index])
  n = int(rng.integers(1, min(max_subjects, len(pool)) + 1))
  ids = rng.choice(pool, size=n, replace=False).astype(np.int32)
  subjects = []
  for _ in range(n):
    motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
    for _ in range(20):  # spread the subjects' starting points so that occlusion is partial, not total
      p0 = rng.uniform(0.25, 0.75, 2)
      if all(np.abs(p0 - q['p0']).max() > 0.22 for q in subjects):
        break
    p1, s0, s1, rot, amp = p0.copy(), rng.uniform(0.13, 0.2) * subject_scale, None, rng.uniform(-0.5, 0.5), 0.0
    d = rng.uniform(0.2, 0.35)
    if motion == 'moves right':
      p0[0], p1[0] = 0.5 - d / 2, 0.5 + d / 2
    elif motion == 'moves left':
      p0[0], p1[0] = 0.5 + d / 2, 0.5 - d / 2
    elif motion == 'moves down':
      p0[1], p1[1] = 0.5 - d / 2, 0.5 + d / 2
    elif motion == 'moves up':
      p0[1], p1[1] = 0.5 + d / 2, 0.5 - d / 2
    elif motion == 'circles around':
      amp = rng.uniform(0.08, 0.15)
    s1 = s0 * (1.6 if motion == 'zooms in' else 0.6 if motion == 'shrinks away' else rng.uniform(0.9, 1.1))
    spin = rng.choice([-1, 1]) * rng.uniform(2.0, 4.0) if motion == 'spins in place' else rng.uniform(-0.4, 0.4)
    subjects.append(dict(motion=motion, p0=p0, p1=p1, s0=s0, s1=s1, rot=rot, spin=spin, amp=amp,
                         phase=rng.uniform(0, 2 * np.pi)))
  bg = dict(c0=rng.uniform(60, 230, 3), c1=rng.uniform(60, 230, 3), angle=rng.uniform(0, 2 * np.pi),
            freq=rng.uniform(2, 6, 2), amp=rng.uniform(8, 25), pan=rng.uniform(-0.15, 0.15, 2),
            noise_seed=int(rng.integers(2**31)), plain=background in ('plain', 'grey'))
  if background == 'grey':
    bg['c0'] = np.full(3, 200.0)
  occluder = None
  if rng.random() < occluder_prob:
    occluder = dict(x0=rng.uniform(-0.1, 0.2), x1=rng.uniform(0.8, 1.1), w=rng.uniform(0.06, 0.12),
                    grey=rng.uniform(90, 160))
  look = nuisance.clip_look(seed, SPLITS[split], index, n, clip_nuisance) if clip_nuisance > 0 else None
  return dict(index=index, split=split, ids=ids, subjects=subjects, bg=bg, occluder=occluder, look=look)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  r = np.sqrt(u * u + v * v)
  if shape == 'circle':
    return r <= 1.0
  if shape == 'square':
    return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
  if shape == 'triangle':
    return (v <= 0.8) & (v >= -0.9 + 1.7 * np.abs(u) * 1.1)
  if shape == 'star':
    a = np.arctan2(v, u)
    return r <= 0.55 + 0.4 * np.cos(5 * a) ** 2
  if shape == 'ring':
    return (r <= 1.0) & (r >= 0.55)
  if shape == 'diamond':
    return np.abs(u) + np.abs(v) <= 1.0
  if shape == 'cross':
    return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
  if shape == 'hexagon':
    au, av = np.abs(u), np.abs(v)
    return (av <= 0.85) & (0.5 * av + 0.866 * au <= 0.9)
  raise ValueError(shape)


def _pattern(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """True where the identity's second colour shows."""
  if pattern == 'plain':
    return np.zeros(u.shape, bool)
  if pattern == 'striped':
    return np.floor((u + 2) * 3.0).astype(np.int32) % 2 == 1
  if pattern == 'checkered':
    return (np.floor((u + 2) * 2.5).astype(np.int32) + np.floor((v + 2) * 2.5).astype(np.int32)) % 2 == 1
  if pattern == 'dotted':
    fu, fv = (u + 2) * 2.5 % 1 - 0.5, (v + 2) * 2.5 % 1 - 0.5
    return fu * fu + fv * fv < 0.08
  if pattern == 'banded':
    return np.floor(np.sqrt(u * u + v * v) * 4).astype(np.int32) % 2 == 1
  raise ValueError(pattern)


def subject_pose(sub: dict[str, Any], t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(x, y, scale, angle) of one subject at normalised times t (0 = first frame, 1 = last)."""
  x = sub['p0'][0] + (sub['p1'][0] - sub['p0'][0]) * t + sub['amp'] * np.cos(2 * np.pi * t + sub['phase'])
  y = sub['p0'][1] + (sub['p1'][1] - sub['p0'][1]) * t + sub['amp'] * np.sin(2 * np.pi * t + sub['phase'])
  s = sub['s0'] * (sub['s1'] / sub['s0']) ** t
  a = sub['rot'] + sub['spin'] * t
  return x, y, s, a


def render_plan(plan: dict[str, Any], table: Sequence[dict[str, Any]], num_frames: int, height: int,
                width: int, frames: Sequence[int] | None = None,
                camera: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
  """Pixels of a planned clip (optionally only some frames; `camera`: another clip's look for the grade, focus
  and grain, the subjects' shapes staying this clip's).

  Returns video (T, H, W, 3) uint8, masks (T, S, H, W) bool (visible part of each subject after occlusion),
  full_masks (T, S, H, W) bool (the whole subject), subject_ids (S,) int32.
  """
  fr = np.arange(num_frames) if frames is None else np.asarray(frames)
  t = (fr / max(num_frames - 1, 1)).astype(np.float32)[:, None, None]
  aspect = width / height
  yy = ((np.arange(height, dtype=np.float32) + 0.5) / height)[None, :, None]
  xx = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, None, :]
  bg = plan['bg']
  f32 = lambda q: np.asarray(q, np.float32)
  # Background: a two-colour gradient with low-frequency waves that pans over time, plus fixed grain noise.
  bx, by = xx + f32(bg['pan'][0]) * t, yy + f32(bg['pan'][1]) * t
  g = np.clip(0.5 + 0.7 * (f32(np.cos(bg['angle'])) * (bx - 0.5) + f32(np.sin(bg['angle'])) * (by - 0.5)), 0, 1)
  wave = f32(bg['amp']) * np.sin(f32(2 * np.pi * bg['freq'][0]) * bx) * np.cos(f32(2 * np.pi * bg['freq'][1]) * by)
  c0, c1 = f32(bg['c0']), f32(bg['c1'])
  noise = np.random.default_rng(bg['noise_seed']).normal(0, 6, (height, width, 3)).astype(np.float32)
  img = c0 + (c1 - c0) * g[..., None] + (wave[..., None] + noise)
  if bg.get('plain'):
    img = np.broadcast_to(c0, img.shape).copy()
  full = []
  look = plan.get('look')
  for k, (sid, sub) in enumerate(zip(plan['ids'], plan['subjects'])):
    ident = table[int(sid)]
    stretch = f32(look['aspect'][k]) if look else f32(1.0)  # this clip's width-to-height of the subject
    x, y, sc, a = (f32(q) for q in subject_pose(sub, t))
    # Only the box the subject can reach over these frames (local radius <= 1.25) is evaluated.
    ry, rx = 1.25 * sc.max() * max(1.0, 1 / stretch), 1.25 * sc.max() * max(1.0, stretch) / aspect
    y0, y1 = int(np.clip(np.floor((y.min() - ry) * height), 0, height)), int(np.clip(np.ceil((y.max() + ry) * height), 0, height))
    x0, x1 = int(np.clip(np.floor((x.min() - rx) * width), 0, width)), int(np.clip(np.ceil((x.max() + rx) * width), 0, width))
    m = np.zeros((len(fr), height, width), bool)
    if y1 > y0 and x1 > x0:
      dx, dy = (xx[:, :, x0:x1] - x) * f32(aspect) / sc, (yy[:, y0:y1] - y) / sc
      ca, sa = np.cos(a), np.sin(a)
      u, v = ca * dx + sa * dy, -sa * dx + ca * dy
      u, v = u / np.sqrt(stretch), v * np.sqrt(stretch)  # stretched along its own axes, area kept
      mc = _shape_mask(ident['shape'], u, v)
      second = _pattern(ident['pattern'], u[mc], v[mc])
      crop = img[:, y0:y1, x0:x1]
      crop[mc] = np.where(second[:, None], f32(ident['colour2']), f32(ident['colour']))
      m[:, y0:y1, x0:x1] = mc
    full.append(m)
  full_masks = np.stack(full, 1) if full else np.zeros((len(fr), 0, height, width), bool)
  vis = full_masks.copy()
  for i in range(vis.shape[1] - 1):  # later subjects are drawn on top
    vis[:, i] &= ~np.any(full_masks[:, i + 1:], axis=1)
  occ = plan['occluder']
  if occ is not None:
    ox = occ['x0'] + (occ['x1'] - occ['x0']) * t
    bar = np.broadcast_to(np.abs(xx - ox) <= occ['w'] / 2, (len(fr), height, width))
    img[bar] = np.float32(occ['grey'])
    vis &= ~bar[:, None]
  video = np.clip(np.round(nuisance.apply(img, camera or look)), 0, 255).astype(np.uint8)
  return dict(video=video, masks=vis, full_masks=full_masks, subject_ids=plan['ids'].astype(np.int32))


def caption(plan: dict[str, Any], table: Sequence[dict[str, Any]]) -> str:
  """Names every subject and its motion (and the occluder when there is one)."""
  parts = [f'a {table[int(i)]["name"]} {s["motion"]}' for i, s in zip(plan['ids'], plan['subjects'])]
  text = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
  text = text[0].upper() + text[1:]
  if plan['occluder'] is not None:
    text += ', partly hidden by a passing grey bar'
  return text + nuisance.caption_suffix(plan.get('look')) + '.'


def caption_corpus(num_identities: int = 64, seed: int = 0, count: int = 2000) -> list[str]:
  """Captions covering the synthetic vocabulary (every identity, motion, the occluder), deterministic."""
  table = identity_table(min(num_identities, 1000), seed)
  rng = np.random.default_rng([seed, 0x7E47])
  pool = np.arange(len(table))
  return [caption(clip_plan(seed, 'train', i, pool, 4), table) for i in range(count)] + \
      [f'a {t["name"]} {m}' for t in table for m in MOTIONS] + [str(rng.integers(10))]


def train_caption_tokenizer(path: str, *, vocab_size: int = 256, num_identities: int = 64, seed: int = 0) -> str:
  """A sentencepiece model (umT5's special ids: pad 0, eos 1, unk 2, no bos) fit to the synthetic captions.

  The CPU demo has no umT5 tokenizer to download; this one is trained from :func:`caption_corpus` in about a
  second, deterministically (one thread), so every process that builds it gets the same ids. Written
  atomically to `path`; an existing file is reused.
  """
  if os.path.exists(path):
    return path
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
    prefix = os.path.join(tmp, 'spiece')
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus(num_identities, seed)), model_prefix=prefix,
        vocab_size=vocab_size, model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1, seed_sentencepiece_size=10000)
    os.replace(prefix + '.model', path)
  return path


def cutout(frame: np.ndarray, mask: np.ndarray, size: tuple[int, int], margin: float) -> np.ndarray:
  """Subject on white: crop the mask's box plus `margin` (fraction of the box side), square it, resize.

  Shared with the construction pipeline, so synthetic references and prepared references look alike.
  """
  h, w = mask.shape
  out = np.full(frame.shape, 255, np.uint8)
  out[mask] = frame[mask]
  ys, xs = np.nonzero(mask)
  if len(ys) == 0:
    return np.full(size + (3,), 255, np.uint8)
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  side = max(y1 - y0, x1 - x0) * (1 + 2 * margin)
  cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
  half = max(side / 2, 1)
  t, l = int(np.floor(cy - half)), int(np.floor(cx - half))
  b, r = int(np.ceil(cy + half)), int(np.ceil(cx + half))
  canvas = np.full((b - t, r - l, 3), 255, np.uint8)
  st, sl, sb, sr = max(t, 0), max(l, 0), min(b, h), min(r, w)
  canvas[st - t:sb - t, sl - l:sr - l] = out[st:sb, sl:sr]
  return np.asarray(Image.fromarray(canvas).resize((size[1], size[0]), Image.BILINEAR))


class SyntheticSet:
  """Plans of every clip of a split plus the identity → clips index used for cross-pairing."""

  def __init__(self, *, num_clips: int, num_identities: int, heldout_identities: int, split: str,
               num_frames: int, height: int, width: int, seed: int = 0, max_subjects: int = 4,
               background: str = 'procedural', occluder_prob: float = 0.3, subject_scale: float = 1.0,
               clip_nuisance: float = 0.0, exclude_seed: int | None = None):
    self.table = identity_table(num_identities, seed)
    self.pool = split_identities(num_identities, heldout_identities, split)
    if split == 'heldout' and exclude_seed is not None and exclude_seed != seed:
      # Held-out identities of another content seed may look like training identities of the seed a model was
      # trained on (same shape, pattern and colours); drop those so that "held out" still means unseen.
      seen = {t['name'] for t in identity_table(num_identities, exclude_seed)[:num_identities - heldout_identities]}
      self.pool = np.asarray([i for i in self.pool if self.table[int(i)]['name'] not in seen], np.int64)
    self.split, self.seed = split, seed
    self.num_frames, self.height, self.width = num_frames, height, width
    self.plans = [clip_plan(seed, split, i, self.pool, max_subjects, background=background,
                            occluder_prob=occluder_prob, subject_scale=subject_scale, clip_nuisance=clip_nuisance)
                  for i in range(num_clips)]
    self.clips_of: dict[int, list[int]] = {}
    for p in self.plans:
      for sid in p['ids']:
        self.clips_of.setdefault(int(sid), []).append(p['index'])

  def __len__(self) -> int:
    return len(self.plans)

  def clip(self, index: int) -> dict[str, Any]:
    out = render_plan(self.plans[index], self.table, self.num_frames, self.height, self.width)
    out['caption'] = caption(self.plans[index], self.table)
    return out


MAX_SUBJECT_WEIGHT = 4.0  # cap of a tiny subject's per-pixel weight (subject_weight)


def subject_weight(masks: np.ndarray) -> np.ndarray:
  """(F, H, W) float32: 0 on background, on subject k's visible pixels mean_area / area_k (capped).

  The balanced term of the subject loss weight (diffusion.subject_loss_weight): every subject's pixels carry
  the same total, so a small or mostly hidden second subject weighs as much in the loss as a large one.
  """
  masks = np.asarray(masks, bool)
  out = np.zeros((masks.shape[0],) + masks.shape[2:], np.float32)
  areas = masks.sum((0, 2, 3)).astype(np.float64)
  present = areas > 0
  if not present.any():
    return out
  mean_area = areas[present].mean()
  for k in np.nonzero(present)[0]:
    out = np.maximum(out, masks[:, k] * np.float32(min(mean_area / areas[k], MAX_SUBJECT_WEIGHT)))
  return out


def _best_frame(rendered: dict[str, np.ndarray], slot: int) -> int:
  """The probed frame showing most of the subject: visible area weighted by the unoccluded fraction."""
  vis = rendered['masks'][:, slot].sum((1, 2)).astype(np.float64)
  full = np.maximum(rendered['full_masks'][:, slot].sum((1, 2)), 1)
  return int(np.argmax(vis * (vis / full) ** 4))


class SyntheticSource:
  """In-memory `grain.RandomAccessDataSource`: cross-paired records in the prepared-shard format.

  Record i: video (F, H, W, 3) uint8, subject_ids (n,), caption (str), clip_id, and reference candidates:
  refs (C, H, W, 3) uint8 subject-on-white cut-outs, ref_slots (C,) (which subject each one shows),
  ref_clip_ids (C,) and ref_frames (C,) (pairing provenance). Each subject gets up to `refs_per_subject`
  candidates from distinct other clips containing the identity, never from clip i (the loader samples one);
  -1 = fallback when no other clip has the identity: the target clip's end frame with the most visible
  subject, augmented by
  `pairing.augment_reference`). `pairing='same_clip'` cuts every candidate from clip i itself (ref_clip_ids = i:
  the non-cross-paired baseline); `synthesis` re-renders the target clip (synthesis.synthesize: background,
  geometry, colour). The held-out split is always cross-paired and never synthesised (make_source).
  """

  def __init__(self, *, num_clips: int, num_identities: int, heldout_identities: int, split: str,
               num_frames: int, height: int, width: int, seed: int = 0, max_subjects: int = 4,
               cutout_margin: float = 0.1, probe_frames: int = 5, refs_per_subject: int = 2,
               background: str = 'procedural', occluder_prob: float = 0.3, subject_scale: float = 1.0,
               pairing: str = 'cross', synthesis: bool = False, clip_nuisance: float = 0.0,
               exclude_seed: int | None = None):
    if pairing not in PAIRINGS:
      raise ValueError(f'unknown pairing {pairing!r}; use one of {PAIRINGS}')
    self.per_subject, self.pairing, self.synthesis = refs_per_subject, pairing, synthesis
    self.set = SyntheticSet(num_clips=num_clips, num_identities=num_identities,
                            heldout_identities=heldout_identities, split=split, num_frames=num_frames,
                            height=height, width=width, seed=seed, max_subjects=max_subjects,
                            background=background, occluder_prob=occluder_prob, subject_scale=subject_scale,
                            clip_nuisance=clip_nuisance, exclude_seed=exclude_seed)
    self.margin, self.probe = cutout_margin, probe_frames

  def __len__(self) -> int:
    return len(self.set)

  def __getitem__(self, index: int) -> dict[str, Any]:
    s = self.set
    index = int(index)
    clip = s.clip(index)
    rng = np.random.default_rng([s.seed, SPLITS[s.split], index, 0xC2])
    refs, slots, ref_clips, ref_frames = [], [], [], []
    halo = nuisance.halo_px(s.plans[index].get('look'), s.height)  # this clip's cut-outs keep its background
    for slot, sid in enumerate(clip['subject_ids']):
      others = [c for c in s.clips_of[int(sid)] if c != index]
      if self.pairing == 'same_clip':
        # The baseline Kaleido argues against: references cut from the very clip the model must generate.
        frames = np.sort(rng.choice(s.num_frames, size=min(self.probe, s.num_frames), replace=False))
        sub = dict(masks=clip['masks'][frames], full_masks=clip['full_masks'][frames])
        for k in np.unique([_best_frame(sub, slot)] + list(rng.choice(len(frames), self.per_subject - 1)))[
            :self.per_subject]:
          refs.append(cutout(clip['video'][frames[k]], nuisance.with_halo(clip['masks'][frames[k], slot], halo),
                             (s.height, s.width), self.margin))
          slots.append(slot)
          ref_clips.append(index)
          ref_frames.append(int(frames[k]))
      elif others:
        for src in rng.choice(others, size=min(self.per_subject, len(others)), replace=False):
          plan = s.plans[int(src)]
          frames = np.sort(rng.choice(s.num_frames, size=min(self.probe, s.num_frames), replace=False))
          r = render_plan(plan, s.table, s.num_frames, s.height, s.width, frames=frames)
          j = int(np.nonzero(plan['ids'] == sid)[0][0])
          k = _best_frame(r, j)
          src_halo = nuisance.halo_px(plan.get('look'), s.height)  # the source clip's segmenter, its background
          refs.append(cutout(r['video'][k], nuisance.with_halo(r['masks'][k, j], src_halo), (s.height, s.width),
                             self.margin))
          slots.append(slot)
          ref_clips.append(int(src))
          ref_frames.append(int(frames[k]))
      else:
        k = 0 if clip['masks'][0, slot].sum() >= clip['masks'][-1, slot].sum() else s.num_frames - 1
        refs.append(pairing.augment_reference(
            cutout(clip['video'][k], nuisance.with_halo(clip['masks'][k, slot], halo), (s.height, s.width),
                   self.margin), rng))
        slots.append(slot)
        ref_clips.append(-1)
        ref_frames.append(k)
    video, text, masks = clip['video'], clip['caption'], clip['masks']
    if self.synthesis:  # background disentanglement on the target only: references stay cut-outs on white
      out = synthesis.synthesize(clip, np.random.default_rng([s.seed, SPLITS[s.split], index, 0x5E]))
      video, text, masks = out['video'], out['caption'], out['masks']
    return dict(video=video, refs=np.stack(refs), ref_slots=np.asarray(slots, np.int32),
                subject_ids=clip['subject_ids'], caption=text, clip_id=np.int32(index),
                ref_clip_ids=np.asarray(ref_clips, np.int32), ref_frames=np.asarray(ref_frames, np.int32),
                subject_weight=subject_weight(masks))


def plan_truth(plan: dict[str, Any], table: Sequence[dict[str, Any]], num_frames: int, height: int,
               width: int) -> dict[str, Any]:
  """What the metrics need to know about a clip: target video, visible masks (F, S, H, W), per-subject motions
  and per-frame poses (F, S, 4): x, y (fractions of width / height), size (radius over height), angle (rad)."""
  r = render_plan(plan, table, num_frames, height, width)
  t = np.arange(num_frames) / max(num_frames - 1, 1)
  poses = np.stack([np.stack(subject_pose(sub, t), -1) for sub in plan['subjects']], 1).astype(np.float32)
  return dict(target=r['video'], masks=r['masks'], motions=[sub['motion'] for sub in plan['subjects']],
              poses=poses)


def pasted_look(s: SyntheticSet, index: int, ref_clips: Sequence[int]) -> dict[str, Any]:
  """What copying the references' looks would make of clip `index` (slot i's reference cut from clip
  ref_clips[i], -1 = none): `look_pasted` (F, H, W, 3) uint8, the target with each subject's pixels under its
  reference's clip camera (grade, focus, grain); `halo_px` (S,) the width of each reference's halo. Empty when
  the world has no per-clip looks."""
  plan = s.plans[index]
  if not plan.get('look'):
    return {}
  r = render_plan(plan, s.table, s.num_frames, s.height, s.width)
  pasted, halos = r['video'].copy(), []
  for slot, src in enumerate(ref_clips):
    look = s.plans[int(src)]['look'] if src >= 0 else plan['look']
    alt = render_plan(plan, s.table, s.num_frames, s.height, s.width, camera=look)['video']
    m = r['masks'][:, slot]
    pasted[m] = alt[m]
    halos.append(nuisance.halo_px(look, s.height))
  return dict(look_pasted=pasted, halo_px=np.asarray(halos, np.int32))


def clip_truth(s: SyntheticSet, index: int) -> dict[str, Any]:
  """:func:`plan_truth` of clip `index` of a set."""
  return plan_truth(s.plans[int(index)], s.table, s.num_frames, s.height, s.width)


def write_example(out_dir: str, name: str, video: np.ndarray, masks: np.ndarray | None,
                  subject_ids: Sequence[int], caption_text: str, *, fps: int = 8,
                  boxes: np.ndarray | None = None) -> dict[str, Any]:
  """Write one clip in the `prepare` input format; returns its annotation line (not yet appended).

  video.mp4 + `name.masks.npz` (masks (F, S, H, W) bool, bit-packed) or per-frame boxes (F, S, 4) x0,y0,x1,y1.
  """
  os.makedirs(out_dir, exist_ok=True)
  _write_mp4(os.path.join(out_dir, f'{name}.mp4'), video, fps)
  subjects = [dict(id=int(i), index=k) for k, i in enumerate(subject_ids)]
  line = dict(video=f'{name}.mp4', caption=caption_text, subjects=subjects)
  if masks is not None:
    np.savez_compressed(os.path.join(out_dir, f'{name}.masks.npz'), shape=np.asarray(masks.shape),
                        bits=np.packbits(masks.astype(bool).ravel()))
    line['masks'] = f'{name}.masks.npz'
  if boxes is not None:
    for k, sub in enumerate(subjects):
      sub['boxes'] = np.asarray(boxes)[:, k].round(2).tolist()
  return line


def export_clips(out_dir: str, *, num_clips: int, num_identities: int, heldout_identities: int,
                 split: str, num_frames: int, height: int, width: int, seed: int = 0,
                 max_subjects: int = 4, fps: int = 8) -> str:
  """Render a split to mp4 + masks + `annotations.jsonl` (the `prepare` input); returns the jsonl path."""
  s = SyntheticSet(num_clips=num_clips, num_identities=num_identities, heldout_identities=heldout_identities,
                   split=split, num_frames=num_frames, height=height, width=width, seed=seed,
                   max_subjects=max_subjects)
  lines = []
  for i in range(len(s)):
    c = s.clip(i)
    lines.append(write_example(out_dir, f'{split}_{i:05d}', c['video'], c['masks'], c['subject_ids'],
                               c['caption'], fps=fps))
  path = os.path.join(out_dir, 'annotations.jsonl')
  with open(path + '.tmp', 'w') as f:
    for line in lines:
      f.write(json.dumps(line) + '\n')
  os.replace(path + '.tmp', path)
  return path


def _write_mp4(path: str, video: np.ndarray, fps: int) -> None:
  """H.264 yuv444p at crf 10 (near-lossless, full-resolution chroma), encoded in-process by PyAV: an ffmpeg
  subprocess started from a process that has run a Beam pipeline (gRPC threads) dies at random.

  One x264 thread: x264's output depends on its thread count, which it takes from the CPUs the process may use
  (all 48 files differed between a 1-core and a 2-core run); with one thread the bytes are the same on any
  machine, for the same seed."""
  f, h, w = video.shape[:3]
  with av.open(path, 'w') as container:
    stream = container.add_stream('libx264', rate=fps, options={'crf': '10', 'threads': '1'})
    stream.width, stream.height, stream.pix_fmt = w, h, 'yuv444p'
    for frame in video:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format='rgb24')):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def export_raw_videos(out_dir: str, *, num_videos: int, shots_per_video: int = 2, num_identities: int,
                      heldout_identities: int, num_frames: int, height: int, width: int, seed: int = 0,
                      max_subjects: int = 2, fps: int = 8, background: str = 'plain') -> str:
  """Raw input for `prepare` with grounding: long videos with scene cuts, captions, and no annotations.

  Video k concatenates `shots_per_video` synthetic clips that share a subject (so that the same subject appears
  in several shots of one source, which cross-pairing needs), written as `video_{k:04d}.mp4` with a
  per-shot captions file `captions.jsonl` ({"video", "start", "end" (seconds), "caption"}). The truth, which
  `prepare` never reads, goes to `truth.jsonl`: per video the cut frames and per shot the subject ids and
  per-frame boxes (x0, y0, x1, y1 of the visible mask; null where hidden). Static camera (`background` 'plain' or 'grey'), the
  setting the motion grounder is for. Returns the captions path.
  """
  os.makedirs(out_dir, exist_ok=True)
  s = SyntheticSet(num_clips=num_videos * shots_per_video * 4, num_identities=num_identities,
                   heldout_identities=heldout_identities, split='train', num_frames=num_frames, height=height,
                   width=width, seed=seed, max_subjects=max_subjects, background=background, occluder_prob=0.0)
  used: set[int] = set()
  captions, truths = [], []
  for k in range(num_videos):
    # The first unused clip, then clips sharing its first subject.
    first = next(i for i in range(len(s)) if i not in used)
    sid = int(s.plans[first]['ids'][0])
    group = [first] + [i for i in s.clips_of[sid] if i != first and i not in used][:shots_per_video - 1]
    used.update(group)
    name = f'video_{k:04d}.mp4'
    parts, shots = [], []
    for j, i in enumerate(group):
      c = s.clip(i)
      start = j * num_frames
      parts.append(c['video'])
      boxes = [[_mask_box_list(c['masks'][t, n]) for t in range(num_frames)] for n in range(len(c['subject_ids']))]
      shots.append(dict(start=start, end=start + num_frames, subject_ids=[int(x) for x in c['subject_ids']],
                        boxes=boxes))
      captions.append(dict(video=name, start=start / fps, end=(start + num_frames) / fps, caption=c['caption']))
    _write_mp4(os.path.join(out_dir, name), np.concatenate(parts), fps)
    truths.append(dict(video=name, cuts=[sh['start'] for sh in shots[1:]], shots=shots))
  for fname, rows in (('captions.jsonl', captions), ('truth.jsonl', truths)):
    with open(os.path.join(out_dir, fname + '.tmp'), 'w') as f:
      for row in rows:
        f.write(json.dumps(row) + '\n')
    os.replace(os.path.join(out_dir, fname + '.tmp'), os.path.join(out_dir, fname))
  return os.path.join(out_dir, 'captions.jsonl')


def grounding_accuracy(grounded: Sequence[dict[str, Any]], truth_path: str) -> dict[str, float]:
  """How well grounded lines (ingest.py) match the truth of `export_raw_videos`.

  Per true subject of every grounded window: the best grounded subject's mean box IoU over the frames where the
  true subject is visible (0 when none overlaps). mean_iou, recall_50 (share with IoU >= 0.5), subjects (count),
  and same_id: of the true subjects seen in two shots of one video and matched (IoU >= 0.5) in both, the share
  whose grounded ids agree (what cross-pairing needs).
  """
  from kaleido_jax.data import grounding as grounding_lib  # lazy: import cost (scipy: 0.5 s of every trainer start)
  with open(truth_path) as f:
    truth = {t['video']: t for t in (json.loads(l) for l in f if l.strip())}
  ious, matched = [], {}
  for line in grounded:
    t = truth[line['video']]
    shot = next(sh for sh in t['shots'] if sh['start'] <= line['start'] < sh['end'])
    for sid, boxes in zip(shot['subject_ids'], shot['boxes']):
      best, best_id = 0.0, None
      for sub in line['subjects']:
        vals = [grounding_lib.box_iou(np.asarray(tb, np.float32), np.asarray(gb if gb else [np.nan] * 4, np.float32))
                for tb, gb in zip(boxes[line['start'] - shot['start']:line['end'] - shot['start']], sub['boxes'])
                if tb is not None]
        v = float(np.mean(vals)) if vals else 0.0
        if v > best:
          best, best_id = v, sub['id']
      ious.append(best)
      if best >= 0.5:
        matched.setdefault((line['video'], sid), {})[shot['start']] = best_id
  pairs = [m for m in matched.values() if len(m) > 1]
  same = [len(set(m.values())) == 1 for m in pairs]
  return dict(mean_iou=float(np.mean(ious)) if ious else 0.0,
              recall_50=float(np.mean(np.asarray(ious) >= 0.5)) if ious else 0.0, subjects=len(ious),
              same_id=float(np.mean(same)) if same else float('nan'), same_id_pairs=len(same))


def _mask_box_list(mask: np.ndarray) -> list[float] | None:
  ys, xs = np.nonzero(mask)
  if not len(ys):
    return None
  return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def make_source(data_config: Any, split: str, exclude_seed: int | None = None) -> SyntheticSource:
  """The synthetic source a `config.data` section describes (`exclude_seed`: see SyntheticSet)."""
  n = data_config.num_clips if split == 'train' else data_config.heldout_clips
  return SyntheticSource(num_clips=n, num_identities=data_config.num_identities,
                         heldout_identities=data_config.heldout_identities, split=split,
                         num_frames=data_config.num_frames, height=data_config.height, width=data_config.width,
                         seed=data_config.synthetic_seed, max_subjects=data_config.max_subjects,
                         cutout_margin=data_config.prepare.cutout_margin,
                         refs_per_subject=data_config.prepare.refs_per_subject,
                         background=data_config.get('background', 'procedural'),
                         occluder_prob=data_config.get('occluder_prob', 0.3),
                         subject_scale=data_config.get('subject_scale', 1.0),
                         pairing=data_config.get('pairing', 'cross') if split == 'train' else 'cross',
                         synthesis=bool(data_config.get('synthesis', False)) and split == 'train',
                         clip_nuisance=float(data_config.get('clip_nuisance', 0.0)), exclude_seed=exclude_seed)
