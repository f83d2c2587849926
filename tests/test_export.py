"""The exported sampler: output == the direct pipeline, symbolic batch, both weight modes, the signature."""

import json
import os

import numpy as np
import pytest

from kaleido_jax import export, exported, pipeline
from tests.sampling_common import tiny_config

PROMPTS = ['A red circle moves right.', 'A blue star spins in place.']


@pytest.fixture(scope='module')
def pipe(tmp_path_factory):
  return pipeline.S2VPipeline.from_config(tiny_config(), workdir=str(tmp_path_factory.mktemp('w')),
                                          checkpoint='random')


def _refs():
  rng = np.random.default_rng(0)
  refs = np.full((2, 2, 16, 16, 3), 255, np.uint8)
  refs[:, :, 4:12, 4:12] = rng.integers(0, 255, (2, 2, 8, 8, 3))
  return refs, np.array([[True, False], [True, True]])


@pytest.mark.parametrize('weights', ['argument', 'baked'])
def test_exported_equals_direct_for_any_batch(pipe, tmp_path, weights):
  out = export.export_sampler(pipe, str(tmp_path / 'art'), weights=weights, platforms=('cpu', 'cuda', 'tpu'))
  sampler = exported.ExportedSampler(out)
  sig = sampler.signature
  assert sig['platforms'] == ['cpu', 'cuda', 'tpu'] and sig['format_version'] == exported.FORMAT_VERSION
  assert sig['inputs'][0] == {'name': 'seeds', 'shape': ['b'], 'dtype': 'uint32'}
  assert sig['output']['shape'] == ['b', 5, 16, 16, 3] and sig['output']['dtype'] == 'uint8'
  assert os.path.exists(os.path.join(out, exported.WEIGHTS_FILE)) == (weights == 'argument')
  refs, mask = _refs()
  got = sampler(PROMPTS, ref_images=refs, ref_mask=mask, seeds=[3, 4])
  want = pipe.generate([[refs[0, 0]], [refs[1, 0], refs[1, 1]]], PROMPTS, seed=[3, 4])
  assert got.shape == (2, 5, 16, 16, 3) and got.dtype == np.uint8
  _same_video(got, want)
  one = sampler(PROMPTS[1:], ref_images=refs[1:], ref_mask=mask[1:], seeds=[4])  # same program, batch 1
  _same_video(one[0], want[1])


def _same_video(got, want):
  """Equal up to uint8 rounding: the exported program is compiled on its own (symbolic batch), so XLA may
  fuse fp32 sums differently; a ~1e-6 difference flips a pixel sitting at a .5 boundary by one level."""
  diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
  assert diff.max() <= 1, diff.max()
  assert (diff > 0).mean() < 1e-3, (diff > 0).mean()


def test_loader_refuses_other_formats_and_bad_requests(pipe, tmp_path):
  out = export.export_sampler(pipe, str(tmp_path / 'art'), platforms=('cpu',))
  sampler = exported.ExportedSampler(out)
  with pytest.raises(exported.ExportedSamplerError, match='empty prompt'):
    sampler([' '])
  with pytest.raises(exported.ExportedSamplerError, match='at most 2'):
    sampler(['x'], [[np.zeros((8, 8, 3), np.uint8)] * 3])
  frames = sampler(['x'], [[np.zeros((8, 8, 3), np.uint8)]])  # image lists are fitted and padded
  assert frames.shape == (1, 5, 16, 16, 3)
  sig_path = os.path.join(out, exported.SIGNATURE_FILE)
  sig = json.load(open(sig_path))
  sig['format_version'] = 99
  json.dump(sig, open(sig_path, 'w'))
  with pytest.raises(exported.ExportedSamplerError, match='re-export'):
    exported.ExportedSampler(out)
  with pytest.raises(exported.ExportedSamplerError, match='not an exported sampler'):
    exported.ExportedSampler(str(tmp_path))


def test_loader_imports_no_model_code(tmp_path):
  import subprocess
  import sys
  code = ('import sys, kaleido_jax.exported; '
          'bad = [m for m in sys.modules if m.startswith("kaleido_jax.") and m != "kaleido_jax.exported"]; '
          'print(bad); sys.exit(1 if bad or "flax" in sys.modules else 0)')
  p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
  assert p.returncode == 0, p.stdout + p.stderr


def test_an_int4_sampler_exports_with_its_weights_as_an_argument(tmp_path):
  # int4 (and bfloat16 / fp8) weights pass through weights.npz as raw bytes and are viewed back on load.
  config = tiny_config()
  config.model.quantization = 'int4'
  q4 = pipeline.S2VPipeline.from_config(config, workdir=str(tmp_path / 'w'), checkpoint='random')
  out = export.export_sampler(q4, str(tmp_path / 'art'), weights='argument', platforms=('cpu',))
  sampler = exported.ExportedSampler(out)
  assert any(w.dtype.name == 'int4' for w in sampler.weights)
  refs, mask = _refs()
  got = sampler(PROMPTS[:1], ref_images=refs[:1], ref_mask=mask[:1], seeds=[3])
  _same_video(got, q4.generate([[refs[0, 0]]], PROMPTS[:1], seed=[3]))


