"""Tiny CPU demo: trains a tiny Kaleido DiT on synthetic cross-paired latents in about a minute.

This is the embedded default of `python -m kaleido_jax.main --config configs/demo.py --workdir DIR`: it
writes TensorBoard logs and orbax checkpoints under DIR. (The end-to-end demo that also samples videos and
evaluates them is the `demo` mode of the sampling issue; until it lands the default mode is `train`.)
"""

from kaleido_jax import config as kcfg


def get_config():
  config = kcfg.base_config()
  config.mode = 'train'
  config.model = kcfg.model_config(
      num_heads=2, head_dim=32, ffn_dim=256, num_layers=2, in_channels=4, out_channels=4,
      text_dim=32, freq_dim=32)
  config.vae = kcfg.vae_config(base_dim=8, z_dim=4, dim_mult=(1, 2), num_res_blocks=1,
                               temporal_downsample=(True,), latents_mean=(0.0,) * 4,
                               latents_std=(1.0,) * 4)
  config.text_encoder = kcfg.text_encoder_config(vocab_size=512, d_model=32, d_kv=8, d_ff=64,
                                                 num_layers=2, num_heads=4, max_length=32)
  config.data.update(num_frames=9, height=32, width=32, num_identities=16, num_clips=128,
                     heldout_identities=4, batch_size=4)
  config.train.update(num_steps=300, learning_rate=3e-4, schedule='warmup_constant', warmup_steps=20,
                      weight_decay=0.0, grad_clip=1.0, log_every=20, checkpoint_every=100)
  config.sample.update(num_steps=20, shift=3.0, guidance_scale=3.0, num_frames=9, height=32, width=32,
                       fps=8)
  return config
