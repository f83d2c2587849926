"""VAE converter: the original Wan2.1 .pth layout loads to the same model; bad checkpoints fail clearly."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from kaleido_jax import config as kcfg
from kaleido_jax.convert import common
from kaleido_jax.convert import vae as convert_vae

pytestmark = pytest.mark.torch

KW = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
          temperal_downsample=[False, True])


@pytest.fixture(scope="module")
def ref():
  import torch
  from diffusers import AutoencoderKLWan
  torch.manual_seed(3)
  return AutoencoderKLWan(**KW, latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()


def _cfg():
  return kcfg.vae_config(base_dim=4, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1,
                         temporal_downsample=(False, True), latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)


def test_wan_pth_layout_matches_diffusers(tmp_path, ref):
  import torch
  cfg = _cfg()
  wan = {convert_vae.wan_key(k, cfg): v for k, v in ref.state_dict().items()}
  # The facts from the release layout: flat decoder upsamples, head.0 / head.2, middle.1 attention.
  assert "decoder.upsamples.2.resample.1.weight" in wan and "encoder.head.2.weight" in wan
  assert "decoder.middle.1.to_qkv.weight" in wan and "conv1.weight" in wan and "conv2.bias" in wan
  path = str(tmp_path / "Wan2.1_VAE.pth")
  torch.save(wan, path)
  ours = convert_vae.load_vae(path, "wan", cfg)
  video = np.random.default_rng(0).uniform(-1, 1, (1, 5, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    expected = ref.encode(torch.from_numpy(video.transpose(0, 4, 1, 2, 3).copy())).latent_dist.mean
  got = np.asarray(ours.encode(jnp.asarray(video)))
  np.testing.assert_allclose(got, expected.numpy().transpose(0, 2, 3, 4, 1), atol=1e-4)


def test_cli_and_wrong_checkpoint(tmp_path, ref):
  src = str(tmp_path / "vae")
  ref.save_pretrained(src, safe_serialization=True)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = tmp_path / "converted"
  subprocess.run([sys.executable, "-m", "kaleido_jax.convert", "--component", "vae", "--format", "diffusers",
                  "--input", src, "--output", str(out)], check=True, capture_output=True, env=env)
  assert convert_vae.load_vae(str(out)).config.base_dim == 4
  bigger = _cfg()
  bigger.base_dim = 8
  with pytest.raises(common.ConversionError, match="expected shape"):
    convert_vae.convert_state(src, "diffusers", bigger)
