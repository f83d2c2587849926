"""The precision policy (model.fp32_params, model/precision.py) holds where weights live and where they compute:
the LoRA base stored in bf16, the bf16 loss of full and LoRA training, and the sampling weights."""

import jax
import jax.numpy as jnp
from flax import nnx

from kaleido_jax import pipeline as pipe_lib
from kaleido_jax.convert import common
from kaleido_jax.model import precision
from kaleido_jax.train import inputs
from kaleido_jax.parallel import mesh as mesh_lib
from kaleido_jax.train import state as state_lib
from kaleido_jax.train import step as step_lib
from tests.train.common import tiny_config

# Leaves the default policy keeps fp32, by name (the DiT's time embedding / projection, tables, norms, scales).
FP32_NAMES = ('time_linear_1', 'time_linear_2', 'time_proj', 'scale_shift_table', 'head_table', 'norm2_',
              'norm_q', 'norm_k')


def _expect_fp32(path: str) -> bool:
  return any(n in path for n in FP32_NAMES) or path.endswith('/scale')


def _dtypes(tree) -> dict:
  return {k: jnp.dtype(v.dtype) for k, v in common.flatten_paths(tree).items()
          if jnp.issubdtype(v.dtype, jnp.floating)}


def _check(dtypes: dict, other):
  assert any(_expect_fp32(k) for k in dtypes) and any(not _expect_fp32(k) for k in dtypes)
  for k, dt in dtypes.items():
    want = jnp.float32 if _expect_fp32(k) else other
    assert dt == want, (k, dt, want)


def test_cast_keeps_the_named_leaves_and_an_empty_policy_keeps_none():
  tree = {'time_proj': {'kernel': jnp.ones(2)}, 'blocks': {'ffn': {'kernel': jnp.ones(2)},
                                                            'norm_q': {'scale': jnp.ones(2)}},
          'step': jnp.zeros((), jnp.int32)}
  out = _dtypes(precision.cast(tree, jnp.bfloat16, precision.DEFAULT_FP32))
  assert out == {'time_proj/kernel': jnp.float32, 'blocks/ffn/kernel': jnp.bfloat16,
                 'blocks/norm_q/scale': jnp.float32}
  assert set(_dtypes(precision.cast(tree, jnp.bfloat16, ())).values()) == {jnp.dtype(jnp.bfloat16)}


def _loss_dtypes(config, monkeypatch):
  """The dtypes of the parameters the bf16 loss merges into the model (recorded at trace time)."""
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  spec = state_lib.build_spec(config, mesh)
  seen = {}
  merge = state_lib.merge_model

  def recording(spec, params, frozen=None):
    seen['params'], seen['frozen'] = _dtypes(params), None if frozen is None else _dtypes(frozen)
    return merge(spec, params, frozen)
  monkeypatch.setattr(state_lib, 'merge_model', recording)
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in inputs.batch_spec(config).items()}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), spec.abstract_state)
  jax.eval_shape(step_lib.make_loss_fn(config, spec), abstract['params'], batch, jax.random.key(0),
                 abstract.get('frozen'))
  return spec, seen


def test_bf16_loss_keeps_the_fp32_set_in_full_training(monkeypatch):
  config = tiny_config(real_dit=True)
  config.model.dtype = 'bfloat16'
  spec, seen = _loss_dtypes(config, monkeypatch)
  assert set(_dtypes(spec.abstract_state['params']).values()) == {jnp.dtype(jnp.float32)}  # master weights
  _check(seen['params'], jnp.bfloat16)


def test_lora_base_in_bf16_keeps_the_fp32_set_in_the_state_and_the_loss(tmp_path, monkeypatch):
  config = tiny_config(real_dit=True)
  config.train.lora.update(rank=4, alpha=4.0)
  config.model.update(dtype='bfloat16', param_dtype='bfloat16')
  spec, seen = _loss_dtypes(config, monkeypatch)
  _check(_dtypes(spec.abstract_state['frozen']), jnp.bfloat16)
  _check(seen['frozen'], jnp.bfloat16)
  assert set(seen['params'].values()) == {jnp.dtype(jnp.bfloat16)}  # the adapters compute in bf16


def test_sampling_weights_keep_the_fp32_set(tmp_path):
  config = tiny_config(real_dit=True)
  _, state = pipe_lib.random_weights(config.model, seed=1)
  conv = common.save_converted(str(tmp_path / 'f32'), nnx.to_pure_dict(state), config.model,
                               component='transformer')
  config.model.update(dtype='bfloat16', param_dtype='bfloat16')
  _, got, _ = pipe_lib.load_weights(config, conv)
  _check(_dtypes(nnx.to_pure_dict(got)), jnp.bfloat16)
  config.model.quantization = 'int8'
  _, got, _ = pipe_lib.load_weights(config, conv)
  flat = _dtypes(nnx.to_pure_dict(got))
  assert flat['blocks/self_attn/to_q/scale'] == jnp.float32 and 'blocks/self_attn/to_q/kernel' not in flat
  _check(flat, jnp.bfloat16)
