r"""Batch sampling throughput (`--mode sample --prompts`): videos per hour on one device vs N, same prompt set.

  JAX_PLATFORMS=cpu python bench/batch_sample.py [--config configs/demo.py] [--prompts 16] [--devices 1,8]
      [--checkpoint random] [--steps 20]

Each row is one `python -m kaleido_jax.main --mode sample --prompts FILE` run in a fresh process with that many
virtual CPU devices (one data-parallel group per device), timed from start to exit (weights, compile and
every video included), and the rate its progress bar reports (videos made / time since the first group
started). Printed: a markdown table with the ratio against the first row. CPU numbers are informational (the
CPU is where we test): on a TPU host each group is a chip.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prompt_set(directory: str, n: int) -> str:
  rng = np.random.default_rng(0)
  lines = []
  for i in range(n):
    img = np.full((24, 24, 3), 255, np.uint8)
    img[6:18, 6:18] = rng.integers(0, 255, 3)
    Image.fromarray(img).save(os.path.join(directory, f'ref{i}.png'))
    lines.append(f'A coloured square number {i} moves across the frame.@@ref{i}.png')
  path = os.path.join(directory, 'prompts.txt')
  with open(path, 'w') as fh:
    fh.write('\n'.join(lines) + '\n')
  return path


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--config', default='configs/demo.py')
  p.add_argument('--prompts', type=int, default=16)
  p.add_argument('--devices', default='1,8')
  p.add_argument('--checkpoint', default='random')
  p.add_argument('--steps', type=int, default=0, help='0 = the config\'s sample.num_steps')
  args = p.parse_args()
  work = tempfile.mkdtemp(prefix='kaleido-batch-bench-')
  prompts = _prompt_set(work, args.prompts)
  rows = []
  for n in [int(x) for x in args.devices.split(',')]:
    out = os.path.join(work, f'out{n}')
    cmd = [sys.executable, '-m', 'kaleido_jax.main', '--config', args.config, '--mode', 'sample', '--workdir',
           os.path.join(work, f'w{n}'), '--prompts', prompts, '--out', out, '--checkpoint', args.checkpoint]
    if args.steps:
      cmd += ['--steps', str(args.steps)]
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.time() - t0
    if proc.returncode:
      print(proc.stderr[-2000:], file=sys.stderr)
      raise SystemExit(f'{n} devices: exit {proc.returncode}')
    rates = re.findall(r'([0-9.]+) videos/h', proc.stderr)
    done = json.load(open(os.path.join(out, 'manifest.json')))['done']
    rows.append((n, done, wall, 3600.0 * done / wall, float(rates[-1]) if rates else float('nan')))
  print(f'prompt set: {args.prompts} videos, {args.config}, checkpoint {args.checkpoint}; '
        f'{os.cpu_count()} CPU cores ({time.strftime("%Y-%m-%d")})\n')
  print('| devices (groups) | videos | wall s (load + compile + sampling) | videos/h (wall) | videos/h (bar) | '
        'ratio (wall) |')
  print('|---|---|---|---|---|---|')
  for n, done, wall, per_h, bar in rows:
    print(f'| {n} | {done} | {wall:.1f} | {per_h:.0f} | {bar:.0f} | {per_h / rows[0][3]:.2f}x |')


if __name__ == '__main__':
  main()
