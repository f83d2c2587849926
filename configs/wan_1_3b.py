"""Wan2.1-T2V-1.3B architecture with Kaleido references (for fine-tuning a 1.3B S2V model).

Made for a v5e-8 (`TPU_SLICE`): fsdp 8, a sample per chip (global batch 8); it validates there as shipped
(`python -m kaleido_jax.tools.aot --config configs/wan_1_3b.py --topology v5e:2x4`).
"""

from kaleido_jax import config as kcfg

TPU_SLICE = 'v5e:2x4'  # v5e-8 (tests/test_configs.py validates the config there as shipped)


def get_config():
  config = kcfg.base_config()
  config.model = kcfg.model_config(**kcfg.WAN_1_3B, dtype='bfloat16', remat_policy='offload')
  config.data.update(num_frames=81, height=480, width=832, max_refs=3, source='tfds',
                     precomputed_latents=True, batch_size=8)
  config.mesh.update(data=1, fsdp=-1)
  # Wan's own sampling (its negative prompt, 480x832), on diffusers' Euler grid.
  config.sample.update(solver='euler', shift=5.0, guidance_scale=5.0, negative_prompt=kcfg.WAN_NEGATIVE_PROMPT,
                       height=480, width=832)
  return config
