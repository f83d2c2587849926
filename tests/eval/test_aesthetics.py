"""The Aesthetics metric's networks in JAX against their PyTorch originals on random weights: transformers'
CLIPVisionModelWithProjection (saved with save_pretrained, as a CLIPModel directory and as a vision-only one),
CLIPImageProcessor's preprocessing, and the LAION MLP as get_aesscore.py defines it (saved with torch.save)."""

import numpy as np
import pytest

from kaleido_jax.eval import aesthetics

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, image_size=32,
            patch_size=8, projection_dim=16)


def _laion_mlp(in_dim):
  """get_aesscore.py's MLP (written out here: the benchmark's module is not importable)."""
  return torch.nn.Sequential(torch.nn.Linear(in_dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                             torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                             torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()


class _MLP(torch.nn.Module):
  def __init__(self, in_dim):
    super().__init__()
    self.layers = _laion_mlp(in_dim)


@pytest.fixture(scope='module')
def clip_dirs(tmp_path_factory):
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp('clip')
  vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**TINY)).eval()
  with torch.no_grad():  # non-trivial norms and class / position embeddings
    for name, p in vision.named_parameters():
      if 'norm' in name or 'embedding' in name:
        p.add_(0.3 * torch.randn_like(p))
  vision.save_pretrained(root / 'vision')
  full = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=TINY, projection_dim=16,
      text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                       vocab_size=99)))
  full.vision_model.load_state_dict(vision.vision_model.state_dict())
  full.visual_projection.load_state_dict(vision.visual_projection.state_dict())
  full.save_pretrained(root / 'full')
  proc = transformers.CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
  for d in ('vision', 'full'):
    proc.save_pretrained(root / d)
  return vision, root


@pytest.mark.parametrize('layout', ['vision', 'full'])
def test_the_clip_tower_matches_transformers(clip_dirs, layout):
  vision, root = clip_dirs
  tower = aesthetics.load_clip(str(root / layout))
  pixels = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = vision(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).image_embeds.numpy()
  got = np.asarray(tower(pixels))
  # fp32, a 2-layer tower: within 1e-5 of the output's scale.
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), np.abs(got - want).max()


def test_preprocessing_matches_clip_image_processor(clip_dirs):
  _, root = clip_dirs
  pre = aesthetics.Preprocess.from_dir(str(root / 'vision'))
  proc = transformers.CLIPImageProcessor.from_pretrained(str(root / 'vision'))
  rng = np.random.default_rng(2)
  for shape in ((48, 80, 3), (90, 40, 3), (33, 33, 3)):
    img = rng.integers(0, 256, size=shape, dtype=np.uint8)
    want = proc(images=img, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
    # PIL resizes in uint8 in both; what is left is float rounding of the normalisation.
    np.testing.assert_allclose(pre(img), want, atol=1e-5)


def test_the_aesthetic_mlp_loads_its_pth_and_matches(tmp_path):
  torch.manual_seed(3)
  mlp = _MLP(16).eval()
  path = tmp_path / 'aesthetic-model.pth'
  torch.save(mlp.state_dict(), path)  # the keys get_aesscore.py's MLP.load_state_dict takes: layers.N.weight
  ours = aesthetics.load_mlp(str(path))
  x = np.random.default_rng(4).normal(size=(5, 16)).astype(np.float32)
  with torch.no_grad():
    want = mlp.layers(torch.from_numpy(x))[:, 0].numpy()
  np.testing.assert_allclose(np.asarray(ours(x)), want, atol=1e-5 * np.abs(want).max())


def test_the_score_of_a_video_is_the_benchmarks_pipeline(clip_dirs, tmp_path):
  # get_aesscore.py end to end in PyTorch (CLIPProcessor, the tower, L2 normalisation, the MLP, the mean over
  # linspace(0, F - 1, 32) frames) against AestheticScorer.
  vision, root = clip_dirs
  torch.manual_seed(5)
  module = _MLP(16).eval()
  torch.save(module.state_dict(), tmp_path / 'aesthetic-model.pth')
  mlp = module.layers
  frames = np.random.default_rng(6).integers(0, 256, size=(40, 36, 52, 3), dtype=np.uint8)
  proc = transformers.CLIPImageProcessor.from_pretrained(str(root / 'vision'))
  idx = np.linspace(0, len(frames) - 1, 32, dtype=int)
  with torch.no_grad():
    embed = vision(**proc(images=list(frames[idx]), return_tensors='pt')).image_embeds
    want = float(mlp(embed / torch.linalg.vector_norm(embed, dim=-1, keepdim=True)).squeeze(1).mean())
  got = aesthetics.AestheticScorer(str(root / 'vision'), str(tmp_path / 'aesthetic-model.pth'))(frames)
  assert abs(got - want) <= 1e-5 * max(abs(want), 1e-3), (got, want)


def test_eval_on_a_benchmark_folder_writes_aesthetic_score_and_a_missing_model_is_one_line(clip_dirs, tmp_path):
  import json
  import shutil
  from kaleido_jax.data import video as video_lib
  from kaleido_jax.eval import opens2v
  from tests.data.test_real_footage import footage
  _, root = clip_dirs
  torch.manual_seed(7)
  torch.save(_MLP(16).eval().state_dict(), tmp_path / 'aesthetic-model.pth')
  bench = tmp_path / 'Open-Domain_Eval.json'
  bench.write_text(json.dumps({'singleobj_1': {'img_paths': ['x.png'], 'prompt': 'a man', 'class_label': ['Man']}}))
  videos = tmp_path / 'videos'
  videos.mkdir()
  shutil.copy(footage('carphone_distorted.mp4'), videos / 'singleobj_1.mp4')
  report = opens2v.evaluate_folder(str(bench), str(videos), str(tmp_path / 'out'), aesthetic_clip=str(root / 'vision'),
                                   aesthetic_mlp=str(tmp_path / 'aesthetic-model.pth'))
  written = json.load(open(tmp_path / 'out' / 'aesthetic_score.json'))
  want = aesthetics.AestheticScorer(str(root / 'vision'), str(tmp_path / 'aesthetic-model.pth'))(
      video_lib.decode(footage('carphone_distorted.mp4')).frames)
  assert abs(written['singleobj_1']['aes_score'] - want) < 1e-6
  assert 'Aesthetics' in report['total']['metrics'] and not report['problems']
  # A CLIP folder that is not there: one line for Aesthetics, MotionAmplitude still scored.
  report = opens2v.evaluate_folder(str(bench), str(videos), str(tmp_path / 'out2'),
                                   aesthetic_clip=str(tmp_path / 'no-clip'),
                                   aesthetic_mlp=str(tmp_path / 'aesthetic-model.pth'))
  assert list(report['problems']) == ['Aesthetics'] and 'no-clip' in report['problems']['Aesthetics']
  assert 'MotionAmplitude' in report['total']['metrics'] and 'Aesthetics' in report['total']['absent']
