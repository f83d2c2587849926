"""Shared tiny training config for trainer tests (TinyDiT stand-in unless the real DiT is asked for)."""

import os

from configs import demo


def tiny_config(**train):
  config = demo.get_config()
  config.mode = 'train'
  config.train.model_factory = os.environ.get('KALEIDO_TEST_MODEL', 'tests.train.tiny_model:TinyDiT')
  config.data.update(batch_size=8, num_frames=5, height=16, width=16, max_refs=2)
  config.mesh.update(data=-1, fsdp=1, context=1, tensor=1)
  config.train.update(num_steps=8, log_every=4, checkpoint_every=4, async_checkpointing=True,
                      learning_rate=1e-3, warmup_steps=2)
  config.train.update(train)
  return config
