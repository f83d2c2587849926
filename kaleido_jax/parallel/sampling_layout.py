"""Where sampling puts things on the chips it runs on (`sample.layout = 'auto'`, what the released-model config
ships): the mesh, VAE tiles and umT5's device, chosen from the devices and their HBM.

- Mesh: one chip, no mesh axes. Several: the guidance branches over `data` (2 for text CFG, 3 with image
  guidance, when they divide the chips) and the tokens over `context` (the rest); the DiT's weights are sharded by
  their names over `context` too (model/sharding.py RULES: embed -> (context, fsdp)), so a v6e-8 holds a quarter
  of the bf16 14B DiT per chip, not all of it as `data=-1` (one replica per chip) did. `model.context_parallel`:
  ulysses when the heads divide over context, else ring. The AOT rows of bench/sample.py (720p v6e-8 data 2 x
  context 4) are this layout.
- VAE tiles (`vae.tile_size`, when unset): 256 px on a 16 GiB chip (v5e: a whole 512x896 frame's decode chunk
  needs 18.1 GiB), 512 px on a 32 GiB one (v6e, v4), whole frames on larger chips.
- umT5 on the host CPU on chips of 32 GiB or less: its 5.7B parameters never take HBM (prompts are encoded once
  each, kaleido_jax/encoders.py).
Weights' format (float, int8, int4) is not chosen here: a converted directory's own format wins (one line if the
config asks for another).
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections

from kaleido_jax.diffusion import guidance

# HBM per chip in GiB by `device_kind` (Cloud TPU documentation); CPUs and GPUs are left to the config.
HBM_GIB = {'TPU v5 lite': 16, 'TPU v5e': 16, 'TPU v6 lite': 32, 'TPU v6e': 32, 'TPU v4': 32, 'TPU v5': 95,
           'TPU v5p': 95}
LAYOUTS = ('config', 'auto')


def hbm_gib(device: Any) -> int | None:
  return HBM_GIB.get(getattr(device, 'device_kind', ''))


def apply(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> dict[str, Any]:
  """Sets `config`'s mesh, VAE tiles and umT5 device for `devices` when `sample.layout == 'auto'`; returns what
  it chose (empty when the layout is the config's)."""
  layout = config.sample.get('layout', 'config')
  if layout not in LAYOUTS:
    raise ValueError(f'sample.layout={layout!r}; choose one of {LAYOUTS}')
  if layout == 'config':
    return {}
  n = len(devices)
  s = config.sample
  branches = guidance.num_branches(float(s.guidance_scale), float(s.get('image_guidance_scale', 0.0)))
  data = branches if n > 1 and n % branches == 0 else 1
  context = n // data
  config.mesh.update(data=data, fsdp=1, context=context, tensor=1)
  chosen: dict[str, Any] = {'mesh': dict(data=data, fsdp=1, context=context, tensor=1)}
  if context > 1:
    config.model.context_parallel = 'ulysses' if int(config.model.num_heads) % context == 0 else 'ring'
    chosen['context_parallel'] = config.model.context_parallel
  hbm = hbm_gib(devices[0])
  if hbm is not None:
    if not config.vae.get('tile_size') and hbm <= 32:
      config.vae.tile_size = 256 if hbm <= 16 else 512
    if hbm <= 32:
      s.text_encoder_device = 'host'
    chosen.update(tile_size=config.vae.get('tile_size'), text_encoder_device=s.text_encoder_device)
  return chosen
