"""Wan2.1 VAE speed and decode memory: kaleido_jax vs diffusers' AutoencoderKLWan, same machine, same run.

  python bench/vae.py [--frames 17] [--size 256] [--no-torch] [--no-memory]

Real architecture (base 96, z 16, mults 1-2-4-4, 2 res blocks), random weights, fp32, batch 1. Times are one
run each after a warm-up (compile) run. Peak memory of chunked (1 latent frame per jitted step, as the
reference) vs unchunked (all remaining latent frames in one step) decoding is each decode's process peak
RSS, measured in a fresh subprocess so the two do not share an allocator high-water mark.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from kaleido_jax import config as kcfg  # noqa: E402
from kaleido_jax.model.vae import WanVAE  # noqa: E402


def timed(fn):
  fn()
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def decode_worker(frames: int, size: int, chunk: int) -> None:
  vae = WanVAE(kcfg.vae_config(), rngs=nnx.Rngs(0))
  lat = vae.latent_shape(frames, size, size)
  z = np.random.default_rng(0).normal(size=(1,) + lat).astype(np.float32)
  jax.block_until_ready(vae.decode(z, chunk_frames=chunk))
  print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--frames", type=int, default=17)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--worker-chunk", type=int, default=0, help=argparse.SUPPRESS)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS decodes (two more full decodes)")
  args = p.parse_args()
  if args.worker_chunk:
    decode_worker(args.frames, args.size, args.worker_chunk)
    return
  jax.config.update("jax_default_matmul_precision", "highest")
  video = np.random.default_rng(0).uniform(-1, 1, (1, args.frames, args.size, args.size, 3)).astype(np.float32)
  vae = WanVAE(kcfg.vae_config(), rngs=nnx.Rngs(0))
  z = vae.encode(video)
  rows = [("kaleido_jax (jit per chunk)", timed(lambda: vae.encode(video)), timed(lambda: vae.decode(z)))]
  if not args.no_torch:
    import torch
    from diffusers import AutoencoderKLWan
    ref = AutoencoderKLWan().eval()
    tv = torch.from_numpy(video.transpose(0, 4, 1, 2, 3).copy())
    with torch.no_grad():
      tz = ref.encode(tv).latent_dist.mean

      def t_enc():
        return ref.encode(tv).latent_dist.mean

      def t_dec():
        return ref.decode(tz).sample
      rows.append(("diffusers eager", timed(t_enc), timed(t_dec)))
  print(f"\nWan2.1 VAE, {args.frames} x {args.size} x {args.size}, fp32, batch 1, {os.cpu_count()} CPU cores")
  print("| implementation | encode (s) | decode (s) | encode speed-up | decode speed-up |")
  print("|---|---|---|---|---|")
  base = rows[-1]
  for name, e, d in rows:
    print(f"| {name} | {e:.2f} | {d:.2f} | {base[1] / e:.2f}x | {base[2] / d:.2f}x |")
  if args.no_memory:
    return

  latent_frames = vae.latent_shape(args.frames, args.size, args.size)[0]
  mem = {}
  for label, chunk in (("chunked (1 latent frame / step)", 1), ("unchunked (all frames in one step)",
                                                                 max(1, latent_frames - 1))):
    out = subprocess.run([sys.executable, __file__, "--frames", str(args.frames), "--size", str(args.size),
                          "--worker-chunk", str(chunk)], capture_output=True, text=True, check=True)
    mem[label] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_gib"]
  print("\n| decode | process peak RSS (GiB) |\n|---|---|")
  for label, gib in mem.items():
    print(f"| {label} | {gib:.2f} |")


if __name__ == "__main__":
  main()
