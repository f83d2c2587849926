"""umT5 encoder checkpoints -> :class:`kaleido_jax.model.text_encoder.UMT5Encoder`.

Formats:
  transformers  ``UMT5EncoderModel`` safetensors (a file, a sharded dir with an index json, or a full
                ``UMT5Model`` / ``UMT5ForConditionalGeneration`` whose decoder is ignored). Keys, as in
                transformers' modeling_umt5.py: ``shared.weight`` / ``encoder.embed_tokens.weight``,
                ``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight`` and
                ``...SelfAttention.relative_attention_bias.weight`` (every layer has one in umT5),
                ``encoder.block.{i}.layer.0.layer_norm.weight``,
                ``encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight``,
                ``encoder.block.{i}.layer.1.layer_norm.weight``, ``encoder.final_layer_norm.weight``.
  wan           the original Wan2.1 ``models_t5_umt5-xxl-enc-bf16.pth`` (wan/modules/t5.py ``T5Encoder``):
                ``token_embedding.weight``, ``blocks.{i}.norm1|norm2.weight``,
                ``blocks.{i}.attn.{q,k,v,o}.weight``, ``blocks.{i}.pos_embedding.embedding.weight``,
                ``blocks.{i}.ffn.gate.0.weight`` (the GELU branch = wi_0), ``blocks.{i}.ffn.fc1.weight``
                (the linear branch = wi_1), ``blocks.{i}.ffn.fc2.weight`` (= wo), ``norm.weight``.

torch Linear weights are (out, in); ours are (in, out). Embedding tables keep their layout.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_collections
from flax import nnx

from kaleido_jax import storage
from kaleido_jax.config import text_encoder_config
from kaleido_jax.convert import common
from kaleido_jax.convert.common import ConversionError, linear_weight, one, stacked
from kaleido_jax.model.text_encoder import UMT5Encoder
from kaleido_jax.model.text_encoder import find_tokenizer_file

COMPONENT = "text_encoder"
FORMATS = ("transformers", "wan")

# Our leaf -> per-format source key template ({i} = layer index) and transform.
_LAYER_MAP = {
    "transformers": {
        "attn_norm/weight": ("encoder.block.{i}.layer.0.layer_norm.weight", None),
        "q/kernel": ("encoder.block.{i}.layer.0.SelfAttention.q.weight", linear_weight),
        "k/kernel": ("encoder.block.{i}.layer.0.SelfAttention.k.weight", linear_weight),
        "v/kernel": ("encoder.block.{i}.layer.0.SelfAttention.v.weight", linear_weight),
        "o/kernel": ("encoder.block.{i}.layer.0.SelfAttention.o.weight", linear_weight),
        "relative_bias": ("encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight", None),
        "ffn_norm/weight": ("encoder.block.{i}.layer.1.layer_norm.weight", None),
        "wi_0/kernel": ("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", linear_weight),
        "wi_1/kernel": ("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", linear_weight),
        "wo/kernel": ("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", linear_weight),
    },
    "wan": {
        "attn_norm/weight": ("blocks.{i}.norm1.weight", None),
        "q/kernel": ("blocks.{i}.attn.q.weight", linear_weight),
        "k/kernel": ("blocks.{i}.attn.k.weight", linear_weight),
        "v/kernel": ("blocks.{i}.attn.v.weight", linear_weight),
        "o/kernel": ("blocks.{i}.attn.o.weight", linear_weight),
        "relative_bias": ("blocks.{i}.pos_embedding.embedding.weight", None),
        "ffn_norm/weight": ("blocks.{i}.norm2.weight", None),
        "wi_0/kernel": ("blocks.{i}.ffn.gate.0.weight", linear_weight),
        "wi_1/kernel": ("blocks.{i}.ffn.fc1.weight", linear_weight),
        "wo/kernel": ("blocks.{i}.ffn.fc2.weight", linear_weight),
    },
}
_FINAL_NORM = {"transformers": "encoder.final_layer_norm.weight", "wan": "norm.weight"}
# Present in full umT5 checkpoints / Wan's wrapper but not part of the encoder.
_IGNORE = {"transformers": ("decoder.", "lm_head.", "encoder.embed_tokens.weight", "shared.weight"),
           "wan": ()}


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ConversionError(f"unknown text encoder format {fmt!r}; choose one of {FORMATS}")


def _embedding_key(reader: common.CheckpointReader, fmt: str) -> str:
  if fmt == "wan":
    return "token_embedding.weight"
  for k in ("encoder.embed_tokens.weight", "shared.weight"):
    if k in reader:
      return k
  return "shared.weight"  # reported as missing by fill_from_plan


def make_plan(num_layers: int, fmt: str, embedding_key: str) -> dict[str, common.Source]:
  """Flat ``{our/leaf/path: Source}`` for every parameter of a ``num_layers`` encoder."""
  _check_format(fmt)
  plan = {"embed/embedding": one(embedding_key), "final_norm/weight": one(_FINAL_NORM[fmt])}
  for leaf, (template, transform) in _LAYER_MAP[fmt].items():
    keys = [template.format(i=i) for i in range(num_layers)]
    plan[f"blocks/{leaf}"] = stacked(keys, transform) if transform else stacked(keys)
  return plan


def _count_layers(keys: list[str], pattern: str) -> int:
  found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
  return max(found) + 1 if found else 0


def _config_json_near(path: str) -> str | None:
  d = path if os.path.isdir(path) else os.path.dirname(path)
  f = os.path.join(d, "config.json")
  return f if os.path.isfile(f) else None


def config_from_transformers_json(file: str, **overrides) -> ml_collections.ConfigDict:
  """Our ``text_encoder`` section from a transformers ``UMT5Config`` json."""
  with open(file) as fh:
    hf = json.load(fh)
  proj = hf.get("feed_forward_proj", "gated-gelu")
  if proj != "gated-gelu":
    raise ConversionError(f"{file}: feed_forward_proj={proj!r}; only umT5's 'gated-gelu' (tanh GELU) is "
                          "implemented")
  if hf.get("model_type") not in (None, "umt5"):
    raise ConversionError(f"{file}: model_type={hf.get('model_type')!r}, expected 'umt5' (plain T5 shares "
                          "one relative bias across layers and is a different architecture)")
  cfg = text_encoder_config(
      vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
      num_layers=hf["num_layers"], num_heads=hf["num_heads"],
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      eps=hf.get("layer_norm_epsilon", 1e-6))
  cfg.update(overrides)
  return cfg


def infer_config(reader: common.CheckpointReader, fmt: str, **overrides) -> ml_collections.ConfigDict:
  """Architecture from tensor shapes (no config file): vocab, widths, depth, heads, buckets.

  ``relative_attention_max_distance`` and ``eps`` cannot be seen in shapes; umT5's 128 / 1e-6 are used.
  """
  _check_format(fmt)
  keys = reader.keys()
  layer_re = r"encoder\.block\.(\d+)\." if fmt == "transformers" else r"blocks\.(\d+)\."
  num_layers = _count_layers(keys, layer_re)
  tmpl = _LAYER_MAP[fmt]
  needed = [_embedding_key(reader, fmt)] + [tmpl[n][0].format(i=0) for n in
                                           ("q/kernel", "relative_bias", "wi_0/kernel")]
  missing = [k for k in needed if k not in reader]
  if num_layers == 0 or missing:
    raise ConversionError(f"{reader.path!r} does not look like a {fmt!r} umT5 encoder checkpoint: "
                          f"{'no layers found; ' if not num_layers else ''}missing {missing}; first keys: "
                          f"{keys[:8]}")
  vocab, d_model = reader.shape(needed[0])
  inner = reader.shape(needed[1])[0]
  buckets, heads = reader.shape(needed[2])
  d_ff = reader.shape(needed[3])[0]
  cfg = text_encoder_config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff,
                            num_layers=num_layers, num_heads=heads,
                            relative_attention_num_buckets=buckets)
  cfg.update(overrides)
  return cfg


def convert_state(reader: common.CheckpointReader, cfg: ml_collections.ConfigDict, fmt: str
                  ) -> dict[str, Any]:
  """Pure nested state dict (numpy) for ``UMT5Encoder(cfg)`` from the checkpoint."""
  _check_format(fmt)
  if cfg.get("quantization", "none") != "none":  # the checkpoint holds float weights
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.quantization = "none"
  abstract = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
  like = nnx.to_pure_dict(nnx.state(abstract))
  targets = common.flatten_paths(like)
  plan = make_plan(cfg.num_layers, fmt, _embedding_key(reader, fmt))
  flat = common.fill_from_plan(reader, targets, plan, ignore_unused=_IGNORE[fmt],
                               what=f"umT5 {fmt} checkpoint {reader.path!r}")
  return common.unflatten_paths(flat, like)


def _build(cfg: ml_collections.ConfigDict):
  return UMT5Encoder(cfg, rngs=nnx.Rngs(0))


def _module_from_state(cfg: ml_collections.ConfigDict, pure: dict[str, Any], saved_scheme: str = "none",
                       where: str = "", device: Any = "default"):
  return common.module_from_state(_build, cfg, pure, saved_scheme=saved_scheme, where=where,
                                  section="config.text_encoder", device=device)


def _is_converted(path: str) -> bool:
  return common.is_converted(path) and "component" in storage.read_json(storage.join(path, common.CONFIG_FILE))


def resolve_config(reader: common.CheckpointReader, path: str, fmt: str,
                   config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """The given config, else transformers' config.json next to the weights, else shapes."""
  if config is not None:
    return config
  cfg_file = _config_json_near(path) if fmt == "transformers" else None
  if cfg_file:
    return config_from_transformers_json(cfg_file)
  return infer_config(reader, fmt)


