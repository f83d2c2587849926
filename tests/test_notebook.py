"""notebooks/kaleido_colab_tpu.ipynb as Colab runs it: from an empty working directory (no repository in it), the
first cell clones the repository (pointed at this checkout) and the next ones take a release written upstream's way
(DeepSpeed DiT run, Wan2.1_VAE.pth, umT5 .pth + tokenizer, at a tiny size: the download replaced by it), convert it
once in the weight format chosen for the chip, load, generate and show it; headless on CPU, int8 and int4."""

import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/kaleido_14b_sample.py shrunk to the tiny release of tests/convert/test_release.py.
OVERRIDES = {
    'model.num_layers': 2, 'model.num_heads': 1, 'model.head_dim': 128, 'model.ffn_dim': 64, 'model.text_dim': 32,
    'model.freq_dim': 16, 'model.in_channels': 4, 'model.out_channels': 4, 'model.dtype': 'float32',
    'model.param_dtype': 'float32',
    'vae.base_dim': 4, 'vae.z_dim': 4, 'vae.dim_mult': [1, 2, 2], 'vae.num_res_blocks': 1,
    'vae.temporal_downsample': [False, True], 'vae.latents_mean': [0.0] * 4, 'vae.latents_std': [1.0] * 4,
    'text_encoder.vocab_size': 320, 'text_encoder.d_model': 32, 'text_encoder.d_kv': 8,
    'text_encoder.num_heads': 4, 'text_encoder.d_ff': 64, 'text_encoder.num_layers': 2,
    'text_encoder.max_length': 16, 'text_encoder.dtype': 'float32',
    'sample.num_frames': 5, 'sample.height': 16, 'sample.width': 16, 'sample.num_steps': 2,
}


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize('scheme', ['int8', 'int4'])
def test_colab_notebook_runs_from_an_empty_directory_on_a_release(tmp_path, monkeypatch, scheme):
  import nbformat
  import torch
  from diffusers import AutoencoderKLWan
  from nbclient import NotebookClient
  from tests import fixtures_text as ft
  from tests.convert.test_release import VAE_KW, _release
  from tests.model import dit_reference as ref
  from tests.sampling_common import write_reference
  torch.manual_seed(3)
  parts = (ref.make_diffusers_model(heads=1, head_dim=128, layers=2, seed=4),
           AutoencoderKLWan(**VAE_KW, latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval(),
           ft.tiny_hf_umt5(seed=3, num_layers=2))
  release = _release(str(tmp_path / 'download' / 'Kaleido-14B-S2V'), parts)
  refs = [write_reference(str(tmp_path / 'a.png')), write_reference(str(tmp_path / 'b.png'), (30, 30, 200))]
  empty = tmp_path / 'content'  # Colab's working directory: no repository in it
  empty.mkdir()
  for key, value in dict(KALEIDO_NOTEBOOK_TEST='1', KALEIDO_NOTEBOOK_REPO=REPO,
                         KALEIDO_NOTEBOOK_SRC=str(empty / 'kaleido_jax'), KALEIDO_NOTEBOOK_RELEASE=release,
                         KALEIDO_NOTEBOOK_STORE=str(empty), KALEIDO_NOTEBOOK_QUANTIZATION=scheme,
                         KALEIDO_NOTEBOOK_REFS=json.dumps(refs), KALEIDO_NOTEBOOK_OVERRIDES=json.dumps(OVERRIDES),
                         JAX_PLATFORMS='cpu').items():
    monkeypatch.setenv(key, value)
  nb = nbformat.read(os.path.join(REPO, 'notebooks', 'kaleido_colab_tpu.ipynb'), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(empty)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  errors = [o for o in outputs if o.get('output_type') == 'error']
  assert not errors, (errors[0].get('evalue'), errors[0].get('traceback', [])[-3:])
  text = ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')
  assert f'kaleido_jax from {empty / "kaleido_jax"}' in text  # cloned there, from the empty directory
  assert (empty / 'kaleido_jax' / 'setup.py').exists()
  umt5 = 'int8'  # an int4 DiT gets an int8 umT5 (release.TEXT_ENCODER_SCHEME), as on a v5e-1
  assert f'DiT weights: {scheme} | umT5: {umt5}' in text
  converted = empty / f'kaleido-14b-{scheme}'
  assert f'converted release: {converted}' in text and (converted / 'release.json').exists()
  assert f"weights: {converted / 'transformer'}" in text  # loaded as written, already quantized
  assert '(5, 16, 16, 3) uint8' in text and 'peak accelerator memory' in text
  assert any('text/html' in o.get('data', {}) for o in outputs)  # the inline video
