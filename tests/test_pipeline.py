"""S2VPipeline end to end on tiny random weights: shapes, dtype, range, seeding, weights and bad inputs."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from kaleido_jax import encoders as enc_lib
from kaleido_jax import pipeline as pipe_lib
from kaleido_jax.convert import common as conv_common
from kaleido_jax.data.references import ReferenceImageError
from tests.sampling_common import tiny_config, write_reference


@pytest.fixture(scope='module')
def pixel_pipe(tmp_path_factory):
  config = tiny_config()
  return pipe_lib.S2VPipeline.from_config(config, workdir=str(tmp_path_factory.mktemp('w')), checkpoint='random')


def test_generate_shapes_range_and_per_sample_seeds(pixel_pipe, tmp_path):
  a = write_reference(str(tmp_path / 'a.png'))
  b = write_reference(str(tmp_path / 'b.png'), colour=(20, 40, 220), mode='RGBA')
  frames = pixel_pipe.generate([[a, b], [a]], ['A red square moves right.', 'A blue square spins.'], seed=[5, 6])
  assert frames.shape == (2, 5, 16, 16, 3) and frames.dtype == np.uint8
  assert frames.min() < frames.max()  # not a constant image
  one = pixel_pipe.generate([a], 'A blue square spins.', seed=6)
  np.testing.assert_array_equal(one[0], frames[1])  # a sample does not depend on the rest of the batch
  again = pixel_pipe.generate([[a, b], [a]], ['A red square moves right.', 'A blue square spins.'], seed=[5, 6])
  np.testing.assert_array_equal(again, frames)
  other = pixel_pipe.generate([a], 'A blue square spins.', seed=7)
  assert not np.array_equal(other, one)


def test_references_and_guidance_reach_the_sampler(pixel_pipe, tmp_path):
  a = write_reference(str(tmp_path / 'a.png'))
  b = write_reference(str(tmp_path / 'b.png'), colour=(20, 200, 20))
  base = pixel_pipe.prepare([a], 'A red square.', seed=0)
  assert base['refs'].shape == (1, 2, 16, 16, 3) and base['ref_mask'].tolist() == [[True, False]]
  assert float(np.abs(base['refs'][0, 1]).max()) == 0.0  # padded slot is zero
  cfg = pixel_pipe.sample_config()
  x = np.asarray(pixel_pipe.sample_latents(base, cfg))
  other = pixel_pipe.prepare([b], 'A red square.', seed=0)
  assert not np.allclose(np.asarray(pixel_pipe.sample_latents(other, cfg)), x)
  plain = np.asarray(pixel_pipe.sample_latents(base, pixel_pipe.sample_config(guidance_scale=1.0)))
  assert not np.allclose(plain, x)


def test_progress_callback_sees_every_step(pixel_pipe):
  seen = []

  class Count:
    def __call__(self, i):
      seen.append(int(i))
  inputs = pixel_pipe.prepare([], 'A red square.', seed=0)
  jax.block_until_ready(pixel_pipe.sample_latents(inputs, pixel_pipe.sample_config(num_steps=3), Count()))
  jax.effects_barrier()
  assert sorted(seen) == [0, 1, 2]


@pytest.mark.slow
def test_wan_vae_codec_pipeline(tmp_path):
  config = tiny_config('wan')
  pipe = pipe_lib.S2VPipeline.from_config(config, workdir=str(tmp_path), checkpoint='random')
  a = write_reference(str(tmp_path / 'a.png'))
  inputs = pipe.prepare([a], 'A red square.', seed=0)
  assert inputs['noise'].shape == (1, 3, 8, 8, 4) and inputs['refs'].shape == (1, 2, 8, 8, 4)
  frames = pipe.generate([a], 'A red square.', seed=0)
  assert frames.shape == (1, 5, 16, 16, 3) and frames.dtype == np.uint8
  with pytest.raises(pipe_lib.UserInputError, match='1 \\+ 4k'):
    pipe.generate([a], 'A red square.', num_frames=6)
  with pytest.raises(pipe_lib.UserInputError, match='multiples of 2'):
    pipe.generate([a], 'A red square.', height=15)


@pytest.mark.parametrize('case', ['empty_prompt', 'too_many_refs', 'bad_size', 'missing_ref', 'corrupt_ref',
                                  'batch_mismatch'])
def test_bad_requests_name_the_input(pixel_pipe, tmp_path, case):
  a = write_reference(str(tmp_path / 'a.png'))
  corrupt = tmp_path / 'c.png'
  corrupt.write_bytes(b'\x89PNG\r\n\x1a\nnot really a png')
  call, err, match = {
      'empty_prompt': (lambda: pixel_pipe.generate([a], '  '), pipe_lib.UserInputError, 'prompt #0 is empty'),
      'too_many_refs': (lambda: pixel_pipe.generate([a, a, a], 'x'), pipe_lib.UserInputError, 'at most 2'),
      'bad_size': (lambda: pixel_pipe.generate([a], 'x', height=17), pipe_lib.UserInputError, 'divisible by 2'),
      'missing_ref': (lambda: pixel_pipe.generate([str(tmp_path / 'nope.png')], 'x'), ReferenceImageError,
                      'does not exist'),
      'corrupt_ref': (lambda: pixel_pipe.generate([str(corrupt)], 'x'), ReferenceImageError, 'c.png'),
      'batch_mismatch': (lambda: pixel_pipe.generate([[a]], ['x', 'y']), pipe_lib.UserInputError,
                         'one list of references per prompt'),
  }[case]
  with pytest.raises(err, match=match):
    call()


def test_weights_from_training_checkpoint_converted_dir_and_mismatch(tmp_path):
  import orbax.checkpoint as ocp
  config = tiny_config()
  graphdef, state = pipe_lib.random_weights(config.model, seed=3)
  pure = nnx.to_pure_dict(state)
  # A training checkpoint as train/checkpoint.py writes it (state item with params and ema).
  ckdir = tmp_path / 'work' / 'checkpoints'
  with ocp.CheckpointManager(str(ckdir), item_handlers={'state': ocp.StandardCheckpointHandler()}) as m:
    ema = jax.tree.map(lambda x: x * 0.5, pure)
    m.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave({'step': 7, 'params': pure, 'ema': ema})))
  _, got, where = pipe_lib.load_weights(config, '', str(tmp_path / 'work'))
  assert 'step 7' in where
  flat_got, flat_want = jax.tree.leaves(nnx.to_pure_dict(got)), jax.tree.leaves(ema)
  assert all(np.allclose(g, w) for g, w in zip(flat_got, flat_want))  # EMA preferred (sample.use_ema)
  config.sample.use_ema = False
  _, got, _ = pipe_lib.load_weights(config, str(ckdir / '7'))
  assert all(np.allclose(g, w) for g, w in zip(jax.tree.leaves(nnx.to_pure_dict(got)), jax.tree.leaves(pure)))
  # A converted directory of another architecture is refused with the reason.
  other = tiny_config()
  other.model.num_layers = 3
  _, ostate = pipe_lib.random_weights(other.model)
  conv_common.save_converted(str(tmp_path / 'conv'), nnx.to_pure_dict(ostate), other.model,
                             component='transformer')
  with pytest.raises(pipe_lib.UserInputError, match='cannot be loaded|different architecture'):
    pipe_lib.load_weights(config, str(tmp_path / 'conv'))
  with pytest.raises(pipe_lib.UserInputError, match='no weights'):
    pipe_lib.load_weights(config, '', str(tmp_path / 'empty'))
  with pytest.raises(pipe_lib.UserInputError, match='does not exist'):
    pipe_lib.load_weights(config, str(tmp_path / 'missing'))


def test_encoders_encode_a_pipeline_batch(tmp_path):
  from kaleido_jax.data import pipeline as data_pipeline
  config = tiny_config()
  enc = enc_lib.Encoders.from_config(config, workdir=str(tmp_path))
  batch = next(data_pipeline.make_dataset(config.data, split='train', seed=0))
  out = enc.encode_batch(batch)
  assert out['video_latents'].shape == (2, 5, 16, 16, 3)
  assert out['ref_latents'].shape == (2, 2, 16, 16, 3)
  assert out['text_embedding'].shape == out['empty_text_embedding'].shape == (2, 48, 32)
  assert np.all(out['ref_latents'][~out['ref_mask']] == 0)
  # The synthetic tokenizer is cached in the workdir and rebuilt identically elsewhere.
  assert os.path.exists(tmp_path / 'tokenizer' / 'spiece.model')
  enc2 = enc_lib.Encoders.from_config(config, workdir=str(tmp_path / 'other'))
  np.testing.assert_allclose(enc2.text(batch['caption']), out['text_embedding'], atol=1e-6)


def test_sharded_pipeline_matches_single_device(pixel_pipe, tmp_path):
  from kaleido_jax.parallel import mesh as mesh_lib
  config = pixel_pipe.config.copy_and_resolve_references()
  config.mesh.update(data=4, fsdp=1, context=1, tensor=2)
  mesh = mesh_lib.make_mesh(config.mesh)
  sharded = pipe_lib.S2VPipeline(pixel_pipe.config, pixel_pipe.encoders, pixel_pipe.graphdef, pixel_pipe.state,
                                 mesh=mesh)
  a = write_reference(str(tmp_path / 'a.png'))
  prompts = ['A red square.', 'A red square moves left.', 'A square.', 'Red.']
  inputs = pixel_pipe.prepare([[a]] * 4, prompts, seed=[0, 1, 2, 3])
  cfg = pixel_pipe.sample_config()
  want = np.asarray(pixel_pipe.sample_latents(inputs, cfg))
  got = sharded.sample_latents(inputs, cfg)
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('axes,cp', [(dict(data=2, fsdp=1, context=4, tensor=1), 'ring'),
                                     (dict(data=2, fsdp=2, context=1, tensor=2), 'gather')])
def test_one_video_sampled_over_eight_devices_matches_single_device(pixel_pipe, tmp_path, axes, cp):
  # One video, text CFG: its two guidance branches over data, the tokens over context (ring attention) or
  # the weights over fsdp x tensor; the same latents as one device.
  from kaleido_jax.parallel import mesh as mesh_lib
  config = pixel_pipe.config.copy_and_resolve_references()
  config.model.context_parallel = cp
  config.mesh.update(**axes)
  graphdef = pipe_lib.abstract_model(config.model)[0]
  sharded = pipe_lib.S2VPipeline(config, pixel_pipe.encoders, graphdef, pixel_pipe.state,
                                 mesh=mesh_lib.make_mesh(config.mesh))
  a = write_reference(str(tmp_path / 'a.png'))
  inputs = pixel_pipe.prepare([a], 'A red square moves left.', seed=3)
  cfg = pixel_pipe.sample_config()
  assert cfg.guidance_scale != 1.0  # two branches
  want = np.asarray(pixel_pipe.sample_latents(inputs, cfg))
  got = sharded.sample_latents(inputs, cfg)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_peak_memory_line_reads_the_backends_counter():
  class Tpu:
    device_kind = 'TPU v6 lite'

    def memory_stats(self):
      return {'peak_bytes_in_use': 3 * 2 ** 30, 'bytes_limit': 32 * 2 ** 30}

  class Cpu:
    device_kind = 'cpu'

    def memory_stats(self):
      return None

  assert pipe_lib.peak_memory_line(Tpu()) == 'peak accelerator memory: 3.00 GiB of 32.00 GiB (TPU v6 lite)'
  assert pipe_lib.peak_memory_line(Cpu()) == ''


def test_host_text_encoder_and_float_checkpoint_quantized_on_load(tmp_path):
  # sample.text_encoder_device=host puts umT5 on the host CPU device; a float converted DiT loads into an int8
  # config quantized (the same values as quantizing the float model directly).
  from kaleido_jax.model import quantization as quant
  config = tiny_config()
  _, state = pipe_lib.random_weights(config.model)
  conv_common.save_converted(str(tmp_path / 'f32'), nnx.to_pure_dict(state), config.model, component='transformer')
  config.model.quantization = 'int8'
  graphdef, qstate, where = pipe_lib.load_weights(config, str(tmp_path / 'f32'))
  assert where == str(tmp_path / 'f32') and quant.scheme_of(nnx.merge(graphdef, qstate)) == 'int8'
  float_model = nnx.merge(*pipe_lib.random_weights(_float(config.model)))
  direct = quant.quantize(float_model, 'int8')
  for a, b in zip(jax.tree.leaves(nnx.state(direct)), jax.tree.leaves(qstate)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config.sample.text_encoder_device = 'host'
  enc = enc_lib.Encoders.from_config(config, workdir=str(tmp_path))
  assert next(iter(enc.text_encoder.embed.embedding[...].devices())).platform == 'cpu'
  assert enc.text(['A red square.']).shape[0] == 1
  enc.release_text_encoder()
  assert enc.text(['A red square.']).shape[0] == 1  # cached
  with pytest.raises(KeyError, match='not cached'):
    enc.text(['A new prompt.'])


def _float(model_cfg):
  cfg = model_cfg.copy_and_resolve_references()
  cfg.quantization = 'none'
  return cfg
