r"""Cloud TPU launcher: create a slice, install this package on every worker, run one command on all.

  python launch/tpu.py create  --name kaleido --zone us-east5-a --accelerator v5p-16 [--queued] [--spot]
  python launch/tpu.py install --name kaleido --zone us-east5-a
  python launch/tpu.py train   --name kaleido --zone us-east5-a --config configs/kaleido_14b.py \
      --workdir gs://BUCKET/runs/k14b [-- --config.train.num_steps=2000]
  python launch/tpu.py status  --name kaleido --zone us-east5-a
  python launch/tpu.py logs    --name kaleido --zone us-east5-a
  python launch/tpu.py delete  --name kaleido --zone us-east5-a

Add --dry_run to print the gcloud command lines instead of running them.

- install: the stock TPU VM images (v2-alpha-tpuv5, -tpuv5-lite, -tpuv6e: Ubuntu 22.04) ship Python 3.10, and jax
  0.10 needs 3.11+, so every worker gets its own environment, `uv venv --python 3.12 ~/kaleido_venv` (uv fetches
  that Python; uv itself from its installer when the image lacks it), as maxdiffusion's setup does; the package
  and jax[tpu] are installed there. The system python3 is not used.
- train: every worker starts the same `python -m kaleido_jax.main` command detached from the SSH session
  (`setsid nohup`, stdin closed), so a dropped SSH connection does not stop the run; each worker logs to
  `~/kaleido_logs/train-<hostname>.log` and keeps the run's pid in `~/kaleido_logs/train.pid`; `status` says on each
  worker whether it runs, `logs` prints each worker's last lines. KALEIDO_DISTRIBUTED=auto makes the trainer call
  `jax.distributed.initialize()` (the slice's hosts from the TPU metadata), so a multi-host slice forms one mesh;
  JAX_PLATFORMS=tpu,cpu keeps the CPU backend beside the TPU (host-side work: `jax.devices('cpu')`). The workdir
  must be shared by all hosts (a gs:// bucket) for orbax checkpoints.

The command lines and the worker scripts are pure functions so tests can check them, and run the scripts in a
local shell against a stand-in gcloud (tests/train/test_launch.py).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

JAX_VERSION = '0.10.2'
# Software versions per generation (Cloud TPU docs, "TPU software versions").
RUNTIME = {'v4': 'tpu-ubuntu2204-base', 'v5litepod': 'v2-alpha-tpuv5-lite', 'v5p': 'v2-alpha-tpuv5',
           'v6e': 'v2-alpha-tpuv6e'}
REMOTE_DIR = '~/kaleido_jax'
ARCHIVE = 'kaleido_jax_src.tgz'


def runtime_version(accelerator: str) -> str:
  gen = accelerator.split('-')[0]
  if gen not in RUNTIME:
    raise ValueError(f'unknown accelerator {accelerator!r}; known generations: {sorted(RUNTIME)}')
  return RUNTIME[gen]


def _common(zone: str, project: str | None) -> list[str]:
  return ['--zone', zone] + (['--project', project] if project else [])


def create_commands(name: str, zone: str, accelerator: str, *, project: str | None = None,
                    queued: bool = False, spot: bool = False, version: str | None = None) -> list[list[str]]:
  """A TPU VM, or a queued resource (waits for capacity) holding one node named `name`."""
  version = version or runtime_version(accelerator)
  if queued:
    cmd = ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', f'{name}-qr', '--node-id', name,
           '--accelerator-type', accelerator, '--runtime-version', version] + _common(zone, project)
  else:
    cmd = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', name, '--accelerator-type', accelerator,
           '--version', version] + _common(zone, project)
  if spot:
    cmd.append('--spot')
  return [cmd]


def ssh_all(name: str, zone: str, command: str, project: str | None = None) -> list[str]:
  """The same shell command on every worker of the slice."""
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', name, '--worker=all', '--command', command] + \
      _common(zone, project)


PYTHON = '3.12'  # the workers' interpreter (uv-managed): jax 0.10 needs >= 3.11, the images ship 3.10
VENV = '~/kaleido_venv'
LOGS = '~/kaleido_logs'
# True when the pid in train.pid is a live process (a zombie, exited but not reaped yet, is not).
_ALIVE = f'pid=$(cat {LOGS}/train.pid 2>/dev/null || true); [ -n "$pid" ] && ps -o stat= -p "$pid" | grep -q "^[^Z]"'


def install_script() -> str:
  """What every worker runs to install: unpack the source, make a Python 3.12 venv with uv, install into it."""
  return '\n'.join([
      'set -euo pipefail',
      f'mkdir -p {REMOTE_DIR} && tar xzf ~/{ARCHIVE} -C {REMOTE_DIR}',
      'export PATH="$HOME/.local/bin:$PATH"',
      # uv's own installer puts it in ~/.local/bin; it needs no Python of the image's.
      'command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh',
      f'uv venv --python {PYTHON} --allow-existing {VENV}',
      f'uv pip install --python {VENV}/bin/python -e {REMOTE_DIR} "jax[tpu]=={JAX_VERSION}"',
      f'{VENV}/bin/python -c "import sys, kaleido_jax; print(\'kaleido_jax on Python\', sys.version.split()[0])"',
  ])


def install_commands(name: str, zone: str, src_dir: str, *, project: str | None = None,
                     archive_dir: str = '/tmp') -> list[list[str]]:
  """Pack the source tree, copy it to every worker, run `install_script` there."""
  archive = os.path.join(archive_dir, ARCHIVE)
  return [
      ['tar', 'czf', archive, '--exclude=.git', '--exclude=__pycache__', '-C', src_dir, '.'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', archive, f'{name}:~/', '--worker=all'] +
      _common(zone, project),
      ssh_all(name, zone, install_script(), project),
  ]


def train_command_string(config: str, workdir: str, extra: list[str] | None = None) -> str:
  """What every worker runs: the trainer, detached from the SSH session, logging to its own file."""
  args = [f'{VENV}/bin/python', '-m', 'kaleido_jax.main', '--config', config, '--workdir', workdir, '--mode', 'train']
  run = ' '.join(shlex.quote(a) if i else a for i, a in enumerate(args + list(extra or [])))
  env = 'KALEIDO_DISTRIBUTED=auto JAX_PLATFORMS=tpu,cpu'
  return '\n'.join([
      'set -euo pipefail',
      f'mkdir -p {LOGS} && cd {REMOTE_DIR}',
      f'log={LOGS}/train-$(hostname).log',
      f'if {_ALIVE}; then echo "$(hostname): a run is going on (pid $pid); see launch/tpu.py status" >&2; exit 1; fi',
      ': >> "$log"',  # the log exists when this returns (the run's own redirection happens in the child)
      # The hangup of the SSH session, which can come the moment this script ends, must not reach the child before
      # setsid has given it a session of its own: an ignored signal stays ignored across fork and exec.
      "trap '' HUP",
      # setsid: a session of its own, so the SSH session's hangup does not reach it; stdin closed.
      f'{env} setsid nohup {run} >> "$log" 2>&1 < /dev/null &',
      f'echo $! > {LOGS}/train.pid',
      'echo "$(hostname): started pid $! (log $log)"',
  ])


def train_commands(name: str, zone: str, config: str, workdir: str, *, project: str | None = None,
                   extra: list[str] | None = None) -> list[list[str]]:
  if len(workdir) and not workdir.startswith('gs://'):
    print('warning: a multi-host workdir must be shared by all hosts (use gs://...)', file=sys.stderr)
  return [ssh_all(name, zone, train_command_string(config, workdir, extra), project)]


def status_commands(name: str, zone: str, *, project: str | None = None) -> list[list[str]]:
  """On each worker: whether its trainer runs, and its log's last line."""
  script = (f'if {_ALIVE}; then state="running (pid $pid)"; '
            f'else state="not running"; fi; '
            f'echo "$(hostname): $state; $(tail -n 1 {LOGS}/train-$(hostname).log 2>/dev/null || echo no log)"')
  return [ssh_all(name, zone, script, project)]


