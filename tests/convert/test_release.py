"""Released Kaleido files as upstream writes them: a DeepSpeed pickle with RNG states and other objects beside
`module` (read without running any of its code), extra conditioner / VAE keys, FSDP2 names; the whole release
folder (DiT + Wan-format VAE + umT5 .pth + tokenizer) converted in one command and sampled from."""

import argparse
import os
import random

import jax.numpy as jnp
import numpy as np
import pytest

from kaleido_jax import config as kcfg
from kaleido_jax.cli import convert as convert_main
from kaleido_jax.convert import common
from kaleido_jax.convert import release
from kaleido_jax.convert import transformer as convert_tf
from kaleido_jax.convert import vae as convert_vae
from tests import fixtures_text as ft
from tests.convert.test_text_encoder import _wan_state_dict
from tests.convert.test_transformer import _to_sat
from tests.convert.test_vae import KW as VAE_KW, _cfg as vae_cfg
from tests.model import dit_reference as ref

pytestmark = pytest.mark.torch
MARKER = '/tmp/kaleido_release_test_ran_code'


class _Evil:
  """An object whose unpickling would run a command: the loader must never do that."""

  def __reduce__(self):
    return (os.system, (f'touch {MARKER}',))


def _deepspeed_file(path, module):
  """`{'module': ..., ...}` the way DeepSpeed / SAT save a model shard: RNG states, args, counters beside it."""
  import torch
  os.makedirs(os.path.dirname(path), exist_ok=True)
  torch.save({'module': module, 'np_rng_state': np.random.get_state(), 'random_rng_state': random.getstate(),
              'torch_rng_state': torch.get_rng_state(), 'args': argparse.Namespace(lr=1e-5, zero_stage=2),
              'iteration': 1000, 'mp_world_size': 1, 'payload': _Evil()}, path)


