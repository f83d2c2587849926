"""umT5 converter: transformers (single / sharded safetensors) and Wan .pth layouts, CLI round trip,
and clear errors for checkpoints that do not fit."""

import argparse
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch  # noqa: E402

from kaleido_jax.cli import convert as cli_convert  # noqa: E402
from kaleido_jax.config import text_encoder_config  # noqa: E402
from kaleido_jax.convert import text_encoder as conv  # noqa: E402
from kaleido_jax.convert.common import ConversionError  # noqa: E402
from kaleido_jax.model.text_encoder import Tokenizer  # noqa: E402
from tests import fixtures_text as ft  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def hf_model():
  return ft.tiny_hf_umt5(seed=3, num_layers=3)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.RandomState(5)
  ids = rng.randint(0, ft.TINY_UMT5["vocab_size"], (2, 40)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, 23:] = 0
  return ids, mask


@pytest.fixture(scope="module")
def reference(hf_model, inputs):
  return ft.hf_last_hidden(hf_model, *inputs)


def _wan_state_dict(hf_model) -> dict:
  """The Wan2.1 T5Encoder key layout (wan/modules/t5.py), built from the transformers weights."""
  sd = hf_model.state_dict()
  out = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
  for i in range(hf_model.config.num_layers):
    p = f"encoder.block.{i}.layer."
    for n in "qkvo":
      out[f"blocks.{i}.attn.{n}.weight"] = sd[p + f"0.SelfAttention.{n}.weight"]
    out[f"blocks.{i}.pos_embedding.embedding.weight"] = sd[p + "0.SelfAttention.relative_attention_bias.weight"]
    out[f"blocks.{i}.norm1.weight"] = sd[p + "0.layer_norm.weight"]
    out[f"blocks.{i}.norm2.weight"] = sd[p + "1.layer_norm.weight"]
    out[f"blocks.{i}.ffn.gate.0.weight"] = sd[p + "1.DenseReluDense.wi_0.weight"]
    out[f"blocks.{i}.ffn.fc1.weight"] = sd[p + "1.DenseReluDense.wi_1.weight"]
    out[f"blocks.{i}.ffn.fc2.weight"] = sd[p + "1.DenseReluDense.wo.weight"]
  return {k: v.clone().contiguous() for k, v in out.items()}


def _err(enc, inputs, reference):
  return float(np.abs(np.asarray(enc(*inputs)) - reference).max())


def test_transformers_sharded_checkpoint(hf_model, inputs, reference, tmp_path):
  hf_model.save_pretrained(str(tmp_path), max_shard_size="20KB")
  assert any(f.endswith(".safetensors.index.json") for f in os.listdir(tmp_path))
  enc = conv.load_text_encoder(str(tmp_path), format="transformers")
  err = _err(enc, inputs, reference)
  print(f"transformers sharded: max |err| = {err:.2e}")
  assert err < 1e-5


def test_wan_pth_layout_with_shapes_inferred(hf_model, inputs, reference, tmp_path):
  path = str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
  torch.save(_wan_state_dict(hf_model), path)
  enc = conv.load_text_encoder(path, format="wan")  # no config.json: from shapes
  err = _err(enc, inputs, reference)
  print(f"wan .pth: max |err| = {err:.2e}")
  assert err < 1e-5
  cfg = conv.infer_config(conv.common.CheckpointReader(path), "wan")
  assert (cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff, cfg.vocab_size) == (3, 4, 8, 64, 320)


def test_wan_bf16_weights_load_as_bfloat16(hf_model, inputs, reference, tmp_path):
  path = str(tmp_path / "enc-bf16.pth")
  torch.save({k: v.to(torch.bfloat16) for k, v in _wan_state_dict(hf_model).items()}, path)
  enc = conv.load_text_encoder(path, format="wan", dtype="bfloat16")
  out = np.asarray(enc(*inputs), np.float32)
  assert enc.embed.embedding[...].dtype.name == "bfloat16"
  assert np.abs(out - reference).max() < 0.05 * np.abs(reference).max()


