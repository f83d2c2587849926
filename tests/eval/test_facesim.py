"""FaceSim-Cur as the benchmark computes it: the ArcFace alignment (against skimage's estimate, as insightface uses
it), the 5 points dlib gives on real faces, the grey-padding retry, the score's quirks, and `--mode eval` with a
CurricularFace `.bin` (dlib alignment: its own file, outside the Total) and with a face_extractor/ that is not there
(one line; the other metrics go on)."""

import json
import os

import numpy as np
import pytest

from kaleido_jax.eval import curricularface
from kaleido_jax.eval import facesim

cv2 = pytest.importorskip('cv2')


def test_the_similarity_transform_is_skimages_estimate():
  transform = pytest.importorskip('skimage.transform')
  rng = np.random.default_rng(0)
  for _ in range(20):
    src = facesim.ARCFACE_112 * rng.uniform(0.5, 3) + rng.normal(0, 4, (5, 2)) + rng.uniform(0, 300, 2)
    dst = facesim.ARCFACE_112 * 2
    t = transform.SimilarityTransform()
    t.estimate(src, dst)
    assert np.abs(facesim.similarity_transform(src, dst) - t.params[:2]).max() < 1e-9


def test_norm_crop_puts_the_five_points_on_the_template():
  # Key points that are an exact similarity of the template (rotated 20 degrees, scaled 1.7, moved): a dot drawn at
  # each lands on the 224-px template after norm_crop.
  a, s, t = np.deg2rad(20), 1.7, np.array([60.0, 40.0])
  rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
  kps = facesim.ARCFACE_112 @ (s * rot).T + t
  for i, p in enumerate(kps):
    image = np.zeros((320, 320, 3), np.uint8)
    cv2.circle(image, tuple(int(round(v)) for v in p), 3, (255, 255, 255), -1)
    crop = facesim.norm_crop(image, kps)
    assert crop.shape == (224, 224, 3)
    ys, xs = np.nonzero(crop[..., 0] > 128)
    centre = np.array([xs.mean(), ys.mean()])
    assert np.abs(centre - facesim.ARCFACE_112[i] * 2).max() < 1.5, (i, centre)
  with pytest.raises(ValueError, match='multiple of 112'):
    facesim.norm_crop(image, kps, size=200)


def _check_five_points(face):
  le, re, nose, lm, rm = face.keypoints
  x0, y0, x1, y1 = face.box
  assert le[0] < nose[0] < re[0] and lm[0] < rm[0]          # image-left to image-right
  assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])    # eyes above the nose above the mouth
  margin = 0.15 * (x1 - x0)
  assert np.all(face.keypoints >= [x0 - margin, y0 - margin]) and np.all(face.keypoints <= [x1 + margin, y1 + margin])


def test_dlib_gives_the_arcface_five_points_on_real_faces():
  pytest.importorskip('dlib')
  skimage_data = pytest.importorskip('skimage.data')
  from kaleido_jax.data import video as video_lib
  from tests.data.test_real_footage import CARPHONE_FACE_16, footage
  finder = facesim.DlibFaceFinder()
  astronaut = facesim.largest(finder(skimage_data.astronaut()))  # her face, about (175, 76, 266, 167)
  assert astronaut.box[0] > 150 and astronaut.box[2] < 290 and astronaut.box[1] > 50 and astronaut.box[3] < 190
  _check_five_points(astronaut)
  frame = video_lib.decode(footage('carphone_pristine.mp4')).frames[16]  # 176 x 144; the hand box is at 156 x 128
  face = facesim.largest(finder(frame))
  assert face is not None
  _check_five_points(face)
  box = CARPHONE_FACE_16 * (144 / 128)
  assert np.all((face.keypoints >= box[:2]) & (face.keypoints <= box[2:])), (face.keypoints, box)


class _PaddedOnly:
  """Finds a 'face' only in an image with the benchmark's grey border, at a fixed place of the padded image."""

  name = 'test'

  def __call__(self, rgb):
    if rgb[0, 0, 0] != 128:
      return []
    return [facesim.Face(np.array([30.0, 40, 80, 100]), facesim.ARCFACE_112 / 2 + [30, 40])]


def test_a_face_at_the_edge_is_searched_again_in_the_padded_image():
  image = np.zeros((100, 80, 3), np.uint8)
  face = facesim.find_face(_PaddedOnly(), image)
  top, left = int(100 * 0.25), int(80 * 0.25)  # the border: 25% of the height / width on each side
  assert np.allclose(face.keypoints, facesim.ARCFACE_112 / 2 + [30 - left, 40 - top])
  assert np.allclose(face.box, [30 - left, 40 - top, 80 - left, 100 - top])


