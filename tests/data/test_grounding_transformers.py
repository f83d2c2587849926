"""The transformers grounder's plumbing on tiny random OWLv2 + SAM models saved by the test (not accuracy):
detections become per-phrase tracks with SAM masks, `prepare` runs end to end with it, missing weights are one
clear error."""

import json
import os

import numpy as np
import pytest

pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from kaleido_jax import config as config_lib  # noqa: E402
from kaleido_jax.data import grounding_transformers as gt  # noqa: E402
from kaleido_jax.data import prepare  # noqa: E402
from kaleido_jax.data import synthetic  # noqa: E402


def _tiny_owlv2(d):
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  vocab = {}
  for c in bytes_to_unicode().values():  # byte-level characters, no merges: every word spelled out
    vocab[c], vocab[c + '</w>'] = len(vocab), len(vocab) + 1
  # OWL counts a query as present when its first id is > 0: the specials go last, as in CLIP's vocabulary.
  vocab['<|startoftext|>'], vocab['<|endoftext|>'] = len(vocab), len(vocab) + 1
  tok = transformers.CLIPTokenizer(vocab=vocab, merges=[])
  cfg = transformers.Owlv2Config(
      text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=16),
      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                         image_size=32, patch_size=8), projection_dim=32)
  transformers.Owlv2ForObjectDetection(cfg).save_pretrained(d)
  transformers.Owlv2Processor(image_processor=transformers.Owlv2ImageProcessor(size={'height': 32, 'width': 32}),
                              tokenizer=tok).save_pretrained(d)


def _tiny_sam(d):
  cfg = transformers.SamConfig(
      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                         image_size=64, patch_size=16, output_channels=16, global_attn_indexes=[0], mlp_dim=37,
                         window_size=0, num_pos_feats=8),
      prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
      mask_decoder_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                               iou_head_hidden_dim=16))
  transformers.SamModel(cfg).save_pretrained(d)
  transformers.SamProcessor(image_processor=transformers.SamImageProcessor(
      size={'longest_edge': 64}, pad_size={'height': 64, 'width': 64})).save_pretrained(d)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
  root = tmp_path_factory.mktemp('tiny_models')
  det, sam = str(root / 'owlv2'), str(root / 'sam')
  _tiny_owlv2(det)
  _tiny_sam(sam)
  return det, sam


def test_tracks_from_detector_and_sam(models):
  det, sam = models
  frames = np.random.default_rng(0).integers(0, 255, (5, 48, 48, 3), dtype=np.uint8)
  g = gt.TransformersGrounder(det, sam, box_threshold=0.0, detect_every=2)
  tracks = g(frames, ['a red square', 'a blue cross'])
  assert [t.phrase for t in tracks] == ['a red square', 'a blue cross']  # random weights still score > 0
  for t in tracks:
    assert t.masks.shape == (5, 48, 48) and t.masks.dtype == bool and t.boxes.shape == (5, 4)
    assert 0 < t.score <= 1
  box_only = gt.TransformersGrounder(det, '', box_threshold=0.0)(frames, ['a red square'])[0]
  for m, b in zip(box_only.masks, box_only.boxes):  # without SAM each mask is its (rounded) box, filled
    assert m.sum() == np.prod(b[2:] - b[:2]) > 0
  assert gt.TransformersGrounder(det, '', box_threshold=1.01)(frames, ['a red square']) == []


def test_missing_weights_name_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    gt.TransformersGrounder(str(tmp_path / 'nowhere'))


def test_prepare_with_transformers_grounding(models, tmp_path):
  det, sam = models
  inp = str(tmp_path / 'in')
  synthetic.export_raw_videos(inp, num_videos=2, shots_per_video=2, num_identities=8, heldout_identities=1,
                              num_frames=12, height=48, width=48)
  c = config_lib.base_config().data
  c.num_frames, c.height, c.width, c.max_subjects = 9, 48, 48, 2
  p = c.prepare
  p.min_frames, p.min_height, p.min_width, p.synth_per_clip = 9, 40, 40, 0
  p.min_blur_var, p.min_subject_area, p.max_subject_area, p.max_border_touch = 0.0, 0.0, 1.0, 1.0
  p.max_subject_box_area = 1.0  # random detector weights: boxes of any size
  p.grounding, p.captions, p.detector_dir, p.segmenter_dir, p.box_threshold = (
      'transformers', os.path.join(inp, 'captions.jsonl'), det, sam, 0.0)
  r = prepare.prepare(c, output_dir=str(tmp_path / 'out'), input_dir=inp, verbose=False)
  assert r['videos'] == 2 and r['shots'] == 4 and r['input'] == r['kept'] + sum(r['dropped'].values())
  with open(tmp_path / 'out' / 'grounded.jsonl') as f:
    lines = [json.loads(l) for l in f]
  assert lines and all(s['phrase'] for l in lines for s in l['subjects'])
  assert r['examples'] == r['kept']
