"""``python -m kaleido_jax.convert --component C --format F --input PATH --output DIR [--quantization int8]``.

``--format kaleido --input RELEASE_DIR`` (the released Kaleido folder: model/, Wan2.1_VAE.pth, umt5-xxl/) converts
its DiT, VAE and umT5 in one command into the layout ``--mode sample --checkpoint DIR`` reads (convert/release.py).

Writes an orbax checkpoint of the component's NNX state plus its config (atomically: an interrupted or
failed conversion leaves no output directory). Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMPONENTS = {
    "transformer": ("kaleido_jax.convert.transformer", ("diffusers", "wan", "kaleido")),
    "vae": ("kaleido_jax.convert.vae", ("diffusers", "wan")),
    "text_encoder": ("kaleido_jax.convert.text_encoder", ("transformers", "wan")),
}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m kaleido_jax.convert", description=__doc__)
  p.add_argument("--component", choices=sorted(COMPONENTS), default="transformer")
  p.add_argument("--format", required=True, help="diffusers | wan | kaleido (transformer); diffusers | wan "
                 "(vae); transformers | wan (text_encoder)")
  p.add_argument("--input", required=True, help="checkpoint file or directory")
  p.add_argument("--output", required=True, help="new directory for the converted checkpoint")
  p.add_argument("--quantization", default="none", choices=("none", "int8", "int4", "fp8"),
                 help="write the layers' linears quantized (transformer, text_encoder; model/quantization.py)")
  args = p.parse_args(argv)
  module, formats = COMPONENTS[args.component]
  if args.format not in formats:
    print(f"error: --format {args.format} is not a {args.component} format; choose one of {formats}",
          file=sys.stderr)
    return 2
  if args.quantization != "none" and args.component == "vae":
    print("error: --quantization applies to the transformer and the text_encoder, not the vae (its convolutions "
          "stay float); drop --quantization", file=sys.stderr)
    return 2
  if args.component == "transformer" and args.format == "kaleido":
    from kaleido_jax.convert import release  # pylint: disable=g-import-not-at-top
    if release.is_release(args.input):  # the whole released folder: DiT, VAE and umT5 in one command
      module = "kaleido_jax.convert.release"
  try:
    importlib.import_module(module).convert_cli(args)
  except (FileNotFoundError, FileExistsError, ValueError) as e:  # ConversionError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
