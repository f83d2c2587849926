"""`--mode sample`: files written on success; every bad input is one stderr line, exit 2, no output file."""

import os
import subprocess
import sys

import numpy as np
import pytest

from kaleido_jax.cli import main as cli_main
from tests.sampling_common import tiny_config, write_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_mode(config, workdir, capsys):
  with pytest.raises(SystemExit) as e:
    cli_main.run_mode('sample', config, str(workdir))
  return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize('case', ['missing_ref', 'corrupt_ref', 'too_many_refs', 'empty_prompt', 'bad_frames',
                                  'bad_size', 'wrong_architecture', 'bad_extension', 'no_weights',
                                  'bad_quantization', 'quantized_checkpoint_other_scheme', 'missing_lora',
                                  'lora_of_another_model', 'cache_without_calibration', 'unknown_cache',
                                  'bad_timesteps'])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
  config = tiny_config(checkpoint='random', prompt='A red square moves right.')
  ref = write_reference(str(tmp_path / 'a.png'))
  corrupt = tmp_path / 'bad.jpg'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 truncated')
  out = tmp_path / 'out' / 'v.mp4'
  config.sample.output = str(out)
  config.sample.refs = (ref,)
  expect = {
      'missing_ref': 'does not exist', 'corrupt_ref': 'bad.jpg', 'too_many_refs': 'at most 2',
      'empty_prompt': 'prompt is empty', 'bad_frames': '1 \\+ 4k', 'bad_size': 'divisible by',
      'wrong_architecture': 'different architecture|cannot be loaded', 'bad_extension': 'unknown video extension',
      'no_weights': 'no weights', 'bad_quantization': "model.quantization='int3'",
      'quantized_checkpoint_other_scheme': "holds int8 weights but config.model.quantization='int4'",
      'missing_lora': 'LoRA .*nope.safetensors.* does not exist', 'lora_of_another_model': 'another model size',
      'cache_without_calibration': 'mode calibrate', 'unknown_cache': "sample.cache='deep'",
      'bad_timesteps': 'strictly decreasing'}[case]
  if case == 'missing_ref':
    config.sample.refs = (str(tmp_path / 'nope.png'),)
  elif case == 'corrupt_ref':
    config.sample.refs = (str(corrupt),)
  elif case == 'too_many_refs':
    config.sample.refs = (ref, ref, ref)
  elif case == 'empty_prompt':
    config.sample.prompt = ' '
  elif case == 'bad_frames':
    config = tiny_config('wan', checkpoint='random', prompt='x', output=str(out), num_frames=6)
  elif case == 'bad_size':
    config.sample.height = 17
  elif case == 'wrong_architecture':
    from flax import nnx
    from kaleido_jax import pipeline
    from kaleido_jax.convert import common
    other = tiny_config()
    other.model.num_heads = 4
    _, state = pipeline.random_weights(other.model)
    common.save_converted(str(tmp_path / 'conv'), nnx.to_pure_dict(state), other.model, component='transformer')
    config.sample.checkpoint = str(tmp_path / 'conv')
  elif case == 'bad_extension':
    config.sample.output = str(tmp_path / 'out' / 'v.avi')
  elif case == 'no_weights':
    config.sample.checkpoint = ''
  elif case == 'bad_quantization':
    config.model.quantization = 'int3'
  elif case == 'quantized_checkpoint_other_scheme':
    from flax import nnx
    from kaleido_jax import pipeline
    from kaleido_jax.convert import common
    q8 = config.model.copy_and_resolve_references()
    q8.quantization = 'int8'
    _, state = pipeline.random_weights(q8)
    common.save_converted(str(tmp_path / 'q8'), nnx.to_pure_dict(state), q8, component='transformer')
    config.sample.checkpoint = str(tmp_path / 'q8')
    config.model.quantization = 'int4'
  elif case == 'missing_lora':
    config.sample.loras = (str(tmp_path / 'nope.safetensors') + ':0.5',)
  elif case == 'lora_of_another_model':
    from safetensors.numpy import save_file
    save_file({'transformer.blocks.0.attn1.to_q.lora_A.weight': np.ones((4, 999), np.float32),
               'transformer.blocks.0.attn1.to_q.lora_B.weight': np.ones((999, 4), np.float32)},
              str(tmp_path / 'big.safetensors'))
    config.sample.loras = (str(tmp_path / 'big.safetensors'),)
  elif case == 'cache_without_calibration':
    config.sample.cache = 'teacache'
  elif case == 'unknown_cache':
    config.sample.cache = 'deep'
  elif case == 'bad_timesteps':
    config.sample.timesteps = (250.0, 750.0)
  code, err = _run_mode(config, tmp_path / 'work', capsys)
  lines = err.strip().splitlines()
  assert code == 2 and lines[-1].startswith('error: ') and 'Traceback' not in err, err
  assert __import__('re').search(expect, lines[-1]), lines[-1]
  assert not out.exists() and not os.path.exists(os.path.dirname(out)) or not os.listdir(os.path.dirname(out))


