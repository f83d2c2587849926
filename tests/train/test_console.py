"""The demo's progress line: a few lines in a log, one rewritten line on a terminal; INFO logs off and back."""

import io

from absl import logging

from kaleido_jax.train import console


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_progress_line_in_a_log_prints_about_ten_lines():
  out = io.StringIO()
  p = console.ProgressLine(0, 100, stream=out)
  for step in range(1, 101):
    p(step, 0.5)
  p.close()
  lines = out.getvalue().splitlines()
  assert 9 <= len(lines) <= 11
  assert lines[-1].startswith('train step 100/100') and 'steps/s' in lines[-1] and 'ETA 0:00' in lines[-1]


def test_progress_line_on_a_terminal_rewrites_itself():
  out = _Tty()
  p = console.ProgressLine(10, 20, stream=out, min_interval=0.0)
  for step in range(11, 21):
    p(step, 0.25)
  p.close()
  text = out.getvalue()
  assert text.count('\n') == 1 and text.count('\r') == 10 and 'train step 20/20' in text


def test_quiet_logs_restores_the_verbosity():
  before = logging.get_verbosity()
  with console.quiet_logs():
    assert logging.get_verbosity() == logging.WARNING
  assert logging.get_verbosity() == before
  with console.quiet_logs(False):
    assert logging.get_verbosity() == before


def test_no_loss_is_shown_before_one_is_read():
  # The loop reads losses on its log cadence: the steps before the first read show none (not `loss nan`).
  out = io.StringIO()
  p = console.ProgressLine(0, 4, stream=out)
  p.every = 1
  for step, loss in ((1, None), (2, None), (3, 0.5), (4, float('nan'))):
    p(step, loss)
  lines = out.getvalue().splitlines()
  assert 'loss' not in lines[0] and 'loss' not in lines[1] and 'nan' not in ''.join(lines[:3])
  assert 'loss 0.5000' in lines[2] and 'loss nan' in lines[3]  # a NaN read from the device is shown as it is