def test_cli_round_trip_with_tokenizer(hf_model, inputs, reference, tmp_path):
  src = tmp_path / "hf"
  hf_model.save_pretrained(str(src))
  ft.train_sentencepiece(str(src / "tokenizer"))
  args = argparse.Namespace(component="text_encoder", format="transformers", input=str(src),
                            output=str(tmp_path / "out"))
  out = cli_convert.convert(args)
  with open(os.path.join(out, "config.json")) as fh:
    meta = json.load(fh)
  assert meta["component"] == "text_encoder" and meta["config"]["num_layers"] == 3
  assert Tokenizer(out).path == os.path.join(out, "tokenizer", "spiece.model")
  enc = conv.load_text_encoder(out)  # converted directory detected
  assert _err(enc, inputs, reference) < 1e-5
  enc16 = conv.load_text_encoder(out, dtype="bfloat16")
  assert enc16.blocks.q.kernel[...].dtype.name == "bfloat16"
  assert np.abs(np.asarray(enc16(*inputs), np.float32) - reference).max() < 0.05 * np.abs(reference).max()
  from kaleido_jax.convert import load_text_encoder  # the package-level entry point named in the issue
  assert load_text_encoder is conv.load_text_encoder
  with pytest.raises(FileExistsError, match="already exists"):
    cli_convert.convert(args)
  parsed = cli_convert.parse_args(["--component", "text_encoder", "--format", "wan", "--input", "x.pth",
                                   "--output", "o", "--dtype", "bfloat16"])
  assert (parsed.format, parsed.input, parsed.output, parsed.dtype) == ("wan", "x.pth", "o", "bfloat16")


def test_missing_and_misshaped_tensors_are_named(hf_model, tmp_path):
  sd = _wan_state_dict(hf_model)
  del sd["blocks.1.ffn.fc1.weight"]
  path = str(tmp_path / "broken.pth")
  torch.save(sd, path)
  cfg = text_encoder_config(**{**ft.TINY_UMT5, "num_layers": 3})
  with pytest.raises(ConversionError, match=r"missing keys.*blocks\.1\.ffn\.fc1\.weight"):
    conv.load_text_encoder(path, format="wan", config=cfg)
  hf_model.save_pretrained(str(tmp_path / "hf"))
  wrong = text_encoder_config(**{**ft.TINY_UMT5, "num_layers": 3, "d_ff": 96})
  with pytest.raises(ConversionError, match=r"blocks/wi_0/kernel: expected shape \(3, 32, 96\)"):
    conv.load_text_encoder(str(tmp_path / "hf"), config=wrong)
  fewer = text_encoder_config(**{**ft.TINY_UMT5, "num_layers": 2})
  with pytest.raises(ConversionError, match=r"unexpected keys.*encoder\.block\.2\."):
    conv.load_text_encoder(str(tmp_path / "hf"), config=fewer)


def test_wrong_format_and_architecture_rejected(hf_model, tmp_path):
  d = tmp_path / "hf"
  hf_model.save_pretrained(str(d))
  with pytest.raises(ConversionError, match="does not look like a 'wan' umT5"):
    conv.load_text_encoder(str(d), format="wan")
  with pytest.raises(ConversionError, match="unknown text encoder format"):
    conv.load_text_encoder(str(d), format="diffusers")
  cfg = json.loads((d / "config.json").read_text())
  cfg["model_type"] = "t5"
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConversionError, match="plain T5"):
    conv.load_text_encoder(str(d))
  with pytest.raises(FileNotFoundError, match="checkpoint not found"):
    conv.load_text_encoder(str(tmp_path / "nothing-here"))


def test_quantized_conversion_round_trip(hf_model, inputs, reference, tmp_path):
  from kaleido_jax import config as kcfg
  from kaleido_jax.model import quantization as quant
  src = tmp_path / "hf"
  hf_model.save_pretrained(str(src))
  args = argparse.Namespace(component="text_encoder", format="transformers", input=str(src),
                            output=str(tmp_path / "q8"), quantization="int8")
  out = cli_convert.convert(args)
  enc = conv.load_text_encoder(out)
  assert quant.scheme_of(enc) == "int8" and enc.blocks.q.qvalue[...].dtype.name == "int8"
  rel = np.linalg.norm(np.asarray(enc(*inputs)) - reference) / np.linalg.norm(reference)
  assert rel < 0.03
  # Quantize-on-load from the float checkpoint gives the same encoder, on the host when asked.
  cfg = kcfg.text_encoder_config(**{**ft.TINY_UMT5, "num_layers": 3}, quantization="int8")
  on_load = conv.load_text_encoder(str(src), "transformers", cfg, device=None)
  assert next(iter(on_load.blocks.q.qvalue[...].devices())).platform == "cpu"
  np.testing.assert_array_equal(np.asarray(on_load(*inputs)), np.asarray(enc(*inputs)))
