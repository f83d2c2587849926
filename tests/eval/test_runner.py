"""`--mode eval`: held-out requests, scores for every generator and the target clips, files written."""

import json
import os

import numpy as np

from kaleido_jax import export, pipeline
from kaleido_jax.eval import runner
from tests.sampling_common import tiny_config


def test_heldout_requests_are_cross_paired_and_unseen():
  config = tiny_config()
  reqs = runner.heldout_requests(config, 3)
  assert len(reqs) == 3
  for r in reqs:
    assert r['prompt'].endswith('.') and 1 <= len(r['refs']) <= config.model.max_refs
    assert r['refs'].dtype == np.uint8 and r['refs'].shape[1:] == (16, 16, 3)
    assert r['target'].shape == (5, 16, 16, 3)


def test_evaluate_writes_table_json_and_strips(tmp_path):
  config = tiny_config()
  reqs = runner.heldout_requests(config, 2)
  blank = lambda batch, seeds: np.full((len(batch), 5, 16, 16, 3), 128, np.uint8)
  copies = lambda batch, seeds: np.stack([r['target'] for r in batch])
  res = runner.evaluate(config, {'grey': blank, 'oracle': copies}, str(tmp_path), requests=reqs)
  means = res['means']
  assert set(means) == {'grey', 'oracle', runner.TARGET}
  assert means['oracle'] == means[runner.TARGET]  # same videos, same scores
  assert means['oracle']['fidelity_histogram'] < means['grey']['fidelity_histogram']
  saved = json.load(open(tmp_path / 'eval.json'))
  assert saved['num_videos'] == 2 and len(saved['per_video']['grey']) == 2
  assert '| grey |' in open(tmp_path / 'eval.md').read()
  assert os.path.exists(tmp_path / 'video_00.png') and os.path.exists(tmp_path / 'video_00.gif')


def test_eval_mode_runs_an_exported_artifact(tmp_path):
  config = tiny_config()
  pipe = pipeline.S2VPipeline.from_config(config, workdir=str(tmp_path), checkpoint='random')
  art = export.export_sampler(pipe, str(tmp_path / 'art'), platforms=('cpu',))
  config.eval.update(exported=art, output_dir=str(tmp_path / 'ev'))
  res = runner.run(config, str(tmp_path))
  name = [n for n in res['means'] if n.startswith('exported')][0]
  direct = runner.evaluate(config, {'direct': runner.pipeline_generator(pipe)}, str(tmp_path / 'ev2'))
  # The exported and the direct sampler make the same videos (image preprocessing is the same for
  # refs that already have the frame size), hence the same scores.
  np.testing.assert_allclose(res['means'][name]['fidelity_histogram'],
                             direct['means']['direct']['fidelity_histogram'], atol=1e-6)