def test_size_flag_parsing():
  assert cli_main.parse_size('480x832') == (480, 832)
  assert cli_main.parse_size('64') == (64, 64)
  for bad in ('x', '0x5', '4x5x6', 'ax3'):
    with pytest.raises(ValueError, match='--size'):
      cli_main.parse_size(bad)


def test_cli_writes_video_gif_and_strip(tmp_path):
  ref = write_reference(str(tmp_path / 'a.png'))
  out = tmp_path / 'v.mp4'
  cmd = [sys.executable, '-m', 'kaleido_jax.main', '--config', os.path.join(REPO, 'tests', 'sampling_config.py'),
         '--workdir', str(tmp_path / 'w'), '--mode', 'sample', '--ref', ref, '--prompt', 'A red square moves right.',
         '--out', str(out), '--checkpoint', 'random', '--steps', '2', '--guidance', '3', '--seed', '1',
         '--frames', '5', '--size', '16x16']
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert 'wrote' in p.stdout
  for suffix in ('.mp4', '.gif', '.png'):
    assert (tmp_path / ('v' + suffix)).stat().st_size > 0
  from kaleido_jax.data.prepare import clips
  frames = clips.read_video(str(out))
  assert frames.shape[:3] == (5, 16, 16)
  assert not [f for f in os.listdir(tmp_path) if 'partial' in f]
  # A bad input through the real CLI: one line, status 2, no traceback.
  bad = cmd[:cmd.index('--ref') + 1] + [str(tmp_path / 'missing.png')] + cmd[cmd.index('--ref') + 2:]
  bad[bad.index('--out') + 1] = str(tmp_path / 'bad.mp4')
  p = subprocess.run(bad, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert p.returncode == 2 and 'Traceback' not in p.stderr
  assert p.stderr.strip().splitlines()[-1].startswith('error: reference #0')
  assert not (tmp_path / 'bad.mp4').exists()


@pytest.mark.parametrize('override,says', [('--config.model.nonexistent=3', '--config.model.nonexistent: unknown'),
                                           ('--config.model.rope_shceme=none', 'nearest known keys: model.rope_scheme'),
                                           ('--config.model.num_layers=abc', 'invalid literal for int()')])
def test_a_bad_config_override_is_one_line_with_status_2(tmp_path, override, says):
  cmd = [sys.executable, '-m', 'kaleido_jax.main', '--config', os.path.join(REPO, 'configs', 'demo.py'), override,
         '--workdir', str(tmp_path / 'w'), '--mode', 'train']
  p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO),
                     cwd=REPO, timeout=300)
  assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and says in lines[0]
  assert not (tmp_path / 'w').exists()


def test_int8_sampling_run_writes_the_video(tmp_path, capsys):
  # The one-shot plan end to end: umT5 encodes and is released, the DiT (int8, quantized on load from random
  # float weights) samples and is released, the VAE decodes.
  config = tiny_config('wan', checkpoint='random', prompt='A red square moves right.',
                       output=str(tmp_path / 'v.mp4'), gif=False)
  config.model.quantization = 'int8'
  config.sample.refs = (write_reference(str(tmp_path / 'a.png')),)
  out = cli_main.run_mode('sample', config, str(tmp_path / 'work'))
  assert out['frames'].shape == (5, 16, 16, 3) and os.path.exists(tmp_path / 'v.mp4')
  assert 'random weights' in capsys.readouterr().out


