"""WanVAE equals diffusers' AutoencoderKLWan (encode mean, decode); chunked and tiled decoding agree."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kaleido_jax import config as kcfg
from kaleido_jax.convert import vae as convert_vae
from kaleido_jax.model.vae import WanVAE

CONFIGS = [
    dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[], temperal_downsample=[True]),
    dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
         temperal_downsample=[False, True]),
    dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=2, attn_scales=[],
         temperal_downsample=[False, True, True]),
]


def _diffusers(cfg, seed):
  import torch
  from diffusers import AutoencoderKLWan
  torch.manual_seed(seed)
  model = AutoencoderKLWan(**cfg, latents_mean=[0.0] * cfg["z_dim"], latents_std=[1.0] * cfg["z_dim"]).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "gamma" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module", params=range(len(CONFIGS)))
def pair(request, tmp_path_factory):
  cfg = CONFIGS[request.param]
  ref = _diffusers(cfg, request.param)
  path = str(tmp_path_factory.mktemp("vae") / "ckpt")
  ref.save_pretrained(path, safe_serialization=True)
  return ref, convert_vae.load_vae(path), request.param


@pytest.mark.torch
@pytest.mark.parametrize("frames,h,w", [(1, 16, 24), (5, 16, 16), (9, 24, 16)])
def test_encode_and_decode_match_diffusers(pair, frames, h, w):
  import torch
  ref, ours, case = pair
  rng = np.random.default_rng(case)
  video = rng.uniform(-1, 1, size=(1, frames, h, w, 3)).astype(np.float32)
  with torch.no_grad():
    t_video = torch.from_numpy(video.transpose(0, 4, 1, 2, 3).copy())
    mean = ref.encode(t_video).latent_dist.mean
    dec = ref.decode(mean).sample
  expected_mean = mean.numpy().transpose(0, 2, 3, 4, 1)
  got_mean = np.asarray(ours.encode(jnp.asarray(video)))
  assert got_mean.shape == expected_mean.shape == (1,) + ours.latent_shape(frames, h, w)
  assert np.abs(got_mean - expected_mean).max() < 1e-4 * max(1, np.abs(expected_mean).max())
  got = np.asarray(ours.decode(jnp.asarray(expected_mean)))
  expected = dec.numpy().transpose(0, 2, 3, 4, 1)
  assert got.shape == expected.shape == video.shape
  assert np.abs(got - expected).max() < 1e-4


@pytest.mark.torch
def test_plain_convolutions_match_diffusers(pair):
  # vae.cpu_kernels='off': the program TPUs and GPUs run (one 3D conv per causal conv, no frame groups),
  # here on the CPU, against the same reference and tolerance as the CPU rewrite above.
  import torch
  ref, ours, case = pair
  cfg = ours.config.copy_and_resolve_references()
  cfg.cpu_kernels = "off"
  plain = WanVAE(cfg, rngs=nnx.Rngs(0))
  nnx.update(plain, nnx.state(ours))
  video = np.random.default_rng(case).uniform(-1, 1, size=(1, 9, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    mean = ref.encode(torch.from_numpy(video.transpose(0, 4, 1, 2, 3).copy())).latent_dist.mean
    dec = ref.decode(mean).sample
  expected_mean = mean.numpy().transpose(0, 2, 3, 4, 1)
  assert np.abs(np.asarray(plain.encode(jnp.asarray(video))) - expected_mean).max() < 1e-4 * max(
      1, np.abs(expected_mean).max())
  got = np.asarray(plain.decode(jnp.asarray(expected_mean)))
  assert np.abs(got - dec.numpy().transpose(0, 2, 3, 4, 1)).max() < 1e-4


def test_chunked_decode_equals_one_step_decode():
  cfg = kcfg.vae_config(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1,
                        temporal_downsample=(False, True), latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
  vae = WanVAE(cfg, rngs=nnx.Rngs(0))
  z = jnp.asarray(np.random.default_rng(0).normal(size=(1, 5, 4, 4, 4)).astype(np.float32))
  one = vae.decode(z, chunk_frames=1)
  many = vae.decode(z, chunk_frames=4)
  np.testing.assert_allclose(one, many, atol=1e-5)
  assert one.shape == (1, 9, 16, 16, 3)


def test_tiled_decode_agrees_with_untiled():
  cfg = kcfg.vae_config(base_dim=4, z_dim=4, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,),
                        latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
  vae = WanVAE(cfg, rngs=nnx.Rngs(1))
  z = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 12, 24, 4)).astype(np.float32) * 0.3)
  full = np.asarray(vae.decode(z))
  # One tile covering the frame is exactly the untiled decode.
  np.testing.assert_allclose(vae.decode(z, tile_size=64, tile_overlap=16), full, atol=1e-6)
  # Two overlapping tiles: each tile's mid-block attention sees only its own pixels, so a *random* VAE
  # differs near the seam. Stated tolerance, measured here: mean |error| 0.046 against a mean |signal| of
  # 0.33 (max 0.40); the test allows 0.06 / 20% of the signal.
  tiled = np.asarray(vae.decode(z, tile_size=32, tile_overlap=16))
  assert tiled.shape == full.shape
  err = np.abs(tiled - full).mean()
  assert err < 0.06 and err < 0.2 * np.abs(full).mean()


def test_normalize_round_trip_and_bad_shapes():
  cfg = kcfg.vae_config(base_dim=4, z_dim=4, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,),
                        latents_mean=(0.5, -1.0, 0.0, 2.0), latents_std=(2.0, 1.0, 0.5, 3.0))
  vae = WanVAE(cfg, rngs=nnx.Rngs(0))
  z = jnp.ones((1, 1, 2, 2, 4))
  np.testing.assert_allclose(vae.denormalize(vae.normalize(z)), z, atol=1e-6)
  with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
    vae.encode(jnp.zeros((1, 4, 16, 16, 3)))
