"""`--mode sample`: one video from reference images and a prompt, written as mp4 (+ GIF and PNG strip); with
`--prompts FILE`, one per request of a prompt set (kaleido_jax/batch.py).

  python -m kaleido_jax.main --config C --workdir W --mode sample --ref a.png --ref b.png \\
      --prompt "..." --out v.mp4 [--checkpoint P] [--steps N] [--guidance G] [--seed S] [--frames F] [--size HxW]

The flags are shorthands for `config.sample.*` keys (cli/main.py). Input problems (missing or corrupt reference,
too many references, empty prompt, a frame count or size the codec cannot take, a checkpoint of another
architecture, an unknown output extension) raise before anything is written, and the command line prints them as
one `error: ...` line with exit status 2; outputs are written atomically (kaleido_jax/media.py).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from kaleido_jax import batch
from kaleido_jax import encoders as enc_lib
from kaleido_jax import media
from kaleido_jax import pipeline as pipe_lib
from kaleido_jax import storage
from kaleido_jax.data import references as refs_lib
from kaleido_jax.diffusion import sampler as sampler_lib
from kaleido_jax.parallel import mesh as mesh_lib
from kaleido_jax.parallel import sampling_layout


class StepProgress:
  """A tqdm bar advanced from inside the jitted sampler (jax.debug.callback)."""

  def __init__(self, total: int, desc: str = 'denoising'):
    self.bar = tqdm(total=total, desc=desc, unit='step', file=sys.stderr)

  def __call__(self, _step: Any) -> None:
    self.bar.update(1)

  def close(self) -> None:
    self.bar.close()


def output_paths(out: str, gif: bool) -> dict[str, str]:
  """The files one sample writes: the video, and with `gif` a GIF and a PNG strip beside it."""
  ext = os.path.splitext(out)[1].lower()
  if ext not in media.VIDEO_EXTENSIONS:
    raise pipe_lib.UserInputError(f'--out {out!r}: unknown video extension {ext or "(none)"!r}; use one of '
                         f'{", ".join(media.VIDEO_EXTENSIONS)}')
  paths = {'video': out}
  base = os.path.splitext(out)[0]
  if gif and ext != '.gif':
    paths['gif'] = base + '.gif'
  if gif:
    paths['strip'] = base + '.png'
  return paths


def write_sample(paths: dict[str, str], frames: np.ndarray, ref_images: np.ndarray | None, fps: float,
                 view_scale: int = 1) -> None:
  """Video at its size; GIF and strip (references first row, frames second) upscaled for viewing."""
  media.write_video(paths['video'], frames, fps)
  big = media.upscale(frames, view_scale)
  if 'gif' in paths:
    media.write_video(paths['gif'], big, fps)
  if 'strip' in paths:
    rows = [big]
    if ref_images is not None and len(ref_images):
      rows.insert(0, media.upscale(ref_images, view_scale))
    media.write_image(paths['strip'], media.strip(rows))


def view_scale(height: int) -> int:
  return max(1, 128 // max(height, 1))


def layout(config: ml_collections.ConfigDict, devices: list[Any]) -> dict[str, Any]:
  try:
    return sampling_layout.apply(config, devices)
  except ValueError as e:
    raise pipe_lib.UserInputError(f'{e} (--config.sample.layout)') from e


def device_groups(config: ml_collections.ConfigDict, devices: list[Any]) -> list[Any]:
  """This host's data-parallel groups for batch sampling: meshes of `fsdp x context x tensor` local chips each."""
  try:
    return mesh_lib.group_meshes(config.mesh, devices)
  except ValueError as e:
    raise pipe_lib.UserInputError(f'{e}; set --config.mesh.* so that they do') from e


