"""The gcloud command lines launch/tpu.py builds (they cannot run here)."""

import shlex

import pytest

from launch import tpu


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


def test_install_copies_to_every_worker_and_installs_jax_tpu():
  tar, scp, ssh = tpu.install_commands('k', 'z', '/src')
  assert tar[:2] == ['tar', 'czf'] and '--exclude=.git' in tar and tar[-2:] == ['/src', '.']
  assert scp[3:5] == ['tpu-vm', 'scp'] and scp[-3:] == ['--worker=all', '--zone', 'z']
  assert '--worker=all' in scp and scp[6] == 'k:~/'
  assert '--worker=all' in ssh
  remote = ssh[ssh.index('--command') + 1]
  assert f'jax[tpu]=={tpu.JAX_VERSION}' in remote and 'pip install' in remote


def test_train_runs_same_multihost_command_on_all_workers():
  (cmd,) = tpu.train_commands('k', 'z', 'configs/kaleido_14b.py', 'gs://b/run',
                              extra=['--config.train.num_steps=10', '--config.mesh.fsdp=-1'])
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'k'] and '--worker=all' in cmd
  remote = cmd[cmd.index('--command') + 1]
  assert 'KALEIDO_DISTRIBUTED=auto' in remote
  inner = shlex.split(remote.split('JAX_PLATFORMS=tpu ', 1)[1].split(' 2>&1')[0])
  assert inner[:3] == ['python3', '-m', 'kaleido_jax.main']
  assert inner[inner.index('--config') + 1] == 'configs/kaleido_14b.py'
  assert inner[inner.index('--workdir') + 1] == 'gs://b/run'
  assert inner[-2:] == ['--config.train.num_steps=10', '--config.mesh.fsdp=-1']


def test_cli_dry_run_prints_commands(capsys):
  assert tpu.main(['delete', '--name', 'k', '--zone', 'z', '--queued', '--dry_run']) == 0
  out = capsys.readouterr().out.strip()
  assert out == 'gcloud compute tpus queued-resources delete k-qr --force --quiet --zone z'
  tpu.main(['train', '--name', 'k', '--zone', 'z', '--workdir', 'gs://b', '--dry_run', '--',
            '--config.seed=3'])
  assert "--config.seed=3" in capsys.readouterr().out
