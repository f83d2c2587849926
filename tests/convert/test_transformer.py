"""The transformer converter: diffusers, Wan2.1 and Kaleido SAT layouts give the same model; bad input fails
early with every problem named and no output left behind."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaleido_jax import config as kcfg
from kaleido_jax.convert import common
from kaleido_jax.convert import transformer as convert_tf
from tests.model import dit_reference as ref

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def torch_model():
  return ref.make_diffusers_model(heads=2, head_dim=16, layers=2, seed=7)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(2, 3, 8, 8, 4)).astype(np.float32), np.array([3.0, 700.0], np.float32),
          rng.normal(size=(2, 5, 32)).astype(np.float32))


def _check(model, torch_model, inputs):
  expected = ref.run_diffusers(torch_model, *inputs)
  got = np.asarray(model(*(jnp.asarray(x) for x in inputs)))
  assert np.abs(got - expected).max() <= 2e-5 * max(1.0, np.abs(expected).max())


def _to_sat(wan: dict, num_layers: int) -> dict:
  """The Wan -> SAT renaming of Kaleido's convert_ckpt_init_wan2sat.py (fused q|k|v and k|v)."""
  import torch
  p = "model.diffusion_model."
  sat = {p + "mixins.patch_embed.proj.weight": wan["patch_embedding.weight"],
         p + "mixins.patch_embed.proj.bias": wan["patch_embedding.bias"],
         p + "mixins.final_layer.adaLN_modulation": wan["head.modulation"],
         p + "mixins.final_layer.linear.weight": wan["head.head.weight"],
         p + "mixins.final_layer.linear.bias": wan["head.head.bias"],
         p + "adaln_projection.1.weight": wan["time_projection.1.weight"],
         p + "adaln_projection.1.bias": wan["time_projection.1.bias"]}
  for a, b in (("text_embedding", "text_embedding"), ("time_embedding", "time_embed")):
    for j in ("0", "2"):
      for w in ("weight", "bias"):
        sat[f"{p}{b}.{j}.{w}"] = wan[f"{a}.{j}.{w}"]
  for i in range(num_layers):
    L, B, A = f"{p}transformer.layers.{i}.", f"blocks.{i}.", f"{p}mixins.adaln_layer."
    for w in ("weight", "bias"):
      sat[L + f"attention.query_key_value.{w}"] = torch.cat([wan[B + f"self_attn.{x}.{w}"] for x in "qkv"])
      sat[L + f"attention.dense.{w}"] = wan[B + f"self_attn.o.{w}"]
      sat[L + f"mlp.dense_h_to_4h.{w}"] = wan[B + f"ffn.0.{w}"]
      sat[L + f"mlp.dense_4h_to_h.{w}"] = wan[B + f"ffn.2.{w}"]
      sat[L + f"cross_attention.dense.{w}"] = wan[B + f"cross_attn.o.{w}"]
      sat[L + f"cross_attention.query.{w}"] = wan[B + f"cross_attn.q.{w}"]
      sat[L + f"cross_attention.key_value.{w}"] = torch.cat([wan[B + f"cross_attn.{x}.{w}"] for x in "kv"])
      sat[L + f"post_cross_attention_layernorm.{w}"] = wan[B + f"norm3.{w}"]
    sat[A + f"query_layernorm_list.{i}.weight"] = wan[B + "self_attn.norm_q.weight"]
    sat[A + f"key_layernorm_list.{i}.weight"] = wan[B + "self_attn.norm_k.weight"]
    sat[A + f"cross_query_layernorm_list.{i}.weight"] = wan[B + "cross_attn.norm_q.weight"]
    sat[A + f"cross_key_layernorm_list.{i}.weight"] = wan[B + "cross_attn.norm_k.weight"]
    sat[A + f"adaLN_modulations.{i}"] = wan[B + "modulation"]
  return sat


def test_wan_layout(tmp_path, torch_model, inputs):
  path = ref.save_wan(torch_model, str(tmp_path / "wan"))
  _check(convert_tf.load_transformer(path, "wan"), torch_model, inputs)


def test_kaleido_sat_layout(tmp_path, torch_model, inputs):
  import torch
  d = tmp_path / "sat"
  (d / "1").mkdir(parents=True)
  torch.save({"module": _to_sat(ref.to_wan_state_dict(torch_model), 2)}, d / "1" / "mp_rank_00_model_states.pt")
  (d / "latest").write_text("1")
  with pytest.raises(common.ConversionError, match="cannot infer the head count"):
    convert_tf.load_transformer(str(d), "kaleido")  # dim 32 is no multiple of Wan's head_dim 128
  cfg = convert_tf.config_from_checkpoint(str(d / "1" / "mp_rank_00_model_states.pt"), "kaleido",
                                          common.CheckpointReader(str(d / "1" / "mp_rank_00_model_states.pt")),
                                          base=kcfg.model_config(head_dim=16))
  assert (cfg.num_heads, cfg.num_layers, cfg.ffn_dim) == (2, 2, 64)
  _check(convert_tf.load_transformer(str(d), "kaleido", cfg), torch_model, inputs)


