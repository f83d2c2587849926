r"""Cloud TPU launcher: create a slice, install this package on every worker, run one command on all.

  python launch/tpu.py create  --name kaleido --zone us-east5-a --accelerator v5p-16 [--queued] [--spot]
  python launch/tpu.py install --name kaleido --zone us-east5-a
  python launch/tpu.py train   --name kaleido --zone us-east5-a --config configs/kaleido_14b.py \
      --workdir gs://BUCKET/runs/k14b [-- --config.train.num_steps=2000]
  python launch/tpu.py delete  --name kaleido --zone us-east5-a

Add --dry_run to print the gcloud command lines instead of running them. Every worker runs the same
`python -m kaleido_jax.main` command (`--worker=all`); KALEIDO_DISTRIBUTED=auto makes the trainer call
`jax.distributed.initialize()` (which discovers the slice's hosts from the TPU metadata), so a multi-host
slice forms one mesh. The workdir must be shared by all hosts (a gs:// bucket) for orbax checkpoints.
The command-line builders are pure functions so tests can check them (tests/train/test_launch.py).
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


def install_commands(name: str, zone: str, src_dir: str, *, project: str | None = None,
                     archive_dir: str = '/tmp') -> list[list[str]]:
  """Pack the source tree, copy it to every worker, unpack, pip install it with jax[tpu]."""
  archive = os.path.join(archive_dir, ARCHIVE)
  setup = (f'mkdir -p {REMOTE_DIR} && tar xzf ~/{ARCHIVE} -C {REMOTE_DIR} && '
           f'python3 -m pip install -q -e {REMOTE_DIR} "jax[tpu]=={JAX_VERSION}"')
  return [
      ['tar', 'czf', archive, '--exclude=.git', '--exclude=__pycache__', '-C', src_dir, '.'],
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', archive, f'{name}:~/', '--worker=all'] +
      _common(zone, project),
      ssh_all(name, zone, setup, project),
  ]


def train_command_string(config: str, workdir: str, extra: list[str] | None = None) -> str:
  """What every worker runs (multi-host via KALEIDO_DISTRIBUTED=auto)."""
  args = ['python3', '-m', 'kaleido_jax.main', '--config', config, '--workdir', workdir, '--mode', 'train']
  args += list(extra or [])
  return (f'cd {REMOTE_DIR} && KALEIDO_DISTRIBUTED=auto JAX_PLATFORMS=tpu '
          + ' '.join(shlex.quote(a) for a in args) + ' 2>&1 | tee -a ~/train.log')


def train_commands(name: str, zone: str, config: str, workdir: str, *, project: str | None = None,
                   extra: list[str] | None = None) -> list[list[str]]:
  if len(workdir) and not workdir.startswith('gs://'):
    print('warning: a multi-host workdir must be shared by all hosts (use gs://...)', file=sys.stderr)
  return [ssh_all(name, zone, train_command_string(config, workdir, extra), project)]


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
  p.add_argument('action', choices=['create', 'install', 'train', 'delete'])
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
  else:
    cmds = delete_commands(a.name, a.zone, project=a.project, queued=a.queued)
  for c in cmds:
    print(shlex.join(c))
    if not a.dry_run:
      subprocess.run(c, check=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