@pytest.fixture(scope='module')
def parts():
  import torch
  from diffusers import AutoencoderKLWan
  dit = ref.make_diffusers_model(heads=1, head_dim=128, layers=2, seed=4)  # dim 128: the head count is inferred
  torch.manual_seed(3)
  vae = AutoencoderKLWan(**VAE_KW, latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
  return dit, vae, ft.tiny_hf_umt5(seed=3, num_layers=2)


def _release(root, parts, extra=None):
  import torch
  dit, vae, umt5 = parts
  sat = _to_sat(ref.to_wan_state_dict(dit), 2)
  sat.update({'conditioner.embedders.0.transformer.shared.weight': torch.zeros(4, 2),
              'first_stage_model.decoder.conv_in.weight': torch.zeros(2)}, **(extra or {}))
  _deepspeed_file(os.path.join(root, 'model', '1000', 'mp_rank_00_model_states.pt'), sat)
  with open(os.path.join(root, 'model', 'latest'), 'w') as fh:
    fh.write('1000')
  torch.save({convert_vae.wan_key(k, vae_cfg()): v for k, v in vae.state_dict().items()},
             os.path.join(root, 'Wan2.1_VAE.pth'))
  os.makedirs(os.path.join(root, 'umt5-xxl', 'google', 'umt5-xxl'))
  torch.save(_wan_state_dict(umt5), os.path.join(root, 'umt5-xxl', 'models_t5_umt5-xxl-enc-bf16.pth'))
  ft.train_sentencepiece(os.path.join(root, 'umt5-xxl', 'google', 'umt5-xxl'), vocab_size=120)
  return root


def _sample_config(root):
  """--mode sample's config for the tiny release: its DiT (int8), the tiny VAE and umT5."""
  config = kcfg.base_config()
  _, config.model = convert_tf.convert_state(os.path.join(root, 'model'), 'kaleido')
  config.model.update(quantization='int8', dtype='float32', param_dtype='float32')
  config.vae = vae_cfg()
  config.text_encoder = kcfg.text_encoder_config(**{k: v for k, v in ft.TINY_UMT5.items()}, quantization='int8',
                                                 max_length=16)
  config.mesh.update(data=1)
  return config


def test_deepspeed_pickle_loads_its_tensors_only_and_runs_none_of_its_code(tmp_path):
  import torch
  if os.path.exists(MARKER):
    os.remove(MARKER)
  path = str(tmp_path / 'mp_rank_00_model_states.pt')
  _deepspeed_file(path, {'a.weight': torch.ones(2, 3), 'module.b': torch.zeros(1)})
  with pytest.raises(Exception):  # what torch's safe loader does with such a file
    torch.load(path, weights_only=True)
  state = common.CheckpointReader(path)
  assert state.keys() == ['a.weight', 'b'] and state.get('a.weight').shape == (2, 3)
  assert not os.path.exists(MARKER)
  # An FSDP2 full-state file: wrapper names stripped.
  fsdp = str(tmp_path / 'fsdp2_rank_0000_checkpoint.pt')
  torch.save({'model': {'_orig_mod.blocks.0._fsdp_wrapped_module.w': torch.ones(2)}, 'step': 3}, fsdp)
  assert common.CheckpointReader(fsdp).keys() == ['blocks.0.w']
  assert convert_tf.resolve_path(str(tmp_path), 'kaleido') in (path, fsdp)


def test_release_folder_converts_in_one_command_and_samples(tmp_path, parts):
  dit, _, _ = parts
  root = _release(str(tmp_path / 'Kaleido-14B-S2V'), parts)
  assert release.is_release(root)
  # Through the CLI entry: a release missing its VAE is one line, exit 2.
  broken = _release(str(tmp_path / 'broken'), parts)
  os.remove(os.path.join(broken, 'Wan2.1_VAE.pth'))
  assert convert_main.main(['--format', 'kaleido', '--input', broken, '--output', str(tmp_path / 'x')]) == 2
  out = release.convert_release(root, str(tmp_path / 'converted'), 'int8', vae=vae_cfg())
  assert sorted(os.listdir(out)) == ['release.json', 'text_encoder', 'transformer', 'vae']
  assert common.saved_quantization(os.path.join(out, 'transformer')) == 'int8'
  assert common.saved_quantization(os.path.join(out, 'text_encoder')) == 'int8'
  # --mode sample's entry: S2VPipeline.from_config with the converted release as the checkpoint.
  from kaleido_jax import pipeline
  config = _sample_config(root)
  pipe = pipeline.S2VPipeline.from_config(config, workdir=str(tmp_path / 'w'), checkpoint=out)
  assert pipe.weights_from.startswith(os.path.join(out, 'transformer'))
  video = pipe.generate([[np.full((16, 16, 3), 200, np.uint8)]], ['a red cat'], num_frames=5, height=16, width=16,
                        seed=0)
  assert video.shape == (1, 5, 16, 16, 3) and video.dtype == np.uint8
  # The DiT it sampled with is the release's (int8: within the quantization error of the torch model).
  rng = np.random.default_rng(0)
  x, t, txt = (rng.normal(size=(1, 2, 8, 8, 4)).astype(np.float32), np.array([500.0], np.float32),
               rng.normal(size=(1, 5, 32)).astype(np.float32))
  from flax import nnx
  got = np.asarray(nnx.merge(pipe.graphdef, pipe.state)(jnp.asarray(x), jnp.asarray(t), jnp.asarray(txt)))
  want = ref.run_diffusers(dit, x, t, txt)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02


_WRITE_ON_DEVICE_1 = """
import os, sys
import jax, jax.numpy as jnp, orbax.checkpoint as ocp
from kaleido_jax.convert import release
from tests.convert.test_release import vae_cfg
root, out, legacy = sys.argv[1:]
assert len(jax.devices()) == 2
with jax.default_device(jax.devices()[1]):  # the converting host's second device
  release.convert_release(root, out, 'int8', vae=vae_cfg())
# A directory as converters wrote them before #37: jax Arrays (int8 included) on the writer's device 1.
with ocp.StandardCheckpointer() as c:
  c.save(os.path.join(legacy, 'state'), {'w': jax.device_put(jnp.ones((4, 8), jnp.int8), jax.devices()[1]),
                                         'b': jax.device_put(jnp.zeros((8,), jnp.bfloat16), jax.devices()[1])})
  c.wait_until_finished()
with open(os.path.join(legacy, 'config.json'), 'w') as f:
  f.write('{"component": "text_encoder", "config": {}}')
"""

_READ_ON_ONE_DEVICE = """
import os, sys
import jax, numpy as np, orbax.checkpoint as ocp
from kaleido_jax import pipeline
from kaleido_jax.convert import common
from tests.convert.test_release import _sample_config
root, out, legacy, work = sys.argv[1:]
assert len(jax.devices()) == 1
for part in ('transformer', 'vae', 'text_encoder'):  # nothing device-specific written: a plain restore works
  with ocp.StandardCheckpointer() as c:
    c.restore(os.path.join(out, part, 'state'))
state, _ = common.load_converted(legacy, component='text_encoder')
assert state['w'].dtype == np.int8 and state['b'].shape == (8,)
pipe = pipeline.S2VPipeline.from_config(_sample_config(root), workdir=work, checkpoint=out)
video = pipe.generate([[np.full((16, 16, 3), 200, np.uint8)]], ['a red cat'], num_frames=5, height=16, width=16,
                      seed=0)
print('sampled', video.shape)
"""


@pytest.mark.slow  # two subprocesses convert and sample (~60 s)
def test_a_release_converted_on_device_1_loads_and_samples_where_that_device_does_not_exist(tmp_path, parts):
  # A TPU process lacks the converting host's CPU device: orbax refused a plain restore of the jax Arrays the
  # converters saved ("Topology mismatch detected"). Twin here: written by device 1 of a 2-device process (DiT,
  # VAE and umT5, int8), read by a 1-device process; plus a directory holding device-1 Arrays as written before.
  import subprocess
  import sys
  root = _release(str(tmp_path / 'Kaleido-14B-S2V'), parts)
  out, legacy = str(tmp_path / 'converted'), str(tmp_path / 'legacy')
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  def run(code, devices, *args):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=repo,
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    p = subprocess.run([sys.executable, '-c', code, *args], env=env, cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout
  run(_WRITE_ON_DEVICE_1, 2, root, out, legacy)
  assert 'sampled (1, 5, 16, 16, 3)' in run(_READ_ON_ONE_DEVICE, 1, root, out, legacy, str(tmp_path / 'w'))


_SECOND_GENERATE = """
import collections, json, os, sys
import jax, numpy as np
from flax import nnx
from kaleido_jax import pipeline
from tests.convert.test_release import _sample_config
root, out, work = sys.argv[1:]
pipe = pipeline.S2VPipeline.from_config(_sample_config(root), workdir=work, checkpoint=out)
ref = [[np.full((16, 16, 3), 200, np.uint8)]]
first = pipe.generate(ref, ['a red cat'], num_frames=5, height=16, width=16, seed=0)

def weights():
  trees = {'dit': pipe.state, 'vae': nnx.state(pipe.encoders.codec, nnx.Param),
           'umt5': nnx.state(pipe.encoders.text_encoder, nnx.Param)}
  leaves = {k: jax.tree.leaves(v) for k, v in trees.items()}
  bad = {k: [type(x).__name__ for x in v if not isinstance(x, jax.Array)] for k, v in leaves.items()}
  assert not any(bad.values()), bad  # host numpy would cross to the device in every call
  return {k: [x.unsafe_buffer_pointer() for x in v] for k, v in leaves.items()}

def transfers(tag):
  # jax.transfer_guard 'log' writes a line to fd 2 for each implicit host -> device transfer; tagged here.
  sys.stderr.flush()
  os.write(2, f'<<{tag}\\n'.encode())
  with jax.transfer_guard_host_to_device('log'):
    video = pipe.generate(ref, ['a blue dog'], num_frames=5, height=16, width=16, seed=7, guidance_scale=3.0)
  os.write(2, f'>>{tag}\\n'.encode())
  return video

before = weights()
events = collections.Counter()
count = lambda name, secs, **kw: events.update([name]) if name.startswith('/jax/core/compile/') else None
jax.monitoring.register_event_duration_secs_listener(count)
second = transfers('second')
jax.monitoring.unregister_event_duration_listener(count)
same = weights() == before
transfers('cached_prompt')  # the same prompt again: umT5 does not run (the prompt cache)
codec = pipe.encoders.codec  # the control: the VAE's weights as host numpy, as before #37
nnx.update(codec, jax.tree.map(np.asarray, nnx.state(codec, nnx.Param)))
transfers('numpy_vae')
print(json.dumps(dict(events=dict(events), same_buffers=same, leaves={k: len(v) for k, v in before.items()},
                      differs=bool(second.shape == first.shape and not np.array_equal(second, first)))))
"""


def test_a_second_generate_with_another_scale_seed_and_prompt_compiles_nothing_and_moves_no_weights(tmp_path, parts):
  # The released model as --mode sample loads it (converted int8 DiT and umT5, the VAE): after one video, another
  # with a new guidance scale, seed and prompt traces and compiles no program (the scales are traced values), and
  # every weight (DiT, VAE, umT5) is a jax Array that stays on its device (the same buffers before and after).
  # Transfers are counted with jax.transfer_guard_host_to_device('log') in a subprocess (the suite silences C++
  # logs: TF_CPP_MIN_LOG_LEVEL=3 in conftest).
  import json
  import re
  import subprocess
  import sys
  root = _release(str(tmp_path / 'Kaleido-14B-S2V'), parts)
  out = release.convert_release(root, str(tmp_path / 'converted'), 'int8', vae=vae_cfg())
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL='0')
  p = subprocess.run([sys.executable, '-c', _SECOND_GENERATE, root, out, str(tmp_path / 'w')], env=env,
                     cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  got = json.loads(p.stdout.strip().splitlines()[-1])
  moved = {tag: body.count('host-to-device transfer')
           for tag, body in re.findall(r'<<(\w+)\n(.*?)>>\1', p.stderr, re.S)}
  assert not got['events'], got['events']  # nothing traced, lowered or compiled
  assert got['same_buffers'] and got['differs'], got
  # What crosses is the call's own inputs and eager scalars (35 on 2026-12-07): fewer transfers than the DiT or the
  # VAE has weight leaves (a weight passed as host numpy is one transfer per leaf per call), and umT5's run for the
  # new prompt adds fewer than umT5 has (the same generate with the prompt cached: 30).
  leaves = got['leaves']
  assert 0 < moved['second'] < min(leaves['dit'], leaves['vae']), (moved, leaves)
  assert 0 <= moved['second'] - moved['cached_prompt'] < leaves['umt5'], (moved, leaves)
  # The count sees a weight upload: the VAE's weights as host numpy (what #37 found) add one per leaf per call.
  assert moved['numpy_vae'] - moved['second'] >= got['leaves']['vae'], (moved, got['leaves'])


def test_unexpected_keys_are_named_and_known_extras_ignored(tmp_path, parts):
  import torch
  root = _release(str(tmp_path / 'rel'), parts, extra={'model.diffusion_model.image_embedding.proj.weight':
                                                        torch.zeros(2, 2), 'ema.decay': torch.zeros(())})
  with pytest.raises(common.ConversionError, match=r"unexpected keys .*ema\.decay.*image_embedding"):
    convert_tf.convert_state(os.path.join(root, 'model'), 'kaleido')
  assert not os.path.exists(tmp_path / 'never')
  with pytest.raises(common.ConversionError):
    release.convert_release(root, str(tmp_path / 'never'), vae=vae_cfg())
  assert not os.path.exists(tmp_path / 'never') and not os.path.exists(str(tmp_path / 'never') + '.partial')
  assert not [f for f in os.listdir(tmp_path) if f.startswith('.partial')]  # no temporary left


@pytest.mark.slow
def test_release_in_a_bucket_converts_into_a_bucket_and_samples_from_it(tmp_path, parts):
  # `convert --input gs://... --output gs://...`, then --mode sample's entry with --checkpoint gs://...
  from kaleido_jax import pipeline, storage
  from tests import gcs as gcs_lib
  root = _release(str(tmp_path / 'Kaleido-14B-S2V'), parts)
  with gcs_lib.emulator() as gcs:
    src, out = f'gs://{gcs.bucket}/Kaleido-14B-S2V', f'gs://{gcs.bucket}/converted'
    for rel in storage.walk_files(root):
      storage.upload(os.path.join(root, rel), storage.join(src, rel))
    assert release.is_release(src)  # what the CLI checks first; the tiny VAE's config is passed as the test does above
    assert release.convert_release(src, out, 'int8', vae=vae_cfg()) == out
    objects = gcs.list('converted/')
    assert 'converted/release.json' in objects and any(o.startswith('converted/transformer/state/') for o in objects)
    assert common.saved_quantization(storage.join(out, 'transformer')) == 'int8'
    assert not os.path.exists('gs:')
    config = _sample_config(root)
    pipe = pipeline.S2VPipeline.from_config(config, workdir=str(tmp_path / 'w'), checkpoint=out)
    assert pipe.weights_from.startswith(f'{out}/transformer')
    video = pipe.generate([[np.full((16, 16, 3), 200, np.uint8)]], ['a red cat'], num_frames=5, height=16,
                          width=16, seed=0)
    assert video.shape == (1, 5, 16, 16, 3) and video.dtype == np.uint8
