"""MotionSmoothness's network, Q-Align (mPLUG-Owl2), in JAX against PyTorch on random weights saved under one-align's
names: the vision tower against transformers' CLIPVisionModel, the abstractor and the modality-adaptive LLaMA against
their restatement (tests/eval/qalign_reference.py; the LLaMA one checked against transformers' LlamaModel on text),
the whole window rating through the benchmark's preprocessing on real frames; the windows and the smoothness
reduction against a transcription of get_motion_smoothness.py; `--mode eval` writing motion_smoothness.json."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from kaleido_jax.eval import qalign

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
from tests.eval import qalign_reference as ref  # noqa: E402  (needs torch)

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              rms_norm_eps=1e-6, rope_theta=10000.0, model_type='mplug_owl2',
              visual_config=dict(
                  visual_model=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                                    image_size=28, patch_size=14, layer_norm_eps=1e-6),
                  visual_abstractor=dict(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                                         num_hidden_layers=2, num_learnable_queries=4, layer_norm_eps=1e-6)))


def _sentencepiece(path):
  """A small SentencePiece model over the prompt and the level words (LLaMA's cannot be fetched): BOS 1."""
  import sentencepiece as spm
  lines = [qalign.PROMPT.replace(qalign.IMAGE_SLOT, ' '), *qalign.LEVELS, 'The quality of the video is good.'] * 20
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=320,
                                 model_type='bpe', character_coverage=1.0, byte_fallback=True)
  path.write_bytes(model.getvalue())


@pytest.fixture(scope='module')
def one_align(tmp_path_factory):
  """A tiny one-align directory: config.json, model.safetensors under one-align's names, tokenizer.model,
  preprocessor_config.json; and the PyTorch model it holds."""
  from safetensors.torch import save_file
  root = tmp_path_factory.mktemp('one-align')
  _sentencepiece(root / 'tokenizer.model')
  import sentencepiece as spm
  cfg = dict(CONFIG, vocab_size=spm.SentencePieceProcessor(model_file=str(root / 'tokenizer.model')).vocab_size())
  (root / 'config.json').write_text(json.dumps(cfg))
  (root / 'preprocessor_config.json').write_text(json.dumps(dict(
      crop_size=28, size=28, do_center_crop=True, do_normalize=True, do_resize=True, resample=3,
      image_mean=list(qalign.CLIP_MEAN), image_std=list(qalign.CLIP_STD))))
  torch.manual_seed(0)
  model = ref.randomise(ref.QAlign(cfg))
  save_file(model.one_align_state_dict(), str(root / 'model.safetensors'))
  return model, root


def test_the_llama_restatement_is_transformers_llama_on_text():
  cfg = dict(CONFIG, vocab_size=50)
  torch.manual_seed(1)
  llama = transformers.LlamaModel(transformers.LlamaConfig(
      vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0)).eval()
  mine = ref.randomise(ref.QAlign(cfg), seed=2)
  with torch.no_grad():
    for a, b in zip(mine.layers, llama.layers):
      for name in ('q_proj', 'o_proj'):
        getattr(a.self_attn, name).weight.copy_(getattr(b.self_attn, name).weight)
      for name in ('k_proj', 'v_proj'):
        getattr(a.self_attn, name).multiway[0].weight.copy_(getattr(b.self_attn, name).weight)
      for name in ('gate_proj', 'up_proj', 'down_proj'):
        getattr(a.mlp, name).weight.copy_(getattr(b.mlp, name).weight)
      a.input_layernorm.multiway[0].weight.copy_(b.input_layernorm.weight)
      a.post_attention_layernorm.multiway[0].weight.copy_(b.post_attention_layernorm.weight)
    x = torch.randn(2, 7, 64)
    want = llama(inputs_embeds=x).last_hidden_state
    got = x
    for layer in mine.layers:
      got = layer(got, torch.zeros(2, 7, dtype=torch.long))
    got = llama.norm(got)
  assert (got - want).abs().max() < 1e-5


