"""GmeScore's network in JAX against transformers' Qwen2-VL run the way GME's `gme_model.py` runs it (vision tokens
merged into the token embeddings, the language model with no position ids, the last token's state normalised), on
random weights saved with `save_pretrained`; the preprocessing against the Qwen2-VL PIL image processor; the score
on a real clip."""

import json

import numpy as np
import pytest

from kaleido_jax.eval import gme

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

SPECIAL = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|vision_start|>', '<|vision_end|>', '<|image_pad|>']


def _tokenizer(path):
  """A small byte-level BPE with Qwen2-VL's special tokens, saved as tokenizer.json (Qwen's own cannot be fetched)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  corpus = [gme.chat('A man rides a bike along a street, in warm light.', gme.QUERY_INSTRUCTION),
            gme.chat(gme.IMAGE_INPUT, gme.CORPUS_INSTRUCTION)]
  tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(path / 'tokenizer.json'))
  return tok


def _model_dir(tmp_path):
  tok = _tokenizer(tmp_path)
  cfg = transformers.Qwen2VLConfig(
      text_config=dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_parameters=dict(
                           rope_type='default', rope_theta=1e6, mrope_section=[2, 3, 3])),
      vision_config=dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64),
      image_token_id=tok.token_to_id('<|image_pad|>'))
  torch.manual_seed(0)
  model = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
  with torch.no_grad():  # norms away from their initial ones, so that a wrong norm shows
    for name, p in model.named_parameters():
      if 'norm' in name or 'ln_q' in name:
        p.uniform_(0.5, 1.5)
  model.save_pretrained(tmp_path)
  return model, tok


def _reference(model, ids, pixel_values=None, grid=None):
  """GME's forward on transformers 5's Qwen2-VL."""
  ids = torch.tensor(ids)
  with torch.no_grad():
    emb = model.model.language_model.embed_tokens(ids)
    if pixel_values is not None:
      img = model.model.visual(pixel_values, grid_thw=grid).pooler_output
      emb[ids == model.config.image_token_id] = img.to(emb.dtype)
    out = model.model.language_model(inputs_embeds=emb, attention_mask=torch.ones_like(ids)).last_hidden_state
  e = out[:, -1]
  return torch.nn.functional.normalize(e, dim=-1).numpy()


def test_gme_matches_transformers_qwen2_vl_and_its_processor(tmp_path):
  model, tok = _model_dir(tmp_path)
  ours = gme.load(str(tmp_path))
  tokenizer = gme.Tokenizer(str(tmp_path))
  # Text: the query under its instruction.
  ids = [tokenizer(gme.chat('A man rides a bike.', gme.QUERY_INSTRUCTION))]
  assert ids[0][:1] == [tok.token_to_id('<|im_start|>')]
  want = _reference(model, ids)
  got = np.asarray(ours.embed(np.asarray(ids, np.int32)))
  assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()
  # Preprocessing: GME's fetch_image resize, then the Qwen2-VL processor with GME's pixel bounds.
  frame = np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8)
  patches, grid = gme.preprocess(frame)
  from PIL import Image
  fetched = Image.fromarray(frame).resize(tuple(reversed(gme.fetch_size(50, 90))), Image.BICUBIC)
  proc = transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
      min_pixels=gme.PIXELS[0], max_pixels=gme.PIXELS[1])
  want_px = proc(images=[fetched], return_tensors='pt')
  assert tuple(want_px['image_grid_thw'][0].tolist()) == grid
  assert np.abs(patches - want_px['pixel_values'].numpy()).max() < 1e-5
  # An image: its merged vision tokens in the image-pad slots; two frames batched.
  tokens = patches.shape[0] // 4
  text = gme.chat(gme.IMAGE_INPUT.replace('<|image_pad|>', '<|image_pad|>' * tokens), gme.CORPUS_INSTRUCTION)
  img_ids = tokenizer(text)
  assert img_ids.count(tok.token_to_id('<|image_pad|>')) == tokens
  frame2 = np.random.default_rng(1).integers(0, 256, (50, 90, 3), dtype=np.uint8)
  patches2, _ = gme.preprocess(frame2)
  want = np.concatenate([_reference(model, [img_ids], torch.from_numpy(p), torch.tensor([grid]))
                         for p in (patches, patches2)])
  got = np.asarray(ours.embed(np.asarray([img_ids] * 2, np.int32), np.stack([patches, patches2]),
                              gme.vision_angles(ours.cfg, *grid[1:])))
  assert np.abs(got - want).max() < 1e-5, np.abs(got - want).max()


def test_images_of_many_sizes_share_padded_programs_and_keep_their_embeddings(tmp_path):
  # NexusScore's crops come in every size: padded to a bucket of patches (masked in the vision attention) and
  # their sequences padded after the final token, each gives transformers' embedding of it alone.
  model, _ = _model_dir(tmp_path)
  scorer = gme.GmeScorer(str(tmp_path), batch=2)
  tokenizer = gme.Tokenizer(str(tmp_path))
  rng = np.random.default_rng(2)
  shapes = [(500, 600), (530, 560), (520, 610), (560, 560), (40, 40), (120, 33)]
  images = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in shapes]
  got = scorer.image_embeddings(images)
  for img, g in zip(images, got):
    patches, grid = gme.preprocess(img)
    assert gme.grid_of(*img.shape[:2]) == grid
    ids = tokenizer(gme.chat(gme.IMAGE_INPUT.replace('<|image_pad|>', '<|image_pad|>' * (patches.shape[0] // 4)),
                             gme.CORPUS_INSTRUCTION))
    want = _reference(model, [ids], torch.from_numpy(patches), torch.tensor([grid]))[0]
    assert np.abs(g - want).max() < 1e-5, np.abs(g - want).max()
  assert len({gme.preprocess(i)[1] for i in images}) == 6  # six patch grids ...
  assert scorer._image.fn._cache_size() == 3  # ... in three buckets, three programs  # pylint: disable=protected-access
  text = scorer.text_embedding('a cat', gme.QUERY_INSTRUCTION)
  want = _reference(model, [tokenizer(gme.chat('a cat', gme.QUERY_INSTRUCTION))])[0]
  assert np.abs(text - want).max() < 1e-5


def test_the_gme_score_of_a_real_clip_is_the_mean_frame_query_product(tmp_path):
  _model_dir(tmp_path)
  from kaleido_jax.data import video as video_lib
  from tests.data.test_real_footage import footage
  frames = video_lib.decode(footage('carphone_pristine.mp4')).frames
  scorer = gme.GmeScorer(str(tmp_path), num_frames=4)
  score = scorer(frames, 'A man talks in a car.')
  idx = np.linspace(0, len(frames) - 1, 4, dtype=int)  # the benchmark's frames (truncated linspace)
  assert list(idx) == [0, 39, 79, 119]
  text = scorer.text_embedding('A man talks in a car.')
  want = float(np.mean(scorer.image_embeddings([frames[i] for i in idx]) @ text))
  assert abs(score - want) < 1e-6 and -1.0 <= score <= 1.0


def test_eval_mode_writes_gmescore_json_in_the_benchmarks_key(tmp_path):
  model_dir = tmp_path / 'gme'
  model_dir.mkdir()
  _model_dir(model_dir)
  import os
  from kaleido_jax.eval import opens2v
  from tests.data.test_real_footage import footage
  bench = tmp_path / 'Open-Domain_Eval.json'
  bench.write_text(json.dumps({'singleobj_1': {'img_paths': [], 'prompt': 'A man talks in a car.'}}))
  videos = tmp_path / 'videos'
  videos.mkdir()
  os.symlink(footage('carphone_pristine.mp4'), videos / 'singleobj_1.mp4')
  report = opens2v.evaluate_folder(str(bench), str(videos), str(tmp_path / 'out'), gme_model=str(model_dir),
                                   gme_dtype='float32', show_progress=False)
  got = json.loads((tmp_path / 'out' / 'gmescore.json').read_text())
  assert set(got) == {'singleobj_1'} and -1.0 <= got['singleobj_1']['gme_score'] <= 1.0
  assert 'GmeScore' in report['total']['metrics'] and 'GmeScore' in report['seconds_per_video']
  # A folder without the model: one line, MotionAmplitude still scored.
  report = opens2v.evaluate_folder(str(bench), str(videos), str(tmp_path / 'out2'), gme_model=str(tmp_path / 'none'),
                                   show_progress=False)
  assert 'config.json' in report['problems']['GmeScore'] and 'MotionAmplitude' in report['total']['metrics']
