"""NexusScore as get_nexusscore.py reduces it (a transcription of its loop here, with the same detector and
embedder), its label rules, the id the benchmark leaves out, and `--mode eval` writing nexusscore.json from a
YOLO-World checkpoint, a CLIP directory and a GME directory."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from kaleido_jax.eval import nexus


def _video(n=40):
  from skimage import data
  cat = data.chelsea()  # 300 x 451 real photo, panned
  return np.stack([np.roll(cat, 3 * i, axis=1) for i in range(n)])


class FakeDetector:
  """Boxes that depend on the frame and the reference (some pairs none), confidences either side of 0.6."""

  def prompts(self, refs):
    return np.stack([r.reshape(-1, 3).mean(0) for r in refs])

  def one(self, frame, prompt):
    rng = np.random.default_rng(int(frame[::7, ::7].sum() + 1000 * prompt.sum()) % 2 ** 32)
    n = rng.integers(0, 4)
    x1, y1 = rng.uniform(0, 200, (2, n))
    boxes = np.stack([x1, y1, x1 + rng.uniform(20, 200, n), y1 + rng.uniform(20, 90, n)], axis=1).astype(np.float32)
    return boxes.reshape(-1, 4), rng.uniform(0.5, 0.9, n).astype(np.float32)

  def __call__(self, frames, prompts):
    return [[self.one(f, p) for p in prompts] for f in frames]


class FakeEmbedder:
  def image_embeddings(self, images):
    e = np.stack([np.concatenate([np.asarray(i, np.float32).reshape(-1, 3).mean(0), [i.shape[0], i.shape[1]]])
                  for i in images])
    e = e - np.asarray([120, 110, 100, 100, 200], np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True)

  def text_embedding(self, text, instruction):
    assert instruction == 'Find an image that matches the given text.'
    e = np.random.default_rng(sum(map(ord, text))).normal(size=5).astype(np.float32)
    return e / np.linalg.norm(e)


def _the_scripts_loop(prefix, frames, prompt_images, labels, detector, embedder):
  """get_nexusscore.py's per-video loop, transcribed (the detector called per frame and reference)."""
  idx = np.linspace(0, len(frames) - 1, 32, dtype=int)
  all_prompt_images, all_image_labels, all_local_images, all_yolo_world_conf = [], [], [], []
  frame_obj = 0
  for frame in [frames[i] for i in idx]:
    for prompt_image, image_label in zip(prompt_images, labels):
      if 'face' in prefix and (image_label == 'Man' or image_label == 'Woman'):
        continue
      if 'human' in prefix and (image_label == 'Man' or image_label == 'Woman'):
        image_label = 'human'
      bboxes, confidences = detector.one(frame, detector.prompts([prompt_image])[0])
      all_yolo_world_conf.extend(confidences)
      if len(bboxes) != 0:
        frame_obj += 1
      for bbox in bboxes:
        x1, y1, x2, y2 = bbox
        all_local_images.append(np.asarray(Image.fromarray(frame).crop((x1, y1, x2, y2))))
        all_prompt_images.append(prompt_image)
        all_image_labels.append(image_label)
  e_main = embedder.image_embeddings(all_prompt_images)
  e_query = np.stack([embedder.text_embedding(t, 'Find an image that matches the given text.')
                      for t in all_image_labels])
  e_local = embedder.image_embeddings(all_local_images)
  gme_image_score = (e_main * e_local).sum(-1)
  gme_text_score = (e_query * e_local).sum(-1)
  kept = [r for b, t, r in zip(all_yolo_world_conf, gme_text_score, gme_image_score)
          if b > 0.6 and t > 0.30 and r != 0]
  return float(np.mean(kept)) / frame_obj if kept else 0


def test_label_rules():
  refs, labels = ['a', 'b', 'c'], ['Man', 'dog', 'Woman']
  assert nexus.references_scored('singleface_3', refs, labels) == [('b', 'dog')]
  assert nexus.references_scored('humanobj_2', refs, labels) == [('a', 'human'), ('b', 'dog'), ('c', 'human')]
  assert nexus.references_scored('multiface_1', refs, labels[:2]) == [('b', 'dog')]  # zip: the shorter list
  assert nexus.references_scored('singleobj_7', refs, labels) == list(zip(refs, labels))


@pytest.mark.parametrize('prefix,labels', [('singleobj_1', ['cat', 'rug']), ('humanobj_4', ['Woman', 'cat']),
                                           ('faceobj_2', ['Man', 'cat'])])
def test_the_score_is_the_scripts_reduction(prefix, labels):
  from skimage import data
  frames = _video()
  refs = [data.astronaut()[100:300, 150:350], data.chelsea()[50:250, 100:300]]
  scorer = nexus.NexusScorer(FakeDetector(), FakeEmbedder())
  got = scorer(prefix, frames, refs, labels)
  want = _the_scripts_loop(prefix, frames, refs, labels, FakeDetector(), FakeEmbedder())
  assert got is not None and abs(got - want) < 1e-6 and got != 0  # crops passed the filters