def test_the_network_matches_pytorch(one_align):
  model_t, root = one_align
  model = qalign.load(str(root))
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(3, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    px = torch.from_numpy(pixels.transpose(0, 3, 1, 2))
    want_v = model_t.vision(px).numpy()
    want_t = model_t.encode_images(px).numpy()
  assert np.abs(np.asarray(model.vision(pixels)) - want_v).max() < 1e-5
  tokens = np.asarray(model.frame_tokens(pixels))
  assert tokens.shape == (3, 5, 64) and np.abs(tokens - want_t).max() < 1e-5 * np.abs(want_t).max()
  tok = qalign.Tokenizer(str(root))
  before, after = tok.prompt()
  ids = np.asarray(tok.levels())
  with torch.no_grad():
    want = model_t(before, px, after)[ids].numpy()
  got = np.asarray(model.last_logits(np.asarray(before), tokens.reshape(1, -1, 64), np.asarray(after), ids))[0]
  assert np.abs(got - want).max() < 1e-5 * max(1.0, np.abs(want).max())


def test_pytorch_bin_shards_load_the_same(one_align, tmp_path):
  # one-align may ship transformers' PyTorch shards (pytorch_model-0000X-of-0000N.bin and their index), with
  # buffers the network recomputes (rotary inv_freq): the same weights as from safetensors.
  import shutil
  model_t, root = one_align
  state = model_t.one_align_state_dict()
  state['model.layers.0.self_attn.rotary_emb.inv_freq'] = torch.ones(8)
  keys = sorted(state)
  shards = {'pytorch_model-00001-of-00002.bin': keys[::2], 'pytorch_model-00002-of-00002.bin': keys[1::2]}
  for name, part in shards.items():
    torch.save({k: state[k] for k in part}, tmp_path / name)
  (tmp_path / 'pytorch_model.bin.index.json').write_text(json.dumps(
      {'weight_map': {k: name for name, part in shards.items() for k in part}}))
  for f in ('config.json', 'tokenizer.model', 'preprocessor_config.json'):
    shutil.copy(root / f, tmp_path / f)
  pixels = np.random.default_rng(4).normal(size=(2, 28, 28, 3)).astype(np.float32)
  want = np.asarray(qalign.load(str(root)).frame_tokens(pixels))
  assert np.array_equal(np.asarray(qalign.load(str(tmp_path)).frame_tokens(pixels)), want)


def _the_scripts_expand2square(pil_img, background_color):
  """QAlignVideoScorer.expand2square (transcribed)."""
  width, height = pil_img.size
  if width == height:
    return pil_img
  if width > height:
    result = Image.new(pil_img.mode, (width, width), background_color)
    result.paste(pil_img, (0, (width - height) // 2))
    return result
  result = Image.new(pil_img.mode, (height, height), background_color)
  result.paste(pil_img, ((height - width) // 2, 0))
  return result


def _reference_ratings(model_t, root, frames):
  """get_motion_smoothness.py's scorer on the PyTorch model: windows, expand2square, CLIPImageProcessor, the prompt
  split at the image slot, the five level words' softmax, the weights."""
  tok = qalign.Tokenizer(str(root))
  before, after = tok.prompt()
  proc = transformers.CLIPImageProcessor.from_pretrained(str(root))
  background = tuple(int(x * 255) for x in proc.image_mean)
  ids = [tok(w)[1] for w in qalign.LEVELS]
  out = []
  for w in _the_scripts_windows(len(frames), 3):
    imgs = [_the_scripts_expand2square(Image.fromarray(frames[i]), background) for i in w]
    px = proc(images=imgs, return_tensors='pt')['pixel_values']
    with torch.no_grad():
      logits = model_t(before, px, after)[ids]
    out.append(float(torch.softmax(logits, -1) @ torch.tensor(qalign.LEVEL_WEIGHTS)))
  return np.asarray(out)


def test_window_ratings_on_real_frames_match_the_scripts_scorer(one_align):
  model_t, root = one_align
  from kaleido_jax.data import video as video_lib
  from tests.data.test_real_footage import footage
  frames = video_lib.decode(footage('carphone_pristine.mp4')).frames[:6]  # 176 x 144: padded to a square
  scorer = qalign.MotionSmoothnessScorer(str(root), dtype='float32', batch=4)
  got = scorer.ratings(frames)
  want = _reference_ratings(model_t, root, frames)
  assert got.shape == (6,) and np.abs(got - want).max() < 1e-5
  assert scorer(frames) == qalign.smoothness(got)


def _the_scripts_windows(total_frames, window_size):
  """load_video_sliding_window's indices (transcribed)."""
  left_extend = (window_size - 1) // 2
  right_extend = window_size - 1 - left_extend
  groups = []
  for current_frame in range(total_frames):
    start_frame = max(0, current_frame - left_extend)
    end_frame = min(total_frames, current_frame + right_extend + 1)
    frame_indices = list(range(start_frame, end_frame))
    while len(frame_indices) < window_size:
      if start_frame == 0:
        frame_indices.append(frame_indices[-1])
      else:
        frame_indices.insert(0, frame_indices[0])
    groups.append([frame_indices[0]] * window_size if current_frame < left_extend else frame_indices)
  return groups


def test_windows_and_the_smoothness_reduction_are_the_scripts():
  for t in (1, 2, 3, 7, 81):
    for w in (3, 5):
      assert qalign.windows(t, w) == _the_scripts_windows(t, w)
  assert qalign.windows(4) == [[0, 0, 0], [0, 1, 2], [1, 2, 3], [2, 2, 3]]
  scores = [0.50, 0.51, 0.56, 0.56, 0.56, 0.52, 0.52]
  diffs = np.abs(np.diff(scores))
  idx = np.where(diffs > 0.025)[0]  # get_artifacts_frames
  want = 1 - len(np.unique(np.concatenate([idx, idx + 1]))) / len(scores)
  assert qalign.smoothness(scores) == pytest.approx(want) == pytest.approx(1 - 4 / 7)
  assert qalign.smoothness([0.7]) == 1.0


def test_eval_mode_writes_motion_smoothness_json(one_align, tmp_path):
  _, root = one_align
  import os
  from kaleido_jax.eval import opens2v
  from tests.data.test_real_footage import footage
  bench = tmp_path / 'Open-Domain_Eval.json'
  bench.write_text(json.dumps({'singleobj_1': {'img_paths': [], 'prompt': 'A man talks in a car.'}}))
  videos = tmp_path / 'videos'
  videos.mkdir()
  os.symlink(footage('carphone_pristine.mp4'), videos / 'singleobj_1.mp4')
  report = opens2v.evaluate_folder(str(bench), str(videos), str(tmp_path / 'out'), qalign_model=str(root),
                                   qalign_dtype='float32', show_progress=False)
  got = json.loads((tmp_path / 'out' / 'motion_smoothness.json').read_text())
  assert set(got) == {'singleobj_1'} and 0.0 <= got['singleobj_1']['motion_smoothness'] <= 1.0
  assert 'MotionSmoothness' in report['total']['metrics']
  report = opens2v.evaluate_folder(str(bench), str(videos), str(tmp_path / 'out2'), qalign_model=str(tmp_path / 'x'),
                                   show_progress=False)
  assert 'config.json' in report['problems']['MotionSmoothness'] and 'MotionAmplitude' in report['total']['metrics']