def test_sharded_diffusers_checkpoint_with_index(tmp_path, torch_model, inputs):
  path = str(tmp_path / "sharded")
  torch_model.save_pretrained(path, safe_serialization=True, max_shard_size="20KB")
  assert any(f.endswith(".index.json") for f in os.listdir(path))
  assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
  _check(convert_tf.load_transformer(path, "diffusers"), torch_model, inputs)


def test_cli_writes_a_loadable_checkpoint_and_refuses_to_overwrite(tmp_path, torch_model, inputs):
  src = ref.save_diffusers(torch_model, str(tmp_path / "src"))
  out = tmp_path / "converted"
  cmd = [sys.executable, "-m", "kaleido_jax.convert", "--component", "transformer", "--format", "diffusers",
         "--input", src, "--output", str(out)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run(cmd, check=True, capture_output=True, env=env)
  _check(convert_tf.load_transformer(str(out)), torch_model, inputs)
  again = subprocess.run(cmd, capture_output=True, text=True, env=env)
  assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_wrong_architecture_names_keys_and_shapes_and_leaves_nothing(tmp_path, torch_model):
  src = ref.save_diffusers(torch_model, str(tmp_path / "src"))
  bigger = convert_tf.config_from_checkpoint(src, "diffusers", common.CheckpointReader(src))
  bigger.num_layers = 3
  bigger.ffn_dim = 96
  bigger.scan_layers = False
  with pytest.raises(common.ConversionError) as e:
    convert_tf.convert_state(src, "diffusers", bigger)
  msg = str(e.value)
  assert "missing keys" in msg and "blocks.2.attn1.to_q.weight" in msg
  assert "blocks/0/ffn/proj_in/kernel: expected shape (32, 96)" in msg
  out = tmp_path / "out"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "kaleido_jax.convert", "--format", "wan", "--input", src,
                      "--output", str(out)], capture_output=True, text=True, env=env)
  assert r.returncode == 2 and "has no tensor 'text_embedding.0.weight'" in r.stderr
  assert "Traceback" not in r.stderr
  assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]


def test_missing_input_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint not found"):
    convert_tf.load_transformer(str(tmp_path / "nope"), "diffusers")


def test_converted_checkpoint_loads_into_either_layer_layout(tmp_path, torch_model, inputs):
  from flax import nnx
  src = ref.save_diffusers(torch_model, str(tmp_path / "src"))
  state, cfg = convert_tf.convert_state(src, "diffusers")
  assert cfg.scan_layers  # converted stacked: a (layers, ...) axis on every block leaf
  stacked_dir = common.save_converted(str(tmp_path / "stacked"), state, cfg, component="transformer", source="t")
  as_list = kcfg.model_config(**{**cfg.to_dict(), "scan_layers": False})
  listed = convert_tf.load_transformer(stacked_dir, config=as_list)
  assert isinstance(listed.blocks, nnx.List) and len(listed.blocks) == 2
  _check(listed, torch_model, inputs)
  # And back: a per-layer checkpoint into the scanned model.
  list_dir = common.save_converted(str(tmp_path / "list"), nnx.to_pure_dict(nnx.state(listed, nnx.Param)),
                                   as_list, component="transformer", source="t")
  _check(convert_tf.load_transformer(list_dir, config=cfg), torch_model, inputs)
  _check(convert_tf.load_transformer(list_dir), torch_model, inputs)


def test_quantized_conversion_writes_int8_and_loads_back_as_quantize_on_load(tmp_path, torch_model, inputs):
  from flax import nnx
  from kaleido_jax.cli.convert import main
  from kaleido_jax.model import quantization as quant
  src = ref.save_diffusers(torch_model, str(tmp_path / "wan"))
  assert main(["--format", "diffusers", "--input", src, "--output", str(tmp_path / "q8"),
               "--quantization", "int8"]) == 0
  assert common.saved_quantization(str(tmp_path / "q8")) == "int8"
  # Its leaves are int8 on disk: a quarter of the float bytes for the blocks' kernels.
  state, saved_cfg = common.load_converted(str(tmp_path / "q8"), component="transformer")
  assert state["blocks"]["ffn"]["proj_in"]["qvalue"].dtype == np.int8
  cfg = saved_cfg
  loaded = convert_tf.load_transformer(str(tmp_path / "q8"), "diffusers", cfg)
  # The same numbers as quantizing the float model on load (from the PyTorch checkpoint, from a float dir).
  on_load = convert_tf.load_transformer(src, "diffusers", cfg)
  assert quant.scheme_of(loaded) == quant.scheme_of(on_load) == "int8"
  a, b = nnx.state(loaded, nnx.Param), nnx.state(on_load, nnx.Param)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  expected = ref.run_diffusers(torch_model, *inputs)
  got = np.asarray(loaded(*(jnp.asarray(x) for x in inputs)))
  assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.01
  # A quantized directory loads only into its own scheme, with one line saying what to set.
  other = saved_cfg.copy_and_resolve_references()
  other.quantization = "int4"
  with pytest.raises(common.ConversionError, match="holds int8 weights but config.model.quantization='int4'"):
    convert_tf.load_transformer(str(tmp_path / "q8"), "diffusers", other)
  # The VAE has no linears to quantize: one line, exit 2.
  assert main(["--component", "vae", "--format", "diffusers", "--input", src, "--output",
               str(tmp_path / "v"), "--quantization", "int8"]) == 2


