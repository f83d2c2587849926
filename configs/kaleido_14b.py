"""Kaleido-14B (Wan2.1-T2V-14B + references + R-RoPE): the released architecture and fine-tune recipe.

Made for a v5p-8 (`TPU_SLICE`, 4 chips on one host): fsdp 4, a sample per chip (global batch 4), and it
validates there as shipped. Never instantiated on CPU: build it abstractly (`nnx.eval_shape`) or compile it
for its slice with `python -m kaleido_jax.tools.aot --config configs/kaleido_14b.py --topology v5p:2x2x1`.
Another slice: `--config.data.batch_size` a multiple of data * fsdp (and of the hosts), e.g. 8 on v5p-16.
"""

from kaleido_jax import config as kcfg

TPU_SLICE = 'v5p:2x2x1'  # v5p-8: what this config validates on as shipped (tests/test_configs.py)


def get_config():
  config = kcfg.base_config()
  # remat 'offload': each block's input waits in host memory for the backward (bench/train.py --aot: 480p + 3
  # refs on v5p-8 needs 78% of HBM this way, 101% with 'full'); attention 'auto' is splash on TPU.
  config.model = kcfg.model_config(**kcfg.WAN_14B, dtype='bfloat16', remat_policy='offload', attention='auto')
  # Training resolution of the public recipe: 480x832, 81 frames, <= 3 references.
  config.data.update(num_frames=81, height=480, width=832, max_refs=3, source='tfds',
                     precomputed_latents=True, batch_size=4)
  config.mesh.update(data=1, fsdp=-1)
  return config
