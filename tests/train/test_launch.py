"""launch/tpu.py: the gcloud command lines it builds, and its worker scripts run in local shells against a stand-in
`gcloud` (each worker a home directory of its own, the SSH session's process group hung up when the command
returns), a stand-in `python3` that reports 3.10 (the stock TPU VM images') and a stand-in `uv`."""

import os
import re
import shlex
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from launch import tpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_create_vm_and_queued_resource():
  (vm,) = tpu.create_commands('k', 'us-east5-a', 'v5p-16', project='p')
  assert vm[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'k']
  assert vm[vm.index('--accelerator-type') + 1] == 'v5p-16'
  assert vm[vm.index('--version') + 1] == 'v2-alpha-tpuv5'
  assert vm[vm.index('--project') + 1] == 'p' and vm[vm.index('--zone') + 1] == 'us-east5-a'
  (qr,) = tpu.create_commands('k', 'z', 'v6e-16', queued=True, spot=True)
  assert qr[3:6] == ['queued-resources', 'create', 'k-qr'] and qr[qr.index('--node-id') + 1] == 'k'
  assert qr[qr.index('--runtime-version') + 1] == 'v2-alpha-tpuv6e' and qr[-1] == '--spot'
  assert '--project' not in qr
  with pytest.raises(ValueError):
    tpu.create_commands('k', 'z', 'v9-8')


def test_install_copies_to_every_worker_and_installs_jax_tpu_into_a_312_venv():
  tar, scp, ssh = tpu.install_commands('k', 'z', '/src')
  assert tar[:2] == ['tar', 'czf'] and '--exclude=.git' in tar and tar[-2:] == ['/src', '.']
  assert scp[3:5] == ['tpu-vm', 'scp'] and scp[-3:] == ['--worker=all', '--zone', 'z']
  assert '--worker=all' in scp and scp[6] == 'k:~/'
  assert '--worker=all' in ssh
  remote = ssh[ssh.index('--command') + 1]
  assert f'jax[tpu]=={tpu.JAX_VERSION}' in remote and 'uv venv --python 3.12' in remote
  assert 'python3 ' not in remote  # the image's Python (3.10) is never used


def test_train_runs_same_multihost_command_on_all_workers_detached():
  (cmd,) = tpu.train_commands('k', 'z', 'configs/kaleido_14b.py', 'gs://b/run',
                              extra=['--config.train.num_steps=10', '--config.mesh.fsdp=-1'])
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'k'] and '--worker=all' in cmd
  remote = cmd[cmd.index('--command') + 1]
  assert 'KALEIDO_DISTRIBUTED=auto JAX_PLATFORMS=tpu,cpu setsid nohup' in remote
  line = next(l for l in remote.splitlines() if 'kaleido_jax.main' in l)
  inner = shlex.split(line.split('setsid nohup ', 1)[1].split(' >> ')[0])
  assert inner[:3] == ['~/kaleido_venv/bin/python', '-m', 'kaleido_jax.main']
  assert inner[inner.index('--config') + 1] == 'configs/kaleido_14b.py'
  assert inner[inner.index('--workdir') + 1] == 'gs://b/run'
  assert inner[-2:] == ['--config.train.num_steps=10', '--config.mesh.fsdp=-1']


GCLOUD = '''
import os, shutil, signal, subprocess, sys
args = sys.argv[1:]
workers = sorted(os.path.join(os.environ['STANDIN_WORKERS'], w) for w in os.listdir(os.environ['STANDIN_WORKERS']))
if args[:4] == ['compute', 'tpus', 'tpu-vm', 'scp']:
  for home in workers:
    shutil.copy(args[4], home)
elif args[:4] == ['compute', 'tpus', 'tpu-vm', 'ssh']:
  command = args[args.index('--command') + 1]
  for home in workers:
    env = dict(os.environ, HOME=home)
    p = subprocess.Popen(['bash', '-c', command], env=env, cwd=home, start_new_session=True)
    rc = p.wait()
    try:
      os.killpg(p.pid, signal.SIGHUP)  # the SSH session ends: its process group is hung up
    except ProcessLookupError:
      pass
    if rc:
      sys.exit(rc)
else:
  sys.exit(f'stand-in gcloud: {args}')
'''

