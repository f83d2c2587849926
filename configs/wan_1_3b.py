"""Wan2.1-T2V-1.3B architecture with Kaleido references (for fine-tuning a 1.3B S2V model)."""

from kaleido_jax import config as kcfg


def get_config():
  config = kcfg.base_config()
  config.model = kcfg.model_config(**kcfg.WAN_1_3B, dtype='bfloat16', remat_policy='offload')
  config.data.update(num_frames=81, height=480, width=832, max_refs=3, source='tfds',
                     precomputed_latents=True)
  config.mesh.update(data=1, fsdp=-1)
  config.sample.update(shift=5.0, guidance_scale=5.0)
  return config
