"""Wan LoRA files -> merged KaleidoDiT weights; trained adapters -> diffusers / PEFT LoRA files.

  model = load_lora(model, "my_lora.safetensors", scale=0.8)      # merged in place (stacked layers too)

Layouts read (key facts from diffusers' ``lora_conversion_utils`` and the trainers that write them):
- **diffusers / PEFT**: ``transformer.blocks.N.attn1.to_q.lora_A.weight`` (r, din) / ``lora_B.weight`` (dout, r);
  prefix ``transformer.`` (a pipeline's ``save_lora_weights``), none (a model's ``save_lora_adapter``) or
  ``base_model.model.`` (PEFT ``save_pretrained``, ``.lora_A.default.weight`` possible). Alpha from the
  safetensors metadata ``lora_adapter_metadata`` (diffusers' LoraConfig as JSON, ``transformer.``-prefixed in
  pipeline files) or a sibling ``adapter_config.json`` (``lora_alpha``, ``alpha_pattern``, ``rank_pattern``,
  ``use_rslora``); without either, alpha = rank (diffusers' default). ``lora_B.bias`` (diffusers' form of
  ``diff_b``) is a bias delta.
- **Wan / ComfyUI**: ``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` / ``lora_up.weight`` and a
  scalar ``...q.alpha`` (scale alpha / r); ``lora_A`` / ``lora_B`` spellings too; ``.diff`` (a dense weight
  delta, torch layout) and ``.diff_b`` (a bias delta), as distilled LoRAs (LightX2V, CausVid) carry them.
  Top-level modules in Wan names (``text_embedding.0``, ``time_embedding.2``, ``time_projection.1``,
  ``head.head``).
- **kohya / musubi-tuner**: ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` / ``lora_up.weight`` /
  ``.alpha``: the Wan module names with dots as underscores.
A file or a directory (``pytorch_lora_weights.safetensors``, ``adapter_model.safetensors`` or the one
``*.safetensors`` in it); ``.pt`` / ``.bin`` files need torch. Every key must map onto a parameter of the
model with the right shape, else :class:`~kaleido_jax.convert.common.ConversionError` names the keys.

Writing (:func:`save_peft_lora`): the adapters of a LoRA-trained model as diffusers' pipeline LoRA file
(``pytorch_lora_weights.safetensors``, ``transformer.``-prefixed PEFT keys, LoraConfig metadata), which
``WanTransformer3DModel.load_lora_adapter(dir, prefix="transformer")`` and ``WanPipeline.load_lora_weights``
load, and which :func:`load_lora` reads back.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any, Sequence

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from kaleido_jax import storage
from kaleido_jax.convert import common
from kaleido_jax.convert import transformer_plan as tf_conv
from kaleido_jax.model import lora as lora_lib

LORA_FILE = "pytorch_lora_weights.safetensors"     # diffusers' LORA_WEIGHT_NAME_SAFE
PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"             # diffusers' LORA_ADAPTER_METADATA_KEY
PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.", "model.diffusion_model.", "model.")
KOHYA_PREFIX = "lora_unet_"
_SUFFIXES = (  # (suffix, role)
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
    (".lora_up.weight", "up"), (".lora_B.bias", "diff_b"), (".alpha", "alpha"), (".diff_b", "diff_b"),
    (".diff", "diff"),
)


def _module_table(num_layers: int) -> dict[str, tuple[str, int | None, str]]:
  """Every module name a LoRA may use (diffusers and Wan spellings) -> (our parameter group, layer, kind).

  kind 'linear': the group holds kernel / bias; 'vector': the group is the path of a 1-D or table parameter
  (norm scales, modulation tables; only dense diffs apply).
  """
  table: dict[str, tuple[str, int | None, str]] = {}
  for fmt in ("diffusers", "wan"):
    for i in range(num_layers):
      for ours, theirs in tf_conv.BLOCK_LINEARS[fmt].items():
        table[f"blocks.{i}.{theirs}"] = (f"blocks/{ours}", i, "linear")
      for ours, theirs in tf_conv.BLOCK_VECTORS[fmt].items():
        module = theirs.rsplit(".", 1)[0] if theirs.endswith((".weight", ".bias")) else theirs
        group = ours.rsplit("/", 1)[0] if ours.endswith("/scale") else ours.replace("_scale", "").replace("_bias", "")
        table.setdefault(f"blocks.{i}.{module}", (f"blocks/{group}", i, "vector"))
    for ours, theirs in tf_conv.TOP[fmt].items():
      if ours not in ("patch", "head_table"):
        table[theirs] = (ours, None, "linear")
  return table


def _vector_leaf(group: str, role: str) -> str:
  """Our leaf for a dense diff on a block vector group ('blocks/self_attn/norm_q', 'blocks/norm2', ...)."""
  if group.endswith(("norm_q", "norm_k")):
    return f"{group}/scale"
  if group == "blocks/norm2":
    return "blocks/norm2_bias" if role == "diff_b" else "blocks/norm2_scale"
  return group  # blocks/scale_shift_table


def _split_key(key: str, kohya: dict[str, str]) -> tuple[str, str] | None:
  """(module name in diffusers / Wan spelling, role) of a file key, or None when it is not a LoRA key."""
  for suffix, role in _SUFFIXES:
    if key.endswith(suffix):
      module = key[: -len(suffix)]
      break
  else:
    return None
  if module.startswith(KOHYA_PREFIX):
    return (kohya.get(module[len(KOHYA_PREFIX):], module), role)
  for prefix in PREFIXES:
    if module.startswith(prefix):
      module = module[len(prefix):]
      break
  return module, role


def resolve_file(path: str) -> str:
  """The LoRA weights file of ``path`` (a file, or a diffusers / PEFT / single-file directory)."""
  if not storage.exists(path):
    raise common.ConversionError(f"LoRA {path!r} does not exist; check the path (sample.loras='PATH:SCALE')")
  path = storage.fetched(path)  # safetensors reads local files: a bucket's are downloaded first
  if os.path.isfile(path):
    return path
  for name in (LORA_FILE, PEFT_FILE):
    if os.path.exists(os.path.join(path, name)):
      return os.path.join(path, name)
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(files) == 1:
    return os.path.join(path, files[0])
  raise common.ConversionError(f"LoRA directory {path!r} holds {len(files)} .safetensors files and neither "
                               f"{LORA_FILE} nor {PEFT_FILE}; pass the file itself")


def _config_alphas(file: str) -> dict[str, Any]:
  """LoraConfig fields from the file's diffusers metadata or a sibling adapter_config.json ({} if neither)."""
  cfg: dict[str, Any] = {}
  if file.endswith(".safetensors"):
    with safe_open(file, framework="np") as f:
      raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw:
      meta = json.loads(raw)
      cfg = {k.removeprefix("transformer."): v for k, v in meta.items()
             if k.startswith("transformer.") or "." not in k}
  sibling = os.path.join(os.path.dirname(file), PEFT_CONFIG)
  if not cfg and os.path.exists(sibling):
    with open(sibling) as fh:
      cfg = json.load(fh)
  return cfg


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
  """PEFT's alpha_pattern / rank_pattern: the value of the first pattern matching the module's name."""
  for pattern, value in (patterns or {}).items():
    if re.fullmatch(rf"(.*\.)?{pattern}", module):
      return value
  return default


