"""NexusScore's detector, YOLO-World v2 with the image-prompt adapter, in JAX against its PyTorch definition
(tests/eval/yoloworld_reference.py, restated from the mmyolo / YOLO-World code the benchmark vendors) on random
weights saved the way mmengine saves a checkpoint; the test pipeline's letterbox and predict_by_feat's boxes against
mmyolo's steps; the shipped variant (v2-L) at full size."""

import numpy as np
import pytest

from kaleido_jax.eval import yoloworld as yw

torch = pytest.importorskip('torch')
cv2 = pytest.importorskip('cv2')
from tests.eval import yoloworld_reference as ref  # noqa: E402  (needs torch)

SMALL = dict(deepen=0.33, widen=0.25, last_stage_out_channels=1024, neck_embed=(32, 64, 128), neck_heads=(1, 2, 4))


def _frames():
  from skimage import data
  return [data.astronaut(), data.coffee()]  # 512x512, 400x600 real photos


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  model = ref.randomise(ref.YOLOWorldImageDetector(**SMALL))
  path = tmp_path_factory.mktemp('yoloworld') / 'yolo_world_small.pth'
  ref.save_mmengine(model, path)
  return model, str(path)


@pytest.mark.parametrize('shape', [(720, 1280), (480, 832), (144, 176), (640, 640), (832, 480), (300, 451), (3, 641)])
def test_the_letterbox_is_the_test_pipelines(shape):
  rgb = np.random.default_rng(sum(shape)).integers(0, 256, shape + (3,), dtype=np.uint8)
  want, meta = ref.test_pipeline(rgb)
  got, box = yw.letterbox(rgb)
  assert got.shape == (640, 640, 3)
  assert np.abs(got - want[0].numpy().transpose(1, 2, 0)).max() == 0  # the same bytes, channels swapped, / 255
  assert box.scale == pytest.approx(meta['scale_factor'], abs=0) and box.shape == shape
  assert box.pad == (int(meta['pad_param'][0]), int(meta['pad_param'][2]))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_the_kept_boxes_are_predict_by_feats_and_the_scripts(seed):
  # Scores spread over (0, 1) and boxes in clusters, so that NMS works across the 0.5 line: the boxes kept above
  # 0.5 from the 0.5 floor are those of the full pass from 0.001.
  rng = np.random.default_rng(seed)
  centres = rng.uniform(0, 640, (40, 2))
  c = centres[rng.integers(0, 40, 8400)] + rng.normal(0, 6, (8400, 2))
  wh = rng.uniform(10, 120, (8400, 2))
  boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)
  scores = rng.uniform(0, 1, 8400).astype(np.float32)
  rgb = np.zeros((480, 832, 3), np.uint8)
  _, meta = ref.test_pipeline(rgb)
  _, box = yw.letterbox(rgb)
  want_b, want_s = ref.predict_boxes(torch.from_numpy(scores[:, None]), torch.from_numpy(boxes), meta)
  got_b, got_s = yw.boxes_in_frame(scores, boxes, box)
  assert 0 < len(got_s) == len(want_s) <= yw.SCRIPT_MAX_BOXES
  assert np.array_equal(got_s, want_s) and np.abs(got_b - want_b).max() < 1e-4


def test_boxes_of_no_area_survive_nms_as_in_mmcv_and_torchvision():
  # Boxes clamped to the frame's edge can have no area: IoU 0 / 0 exceeds no threshold, so NMS keeps both (and the
  # script then fails on the empty crop, see eval/nexus.py).
  boxes = np.asarray([[0, 0, 0, 50], [0, 0, 0, 50], [10, 10, 60, 60], [12, 12, 60, 60]], np.float32)
  assert yw.nms(boxes, np.asarray([0.9, 0.8, 0.7, 0.6], np.float32), 0.7).tolist() == [0, 1, 2]
  want = ref.nms(torch.from_numpy(boxes), torch.tensor([0.9, 0.8, 0.7, 0.6]), 0.7).tolist()
  assert want == [0, 1, 2]


