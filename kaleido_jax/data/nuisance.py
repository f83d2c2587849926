"""What a clip carries that is not its subjects' identity: the synthetic world's per-clip look (Kaleido's second
claim made testable).

In real footage a reference cut from the clip it trains on carries the clip with it: the light and colour grade,
the camera's focus and noise, the subject's pose and proportions of that moment, a band of the clip's background
left at the mask's edge by the segmenter. A model trained on such same-clip pairs can copy those from the
reference instead of learning the identity; one trained on cross pairs (references from other clips) cannot.
`clip_look` draws them per clip from their own random stream, so a world with them has the same subjects, motions
and backgrounds as one without, and `strength` 0 is the world without them (older numbers stay reproducible):

- grade: one of GRADES (channel gains, an offset), named in the caption ("in warm light"), so the prompt says
  which look the video must have and a reference of another clip's look must not override it;
- focus: sharp, or soft (a Gaussian blur of `SOFT_SIGMA` px at 128 px), named in the caption ("in soft focus");
- grain: per-pixel noise of the clip's camera (not named: a nuisance the model cannot be told);
- aspect: each subject's width-to-height stretch in this clip (the pose and scale of the moment are already drawn
  per clip by synthetic.clip_plan);
- halo: the width of the band of the clip's own background a cut-out of it keeps around the subject.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

# name -> (R, G, B gains, R, G, B offsets in 0..255 levels) at strength 1: a tint of the highlights and of the
# shadows, as a grade has (an offset alone tells warm from daylight on an orange that the gains would clip).
GRADES = {
    'daylight': ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
    'warm light': ((1.1, 0.95, 0.7), (25.0, 10.0, 0.0)),
    'cold light': ((0.75, 0.92, 1.1), (0.0, 10.0, 30.0)),
    'dim light': ((0.55, 0.55, 0.6), (0.0, 0.0, 0.0)),
    'green light': ((0.8, 1.1, 0.8), (0.0, 25.0, 0.0)),
}
FOCUS = ('sharp focus', 'soft focus')
SOFT_SIGMA = 1.6          # px of blur at 128 px height (scaled with the height)
MAX_GRAIN = 9.0           # noise std in 0..255 levels at strength 1
MAX_ASPECT = 0.35         # |log aspect| at strength 1
HALO = (2.0, 5.0)         # halo width range, px at 128 px height
STREAM = 0x4E55           # the look's random stream, apart from clip_plan's draws


def clip_look(seed: int, split_id: int, index: int, num_subjects: int, strength: float) -> dict[str, Any]:
  """The per-clip look of clip (seed, split, index), a pure function of them; `strength` in (0, 1] scales every
  nuisance (gains toward 1, blur, grain, stretch and halo toward none)."""
  rng = np.random.default_rng([seed, split_id, index, STREAM])
  names = list(GRADES)
  return dict(
      strength=float(strength),
      grade=names[int(rng.integers(len(names)))],
      focus=FOCUS[int(rng.integers(len(FOCUS)))],
      grain=float(rng.uniform(0.3, 1.0) * MAX_GRAIN * strength),
      grain_seed=int(rng.integers(2**31)),
      aspect=[float(np.exp(rng.uniform(-1, 1) * MAX_ASPECT * strength)) for _ in range(num_subjects)],
      halo=float(rng.uniform(*HALO) * strength),
  )


def caption_suffix(look: dict[str, Any] | None) -> str:
  """', in warm light, in soft focus' (the look the prompt asks for), '' without a look."""
  return '' if not look else f', in {look["grade"]}, in {look["focus"]}'


def apply(frames: np.ndarray, look: dict[str, Any] | None, *, grain: bool = True) -> np.ndarray:
  """(F, H, W, 3) float32 in 0..255 as the clip's camera saw them: graded, blurred when soft, grained."""
  if not look:
    return frames
  s = look['strength']
  gains, offset = GRADES[look['grade']]
  gains = 1.0 + s * (np.asarray(gains, np.float32) - 1.0)
  out = frames * gains + s * np.asarray(offset, np.float32)
  if look['focus'] == 'soft focus':
    sigma = s * SOFT_SIGMA * frames.shape[1] / 128.0
    out = ndimage.gaussian_filter(out, sigma=(0, sigma, sigma, 0), mode='nearest')
  if grain and look['grain'] > 0:
    noise = np.random.default_rng(look['grain_seed']).normal(0, look['grain'], out.shape[1:]).astype(np.float32)
    out = out + noise  # the camera's fixed-pattern grain: the same every frame
  return out.astype(np.float32)


def halo_px(look: dict[str, Any] | None, height: int) -> int:
  """The clip's cut-out halo width in pixels at `height`."""
  return 0 if not look else int(round(look['halo'] * height / 128.0))


def with_halo(mask: np.ndarray, px: int) -> np.ndarray:
  """The subject's mask grown by `px` pixels: what a segmenter's loose mask keeps of the clip around it."""
  return ndimage.binary_dilation(mask, iterations=px) if px > 0 else mask
