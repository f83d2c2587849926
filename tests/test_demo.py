"""`--mode demo` end to end on a tiny budget: trains, samples held-out references, evaluates, writes files."""

import os

import pytest

from kaleido_jax.cli import main as cli_main
from tests.sampling_common import tiny_config


@pytest.mark.slow
def test_demo_mode_writes_samples_eval_and_logs(tmp_path, capsys):
  config = tiny_config()
  config.train.update(num_steps=4, log_every=2, checkpoint_every=4, warmup_steps=1)
  config.data.batch_size = 8  # the tests run on 8 virtual devices (data-parallel 8)
  out = cli_main.run_mode('demo', config, str(tmp_path))
  assert out['train']['step'] == 4
  means = out['eval']['means']
  assert {'trained', 'untrained'} <= set(means)
  for gif, prompt in out['samples']:
    assert os.path.getsize(gif) > 0 and prompt
    assert os.path.exists(gif.replace('.gif', '.mp4')) and os.path.exists(gif.replace('.gif', '.png'))
    # The request's inputs beside it (README's `--mode sample --ref samples/heldout_00_ref_0.png` example).
    assert open(gif.replace('.gif', '.txt')).read().strip() == prompt
    assert os.path.exists(gif.replace('.gif', '_ref_0.png'))
  for f in ('eval.json', 'eval.md', 'video_00.png'):
    assert os.path.exists(tmp_path / 'eval' / f)
  assert any(f.startswith('events') for f in os.listdir(tmp_path))
  printed = capsys.readouterr().out
  assert '| trained |' in printed and 'tensorboard --logdir' in printed
  assert 'train step 4/4' in printed and 'subject_presence_min' in printed
  # A second run resumes: no more training, same evaluation inputs.
  again = cli_main.run_mode('demo', config, str(tmp_path))
  assert again['train']['step'] == 4 and again['train']['losses'] == []
