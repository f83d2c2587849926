"""notebooks/kaleido_colab_tpu.ipynb runs headless on CPU: the released-model cells, at a tiny size, on
int8 checkpoints the test converts itself (DiT and umT5 through `python -m kaleido_jax.convert
--quantization int8`, the VAE in float), as a Colab user runs them on the converted Kaleido-14B."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/kaleido_14b_sample.py shrunk to the tiny checkpoints below.
OVERRIDES = {
    'model.num_layers': 1, 'model.num_heads': 2, 'model.head_dim': 16, 'model.ffn_dim': 64, 'model.text_dim': 32,
    'model.freq_dim': 16, 'model.in_channels': 4, 'model.out_channels': 4, 'model.dtype': 'float32',
    'model.param_dtype': 'float32',
    'vae.base_dim': 4, 'vae.z_dim': 4, 'vae.dim_mult': [1, 2, 2], 'vae.num_res_blocks': 1,
    'vae.temporal_downsample': [False, True], 'vae.latents_mean': [0.0] * 4, 'vae.latents_std': [1.0] * 4,
    'text_encoder.vocab_size': 320, 'text_encoder.d_model': 32, 'text_encoder.d_kv': 8,
    'text_encoder.num_heads': 4, 'text_encoder.d_ff': 64, 'text_encoder.num_layers': 2,
    'text_encoder.max_length': 32, 'text_encoder.dtype': 'float32',
    'sample.num_frames': 5, 'sample.height': 32, 'sample.width': 32, 'sample.num_steps': 2,
}


def _convert(*args):
  subprocess.run([sys.executable, '-m', 'kaleido_jax.convert', *args], check=True, capture_output=True,
                 env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, cwd=REPO)


@pytest.mark.slow
@pytest.mark.torch
def test_colab_notebook_runs_the_released_model_path_with_int8_weights(tmp_path, monkeypatch):
  import nbformat
  import torch
  from diffusers import AutoencoderKLWan
  from nbclient import NotebookClient
  from tests import fixtures_text as ft
  from tests.model import dit_reference as ref
  from tests.sampling_common import write_reference
  src, root = tmp_path / 'pytorch', tmp_path / 'weights'
  dit = ref.save_diffusers(ref.make_diffusers_model(heads=2, head_dim=16, layers=1, seed=1), str(src / 'dit'))
  _convert('--format', 'diffusers', '--input', dit, '--output', str(root / 'kaleido-14b-int8'),
           '--quantization', 'int8')
  torch.manual_seed(0)
  AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                   temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                   latents_std=[1.0] * 4).save_pretrained(str(src / 'vae'))
  _convert('--component', 'vae', '--format', 'diffusers', '--input', str(src / 'vae'), '--output',
           str(root / 'wan2.1-vae'))
  ft.tiny_hf_umt5(seed=2).save_pretrained(str(src / 'umt5'))
  ft.train_sentencepiece(str(src / 'umt5' / 'tokenizer'))
  _convert('--component', 'text_encoder', '--format', 'transformers', '--input', str(src / 'umt5'), '--output',
           str(root / 'umt5-xxl-int8'), '--quantization', 'int8')
  refs = [write_reference(str(tmp_path / 'a.png')), write_reference(str(tmp_path / 'b.png'), (30, 30, 200))]
  for key, value in dict(KALEIDO_NOTEBOOK_TEST='1', KALEIDO_NOTEBOOK_WEIGHTS=str(root),
                         KALEIDO_NOTEBOOK_REFS=json.dumps(refs), KALEIDO_NOTEBOOK_OVERRIDES=json.dumps(OVERRIDES),
                         KALEIDO_NOTEBOOK_WORKDIR=str(tmp_path / 'work'), JAX_PLATFORMS='cpu').items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(os.path.join(REPO, 'notebooks', 'kaleido_colab_tpu.ipynb'), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': REPO}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  errors = [o for o in outputs if o.get('output_type') == 'error']
  assert not errors, errors[0].get('evalue')
  text = ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')
  assert 'DiT weights: int8 | umT5: int8' in text
  assert f"weights: {root / 'kaleido-14b-int8'}" in text  # loaded as written, already int8
  assert '(5, 32, 32, 3) uint8' in text and 'peak accelerator memory' in text
  assert any('text/html' in o.get('data', {}) for o in outputs)  # the inline video