def logs_commands(name: str, zone: str, *, lines: int = 50, project: str | None = None) -> list[list[str]]:
  return [ssh_all(name, zone, f'echo "== $(hostname)"; tail -n {int(lines)} {LOGS}/train-$(hostname).log', project)]


def delete_commands(name: str, zone: str, *, project: str | None = None,
                    queued: bool = False) -> list[list[str]]:
  if queued:
    return [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', f'{name}-qr', '--force', '--quiet']
            + _common(zone, project)]
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', name, '--quiet'] + _common(zone, project)]


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = []
  if '--' in argv:
    extra = argv[argv.index('--') + 1:]
    argv = argv[:argv.index('--')]
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('action', choices=['create', 'install', 'train', 'status', 'logs', 'delete'])
  p.add_argument('--lines', type=int, default=50, help='logs: how many last lines of each worker\'s log')
  p.add_argument('--name', required=True)
  p.add_argument('--zone', required=True)
  p.add_argument('--project')
  p.add_argument('--accelerator', default='v5p-8')
  p.add_argument('--version')
  p.add_argument('--queued', action='store_true')
  p.add_argument('--spot', action='store_true')
  p.add_argument('--config', default='configs/kaleido_14b.py')
  p.add_argument('--workdir', default='')
  p.add_argument('--src', default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  p.add_argument('--dry_run', action='store_true')
  a = p.parse_args(argv)
  if a.action == 'create':
    cmds = create_commands(a.name, a.zone, a.accelerator, project=a.project, queued=a.queued, spot=a.spot,
                           version=a.version)
  elif a.action == 'install':
    cmds = install_commands(a.name, a.zone, a.src, project=a.project)
  elif a.action == 'train':
    if not a.workdir:
      p.error('train needs --workdir')
    cmds = train_commands(a.name, a.zone, a.config, a.workdir, project=a.project, extra=extra)
  elif a.action == 'status':
    cmds = status_commands(a.name, a.zone, project=a.project)
  elif a.action == 'logs':
    cmds = logs_commands(a.name, a.zone, lines=a.lines, project=a.project)
  else:
    cmds = delete_commands(a.name, a.zone, project=a.project, queued=a.queued)
  for c in cmds:
    print(shlex.join(c))
    if not a.dry_run:
      subprocess.run(c, check=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