def test_a_bf16_release_converts_in_bf16_and_quantizes_leaf_by_leaf_as_the_module_would(tmp_path, torch_model):
  # Host RAM of a conversion: the weights keep the checkpoint's dtype (bf16 stays bf16: half the float32 bytes),
  # and a quantized conversion quantizes each kernel as it is read (a stacked one layer by layer) instead of
  # building the float model and quantizing it: the same bits as that path, int8 and int4.
  import copy
  import torch
  from flax import nnx
  from kaleido_jax.cli.convert import main
  src = ref.save_diffusers(copy.deepcopy(torch_model).to(torch.bfloat16), str(tmp_path / "bf16"))
  assert main(["--format", "diffusers", "--input", src, "--output", str(tmp_path / "f")]) == 0
  state, cfg = common.load_converted(str(tmp_path / "f"), component="transformer")
  assert cfg.param_dtype == "bfloat16"
  flat = common.flatten_paths(state)
  kernels = {k: str(v.dtype) for k, v in flat.items() if k.startswith("blocks/") and k.endswith("/kernel")}
  assert kernels and set(kernels.values()) == {"bfloat16"}  # (the precision policy's tables stay float32)
  for scheme in ("int8", "int4"):
    assert main(["--format", "diffusers", "--input", src, "--output", str(tmp_path / scheme), "--quantization",
                 scheme]) == 0
    streamed, qcfg = common.load_converted(str(tmp_path / scheme), component="transformer")
    module = common.module_from_state(convert_tf.build_model, qcfg, state, device=None)
    want = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    got_flat, want_flat = common.flatten_paths(streamed), common.flatten_paths(want)
    assert sorted(got_flat) == sorted(want_flat)
    for k, v in want_flat.items():
      np.testing.assert_array_equal(np.asarray(got_flat[k]), np.asarray(v), err_msg=f"{scheme} {k}")


_PEAK_RSS = """
import json, os, sys, threading, time
import jax
from kaleido_jax.cli import convert
jax.devices()

def anon():  # resident anonymous memory: what a conversion needs of RAM (the mmapped checkpoint is page cache)
  for line in open('/proc/self/status'):
    if line.startswith('RssAnon:'):
      return int(line.split()[1]) * 1024

peak, stop = [0], threading.Event()

def poll():
  while not stop.is_set():
    peak[0] = max(peak[0], anon())
    time.sleep(0.002)
base = anon()
threading.Thread(target=poll, daemon=True).start()
rc = convert.main(sys.argv[1:])
stop.set()
print(json.dumps({'rc': rc, 'base': base, 'peak': peak[0]}))
"""


@pytest.mark.slow
def test_converting_a_1_gib_bf16_checkpoint_to_int8_stays_within_three_and_a_half_outputs_of_ram(tmp_path):
  # A diffusers Wan transformer of 1.02 GiB in bf16 (dim 1024, ffn 4096, 32 layers: the largest stacked kernel
  # 256 MiB in bf16, a layer's 8 MiB), converted to int8 by the CLI in a process of its own; its peak resident
  # anonymous memory is polled. Measured (2026-12-07): 1.53-1.67 GiB over the process's baseline for a 0.53 GiB
  # output (filling the output leaf by leaf peaks at output + ~0.1 GiB; orbax's save then holds one to two more
  # copies of it); the conversion before #37 (a float32 model, a cast copy, then quantized) took 5.38 GiB.
  import json
  import subprocess
  import sys
  import torch
  from diffusers import WanTransformer3DModel
  from safetensors.torch import save_file
  with torch.device("meta"):
    meta = WanTransformer3DModel(num_attention_heads=8, attention_head_dim=128, in_channels=16, out_channels=16,
                                 text_dim=256, freq_dim=256, ffn_dim=4096, num_layers=32, patch_size=(1, 2, 2),
                                 rope_max_seq_len=1024)
  src = tmp_path / "big"
  src.mkdir()
  g = torch.Generator().manual_seed(0)
  save_file({k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in meta.state_dict().items()},
            str(src / "diffusion_pytorch_model.safetensors"))
  meta.save_config(str(src))
  del meta
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  p = subprocess.run([sys.executable, "-c", _PEAK_RSS, "--format", "diffusers", "--input", str(src), "--output",
                      str(tmp_path / "q8"), "--quantization", "int8"], env=env, capture_output=True, text=True,
                     timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  m = json.loads(p.stdout.strip().splitlines()[-1])
  state, _ = common.load_converted(str(tmp_path / "q8"), component="transformer")
  output = sum(x.nbytes for x in jax.tree.leaves(state))
  used = m["peak"] - m["base"]
  print(f"peak {used / 2**30:.2f} GiB over the baseline, output {output / 2**30:.2f} GiB")
  assert m["rc"] == 0 and 0.45 * 2**30 < output < 0.6 * 2**30
  assert used <= 3.5 * output + 2**28
