"""bench/ablate.py on a tiny budget: the table's shape and the runner's resume, not the science."""

import json
import os

import pytest

from bench import ablate
from tests.sampling_common import tiny_config


def _base():
  config = tiny_config()
  config.train.update(log_every=2, checkpoint_every=2, warmup_steps=1)
  config.data.batch_size = 8  # the tests run on 8 virtual devices (data-parallel 8)
  return config


@pytest.mark.slow
def test_two_values_one_seed_writes_table_json_and_plot(tmp_path):
  base = _base()
  key, values = ablate.parse_factor(base, 'model.rope_scheme=kaleido,none')
  assert (key, values) == ('model.rope_scheme', ['kaleido', 'none'])
  out = ablate.run(base, key, values, seeds=1, steps=2, out=str(tmp_path), log=lambda _: None)
  md = (tmp_path / 'ablation.md').read_text()
  rows = [l for l in md.splitlines() if l.startswith('| ')]
  assert rows[0].startswith('| model.rope_scheme | seeds | fidelity_lpips ↓')
  assert [r.split(' | ')[0] for r in rows[1:]] == ['| kaleido', '| none', '| real clips (ceiling)']
  assert len(rows[1].split('|')) == len(rows[0].split('|'))
  assert 'one seed per value: no test is possible' in md
  assert os.path.getsize(tmp_path / 'ablation.png') > 0
  data = json.loads((tmp_path / 'ablation.json').read_text())
  assert [r['value'] for r in data['runs']] == ['kaleido', 'none']
  assert set(data['summary']) == {'kaleido', 'none'} and data['ceiling']['pose_copy_rate'] == 0.0
  # The two runs differ only by the factor: same seed, same steps.
  cfgs = [json.loads((tmp_path / 'runs' / f'model.rope_scheme={v}' / 'seed0' / 'run.json').read_text())
          for v in values]
  assert cfgs[0]['model'].pop('rope_scheme') == 'kaleido' and cfgs[1]['model'].pop('rope_scheme') == 'none'
  assert cfgs[0] == cfgs[1]
  # Resumable: a finished run is neither retrained nor rescored.
  stamp = os.path.getmtime(tmp_path / 'runs' / 'model.rope_scheme=none' / 'seed0' / 'eval_seed0' / 'eval.json')
  again = ablate.run(base, key, values, seeds=1, steps=2, out=str(tmp_path), log=lambda _: None)
  assert json.dumps(again['summary']) == json.dumps(out['summary'])  # NaN CIs (one seed) compare as text
  assert os.path.getmtime(tmp_path / 'runs' / 'model.rope_scheme=none' / 'seed0' / 'eval_seed0' / 'eval.json') == stamp
  # Another config in the same directory is refused, not mixed in.
  with pytest.raises(ValueError, match='different config'):
    ablate.run(base, key, values, seeds=1, steps=3, out=str(tmp_path), log=lambda _: None)


def test_statistics_and_bad_factors():
  mean, ci = ablate.mean_ci([1.0, 2.0, 3.0])
  assert mean == 2.0 and ci == pytest.approx(4.303 * 1.0 / 3 ** 0.5, rel=1e-3)  # t(0.975, 2) = 4.303
  scores = {'a': [dict(binding_error=0.50), dict(binding_error=0.52), dict(binding_error=0.51)],
            'b': [dict(binding_error=0.10), dict(binding_error=0.12), dict(binding_error=0.11)]}
  lines = ablate.significant(scores)
  assert len(lines) == 1 and lines[0].startswith('b vs a: binding_error') and 'better' in lines[0]
  base = _base()
  with pytest.raises(ValueError, match='nearest known keys: model.rope_scheme'):
    ablate.parse_factor(base, 'model.rope_shceme=a,b')
  with pytest.raises(ValueError, match='at least two values'):
    ablate.parse_factor(base, 'data.pairing=cross')


@pytest.mark.slow
def test_the_pairing_ablation_in_the_world_with_looks_two_seeds_writes_cis_welch_and_the_plot(tmp_path):
  # Kaleido's second claim as the runner measures it: cross vs same_clip references in the world where a clip has
  # its own look, 2 training seeds x 2 content seeds, a few steps: CIs, Welch's p per metric, the paste metrics.
  base = _base()
  base.data.update(clip_nuisance=1.0, height=32, width=32)
  base.eval.num_videos = 2
  key, values = ablate.parse_factor(base, 'data.pairing=cross,same_clip')
  out = ablate.run(base, key, values, seeds=2, steps=2, out=str(tmp_path), eval_seeds=[0, 1], log=lambda _: None)
  md = (tmp_path / 'ablation.md').read_text()
  head = [l for l in md.splitlines() if l.startswith('| data.pairing')][0]
  assert 'look_paste_rate ↓' in head and 'halo_paste_rate ↓' in head
  rows = {l.split(' | ')[0][2:]: l for l in md.splitlines() if l.startswith('| cross') or l.startswith('| same_clip')}
  assert ' ± ' in rows['cross'] and rows['cross'].split(' | ')[1] == '2'  # two seeds: a confidence interval
  assert "Welch's t-test against cross" in md
  p = out['welch_p']['same_clip']
  assert set(p) == {m for m, _ in ablate.METRICS} and 0.0 <= p['fidelity_lpips'] <= 1.0
  data = json.loads((tmp_path / 'ablation.json').read_text())
  assert data['eval_seeds'] == [0, 1] and len(data['runs']) == 4
  assert all('look_paste_rate' in r['means'] for r in data['runs'])
  assert data['ceiling']['look_paste_rate'] == 0.0
  assert os.path.getsize(tmp_path / 'ablation.png') > 0