@pytest.mark.slow
def test_one_shot_sample_on_two_hosts_writes_one_video_equal_to_one_host(tmp_path):
  # Two processes (jax.distributed on loopback, one device each) run `--mode sample` as the hosts of a slice would:
  # the video spans both hosts' chips, its latents are gathered to every host to decode, and process 0 alone writes.
  from tests.train.test_loop import _free_port
  ref = write_reference(str(tmp_path / 'a.png'))

  def cmd(out):
    return [sys.executable, '-m', 'kaleido_jax.main', '--config', os.path.join(REPO, 'tests', 'sampling_config.py'),
            '--workdir', str(tmp_path / 'w'), '--mode', 'sample', '--ref', ref, '--prompt', 'A red square moves right.',
            '--out', str(out), '--checkpoint', 'random', '--steps', '2', '--guidance', '3', '--seed', '1',
            '--frames', '5', '--size', '16x16']
  base = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  one = subprocess.run(cmd(tmp_path / 'one.mp4'), capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(base, XLA_FLAGS='--xla_force_host_platform_device_count=2'))
  assert one.returncode == 0, one.stderr[-2000:]
  port = _free_port()
  procs = [subprocess.Popen(cmd(tmp_path / 'two.mp4'), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env=dict(base, XLA_FLAGS='--xla_force_host_platform_device_count=1',
                                               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
                                               JAX_PROCESS_ID=str(i))) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (stdout, stderr) in zip(procs, outs):
    assert p.returncode == 0, stderr[-2000:]
  assert 'wrote' in outs[0][0] and 'wrote' not in outs[1][0]  # one writer
  from kaleido_jax.data.prepare import clips
  a, b = clips.read_video(str(tmp_path / 'one.mp4')), clips.read_video(str(tmp_path / 'two.mp4'))
  assert a.shape == b.shape == (5, 16, 16, 3)
  assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # the same video (video codec rounding aside)


def test_a_cpu_run_without_jax_platforms_is_quiet(tmp_path):
  # libtpu is installed (the test extra) and this machine has no TPU: `--mode sample` with JAX_PLATFORMS unset and
  # every log level at its default must not print libtpu's initialisation trace, nor orbax's "Metadata file does
  # not exist" for a training checkpoint's weights (an item of a CheckpointManager step), nor TF's banners: a user
  # reads them as errors. The weights: a step a CheckpointManager wrote, as the trainer writes them.
  import jax
  import orbax.checkpoint as ocp
  from flax import nnx
  from kaleido_jax import pipeline as pipe_lib
  from tests.sampling_common import tiny_config
  _, state = pipe_lib.random_weights(tiny_config().model, seed=0)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  with ocp.CheckpointManager(str(tmp_path / 'w' / 'checkpoints'),
                             item_handlers={'state': ocp.StandardCheckpointHandler()}) as mngr:
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({'params': params})))
  ref = write_reference(str(tmp_path / 'a.png'))
  cmd = [sys.executable, '-m', 'kaleido_jax.main', '--config', os.path.join(REPO, 'tests', 'sampling_config.py'),
         '--workdir', str(tmp_path / 'w'), '--mode', 'sample', '--ref', ref, '--prompt', 'A red square moves right.',
         '--out', str(tmp_path / 'v.mp4'), '--steps', '1', '--frames', '5', '--size', '16x16']
  env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL')}
  p = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, PYTHONPATH=REPO), cwd=REPO, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert 'checkpoints step 3' in p.stdout, p.stdout[-2000:]  # the trainer-style checkpoint was what it loaded
  for noise in ('libtpu_init_utils', 'InitGoogle', 'TPU_WORKER_HOSTNAMES', 'TPU accelerator type',
                'Metadata file does not exist', 'oneDNN', 'cuda', 'Unable to register'):
    assert noise not in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize('body,expected', [
    (None, "No such file or directory"),
    ('import no_such_module_here\n', "ModuleNotFoundError: No module named 'no_such_module_here'"),
    ('def get_config(:\n', 'SyntaxError: invalid syntax'),
])
def test_a_config_file_that_does_not_load_is_one_line_with_status_2(tmp_path, body, expected):
  path = tmp_path / 'cfg.py'
  if body is not None:
    path.write_text(body)
  p = subprocess.run([sys.executable, '-m', 'kaleido_jax.main', '--config', str(path), '--workdir',
                      str(tmp_path / 'w'), '--dry_run'], capture_output=True, text=True, cwd=str(tmp_path),
                     env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO), timeout=120)
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: the config file does not load') and expected in lines[0]
