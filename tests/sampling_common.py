"""Tiny configs and helpers shared by the pipeline / CLI / export / eval / demo tests."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from configs import demo
from kaleido_jax import config as kcfg


def tiny_config(codec: str = 'pixel', **sample):
  """The demo config shrunk: 2 layers, 16x16 pixels (pixel codec) or a 2-level Wan VAE, 2 sampler steps."""
  config = demo.get_config()
  config.model.update(num_layers=2, num_heads=2, head_dim=16, ffn_dim=64)
  config.vae.pixel_downsample = 1  # latents are the 16x16 pixels themselves
  if codec == 'wan':
    config.vae = kcfg.vae_config(base_dim=8, z_dim=4, dim_mult=(1, 2), num_res_blocks=1,
                                 temporal_downsample=(True,), latents_mean=(0.1,) * 4, latents_std=(0.5,) * 4)
    config.model.update(patch_size=(1, 2, 2), in_channels=4, out_channels=4)
  config.data.update(num_frames=5, height=16, width=16, num_clips=16, heldout_clips=8, num_identities=24,
                     heldout_identities=4, batch_size=2)
  config.sample.update(num_steps=2, num_frames=5, height=16, width=16, guidance_scale=2.0)
  config.sample.update(sample)
  config.eval.update(num_videos=2, batch_size=2, save_videos=1)
  return config


def write_reference(path: str, colour=(200, 30, 30), size=(20, 14), mode: str = 'RGB') -> str:
  """A coloured square on white (or on transparency for RGBA) saved as an image file."""
  w, h = size
  arr = np.full((h, w, 3), 255, np.uint8)
  arr[h // 4:3 * h // 4, w // 4:3 * w // 4] = colour
  img = Image.fromarray(arr)
  if mode == 'RGBA':
    alpha = np.zeros((h, w), np.uint8)
    alpha[h // 4:3 * h // 4, w // 4:3 * w // 4] = 255
    img.putalpha(Image.fromarray(alpha))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
  return path