def test_loaded_weights_live_on_the_device_and_a_second_call_compiles_nothing(pipe, tmp_path):
  # weights='argument': the loader reads weights.npz leaf by leaf straight onto the device; calls pass those device
  # arrays (no host copy crosses per video: the same buffers after a call), and a second call with other seeds
  # and prompts traces, lowers and compiles nothing.
  import collections
  import jax
  import zipfile
  out = export.export_sampler(pipe, str(tmp_path / 'art'), weights='argument', platforms=('cpu',))
  with zipfile.ZipFile(os.path.join(out, exported.WEIGHTS_FILE)) as zf:  # one .npy member per leaf
    names = zf.namelist()
  sampler = exported.ExportedSampler(out)
  assert names == [f'w{i:05d}.npy' for i in range(len(sampler.weights))]
  assert sampler.weights and all(isinstance(w, jax.Array) for w in sampler.weights)
  before = [w.unsafe_buffer_pointer() for w in sampler.weights]
  refs, mask = _refs()
  first = sampler(PROMPTS[:1], ref_images=refs[:1], ref_mask=mask[:1], seeds=[1])
  events = collections.Counter()
  count = lambda name, secs, **kw: events.update([name]) if name.startswith('/jax/core/compile/') else None
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    second = sampler(PROMPTS[1:], ref_images=refs[1:], ref_mask=mask[1:], seeds=[9])
  finally:
    jax.monitoring.unregister_event_duration_listener(count)
  assert not events, dict(events)
  assert [w.unsafe_buffer_pointer() for w in sampler.weights] == before
  assert second.shape == first.shape and not np.array_equal(second, first)


def _record_rewrites(monkeypatch):
  """Every CPU rewrite of model/cpu.py called while tracing, with the platform the trace was for."""
  from kaleido_jax.model import cpu
  calls = []
  skip = {'platform', 'enabled', 'kernels', 'active', 'target_platform', 'portable'}
  for name in dir(cpu):
    fn = getattr(cpu, name)
    if name.startswith('_') or name in skip or not callable(fn) or getattr(fn, '__module__', '') != cpu.__name__:
      continue

    def recording(*a, _fn=fn, _name=name, **kw):
      calls.append((cpu.platform(), _name))
      return _fn(*a, **kw)
    monkeypatch.setattr(cpu, name, recording)
  return calls


def _kernels(exp):
  import re
  return set(re.findall(r'custom_call @(\w+)', exp.mlir_module())) - {'shape_assertion'}


def test_each_platform_of_an_export_gets_its_own_program(pipe, tmp_path, monkeypatch):
  # Exported on this CPU host for (cpu, tpu): the CPU branch runs the CPU rewrites, the TPU branch the plain
  # program (no rewrite is traced for it, no Pallas / cuDNN call, which would not lower for the CPU branch).
  import jax
  calls = _record_rewrites(monkeypatch)
  out = export.export_sampler(pipe, str(tmp_path / 'both'), platforms=('cpu', 'tpu'))
  assert calls and {p for p, _ in calls} == {'cpu'}, sorted(set(calls))
  exp = jax.export.deserialize(open(os.path.join(out, exported.PROGRAM_FILE), 'rb').read())
  assert exp.platforms == ('cpu', 'tpu') and not _kernels(exp)
  # For the TPU alone: the plain program with splash (Mosaic), and still no CPU rewrite.
  calls.clear()
  out = export.export_sampler(pipe, str(tmp_path / 'tpu'), platforms=('tpu',))
  exp = jax.export.deserialize(open(os.path.join(out, exported.PROGRAM_FILE), 'rb').read())
  assert not calls and _kernels(exp) == {'tpu_custom_call'}


def test_an_artifact_exported_into_a_bucket_loads_from_it(pipe, tmp_path):
  from kaleido_jax import storage
  from tests import gcs as gcs_lib
  with gcs_lib.emulator() as gcs:
    out = export.export_sampler(pipe, f'gs://{gcs.bucket}/art', weights='argument', platforms=('cpu',))
    assert out == f'gs://{gcs.bucket}/art' and not os.path.exists('gs:')
    assert {exported.SIGNATURE_FILE, exported.PROGRAM_FILE, exported.WEIGHTS_FILE} <= set(storage.listdir(out))
    sampler = exported.ExportedSampler(out)
  refs, mask = _refs()
  got = sampler(PROMPTS, ref_images=refs, ref_mask=mask, seeds=[3, 4])
  _same_video(got, pipe.generate([[refs[0, 0]], [refs[1, 0], refs[1, 1]]], PROMPTS, seed=[3, 4]))
