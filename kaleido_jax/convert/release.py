"""Released Kaleido, whole: ``python -m kaleido_jax.convert --format kaleido --input RELEASE_DIR --output OUT``.

The released folder (Hugging Face ``Crilias/Kaleido-14B-S2V`` after its ``merge_kaleido.py``, as upstream's README
arranges it) holds the DiT as a SAT / DeepSpeed run (``model/latest`` + ``model/<step>/mp_rank_00_model_states.pt``,
or an FSDP2 ``fsdp2_rank_0000_checkpoint.pt``), the VAE as Wan's ``Wan2.1_VAE.pth`` and umT5 in Wan's layout
(``umt5-xxl/``: the encoder ``.pth`` and the ``google/umt5-xxl`` tokenizer). One command converts the three:

  OUT/transformer   the DiT (``--quantization int8 | int4 | fp8`` writes it quantized)
  OUT/vae           the VAE (float)
  OUT/text_encoder  umT5 (int8 / fp8 with the DiT's scheme; int8 for an int4 DiT) and its ``spiece.model``
  OUT/release.json  what was converted from where

``--mode sample --checkpoint OUT`` (or ``init_from.transformer=OUT``) then reads all three: :func:`apply` points
``init_from`` and the tokenizer at them.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import ml_collections

from kaleido_jax import storage
from kaleido_jax.convert import text_encoder as conv_te
from kaleido_jax.convert import transformer as conv_tf
from kaleido_jax.convert import vae as conv_vae

MARKER = "release.json"
PARTS = ("transformer", "vae", "text_encoder")
VAE_NAMES = ("Wan2.1_VAE.pth", "*VAE*.pth", "*vae*.pth")
# umT5's scheme for the DiT's --quantization: int4 costs umT5 26% relative error (README's quantization table),
# so an int4 DiT gets an int8 umT5 (the one-chip v5e setting).
TEXT_ENCODER_SCHEME = {"none": "none", "int8": "int8", "fp8": "fp8", "int4": "int8"}


def is_release(path: str) -> bool:
  """A released Kaleido folder (its DiT run directory and VAE file beside each other)."""
  if not path or not storage.exists(path):
    return False
  path = storage.fetched(path)  # a bucket's files are read locally (downloaded once per process)
  return os.path.isdir(os.path.join(path, "model")) and _find(path, VAE_NAMES) is not None


def is_converted_release(path: str) -> bool:
  return bool(path) and storage.path(storage.join(path, MARKER)).is_file()


def _find(root: str, patterns: tuple[str, ...], recursive: bool = False) -> str | None:
  for pattern in patterns:
    hits = sorted(glob.glob(os.path.join(root, "**" if recursive else "", pattern), recursive=recursive))
    if hits:
      return hits[0]
  return None


def locate(release_dir: str) -> dict[str, str]:
  """The release's files: DiT run directory, VAE .pth, umT5 encoder .pth and tokenizer (FileNotFoundError naming
  what is missing)."""
  umt5 = os.path.join(release_dir, "umt5-xxl")
  found = {"transformer": os.path.join(release_dir, "model"), "vae": _find(release_dir, VAE_NAMES),
           "text_encoder": _find(umt5, ("*.pth",), recursive=True) if os.path.isdir(umt5) else None,
           "tokenizer": _find(umt5, ("spiece.model",), recursive=True) if os.path.isdir(umt5) else None}
  missing = [k for k, v in found.items() if not v or not os.path.exists(v)]
  if missing:
    raise FileNotFoundError(
        f"{release_dir!r} is not a complete Kaleido release: no {', '.join(missing)} found (expected model/, "
        "Wan2.1_VAE.pth and umt5-xxl/ with the encoder .pth and spiece.model, as upstream's README arranges it)")
  return found


def convert_release(release_dir: str, output_dir: str, quantization: str = "none", *,
                    model: ml_collections.ConfigDict | None = None, vae: ml_collections.ConfigDict | None = None,
                    text_encoder: ml_collections.ConfigDict | None = None) -> str:
  """Converts the three parts into ``output_dir`` (refused if it exists; a part that fails leaves nothing).

  The architectures default to the release's: the DiT's and umT5's read off their tensor shapes, the VAE is the
  Wan2.1 VAE (its .pth carries no config); ``model`` / ``vae`` / ``text_encoder`` give others (tests' tiny ones).
  """
  source = storage.absolute(release_dir)
  files = locate(storage.fetched(release_dir))  # the release's .pth / DeepSpeed files are read locally
  with storage.atomic_dir(output_dir) as tmp:  # refused if it exists; a part that fails leaves nothing
    conv_tf.convert(files["transformer"], os.path.join(tmp, "transformer"), "kaleido", quantization, model)
    conv_vae.convert(files["vae"], os.path.join(tmp, "vae"), "wan", vae)
    conv_te.convert(files["text_encoder"], os.path.join(tmp, "text_encoder"), "wan", text_encoder,
                    quantization=TEXT_ENCODER_SCHEME[quantization])
    shutil.copyfile(files["tokenizer"], os.path.join(tmp, "text_encoder", "spiece.model"))
    with open(os.path.join(tmp, MARKER), "w") as fh:
      json.dump({"source": source, "files": files, "quantization": quantization,
                 "parts": list(PARTS)}, fh, indent=2)
  return output_dir


def apply(config: ml_collections.ConfigDict, path: str) -> bool:
  """Points ``config.init_from`` (all three parts) and the tokenizer at a converted release; False if ``path`` is
  not one. The tokenizer and any part the user set to something else already are kept."""
  if not is_converted_release(path):
    return False
  init = config.init_from
  init.transformer = storage.join(path, "transformer")
  for part, fmt in (("vae", "diffusers"), ("text_encoder", "transformers")):
    if not init[part]:
      init[part], init[f"{part}_format"] = storage.join(path, part), fmt  # converted dirs load in any format
  if not config.text_encoder.tokenizer_path:
    config.text_encoder.tokenizer_path = storage.join(path, "text_encoder", "spiece.model")
  return True
