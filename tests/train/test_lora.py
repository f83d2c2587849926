"""LoRA fine-tuning: only the adapters take gradients and optimiser state; the frozen base (float or quantized)
never changes and is not checkpointed; the adapters are written in the diffusers / PEFT layout and load back."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kaleido_jax.convert import common
from kaleido_jax.convert import lora as lora_conv
from kaleido_jax.model import lora as lora_lib
from kaleido_jax.model.dit import KaleidoDiT
from kaleido_jax.parallel import mesh as mesh_lib
from kaleido_jax.train import loop
from kaleido_jax.train import state as state_lib
from tests.train.common import tiny_config


def _config(tmp_path, quantization='none', **train):
  config = tiny_config(real_dit=True, num_steps=4, checkpoint_every=2, learning_rate=1e-2, schedule='constant',
                       warmup_steps=0, **train)
  config.train.lora.update(rank=4, alpha=8.0, targets=('attention', 'ffn'))
  with nnx.use_eager_sharding(False):
    base = KaleidoDiT(config.model, rngs=nnx.Rngs(123))
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(base, nnx.Param)))
  config.init_from.transformer = common.save_converted(str(tmp_path / 'base'), pure, config.model,
                                                       component='transformer')
  config.model.quantization = quantization
  return config, pure


def _size(tree):
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('quantization', ['none', pytest.param('int8', marks=pytest.mark.slow)])
def test_lora_training_moves_only_the_adapters(tmp_path, quantization):
  config, base = _config(tmp_path, quantization)
  out = loop.run(config, str(tmp_path / 'run'))
  state = jax.device_get(out['state'])
  flat = common.flatten_paths(state['params'])
  assert flat and all(k.endswith(('lora_a', 'lora_b')) for k in flat)
  # 10 linears per block (q k v o of both attentions, the FFN's two) x 2 factors, stacked over the layers.
  assert len(flat) == 20
  assert max(np.abs(v).max() for k, v in flat.items() if k.endswith('lora_b')) > 0  # B moved off zero
  lora_size = _size(state['params'])
  assert lora_size < 0.2 * _size(base)
  # AdamW keeps two moments per trained parameter and a few counters: LoRA-sized.
  assert lora_size * 2 <= _size(state['opt_state']) <= lora_size * 2 + 8
  # The frozen base is the loaded one, bit for bit (quantized: its int8 form of those weights).
  frozen = common.flatten_paths(state['frozen'])
  if quantization == 'none':
    for k, v in common.flatten_paths(base).items():
      parts = k.split('/')
      key = '/'.join(parts[:-1] + ['base', parts[-1]]) if '/'.join(parts[:-1]) + '/base/' + parts[-1] in frozen else k
      np.testing.assert_array_equal(frozen[key], v, err_msg=k)
  else:
    assert any(k.endswith('base/qvalue') and v.dtype == np.int8 for k, v in frozen.items())
  # Checkpoints hold no copy of the base; the adapter file is there.
  assert os.path.exists(tmp_path / 'run' / loop.LORA_DIR / lora_conv.LORA_FILE)


@pytest.mark.slow
def test_lora_adapter_file_reproduces_the_trained_model_and_resumes(tmp_path):
  config, base = _config(tmp_path)
  out = loop.run(config, str(tmp_path / 'run'))
  spec = state_lib.build_spec(config, mesh_lib.make_mesh(config.mesh))
  # The file holds the EMA of the adapters when the run keeps one (the demo config does), as sampling uses it.
  written = out['state']['ema' if 'ema' in out['state'] else 'params']
  trained = state_lib.merge_model(spec, jax.device_get(written), jax.device_get(out['state']['frozen']))
  assert lora_lib.has_adapters(trained)
  # The base + the written adapter file == the adapted model.
  merged = _restored(base, config.model)
  lora_conv.load_lora(merged, str(tmp_path / 'run' / loop.LORA_DIR))
  r = np.random.default_rng(0)
  x = jnp.asarray(r.normal(size=(2, 2, 8, 8, config.model.in_channels)), jnp.float32)
  t = jnp.array([10.0, 800.0])
  text = jnp.asarray(r.normal(size=(2, 7, config.model.text_dim)), jnp.float32)
  want, got = np.asarray(trained(x, t, text)), np.asarray(merged(x, t, text))
  assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
  # Sampling from the training workdir: the base from init_from with the checkpoint's (EMA) adapters merged.
  from kaleido_jax import pipeline
  graphdef, state, where = pipeline.load_weights(config, workdir=str(tmp_path / 'run'))
  assert 'LoRA adapters' in where
  sampled = np.asarray(nnx.merge(graphdef, state)(x, t, text))
  assert np.abs(sampled - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
  # Resume: the checkpoint restores the adapters and optimiser, the base comes from init_from again.
  config.train.num_steps = 6
  again = loop.run(config, str(tmp_path / 'run'))
  assert again['step'] == 6 and len(again['losses']) == 2


def _restored(pure, model_cfg):
  model = KaleidoDiT(model_cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  nnx.update(model, state)
  return model
