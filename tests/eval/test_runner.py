"""`--mode eval`: held-out requests, scores for every generator and the target clips, files written."""

import json
import os

import numpy as np
import pytest

from kaleido_jax import export, pipeline
from kaleido_jax.cli import main as cli_main
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
  res = cli_main.run_mode('eval', config, str(tmp_path))
  name = [n for n in res['means'] if n.startswith('exported')][0]
  direct = runner.evaluate(config, {'direct': runner.pipeline_generator(pipe)}, str(tmp_path / 'ev2'))
  # The exported and the direct sampler make the same videos (image preprocessing is the same for
  # refs that already have the frame size), hence the same scores.
  np.testing.assert_allclose(res['means'][name]['fidelity_histogram'],
                             direct['means']['direct']['fidelity_histogram'], atol=1e-6)


@pytest.mark.slow
def test_calibrate_then_eval_reports_model_calls_per_video(tmp_path, capsys):
  config = tiny_config(checkpoint='random', num_steps=10)
  record = cli_main.run_mode('calibrate', config, str(tmp_path))
  assert os.path.exists(tmp_path / 'step_cache.json') and len(record['mag_ratios']) == 10
  assert 'wrote' in capsys.readouterr().out
  config.eval.output_dir = str(tmp_path / 'plain')
  plain = cli_main.run_mode('eval', config, str(tmp_path))
  config.sample.update(cache='magcache', magcache_threshold=0.5, magcache_max_skip=3)
  config.eval.output_dir = str(tmp_path / 'cached')
  cached = cli_main.run_mode('eval', config, str(tmp_path))
  from kaleido_jax.diffusion import guidance
  full = 10 * guidance.num_branches(config.sample.guidance_scale, config.sample.image_guidance_scale)
  name = next(n for n in plain['means'] if n.startswith('model'))
  assert plain['means'][name]['model_calls_per_video'] == full  # 10 steps x every guidance branch
  assert cached['means'][name]['model_calls_per_video'] < full
  assert 'model_calls_per_video' not in plain['means'][runner.TARGET]
  md = open(tmp_path / 'cached' / 'eval.md').read()
  assert 'model_calls_per_video' in md and '—' in md
  saved = json.load(open(tmp_path / 'cached' / 'eval.json'))
  assert saved['means'][name]['model_calls_per_video'] < full


def test_in_the_world_with_looks_a_generator_that_pastes_the_references_looks_scores_one(tmp_path):
  # data.clip_nuisance: the held-out truth carries what pasting each reference's look would make of the clip; the
  # target clips score 0 on the paste metrics, a generator that returns that counterfactual 1.
  config = tiny_config()
  config.data.update(clip_nuisance=1.0, height=32, width=32)
  reqs = runner.heldout_requests(config, 4)
  assert all('look_pasted' in r['truth'] for r in reqs)
  assert all(r['prompt'].endswith(' focus.') for r in reqs)  # the prompt names the look the video must have
  pasted = lambda batch, seeds: np.stack([r['truth']['look_pasted'] for r in batch])
  res = runner.evaluate(config, {"pasted": pasted}, str(tmp_path), requests=reqs)
  target, paste = res['means'][runner.TARGET], res['means']['pasted']
  assert target['look_paste_rate'] == 0.0 and target['halo_paste_rate'] == 0.0
  assert paste['look_paste_rate'] > 0.9, paste  # 1 where a reference's clip has another look (NaN where none)
