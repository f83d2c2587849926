"""The one weight loader: every leaf lands in its target sharding, and no device ever holds more than its shard
of the model plus one leaf in flight (measured: the live arrays per device after every leaf)."""

import gc

import jax
import numpy as np
import pytest
from flax import nnx

from kaleido_jax import pipeline as pipe_lib
from kaleido_jax import weights
from kaleido_jax.convert import common as conv_common
from kaleido_jax.model import dit
from kaleido_jax.model import quantization as quant
from kaleido_jax.parallel import mesh as mesh_lib
from tests.sampling_common import tiny_config


def _fsdp_mesh():
  cfg = tiny_config().mesh
  cfg.update(data=1, fsdp=8, context=1, tensor=1)
  return mesh_lib.make_mesh(cfg)


def _bytes_by_device():
  out = {}
  for a in jax.live_arrays():
    for s in a.addressable_shards:
      out[s.device] = out.get(s.device, 0) + s.data.nbytes
  return out


def _shard_bytes(target):
  """Per device: the bytes of its shards of every target leaf; and the largest whole leaf."""
  per_device, biggest = {}, 0
  for t in jax.tree.leaves(target):
    nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
    biggest = max(biggest, nbytes)
    for d, index in t.sharding.devices_indices_map(tuple(t.shape)).items():
      shape = [len(range(*sl.indices(n))) for sl, n in zip(index, t.shape)]
      per_device[d] = per_device.get(d, 0) + int(np.prod(shape)) * np.dtype(t.dtype).itemsize
  return per_device, biggest


def _load_measured(path, target, model_cfg, fmt='diffusers'):
  gc.collect()
  before = _bytes_by_device()
  peak = {}

  def on_leaf(_):
    for d, b in _bytes_by_device().items():
      peak[d] = max(peak.get(d, 0), b - before.get(d, 0))
  pure, _ = weights.load_transformer(path, target, model_cfg=model_cfg, fmt=fmt, on_leaf=on_leaf)
  return pure, peak


def _assert_landed_sharded(pure, target, peak, host_in_flight=0):
  """``host_in_flight``: bytes the host's CPU device may also hold while a leaf is worked on there (a float kernel
  quantized on load); in this test the host's CPU device is also mesh device 0, on a TPU it is host RAM."""
  for got, want in zip(jax.tree.leaves(pure), jax.tree.leaves(target)):
    assert got.sharding == want.sharding and got.shape == want.shape and got.dtype == want.dtype
  shards, biggest = _shard_bytes(target)
  total = sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in jax.tree.leaves(target))
  # The bound can fail: the whole model on one device (the old load) is far above it.
  assert max(shards.values()) + biggest < total
  assert len(peak) == 8
  host = conv_common.host_device()
  for d, b in peak.items():
    assert b <= shards[d] + biggest + (host_in_flight if d == host else 0), (d, b, shards[d], biggest)


def test_converted_directory_lands_in_fsdp_shardings_within_shard_plus_one_leaf(tmp_path, monkeypatch):
  config = tiny_config()
  config.model.update(num_heads=4, head_dim=16, ffn_dim=128)  # every dim divisible by the 8 devices
  _, state = pipe_lib.random_weights(config.model, seed=5)
  want = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  conv_common.save_converted(str(tmp_path / 'conv'), want, config.model, component='transformer')
  del state
  mesh = _fsdp_mesh()
  _, _, target = pipe_lib.weights_target(config.model, mesh)
  pure, peak = _load_measured(str(tmp_path / 'conv'), target, config.model)
  _assert_landed_sharded(pure, target, peak)
  for got, w in zip(jax.tree.leaves(pure), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got), w)
  assert any(len(set(s.data.shape for s in x.addressable_shards)) == 1 and x.addressable_shards[0].data.size < x.size
             for x in jax.tree.leaves(pure))  # really sharded, not replicated

  # The other block layout (per-layer list) from the same stacked directory, and int8 quantized on load:
  # the same numbers as quantizing the float model directly.
  config.model.update(scan_layers=False, quantization='int8')
  _, _, qtarget = pipe_lib.weights_target(config.model, mesh)
  asked = {}
  stream = weights.sources.OrbaxSource.stream
  monkeypatch.setattr(weights.sources.OrbaxSource, 'stream',
                      lambda self, wanted: (asked.update(wanted), stream(self, wanted))[1])
  qpure, qpeak = _load_measured(str(tmp_path / 'conv'), qtarget, config.model)
  # On the host: the stored stacked kernel (read whole, relaid per layer) and one layer of it being quantized.
  stacked = max(np.asarray(v).nbytes for k, v in weights.flat(want).items() if k.endswith('/kernel'))
  _assert_landed_sharded(qpure, qtarget, qpeak, host_in_flight=2 * stacked)
  # Each float kernel that is quantized on load is read to the host's CPU device, not into the chips' shardings:
  # only its int8 pair reaches the mesh. Every other leaf is read straight into its target sharding.
  host = jax.sharding.SingleDeviceSharding(conv_common.host_device())
  qflat = weights.flat(qtarget)
  kernels = {k[:-len('/qvalue')] + '/kernel' for k in qflat if k.endswith('/qvalue')}
  assert kernels and kernels <= set(asked)
  for k, w in asked.items():
    assert w.sharding == (host if k in kernels else qflat[k].sharding), k
  float_cfg = config.model.copy_and_resolve_references()
  float_cfg.quantization = 'none'
  graphdef, per_layer = pipe_lib.abstract_model(float_cfg)
  nnx.replace_by_pure_dict(per_layer, dit.relayout_blocks(want, scan_layers=False))
  direct = quant.quantize(nnx.merge(graphdef, per_layer), 'int8')
  direct_flat = weights.flat(nnx.to_pure_dict(nnx.state(direct)))
  got_flat = weights.flat(qpure)
  assert set(direct_flat) == set(got_flat)
  for k, v in direct_flat.items():
    np.testing.assert_array_equal(np.asarray(got_flat[k]), np.asarray(v), err_msg=k)


@pytest.mark.torch
def test_pytorch_checkpoint_lands_in_fsdp_shardings_within_shard_plus_one_leaf(tmp_path):
  from kaleido_jax.convert import transformer as conv
  from tests.model import dit_reference as ref
  torch_model = ref.make_diffusers_model(heads=2, head_dim=16, layers=2, seed=3)
  path = ref.save_diffusers(torch_model, str(tmp_path / 'diffusers'))
  cfg = conv.config_from_checkpoint(path, 'diffusers', conv_common.CheckpointReader(path))
  mesh = _fsdp_mesh()
  _, _, target = pipe_lib.weights_target(cfg, mesh)
  pure, peak = _load_measured(path, target, cfg)
  _assert_landed_sharded(pure, target, peak)
  # Same numbers as the host-side conversion.
  host, _ = conv.convert_state(path, 'diffusers', cfg)
  for got, w in zip(jax.tree.leaves(pure), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(w))


def test_bad_sources_are_named_before_reading(tmp_path):
  config = tiny_config()
  _, state = pipe_lib.random_weights(config.model)
  pure = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  del pure['head_table']
  conv_common.save_converted(str(tmp_path / 'conv'), pure, config.model, component='transformer')
  _, _, target = pipe_lib.weights_target(config.model)
  with pytest.raises(weights.WeightsError, match='missing head_table'):
    weights.load_transformer(str(tmp_path / 'conv'), target, model_cfg=config.model)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    weights.load_transformer(str(tmp_path / 'nope'), target, model_cfg=config.model)