class _FixedFaces:
  """A face on every bright frame (none on a dark one), with an ArcFace embedding given per frame."""

  name = 'test'

  def __init__(self, arcs):
    self.arcs = iter(arcs)

  def __call__(self, rgb):
    if rgb[rgb.shape[0] // 2, rgb.shape[1] // 2].mean() < 10:  # dark in the middle, also when padded grey
      return []
    return [facesim.Face(np.array([0.0, 0, 112, 112]), facesim.ARCFACE_112, next(self.arcs))]


class _Embedder:
  """The reference's embedding e0; frame k's is given (unit vectors)."""

  def __init__(self, vectors):
    self.vectors = np.asarray(vectors, np.float32)

  def __call__(self, crops):
    assert len(crops) == len(self.vectors)
    return self.vectors


def test_the_scores_keep_the_benchmarks_quirks():
  # Four frames: two with a face (cosines 0.6 and -0.5 to the reference), two dark (no face). cur_score leaves the
  # clipped 0 out (0.6), arc_score keeps it ((0.8 + 0) / 2); the frames without a face count in neither.
  frames = np.stack([np.full((112, 112, 3), v, np.uint8) for v in (200, 0, 200, 0)])
  e0, e1, e2 = [1, 0, 0], [0.6, 0.8, 0], [-0.5, np.sqrt(0.75), 0]
  arcs = [np.array([1.0, 0, 0]), np.array([0.8, 0.6, 0]), np.array([-0.3, 0.9, 0])]
  got = facesim.facesim_cur(frames, np.full((112, 112, 3), 200, np.uint8), _FixedFaces(arcs),
                            _Embedder([e0, e1, e2]), num_frames=4)
  assert abs(got['cur_score'] - 0.6) < 1e-6 and abs(got['arc_score'] - 0.4) < 1e-6, got
  assert facesim.facesim_cur(frames, np.zeros((112, 112, 3), np.uint8), _FixedFaces([]), _Embedder([])) is None
  # The benchmark's frame choice: linspace truncated, not rounded.
  assert list(facesim.frame_indices(81, 32))[:4] == [0, 2, 5, 7]


def test_a_video_of_the_reference_itself_scores_one_with_the_real_network():
  pytest.importorskip('dlib')
  skimage_data = pytest.importorskip('skimage.data')
  face = skimage_data.astronaut()
  embedder = facesim.CurricularFaceEmbedder(curricularface.IRBackbone(18))  # random weights: the same crop, cos 1
  frames = np.stack([face, face, np.zeros_like(face)])
  got = facesim.facesim_cur(frames, face, facesim.DlibFaceFinder(), embedder, num_frames=3)
  assert abs(got['cur_score'] - 1.0) < 1e-5 and 'arc_score' not in got


def test_eval_mode_scores_facesim_cur_with_dlib_alignment_apart_from_the_total(tmp_path):
  pytest.importorskip('dlib')
  torch = pytest.importorskip('torch')
  from kaleido_jax.cli import main as cli_main
  from kaleido_jax.data import video as video_lib
  from tests.data.test_real_footage import footage
  from tests.eval.test_curricularface import _random
  from tests.sampling_common import tiny_config
  root = tmp_path / 'OpenS2V-Eval'
  (root / 'Images' / 'singleface' / 'man').mkdir(parents=True)
  frames = video_lib.decode(footage('carphone_pristine.mp4')).frames
  cv2.imwrite(str(root / 'Images' / 'singleface' / 'man' / '1.png'), cv2.cvtColor(frames[16], cv2.COLOR_RGB2BGR))
  bench = root / 'Open-Domain_Eval.json'
  bench.write_text(json.dumps({'singleface_1': {'img_paths': ['Images/singleface/man/1.png'],
                                                'prompt': 'A man talks in a car.', 'class_label': ['Man']}}))
  videos = tmp_path / 'videos'
  videos.mkdir()
  os.symlink(footage('carphone_pristine.mp4'), videos / 'singleface_1.mp4')
  weights = tmp_path / 'OpenS2V-Weight'
  weights.mkdir()
  torch.save(_random(curricularface.STAGES[18], seed=0).state_dict(),
             weights / 'glint360k_curricular_face_r101_backbone.bin')
  config = tiny_config()
  config.eval.update(benchmark=str(bench), samples_dir=str(videos), output_dir=str(tmp_path / 'out'),
                     facesim_model=str(weights / 'glint360k_curricular_face_r101_backbone.bin'))
  report = cli_main.run_mode('eval', config, str(tmp_path / 'w'))
  got = json.load(open(tmp_path / 'out' / facesim.DLIB_FILE))
  # His own face from frame 16 against 32 of his frames, through random IR-18 weights (measured 0.999: random
  # weights put faces close together; this checks the path and the file, identity margins are dlib's test).
  assert 0.5 < got['singleface_1']['cur_score'] <= 1.0, got
  assert not (tmp_path / 'out' / 'facesim.json').exists() and 'FaceSim-Cur' in report['total']['absent']
  assert facesim.DLIB_NAME in open(tmp_path / 'out' / 'eval.md').read()
  # The weight folder with no face_extractor/: one line for FaceSim-Cur, MotionAmplitude still scored.
  config.eval.update(facesim_model='', benchmark_weights=str(weights), output_dir=str(tmp_path / 'out2'))
  report = cli_main.run_mode('eval', config, str(tmp_path / 'w'))
  assert 'face_extractor' in report['problems']['FaceSim-Cur'] and report['videos'] == 1
  # the MLP from the folder, the CLIP tower not given
  assert 'CLIP ViT-L/14 directory' in report['problems']['Aesthetics']
  assert 'MotionAmplitude' in report['total']['metrics']