def test_a_video_where_no_reference_is_found_is_left_out():
  class Nothing(FakeDetector):
    def one(self, frame, prompt):
      return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
  scorer = nexus.NexusScorer(Nothing(), FakeEmbedder())
  assert scorer('singleobj_1', _video(), [np.zeros((8, 8, 3), np.uint8)], ['cat']) is None
  assert nexus.score([0.9, 0.5], [0.4, 0.9], [0.5, 0.5], 2) == pytest.approx(0.2)  # only the first crop passes
  assert nexus.score([0.9], [0.0], [0.9], 1) == 0.0  # an image score of exactly 0 never counts


@pytest.mark.slow  # ~30 s: two runs building GME, CLIP and YOLO-World
def test_eval_mode_writes_nexusscore_json(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from kaleido_jax.eval import opens2v
  from tests.eval import test_gme
  from tests.eval import yoloworld_reference as ref
  from tests.data.test_real_footage import footage
  # GME, a CLIP ViT (projection 512, the prompt width) and YOLO-World, all tiny and random, in their own formats.
  (tmp_path / 'gme').mkdir()
  test_gme._model_dir(tmp_path / 'gme')  # pylint: disable=protected-access
  torch.manual_seed(0)
  clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, image_size=32, patch_size=16,
      projection_dim=512))
  clip.save_pretrained(tmp_path / 'clip')
  transformers.CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}).save_pretrained(
      tmp_path / 'clip')
  detector = ref.randomise(ref.YOLOWorldImageDetector(deepen=0.33, widen=0.25, last_stage_out_channels=1024,
                                                      neck_embed=(32, 64, 128), neck_heads=(1, 2, 4)))
  with torch.no_grad():  # a few boxes, known: only the stride-32 level fires, every box 30 strides wide, so that
    head = detector.bbox_head.head_module  # after clamping to the frame all are the frame and NMS keeps one
    for i, contrast in enumerate(head.cls_contrasts):
      contrast.bias.fill_(5.0 if i == 2 else -20.0)
    for reg in head.reg_preds:
      reg[2].weight.zero_()
      reg[2].bias.copy_(torch.tensor(([-10.0] * 15 + [10.0]) * 4))
  weights = tmp_path / 'OpenS2V-Weight'
  weights.mkdir()
  ref.save_mmengine(detector, weights / 'yolo_world_v2_l_image_prompt_adapter-719a7afb.pth')
  root = tmp_path / 'OpenS2V-Eval'
  os.makedirs(root / 'Images' / 'singleobj')
  from skimage import data
  Image.fromarray(data.chelsea()).save(root / 'Images' / 'singleobj' / 'cat.png')
  bench = root / 'Open-Domain_Eval.json'
  bench.write_text(json.dumps({
      'singleobj_1': {'img_paths': ['Images/singleobj/cat.png'], 'prompt': 'A man in a car.', 'class_label': ['cat']},
      'singleobj_2': {'img_paths': ['Images/singleobj/dog.png'], 'prompt': 'A dog.', 'class_label': ['dog']}}))
  videos = tmp_path / 'videos'
  videos.mkdir()
  os.symlink(footage('carphone_pristine.mp4'), videos / 'singleobj_1.mp4')
  os.symlink(footage('carphone_pristine.mp4'), videos / 'singleobj_2.mp4')
  report = opens2v.evaluate_folder(str(bench), str(videos), str(tmp_path / 'out'), weights=str(weights),
                                   gme_model=str(tmp_path / 'gme'), gme_dtype='float32',
                                   yoloworld_clip=str(tmp_path / 'clip'), show_progress=False)
  got = json.loads((tmp_path / 'out' / 'nexusscore.json').read_text())
  assert set(got) == {'singleobj_1'} and 0.0 <= got['singleobj_1']['nexus_score'] <= 1.0
  assert 'NexusScore' in report['total']['metrics'] and 'NexusScore' in report['seconds_per_video']
  assert 'dog.png does not exist' in report['problems']['singleobj_2']  # one line; the other id went on
  # Without the checkpoint: one line naming it, the other metrics go on.
  report = opens2v.evaluate_folder(str(bench), str(videos), str(tmp_path / 'out2'), gme_model=str(tmp_path / 'gme'),
                                   gme_dtype='float32', yoloworld_clip=str(tmp_path / 'clip'),
                                   yoloworld_model=str(tmp_path / 'none.pth'), show_progress=False)
  assert 'none.pth' in report['problems']['NexusScore'] and 'GmeScore' in report['total']['metrics']
