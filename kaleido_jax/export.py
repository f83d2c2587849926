"""`--mode export`: the whole sampler as one `jax.export` artifact that runs without kaleido_jax's model code.

The exported program is text encoder -> reference encoding -> seeded noise -> the denoising loop (one
lax.scan, CFG) -> decoder -> uint8 frames, for a fixed video size and a *symbolic* batch size `b`:

  program(weights, seeds (b,) uint32, input_ids (b, L) int32, attention_mask (b, L) int32,
          negative_ids (1, L) int32, negative_mask (1, L) int32,
          ref_images (b, R, H, W, 3) float32 in [-1, 1] (fit and white-padded), ref_mask (b, R) bool)
      -> frames (b, F, H, W, 3) uint8

`weights` is the flat list of every parameter (DiT, text encoder, codec) when `export.weights='argument'`
(stored beside the program in weights.npz, so one program serves any fine-tune of the same architecture), or
an empty list when 'baked' (the parameters are constants inside the program: one self-contained file).
The artifact directory holds program.jax_exported (serialized jax.export.Exported, lowered for every platform
in `export.platforms`, each platform's branch traced for that platform: `per_platform`), weights.npz, spiece.model (the tokenizer) and signature.json (format version, input
and output signature, platforms, the sampling settings, the video size, the negative prompt).
`kaleido_jax/exported.py` loads and runs it with jax, numpy and sentencepiece only.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import kaleido_jax
from kaleido_jax import exported as exported_lib
from kaleido_jax import storage
from kaleido_jax.diffusion import sampler as sampler_lib
from kaleido_jax.model import cpu

FORMAT = exported_lib.FORMAT
FORMAT_VERSION = exported_lib.FORMAT_VERSION
INPUT_NAMES = exported_lib.INPUT_NAMES


def _split(module: Any) -> tuple[Any, Any]:
  return nnx.split(module)


def build_program(pipe: Any, cfg: ml_collections.ConfigDict, num_frames: int, height: int, width: int,
                  baked: bool):
  """(program, weight leaves): `program(weights, *inputs)` as in the module docstring."""
  enc = pipe.encoders
  parts = {'dit': (pipe.graphdef, pipe.state), 'text': _split(enc.text_encoder), 'codec': _split(enc.codec)}
  states = {k: v[1] for k, v in parts.items()}
  leaves, treedef = jax.tree.flatten(states)
  latent = tuple(enc.latent_shape(num_frames, height, width))
  codec_graph, text_graph = parts['codec'][0], parts['text'][0]

  def program(weights, seeds, input_ids, attention_mask, negative_ids, negative_mask, ref_images, ref_mask):
    st = jax.tree.unflatten(treedef, leaves if baked else weights)
    text_encoder = nnx.merge(text_graph, st['text'])
    codec = nnx.merge(codec_graph, st['codec'])

    def encode_text(ids, mask):
      hidden = text_encoder(ids, mask)
      return jnp.where(mask[..., None] > 0, hidden, 0.0).astype(jnp.float32)

    text_cond = encode_text(input_ids, attention_mask)
    text_uncond = encode_text(negative_ids, negative_mask)
    b, r = ref_images.shape[:2]
    refs = None
    if r:  # each reference alone as a 1-frame video (data/references.encode_references, written for symbolic b)
      z = codec.encode(ref_images.reshape((-1, 1) + ref_images.shape[2:]))[:, 0]
      refs = codec.normalize(z).reshape((b, r) + z.shape[1:])
      refs = jnp.where(ref_mask.reshape((b, r, 1, 1, 1)), refs, 0.0)
    noise = jax.vmap(lambda s: jax.random.normal(jax.random.key(s), latent, jnp.float32))(seeds)
    latents = sampler_lib.sample_traced(sampler_lib.nnx_denoise_fn(pipe.graphdef, st['dit']), noise, text_cond,
                                        text_uncond, refs, ref_mask if r else None, cfg=cfg)
    video = codec.decode(codec.denormalize(latents))
    return jnp.clip(jnp.round((video + 1.0) * 127.5), 0, 255).astype(jnp.uint8)

  return program, leaves


def per_platform(program: Any, platforms: tuple[str, ...]) -> Any:
  """``program`` traced once per platform and chosen by ``lax.platform_dependent`` where the artifact runs.

  Each branch is traced under ``cpu.target_platform(p)``, so every ``auto`` setting (``model.cpu_kernels``,
  ``model.attention``) resolves for the platform that branch serves, not for the host that exports: the CPU
  branch carries the CPU rewrites, the TPU and GPU branches the plain program. With one platform that is all;
  with several, jax lowers every branch for every platform, so attention is the `xla` kernel in each (a
  splash or cuDNN call lowers only on its own platform: export for `tpu` alone to get splash).
  """
  portable = len(platforms) > 1

  def branch(platform):
    def run(*args):
      with cpu.target_platform(platform, portable=portable):
        return program(*args)
    return run

  def dispatched(*args):
    if len(platforms) == 1:
      return branch(platforms[0])(*args)
    return jax.lax.platform_dependent(*args, **{p: branch(p) for p in platforms})
  return dispatched


def input_specs(pipe: Any, num_frames: int, height: int, width: int, max_refs: int, batch: Any) -> list:
  L = pipe.encoders.text_len
  return [jax.ShapeDtypeStruct((batch,), jnp.uint32),
          jax.ShapeDtypeStruct((batch, L), jnp.int32), jax.ShapeDtypeStruct((batch, L), jnp.int32),
          jax.ShapeDtypeStruct((1, L), jnp.int32), jax.ShapeDtypeStruct((1, L), jnp.int32),
          jax.ShapeDtypeStruct((batch, max_refs, height, width, 3), jnp.float32),
          jax.ShapeDtypeStruct((batch, max_refs), jnp.bool_)]


def _spec_json(spec: jax.ShapeDtypeStruct, name: str) -> dict:
  return {'name': name, 'shape': [d if isinstance(d, int) else str(d) for d in spec.shape],
          'dtype': np.dtype(spec.dtype).name}


def export_sampler(pipe: Any, output_dir: str, *, weights: str = 'argument',
                   platforms: tuple[str, ...] = ('cpu', 'cuda', 'tpu'), max_refs: int | None = None,
                   cfg: ml_collections.ConfigDict | None = None) -> str:
  """Write the artifact directory (atomically: a complete directory or nothing). Returns its path."""
  if weights not in ('argument', 'baked'):
    raise ValueError(f"export.weights {weights!r}: use 'argument' | 'baked'")
  config = pipe.config
  if len(platforms) > 1 and config.model.attention in ('splash', 'cudnn'):
    raise ValueError(f'model.attention={config.model.attention!r} lowers only on its own platform, so it cannot '
                     f'be exported for {list(platforms)}: use --config.export.platforms with that platform alone, '
                     'or model.attention=auto')
  cfg = cfg or config.sample
  f, h, w = int(cfg.num_frames), int(cfg.height), int(cfg.width)
  max_refs = int(max_refs or config.model.max_refs)
  pipe.check_request(['x'], [max_refs], f, h, w)
  baked = weights == 'baked'
  program, leaves = build_program(pipe, cfg, f, h, w, baked)
  (b,) = jax.export.symbolic_shape('b')
  specs = input_specs(pipe, f, h, w, max_refs, b)
  weight_specs = [] if baked else [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]
  exp = jax.export.export(jax.jit(per_platform(program, tuple(platforms))),
                          platforms=tuple(platforms))(weight_specs, *specs)
  out_spec = exp.out_avals[0]
  signature = {
      'format': FORMAT, 'format_version': FORMAT_VERSION, 'kaleido_jax_version': kaleido_jax.__version__,
      'jax_version': jax.__version__, 'calling_convention_version': exp.calling_convention_version,
      'platforms': list(exp.platforms), 'weights': weights, 'num_weights': 0 if baked else len(leaves),
      'inputs': [_spec_json(s, n) for s, n in zip(specs, INPUT_NAMES)],
      'output': _spec_json(jax.ShapeDtypeStruct(out_spec.shape, out_spec.dtype), 'frames'),
      'video': {'num_frames': f, 'height': h, 'width': w, 'fps': float(cfg.fps)},
      'max_refs': max_refs, 'text_len': pipe.encoders.text_len, 'tokenizer': 'spiece.model',
      'negative_prompt': cfg.negative_prompt,
      'sample': {**{k: cfg[k] for k in ('solver', 'num_steps', 'shift', 'guidance_scale', 'image_guidance_scale',
                                        'warp_timesteps')}, 'timesteps': [float(t) for t in cfg.timesteps]},
      'weights_from': pipe.weights_from,
  }
  with storage.atomic_dir(output_dir, replace=True) as tmp:  # a previous artifact goes once the new one is whole
    with open(os.path.join(tmp, exported_lib.PROGRAM_FILE), 'wb') as fh:
      fh.write(exp.serialize())
    if not baked:  # an .npz (a zip of .npy members), written one leaf at a time: the host holds one leaf
      with zipfile.ZipFile(os.path.join(tmp, exported_lib.WEIGHTS_FILE), 'w', allowZip64=True) as zf:
        for i, x in enumerate(leaves):
          with zf.open(f'w{i:05d}.npy', 'w', force_zip64=True) as member:
            np.lib.format.write_array(member, np.asarray(jax.device_get(x)), allow_pickle=False)
    shutil.copyfile(pipe.encoders.tokenizer.path, os.path.join(tmp, 'spiece.model'))
    with open(os.path.join(tmp, exported_lib.SIGNATURE_FILE), 'w') as fh:
      json.dump(signature, fh, indent=2, ensure_ascii=False)
  return output_dir