PYTHON3 = '''#!/bin/sh
if [ "$1" = "--version" ]; then echo "Python 3.10.12"; exit 0; fi
echo "stand-in python3 is 3.10 (the stock TPU VM image's): kaleido_jax needs >= 3.11" >&2; exit 1
'''

UV = '''
import os, sys
args = sys.argv[1:]
with open(os.path.join(os.environ['HOME'], 'uv.calls'), 'a') as f:
  f.write(' '.join(args) + '\\n')
if args[0] == 'venv':
  assert args[args.index('--python') + 1] == '3.12', args
  venv = os.path.expanduser(args[-1])
  os.makedirs(os.path.join(venv, 'bin'), exist_ok=True)
  link = os.path.join(venv, 'bin', 'python')
  if not os.path.exists(link):
    os.symlink(os.environ['STANDIN_REAL_PYTHON'], link)  # a 3.11+ interpreter, as uv's managed 3.12 would be
elif args[:2] != ['pip', 'install']:
  sys.exit(f'stand-in uv: {args}')
'''


def _tool(path, text, python=False):
  path.write_text((f'#!{sys.executable}\n' if python else '') + textwrap.dedent(text).lstrip())
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_install_train_status_logs_on_two_stand_in_workers(tmp_path):
  bin_dir, workers = tmp_path / 'bin', tmp_path / 'workers'
  bin_dir.mkdir()
  for i in range(2):
    (workers / f'worker-{i}').mkdir(parents=True)
  _tool(bin_dir / 'gcloud', GCLOUD, python=True)
  _tool(bin_dir / 'python3', PYTHON3)
  _tool(bin_dir / 'uv', UV, python=True)
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', STANDIN_WORKERS=str(workers),
             STANDIN_REAL_PYTHON=sys.executable, PYTHONPATH=ROOT)
  assert subprocess.run(['python3', '--version'], env=env, capture_output=True, text=True).stdout.startswith('Python 3.10')

  def launch(*args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'tpu.py'), args[0], '--name', 'k', '--zone', 'z',
                        '--src', ROOT, *args[1:]], env=env, capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p.stdout

  out = launch('install')
  assert out.count('kaleido_jax on Python 3.1') == 2  # each worker's venv Python, not the image's 3.10
  for i in range(2):
    home = workers / f'worker-{i}'
    assert (home / 'kaleido_jax' / 'configs' / 'demo.py').exists()
    calls = (home / 'uv.calls').read_text().splitlines()
    assert calls[0].startswith('venv --python 3.12') and f'jax[tpu]=={tpu.JAX_VERSION}' in calls[1]
  # train: detached; the SSH session is hung up as soon as the command returns, the runs go on and finish.
  out = launch('train', '--config', 'configs/demo.py', '--workdir', str(tmp_path / 'run'), '--', '--dry_run')
  assert len(re.findall(r'^\S+: started pid \d+ \(log ', out, re.M)) == 2, out
  logs = [next((workers / f'worker-{i}' / 'kaleido_logs').glob('train-*.log')) for i in range(2)]
  t = time.time()
  while not all('dry run: --mode train' in l.read_text() for l in logs):
    assert time.time() - t < 120, [l.read_text()[-2000:] for l in logs]
    time.sleep(0.2)
  out = launch('status')
  while out.count('not running; dry run: --mode train') < 2:  # the runs exit a moment after their last line
    assert time.time() - t < 120 and out.count('running (pid') == 2 - out.count('not running'), out
    time.sleep(0.2)
    out = launch('status')
  out = launch('logs', '--lines', '5')
  assert len(re.findall(r'^== ', out, re.M)) == 2 and out.count('kaleido_jax.train.loop:run') == 2, out


def test_cli_dry_run_prints_commands(capsys):
  assert tpu.main(['delete', '--name', 'k', '--zone', 'z', '--queued', '--dry_run']) == 0
  out = capsys.readouterr().out.strip()
  assert out == 'gcloud compute tpus queued-resources delete k-qr --force --quiet --zone z'
  tpu.main(['train', '--name', 'k', '--zone', 'z', '--workdir', 'gs://b', '--dry_run', '--',
            '--config.seed=3'])
  assert "--config.seed=3" in capsys.readouterr().out
