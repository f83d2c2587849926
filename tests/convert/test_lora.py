"""LoRA files: a PEFT LoRA on a tiny diffusers Wan model gives diffusers' output once merged into our converted
model; the Wan / ComfyUI and kohya layouts of the same LoRA merge to the same weights; keys or shapes that do not
fit are one error naming them."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kaleido_jax.convert import common
from kaleido_jax.convert import lora as lora_conv
from kaleido_jax.convert import transformer as convert_tf
from kaleido_jax.model import lora as lora_lib
from tests.model import dit_reference as ref

pytestmark = pytest.mark.torch

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]


@pytest.fixture(scope="module")
def peft_setup(tmp_path_factory):
  """(base diffusers dir, LoRA dir, diffusers output with the LoRA, inputs)."""
  import torch
  from peft import LoraConfig
  root = tmp_path_factory.mktemp("lora")
  model = ref.make_diffusers_model(heads=2, head_dim=16, layers=2, seed=3)
  base_dir = ref.save_diffusers(model, str(root / "base"))
  torch.manual_seed(1)
  # init_lora_weights=False: random A *and* B, so the LoRA really changes the output.
  model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
  lora_dir = str(root / "lora")
  model.save_lora_adapter(lora_dir)
  rng = np.random.default_rng(0)
  inputs = (rng.normal(size=(2, 3, 8, 8, 4)).astype(np.float32), np.array([3.0, 700.0], np.float32),
            rng.normal(size=(2, 5, 32)).astype(np.float32))
  base_out = None
  with torch.no_grad():
    model.disable_adapters()
    base_out = ref.run_diffusers(model, *inputs)
    model.enable_adapters()
  expected = ref.run_diffusers(model, *inputs)
  assert np.abs(expected - base_out).max() > 1e-2  # the LoRA matters
  return base_dir, lora_dir, expected, inputs


def _tol(expected):
  return 2e-5 * max(1.0, np.abs(expected).max())  # the DiT parity tolerance (tests/convert/test_transformer.py)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_peft_lora_merged_matches_diffusers(peft_setup, scan_layers):
  base_dir, lora_dir, expected, inputs = peft_setup
  cfg = convert_tf.config_from_checkpoint(base_dir, "diffusers", common.CheckpointReader(base_dir))
  cfg.scan_layers = scan_layers
  model = convert_tf.load_transformer(base_dir, "diffusers", cfg)
  lora_conv.load_lora(model, lora_dir, scale=1.0)
  got = np.asarray(model(*(jnp.asarray(x) for x in inputs)))
  assert np.abs(got - expected).max() <= _tol(expected)


def _merged_kernels(base_dir, path, scale=1.0):
  model = convert_tf.load_transformer(base_dir, "diffusers")
  lora_conv.load_lora(model, path, scale)
  return {k: np.asarray(v) for k, v in common.flatten_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


def _peft_tensors(lora_dir):
  reader = common.CheckpointReader(lora_conv.resolve_file(lora_dir))
  return {k: reader.get(k) for k in reader.keys()}


def _to_wan_names(key: str) -> str:
  for theirs, wan in (("attn1.to_out.0", "self_attn.o"), ("attn2.to_out.0", "cross_attn.o"),
                      ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2")):
    key = key.replace(theirs, wan)
  for p in "qkv":
    key = key.replace(f"attn1.to_{p}", f"self_attn.{p}").replace(f"attn2.to_{p}", f"cross_attn.{p}")
  return key


def test_comfyui_and_kohya_layouts_merge_to_the_same_weights(peft_setup, tmp_path):
  from safetensors.numpy import save_file
  base_dir, lora_dir, _, _ = peft_setup
  peft = _peft_tensors(lora_dir)
  comfy, kohya = {}, {}
  for key, value in peft.items():
    module, role = key.rsplit(".lora_", 1)
    wan = _to_wan_names(module)
    down_up = "lora_down.weight" if role.startswith("A") else "lora_up.weight"
    # alpha 8 over rank 4 = PEFT's scale 2, stated per module as these trainers do.
    comfy[f"diffusion_model.{wan}.{down_up}"] = value
    comfy[f"diffusion_model.{wan}.alpha"] = np.array(8.0, np.float32)
    kohya[f"lora_unet_{wan.replace('.', '_')}.{down_up}"] = value
    kohya[f"lora_unet_{wan.replace('.', '_')}.alpha"] = np.array(8.0, np.float32)
  save_file(comfy, str(tmp_path / "comfy.safetensors"))
  save_file(kohya, str(tmp_path / "kohya.safetensors"))
  want = _merged_kernels(base_dir, lora_dir, 0.5)
  for name in ("comfy", "kohya"):
    got = _merged_kernels(base_dir, str(tmp_path / f"{name}.safetensors"), 0.5)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=f"{name}: {k}")
  base = _merged_kernels(base_dir, lora_dir, 0.0)  # scale 0 = the base model
  assert max(np.abs(want[k] - base[k]).max() for k in want) > 1e-3


def test_several_loras_add_and_dense_diffs_apply(peft_setup, tmp_path):
  from safetensors.numpy import save_file
  base_dir, lora_dir, _, _ = peft_setup
  rng = np.random.default_rng(5)
  diff_b = rng.normal(size=(32,)).astype(np.float32)
  diff = rng.normal(size=(32, 32)).astype(np.float32)   # torch layout (dout, din)
  norm = rng.normal(size=(32,)).astype(np.float32)
  save_file({"diffusion_model.blocks.1.self_attn.q.diff_b": diff_b, "diffusion_model.blocks.1.self_attn.q.diff": diff,
             "diffusion_model.blocks.0.norm3.diff": norm}, str(tmp_path / "diff.safetensors"))
  base = _merged_kernels(base_dir, lora_dir, 0.0)
  model = convert_tf.load_transformer(base_dir, "diffusers")
  lora_conv.load_lora(model, lora_dir, 1.0)
  lora_conv.load_lora(model, str(tmp_path / "diff.safetensors"), 2.0)
  got = {k: np.asarray(v) for k, v in common.flatten_paths(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}
  once = _merged_kernels(base_dir, lora_dir, 1.0)
  np.testing.assert_allclose(got["blocks/self_attn/to_q/bias"][1], base["blocks/self_attn/to_q/bias"][1] + 2 * diff_b,
                             atol=1e-5)
  np.testing.assert_allclose(got["blocks/self_attn/to_q/kernel"][1], once["blocks/self_attn/to_q/kernel"][1] + 2 * diff.T,
                             atol=1e-5)
  np.testing.assert_allclose(got["blocks/norm2_scale"][0], base["blocks/norm2_scale"][0] + 2 * norm, atol=1e-6)
  np.testing.assert_array_equal(got["blocks/self_attn/to_q/kernel"][0], once["blocks/self_attn/to_q/kernel"][0])


def test_lora_on_a_quantized_model_follows_the_float_merge(peft_setup):
  base_dir, lora_dir, expected, inputs = peft_setup
  cfg = convert_tf.config_from_checkpoint(base_dir, "diffusers", common.CheckpointReader(base_dir))
  cfg.quantization = "int8"
  model = convert_tf.load_transformer(base_dir, "diffusers", cfg)
  lora_conv.load_lora(model, lora_dir)
  got = np.asarray(model(*(jnp.asarray(x) for x in inputs)))
  # int8 weights: the same 2% band as the quantization tests' int8 DiT rows.
  assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()


def test_keys_or_shapes_that_do_not_fit_are_named(peft_setup, tmp_path):
  from safetensors.numpy import save_file
  base_dir, _, _, _ = peft_setup
  model = convert_tf.load_transformer(base_dir, "diffusers")
  a, b = np.ones((4, 32), np.float32), np.ones((32, 4), np.float32)
  save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": a, "transformer.blocks.0.attn1.to_q.lora_B.weight": b,
             "transformer.blocks.0.attn2.add_k_proj.lora_A.weight": a}, str(tmp_path / "i2v.safetensors"))
  with pytest.raises(common.ConversionError, match="add_k_proj"):
    lora_conv.load_lora(model, str(tmp_path / "i2v.safetensors"))
  save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": np.ones((4, 48), np.float32),
             "transformer.blocks.0.attn1.to_q.lora_B.weight": np.ones((48, 4), np.float32)},
            str(tmp_path / "big.safetensors"))
  with pytest.raises(common.ConversionError, match=r"to_q.*\(48, 48\).*\(32, 32\)"):
    lora_conv.load_lora(model, str(tmp_path / "big.safetensors"))
  save_file({"transformer.blocks.7.attn1.to_q.lora_A.weight": a, "transformer.blocks.7.attn1.to_q.lora_B.weight": b},
            str(tmp_path / "deep.safetensors"))
  with pytest.raises(common.ConversionError, match="block 7"):
    lora_conv.load_lora(model, str(tmp_path / "deep.safetensors"))
  save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": a}, str(tmp_path / "half.safetensors"))
  with pytest.raises(common.ConversionError, match="no matching"):
    lora_conv.load_lora(model, str(tmp_path / "half.safetensors"))
  with pytest.raises(common.ConversionError, match="does not exist"):
    lora_conv.load_lora(model, str(tmp_path / "missing.safetensors"))


def test_spec_parsing():
  assert lora_conv.parse_spec("/a/b.safetensors:0.75") == ("/a/b.safetensors", 0.75)
  assert lora_conv.parse_spec("/a/b.safetensors") == ("/a/b.safetensors", 1.0)
  assert lora_conv.parse_spec("C:/x/y") == ("C:/x/y", 1.0)
  assert lora_lib.resolve_targets("attention") == lora_lib.BLOCK_LINEARS[:8]
  assert lora_lib.resolve_targets(["to_q", "ffn"]) == ("self_attn/to_q", "cross_attn/to_q", "ffn/proj_in",
                                                      "ffn/proj_out")
  with pytest.raises(ValueError, match="names no linear"):
    lora_lib.resolve_targets(["to_x"])
  assert os.path.basename(lora_conv.LORA_FILE) == "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_sample_loras_merge_as_the_pipeline_loads(peft_setup, quantization):
  from kaleido_jax import config as kcfg
  from kaleido_jax import pipeline
  base_dir, lora_dir, _, _ = peft_setup
  config = kcfg.base_config()
  config.model = convert_tf.config_from_checkpoint(base_dir, "diffusers", common.CheckpointReader(base_dir))
  config.model.quantization = quantization
  config.init_from.transformer = base_dir
  config.sample.loras = (f"{lora_dir}:0.5",)
  _, state, where = pipeline.load_weights(config)
  assert "LoRA" in where
  want = convert_tf.load_transformer(base_dir, "diffusers", config.model)  # quantized as it loads
  if quantization == "none":
    lora_conv.load_lora(want, lora_dir, 0.5)
  got = common.flatten_paths(nnx.to_pure_dict(state))
  ref_flat = common.flatten_paths(nnx.to_pure_dict(nnx.state(want, nnx.Param)))
  if quantization == "none":
    for k in ref_flat:
      np.testing.assert_allclose(np.asarray(got[k]), np.asarray(ref_flat[k]), atol=1e-6, err_msg=k)
  else:  # merged in float, then quantized: the int8 values differ from the base model's where the LoRA lands
    changed = [k for k in ref_flat if k.endswith("qvalue") and np.any(np.asarray(got[k]) != np.asarray(ref_flat[k]))]
    assert "blocks/self_attn/to_q/qvalue" in changed and "blocks/cross_attn/to_k/qvalue" in changed


def test_trained_adapters_saved_as_peft_load_into_diffusers_with_the_same_output(peft_setup, tmp_path):
  from diffusers import WanTransformer3DModel
  base_dir, _, _, inputs = peft_setup
  cfg = convert_tf.config_from_checkpoint(base_dir, "diffusers", common.CheckpointReader(base_dir))
  model = convert_tf.load_transformer(base_dir, "diffusers", cfg)
  lora_lib.add_adapters(model, 4, 8.0, "all", rngs=nnx.Rngs(2))
  rng = np.random.default_rng(4)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, lora_lib.LoRALinear):  # as after training: B off zero
      node.lora_b.value = jnp.asarray(rng.normal(size=node.lora_b.value.shape) * 0.1, jnp.float32)
  ours = np.asarray(model(*(jnp.asarray(x) for x in inputs)))
  out = lora_conv.save_peft_lora(model, str(tmp_path / "adapter"), alpha=8.0)
  assert os.path.basename(out) == lora_conv.LORA_FILE
  theirs = WanTransformer3DModel.from_pretrained(base_dir).eval()
  theirs.load_lora_adapter(str(tmp_path / "adapter"), prefix="transformer", weight_name=lora_conv.LORA_FILE)
  expected = ref.run_diffusers(theirs, *inputs)
  assert np.abs(ours - expected).max() <= _tol(expected)
  # And back: the file merges into the base with the same output.
  merged = convert_tf.load_transformer(base_dir, "diffusers", cfg)
  lora_conv.load_lora(merged, str(tmp_path / "adapter"))
  got = np.asarray(merged(*(jnp.asarray(x) for x in inputs)))
  assert np.abs(got - expected).max() <= _tol(expected)


def test_a_lora_in_a_bucket_and_a_base_model_in_a_bucket_load_as_local_ones(peft_setup):
  from kaleido_jax import config as kcfg
  from kaleido_jax import pipeline, storage
  from tests import gcs as gcs_lib
  base_dir, lora_dir, _, _ = peft_setup
  config = kcfg.base_config()
  config.model = convert_tf.config_from_checkpoint(base_dir, "diffusers", common.CheckpointReader(base_dir))
  config.init_from.transformer = base_dir
  config.sample.loras = (f"{lora_dir}:0.5",)
  _, want, _ = pipeline.load_weights(config)
  with gcs_lib.emulator() as gcs:
    for local, name in ((base_dir, "base"), (lora_dir, "lora")):
      for rel in storage.walk_files(local):
        storage.upload(os.path.join(local, rel), f"gs://{gcs.bucket}/{name}/{rel}")
    config.init_from.transformer = f"gs://{gcs.bucket}/base"
    config.sample.loras = (f"gs://{gcs.bucket}/lora:0.5",)
    _, got, where = pipeline.load_weights(config)
  assert "LoRA gs://" in where
  got, want = common.flatten_paths(nnx.to_pure_dict(got)), common.flatten_paths(nnx.to_pure_dict(want))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
