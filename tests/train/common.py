"""Shared tiny training config for trainer tests.

`real_dit=True`: the real KaleidoDiT at demo size (2 layers, d=64) — used where the model matters (sharded
equivalence, loss decrease, AOT). Otherwise the TinyDiT stand-in (same call contract and logical axis
names, ~4x faster to compile) for the loop mechanics (checkpoints, signals, processes).
"""

from configs import demo


def tiny_config(real_dit=False, **train):
  config = demo.get_config()
  config.mode = 'train'
  config.train.model_factory = ('kaleido_jax.model.dit:KaleidoDiT' if real_dit
                                else 'tests.train.tiny_model:TinyDiT')
  config.data.update(batch_size=8, num_frames=5, height=16, width=16, max_refs=2)
  config.mesh.update(data=-1, fsdp=1, context=1, tensor=1)
  config.train.update(num_steps=8, log_every=4, checkpoint_every=4, async_checkpointing=True,
                      learning_rate=1e-3, warmup_steps=2, input='synthetic_latents', schedule='warmup_constant')
  # synthetic_latents batches carry no subject masks, so the demo's subject-balanced loss is off here.
  config.diffusion.subject_loss_weight = 0.0
  config.train.update(train)
  return config
