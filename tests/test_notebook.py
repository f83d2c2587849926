"""notebooks/kaleido_colab_tpu.ipynb runs headless on CPU with the tiny demo config and random weights."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_colab_notebook_executes(tmp_path, monkeypatch):
  import nbformat
  from nbclient import NotebookClient
  monkeypatch.setenv('KALEIDO_NOTEBOOK_TEST', '1')
  monkeypatch.setenv('KALEIDO_NOTEBOOK_CHECKPOINT', 'random')
  monkeypatch.setenv('KALEIDO_NOTEBOOK_WORKDIR', str(tmp_path))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = nbformat.read(os.path.join(REPO, 'notebooks', 'kaleido_colab_tpu.ipynb'), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': REPO}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')
  assert '(5, 32, 32, 3) uint8' in text and 'random weights' in text
  assert any('text/html' in o.get('data', {}) for o in outputs)  # the inline video