def load_text_encoder(path: str, format: str = "transformers",  # noqa: A002 (matches the CLI flag)
                      config: ml_collections.ConfigDict | None = None, *, dtype: str | None = None,
                      device: Any = "default"):
  """A ready :class:`UMT5Encoder` from a PyTorch-side checkpoint or a converted directory.

  ``config`` (our ``text_encoder`` section) wins; otherwise a transformers ``config.json`` next to the
  weights is read; otherwise the architecture is inferred from tensor shapes. ``dtype`` overrides the
  parameter / compute dtype (e.g. 'bfloat16' for the 5.7B XXL encoder). ``config.quantization``: float
  weights are quantized on the host as they load; ``device`` is where the result goes (None: the host).
  """
  if _is_converted(path):
    pure, saved_cfg = common.load_converted(path, component=COMPONENT)
    return _module_from_state(_with_dtype(config if config is not None else saved_cfg, dtype), pure,
                              common.saved_quantization(path), path, device)
  _check_format(format)
  path = storage.fetched(path)  # PyTorch-side files are read locally
  reader = common.CheckpointReader(path)
  cfg = _with_dtype(resolve_config(reader, path, format, config), dtype)
  return _module_from_state(cfg, convert_state(reader, cfg, format), where=path, device=device)


def _with_dtype(cfg: ml_collections.ConfigDict, dtype: str | None) -> ml_collections.ConfigDict:
  if not dtype:
    return cfg
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.dtype = dtype
  return cfg