def test_the_network_matches_its_pytorch_definition_on_real_photos(small):
  model_t, path = small
  model = yw.load(path)  # the variant from the checkpoint's shapes
  assert (model.cfg.widen_factor, model.cfg.last_stage_out_channels, model.cfg.neck_num_heads) == (0.25, 1024,
                                                                                                   (1, 1, 1))
  rng = np.random.default_rng(0)
  clip = rng.normal(size=(2, 512)).astype(np.float32)
  with torch.no_grad():
    want_p = model_t.prompt(torch.from_numpy(clip)).numpy()
  prompts = np.asarray(model.prompt(clip))
  assert np.abs(prompts - want_p).max() < 1e-6
  frames = _frames()  # two frames x two prompts: the backbone once per frame, its features repeated per prompt
  pixels = np.stack([yw.letterbox(f)[0] for f in frames])
  scores, boxes = model(pixels, np.stack([prompts] * len(frames)))  # the backbone once per frame
  for i, f in enumerate(frames):
    x, meta = ref.test_pipeline(f)
    for r in range(2):
      with torch.no_grad():
        s_t, b_t = model_t.decoded(x, torch.from_numpy(prompts[r][None, None]))
      assert np.abs(np.asarray(scores[i, r]) - s_t[0, :, 0].numpy()).max() < 1e-5
      assert np.abs(np.asarray(boxes[i, r]) - b_t[0].numpy()).max() < 1e-5 * float(b_t.abs().max())
      # The boxes from the same network outputs: random weights give equal scores by the thousand, where a 1e-7
      # difference may swap which of two boxes NMS keeps, so the box steps are compared on identical inputs.
      want_b, want_s = ref.predict_boxes(s_t[0], b_t[0], meta)
      got_b, got_s = yw.boxes_in_frame(s_t[0, :, 0].numpy(), b_t[0].numpy(), yw.letterbox(f)[1])
      assert len(want_s) and np.array_equal(got_s, want_s) and np.abs(got_b - want_b).max() < 1e-3


def test_a_checkpoint_of_something_else_is_refused(tmp_path, small):
  model_t, _ = small
  state = model_t.state_dict()
  no_prompt = {k: v for k, v in state.items() if not k.startswith('image_prompt_encoder')}
  torch.save({'state_dict': no_prompt}, tmp_path / 'text_only.pth')
  with pytest.raises(ValueError, match='not a YOLO-World image-prompt checkpoint'):
    yw.load(str(tmp_path / 'text_only.pth'))
  extra = dict(state, **{'neck.top_down_layers.0.attn_block.scale': torch.ones(1, 1, 1, 1)})  # with_scale=True
  torch.save({'state_dict': extra}, tmp_path / 'with_scale.pth')
  with pytest.raises(ValueError, match='another variant'):
    yw.load(str(tmp_path / 'with_scale.pth'))


@pytest.mark.slow
def test_the_shipped_v2_l_at_full_size(tmp_path):
  # yolo_world_v2_l_image_prompt_adapter's architecture (48 M parameters): its shapes give the default Config.
  model_t = ref.randomise(ref.YOLOWorldImageDetector())
  ref.save_mmengine(model_t, tmp_path / 'v2l.pth')
  model = yw.load(str(tmp_path / 'v2l.pth'))
  assert model.cfg == yw.Config()
  frame = _frames()[1]  # coffee, 400x600
  prompt = np.asarray(model.prompt(np.random.default_rng(3).normal(size=(1, 512)).astype(np.float32)))
  scores, boxes = model(yw.letterbox(frame)[0][None], prompt[None])
  x, _ = ref.test_pipeline(frame)
  with torch.no_grad():
    s_t, b_t = model_t.decoded(x, torch.from_numpy(prompt[None]))
  assert np.abs(np.asarray(scores[0, 0]) - s_t[0, :, 0].numpy()).max() < 1e-5
  assert np.abs(np.asarray(boxes[0, 0]) - b_t[0].numpy()).max() < 1e-5 * float(b_t.abs().max())