def read_lora(path: str, num_layers: int) -> list[lora_lib.Update]:
  """The :class:`~kaleido_jax.model.lora.Update` list of a LoRA file in any supported layout."""
  file = resolve_file(path)
  try:
    reader = common.CheckpointReader(file)
  except (FileNotFoundError, OSError) as e:
    raise common.ConversionError(f"LoRA {path!r} cannot be read: {e}") from e
  # Block indices the file names (a deeper model's LoRA then fails as "block N does not exist", not as unknown keys).
  indices = [int(m) for k in reader.keys() for m in re.findall(r"blocks[._](\d+)[._]", k)]
  table = _module_table(max([num_layers] + [i + 1 for i in indices]))
  kohya = {name.replace(".", "_"): name for name in table}
  peft_cfg = _config_alphas(file)
  modules: dict[str, dict[str, str]] = {}
  unknown: list[str] = []
  for key in reader.keys():
    split = _split_key(key, kohya)
    if split is None or split[0] not in table:
      unknown.append(key)
      continue
    modules.setdefault(split[0], {})[split[1]] = key
  if unknown:
    raise common.ConversionError(
        f"LoRA {path!r}: {len(unknown)} keys map onto no layer of this model: {common._short(unknown, 6)} "
        "(readable: diffusers/PEFT 'transformer.blocks.N.attn1.to_q.lora_A.weight', Wan/ComfyUI "
        "'diffusion_model.blocks.N.self_attn.q.lora_down.weight', kohya 'lora_unet_blocks_N_self_attn_q.lora_down."
        "weight'); is it a LoRA for another model (image-to-video, Wan 2.2)?")
  updates: list[lora_lib.Update] = []
  for module, roles in sorted(modules.items()):
    group, layer, kind = table[module]
    if kind == "vector":
      for role in ("diff", "diff_b"):
        if role in roles:
          updates.append(lora_lib.Update(_vector_leaf(group, role), layer, dense=reader.get(roles[role]),
                                         source=f"{path}: {roles[role]}"))
      if set(roles) - {"diff", "diff_b"}:
        raise common.ConversionError(f"LoRA {path!r}: {module} is a norm / table parameter; only dense .diff "
                                     f"deltas apply to it, but the file has {sorted(roles)}")
      continue
    if ("down" in roles) != ("up" in roles):
      have = roles.get("down") or roles.get("up")
      raise common.ConversionError(f"LoRA {path!r}: {have} has no matching "
                                   f"{'lora_up / lora_B' if 'down' in roles else 'lora_down / lora_A'}")
    if "down" in roles:
      down_t, up_t = reader.get(roles["down"]), reader.get(roles["up"])  # (r, din), (dout, r)
      if down_t.ndim != 2 or up_t.ndim != 2:
        raise common.ConversionError(f"LoRA {path!r}: {roles['down']} is {down_t.shape}; only linear LoRAs apply")
      rank = down_t.shape[0]
      if "alpha" in roles:
        alpha, rslora = float(np.asarray(reader.get(roles["alpha"])).reshape(())), False
      else:
        rank_cfg = int(_pattern_value(peft_cfg.get("rank_pattern"), module, peft_cfg.get("r", rank)))
        alpha = float(_pattern_value(peft_cfg.get("alpha_pattern"), module, peft_cfg.get("lora_alpha", rank_cfg)))
        rslora = bool(peft_cfg.get("use_rslora", False))
      updates.append(lora_lib.Update(f"{group}/kernel", layer, down=np.ascontiguousarray(down_t.T),
                                     up=np.ascontiguousarray(up_t.T), scale=lora_lib.lora_scale(alpha, rank, rslora),
                                     source=f"{path}: {roles['down']}"))
    if "diff" in roles:
      updates.append(lora_lib.Update(f"{group}/kernel", layer, dense=common.linear_weight(reader.get(roles["diff"])),
                                     source=f"{path}: {roles['diff']}"))
    if "diff_b" in roles:
      updates.append(lora_lib.Update(f"{group}/bias", layer, dense=reader.get(roles["diff_b"]),
                                     source=f"{path}: {roles['diff_b']}"))
  if not updates:
    raise common.ConversionError(f"LoRA {path!r} holds no LoRA tensors")
  deep = [u for u in updates if u.layer is not None and u.layer >= num_layers]
  if deep:
    raise common.ConversionError(f"LoRA {path!r}: {deep[0].source.split(': ', 1)[-1]} is for block {deep[0].layer}, "
                                 f"which does not exist (the model has {num_layers} blocks); this LoRA is for a "
                                 "deeper model")
  return updates


