"""``python -m kaleido_jax.convert --component C --format F --input PATH --output DIR [--quantization int8]``.

``--format kaleido --input RELEASE_DIR`` (the released Kaleido folder: model/, Wan2.1_VAE.pth, umt5-xxl/) converts
its DiT, VAE and umT5 in one command into the layout ``--mode sample --checkpoint DIR`` reads (convert/release.py).

Writes an orbax checkpoint of the component's NNX state plus its config (atomically: an interrupted or
failed conversion leaves no output directory). Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from kaleido_jax.convert import release
from kaleido_jax.convert import transformer
from kaleido_jax.convert import vae
from kaleido_jax.convert import text_encoder

COMPONENTS = {
    "transformer": ("diffusers", "wan", "kaleido"),
    "vae": ("diffusers", "wan"),
    "text_encoder": ("transformers", "wan"),
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m kaleido_jax.convert", description=__doc__)
  p.add_argument("--component", choices=sorted(COMPONENTS), default="transformer")
  p.add_argument("--format", required=True, help="diffusers | wan | kaleido (transformer); diffusers | wan "
                 "(vae); transformers | wan (text_encoder)")
  p.add_argument("--input", required=True, help="checkpoint file or directory")
  p.add_argument("--output", required=True, help="new directory for the converted checkpoint")
  p.add_argument("--quantization", default="none", choices=("none", "int8", "int4", "fp8"),
                 help="write the layers' linears quantized (transformer, text_encoder; model/quantization.py)")
  p.add_argument("--dtype", default=None, help="text_encoder parameter dtype, e.g. bfloat16 (default: float32)")
  p.add_argument("--dry_run", action="store_true", help="check the arguments, say what would be converted, stop")
  return p.parse_args(argv)


def convert(args: argparse.Namespace) -> str:
  """One conversion (the library's `convert` of the component); prints what it wrote and returns the directory."""
  quantization = getattr(args, "quantization", None) or "none"
  if args.component == "transformer" and args.format == "kaleido":
    if release.is_release(args.input):  # the whole released folder: DiT, VAE and umT5 in one command
      out = release.convert_release(args.input, args.output, quantization)
      print(f"wrote {out} (transformer, vae, text_encoder; sample with --checkpoint {out})")
      return out
  if args.component == "transformer":
    out, cfg = transformer.convert(args.input, args.output, args.format, quantization)
    print(f"wrote {out} ({cfg.num_layers} layers, dim {cfg.num_heads * cfg.head_dim})")
  elif args.component == "vae":
    out = vae.convert(args.input, args.output, args.format)
    print(f"wrote {out}")
  else:
    out = text_encoder.convert(args.input, args.output, args.format, dtype=getattr(args, "dtype", None),
                               quantization=quantization)
    print(f"text_encoder ({args.format}) {args.input} -> {out}")
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  formats = COMPONENTS[args.component]
  if args.format not in formats:
    print(f"error: --format {args.format} is not a {args.component} format; choose one of {formats}",
          file=sys.stderr)
    return 2
  if args.quantization != "none" and args.component == "vae":
    print("error: --quantization applies to the transformer and the text_encoder, not the vae (its convolutions "
          "stay float); drop --quantization", file=sys.stderr)
    return 2
  if args.dry_run:
    print(f"dry run: {args.component} ({args.format}) {args.input} -> {args.output}")
    return 0
  try:
    convert(args)
  except (FileNotFoundError, FileExistsError, ValueError) as e:  # ConversionError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