def run_batch(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`--prompts FILE`: kaleido_jax/batch.py (one video per request, resumable, over every chip and host)."""
  s = config.sample
  out_dir = s.output or storage.join(workdir, 'samples')
  if os.path.splitext(out_dir)[1].lower() in media.VIDEO_EXTENSIONS:
    raise pipe_lib.UserInputError(f'--out {out_dir!r}: with --prompts, --out is the directory of the videos')
  pipe_lib.check_request(config, ['x'], [0], int(s.num_frames), int(s.height), int(s.width))
  requests = batch.read_requests(s.prompts, base_seed=int(s.seed), max_refs=int(config.model.max_refs),
                                 check_image=lambda path, j: refs_lib.load_reference(path, 8, 8, index=j),
                                 root=s.get('prompts_root', ''))
  mesh_lib.initialize_distributed()
  layout(config, list(jax.local_devices()))  # a host's chips: its groups
  groups = device_groups(config, list(jax.local_devices()))
  storage.path(out_dir).mkdir(parents=True, exist_ok=True)
  encoders = enc_lib.Encoders.from_config(config, workdir=workdir)  # shared by the host's groups
  pipes = [pipe_lib.S2VPipeline.from_config(config, workdir=workdir, checkpoint=s.checkpoint, encoders=encoders,
                                            mesh=mesh) for mesh in groups]

  def maker(pipe):
    def make(req):  # a bad request is recorded in the manifest (batch.py) and the others go on
      try:
        return pipe.generate(list(req.refs), req.prompt, seed=req.seed)[0]
      except (pipe_lib.UserInputError, refs_lib.ReferenceImageError, FileNotFoundError) as e:
        raise ValueError(str(e)) from e
    return make
  n = len(groups)
  stats = batch.run_requests(requests, out_dir, [maker(p) for p in pipes], fps=float(s.fps),
                             group_offset=jax.process_index() * n, num_groups=jax.process_count() * n)
  manifest = batch.write_manifest(out_dir, requests)
  print(f'{stats["made"]} videos made, {stats["skipped"]} already done, {stats["errors"]} bad requests on this host '
        f'({n} group(s) of {groups[0].size} chip(s)); {manifest["done"]} of {len(requests)} done in '
        f'{storage.join(out_dir, batch.MANIFEST)}')
  return {'stats': stats, 'manifest': manifest, 'out_dir': out_dir}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  s = config.sample
  if s.get('prompts', ''):
    return run_batch(config, workdir)
  # Several hosts (a multi-host slice): one video over every chip; process 0 writes it.
  mesh_lib.initialize_distributed()
  writer = jax.process_index() == 0
  chosen = layout(config, jax.devices())
  if chosen and writer:
    print(f'layout for {jax.device_count()} x {jax.devices()[0].device_kind}: {chosen}')
  paths = output_paths(s.output or storage.join(workdir, 'samples', 'sample.mp4'), bool(s.gif))
  if not s.prompt.strip():
    raise pipe_lib.UserInputError('the prompt is empty; describe the video to make (--prompt "...")')
  # Everything that can be checked without weights is checked before loading any.
  pipe_lib.check_request(config, [s.prompt], [len(s.refs)], int(s.num_frames), int(s.height), int(s.width))
  for i, r in enumerate(s.refs):
    refs_lib.load_reference(r, 8, 8, index=i)
  # The one-chip memory plan (a one-shot run): umT5 encodes the two prompts and is released before the DiT
  # loads; the DiT is released before the VAE decodes. So the chip holds one of the three at a time (plus
  # the small VAE), which `python -m kaleido_jax.tools.aot --step sample` checks for a slice.
  encoders = enc_lib.Encoders.from_config(config, workdir=workdir)
  encoders.text([s.prompt, s.negative_prompt])
  encoders.release_text_encoder()
  # Every visible chip: guidance branches over data, tokens over context, weights by their names (config.mesh).
  mesh = None
  if jax.device_count() > 1:
    try:
      mesh = mesh_lib.make_mesh(config.mesh)
    except ValueError as e:
      raise pipe_lib.UserInputError(f'{e}; set --config.mesh.* to use the {jax.device_count()} devices') from e
  pipe = pipe_lib.S2VPipeline.from_config(config, workdir=workdir, checkpoint=s.checkpoint, encoders=encoders,
                                          mesh=mesh)
  progress = StepProgress(sampler_lib.num_steps(s))
  try:
    inputs = pipe.prepare(list(s.refs), s.prompt, seed=int(s.seed))
    latents = pipe.sample_latents(inputs, pipe.sample_config(), on_step=progress)
    pipe.release_weights()
    if jax.process_count() > 1:  # the latents span hosts: every host gets them whole to decode on its own chips
      latents = multihost_utils.process_allgather(latents, tiled=True)
    frames = enc_lib.to_uint8(pipe.encoders.decode(latents))[0]
  finally:
    progress.close()
  if not writer:
    return {'paths': {}, 'frames': frames}
  n = len(s.refs)
  write_sample(paths, frames, enc_lib.to_uint8(inputs['ref_images'][0, :n]), s.fps, view_scale(s.height))
  print(f'wrote {", ".join(paths.values())} ({frames.shape[0]} frames {frames.shape[1]}x{frames.shape[2]}, '
        f'weights: {pipe.weights_from}; {pipe.last_stats.get("model_calls", "?")} DiT passes)')
  line = pipe_lib.peak_memory_line()
  if line:
    print(line)
  return {'paths': paths, 'frames': frames}
