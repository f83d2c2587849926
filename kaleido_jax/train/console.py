"""What a person watching a run sees: one progress line instead of the library's INFO logs.

`train.console='progress'` (the demo's) turns absl / orbax / grain INFO lines off for the run (warnings still
show; TensorBoard still gets every scalar) and prints one line per update: step, steps/s, loss and ETA, rewritten
in place on a terminal, every ~10% of the run otherwise (logs stay readable). `'log'` (the default) keeps clu's
logging writer lines, what a cluster job's log wants.
"""

from __future__ import annotations

import contextlib
import sys
import time

from absl import logging


def _clock(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}' if seconds >= 3600 else \
      f'{seconds // 60}:{seconds % 60:02d}'


class ProgressLine:
  """Call with (step, loss) after every step; `close()` ends the line."""

  def __init__(self, start: int, total: int, stream=None, min_interval: float = 0.5):
    self.start, self.total, self.stream = start, total, stream or sys.stdout
    self.tty = bool(getattr(self.stream, 'isatty', lambda: False)())
    self.first = None  # (step, time) of the first call
    self.last_print = 0.0
    self.min_interval = min_interval
    self.every = max(1, (total - start) // 10)
    self.shown = False

  def line(self, step: int, loss: float | None) -> str:
    """Rate and ETA count from the first finished step, so the first step's compilation does not skew them. The
    loss is the last one read from the device (the loop reads on its log / checkpoint cadence); none is shown
    before the first read: a `nan` there would read as divergence."""
    shown = '' if loss is None else f'  loss {loss:.4f}'
    if self.first is None or step <= self.first[0]:
      return f'train step {step}/{self.total}{shown}  (compiled; measuring speed)'
    rate = (step - self.first[0]) / max(time.time() - self.first[1], 1e-9)
    return (f'train step {step}/{self.total}  {rate:.2f} steps/s{shown}  '
            f'ETA {_clock((self.total - step) / rate)}')

  def __call__(self, step: int, loss: float | None) -> None:
    now = time.time()
    if self.first is None:
      self.first = (step, now)
    final = step >= self.total
    if self.tty:
      if final or now - self.last_print >= self.min_interval:
        self.stream.write('\r' + self.line(step, loss) + '\x1b[K')
        self.stream.flush()
        self.last_print, self.shown = now, True
    elif final or (step - self.start) % self.every == 0:
      self.stream.write(self.line(step, loss) + '\n')
      self.stream.flush()

  def close(self) -> None:
    if self.tty and self.shown:
      self.stream.write('\n')
      self.stream.flush()


@contextlib.contextmanager
def quiet_logs(enabled: bool = True):
  """absl (and so orbax, grain, clu's logging writer) at WARNING for the block; restored after."""
  if not enabled:
    yield
    return
  before = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    yield
  finally:
    logging.set_verbosity(before)