def parse_spec(spec: str) -> tuple[str, float]:
  """'path' or 'path:scale' (sample.loras entries) -> (path, scale)."""
  path, sep, tail = spec.rpartition(":")
  if sep:
    try:
      return path, float(tail)
    except ValueError:
      pass
  return spec, 1.0


def check_specs(specs: Sequence[str]) -> list[tuple[str, float]]:
  """The parsed sample.loras entries; a missing file is a ConversionError naming it."""
  out = []
  for spec in specs:
    path, scale = parse_spec(spec)
    resolve_file(path)
    out.append((path, scale))
  return out


def merge_loras_into_state(pure: dict, specs: Sequence[str], num_layers: int) -> dict:
  """Every 'path[:scale]' of ``specs`` merged into a pure KaleidoDiT state (float or quantized), in order."""
  for path, scale in check_specs(specs):
    try:
      lora_lib.merge_state(pure, read_lora(path, num_layers), scale, num_layers=num_layers)
    except lora_lib.LoRAMismatch as e:
      raise common.ConversionError(f"LoRA {path!r} does not fit the model: {e}") from e
  return pure


def load_lora(model, path: str, scale: float = 1.0):
  """``model`` (a KaleidoDiT, float or quantized) with the LoRA at ``path`` merged in at ``scale``; in place."""
  num_layers = int(model.config.num_layers)
  try:
    return lora_lib.merge(model, read_lora(path, num_layers), scale)
  except lora_lib.LoRAMismatch as e:
    raise common.ConversionError(f"LoRA {path!r} does not fit the model: {e}") from e


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def peft_state_dict(updates: Sequence[lora_lib.Update], prefix: str = "transformer.") -> dict[str, np.ndarray]:
  """diffusers / PEFT keys (``{prefix}blocks.N.attn1.to_q.lora_A.weight``) of low-rank block updates."""
  names = tf_conv.BLOCK_LINEARS["diffusers"]
  out = {}
  for u in updates:
    rel = u.leaf[len("blocks/"):-len("/kernel")]
    module = f"{prefix}blocks.{u.layer}.{names[rel]}"
    out[f"{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(u.down, np.float32).T)
    out[f"{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(u.up, np.float32).T)
  return out


def save_peft_lora(model, directory: str, *, alpha: float | None = None) -> str:
  """Writes the LoRA-trained ``model``'s adapters as diffusers' pipeline LoRA file; returns its path."""
  updates = lora_lib.adapter_weights(model)
  if not updates:
    raise ValueError("the model has no LoRA adapters (train.lora.rank = 0 trains the full model)")
  rank = int(updates[0].down.shape[1])
  alpha = float(alpha if alpha is not None else updates[0].scale * rank)
  names = tf_conv.BLOCK_LINEARS["diffusers"]
  targets = sorted({names[u.leaf[len("blocks/"):-len("/kernel")]] for u in updates})
  config = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
            "use_rslora": False, "use_dora": False, "init_lora_weights": True}
  metadata = {"format": "pt", METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()},
                                                        sort_keys=True)}
  storage.path(directory).mkdir(parents=True, exist_ok=True)
  out = storage.join(directory, LORA_FILE)
  with tempfile.TemporaryDirectory() as tmp:  # safetensors writes local files; upload() is atomic locally
    save_file(peft_state_dict(updates), os.path.join(tmp, LORA_FILE), metadata=metadata)
    storage.upload(os.path.join(tmp, LORA_FILE), out)
  return out