def _find_tokenizer_near(path: str) -> str | None:
  d = path if os.path.isdir(path) else os.path.dirname(path)
  for candidate in (d, os.path.dirname(d)):
    try:
      return find_tokenizer_file(candidate) if candidate else None
    except FileNotFoundError:
      continue
  return None


def convert(input_path: str, output_dir: str, format: str = "transformers",  # noqa: A002
            config: ml_collections.ConfigDict | None = None, dtype: str | None = None,
            quantization: str = "none") -> str:
  """Converts and writes an orbax directory (+ config.json, + tokenizer/spiece.model when found).

  ``quantization`` (none | int8 | int4 | fp8) writes the layers' linears quantized (model/quantization.py).
  """
  _check_format(format)
  reader = common.CheckpointReader(input_path)
  cfg = _with_dtype(resolve_config(reader, input_path, format, config), dtype)
  if quantization and quantization != "none":  # each kernel quantized as it is read (common.fill_quantized)
    float_cfg = ml_collections.ConfigDict(cfg.to_dict())
    float_cfg.quantization = "none"
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.quantization = quantization
    float_like = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: _build(float_cfg))))
    like = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: _build(cfg)), nnx.Param))
    flat = common.fill_quantized(reader, common.flatten_paths(float_like), common.flatten_paths(like),
                                 make_plan(cfg.num_layers, format, _embedding_key(reader, format)), quantization,
                                 ignore_unused=_IGNORE[format], what=f"umT5 {format} checkpoint {reader.path!r}")
    pure = common.unflatten_paths(flat, like)
  else:
    pure = convert_state(reader, cfg, format)
  out = common.save_converted(output_dir, pure, cfg, component=COMPONENT, source=os.path.abspath(input_path))
  tok = _find_tokenizer_near(input_path)
  if tok:  # local or a bucket, like the output
    storage.upload(tok, storage.join(out, "tokenizer", "spiece.model"))
  return out
