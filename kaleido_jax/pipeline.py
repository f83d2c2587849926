"""Subject-to-video for users: reference images + prompt -> uint8 video frames.

  pipe = S2VPipeline.from_config(config, workdir=WORKDIR, checkpoint='')
  frames = pipe.generate(['dog.png', 'hat.png'], 'a dog wearing the hat runs on a beach')  # (1, F, H, W, 3)
  # or in one call: kaleido_jax.pipeline.generate(refs, prompt, config=config, workdir=WORKDIR)

Stages: prompt -> umT5 (cached) | references -> fit-and-pad on white -> each VAE-encoded as a 1-frame video
-> normalised latents in `max_refs` slots with a mask | seeded noise -> the jitted sampler (one lax.scan,
text CFG with the same references in both branches, kaleido_jax/diffusion/sampler.py) -> VAE decode -> uint8.
With a `mesh`, weights are placed by their logical axis names (model/sharding.py, parallel/shardings.py) and the
batch over (data, fsdp), and the sampler runs under that mesh and its logical rules: guidance branches and prompts
over (data, fsdp), the token sequence over `context` (the context-parallel attention), weights over fsdp / tensor.

Weights (`checkpoint`): '' = the workdir's newest training checkpoint, else `config.init_from.transformer`;
a path = a training checkpoint directory (WORKDIR, WORKDIR/checkpoints or one step directory), a directory
written by `python -m kaleido_jax.convert`, or a PyTorch-side checkpoint (`init_from.transformer_format`);
'random' = fresh random weights (tests, the untrained baseline of the demo). A checkpoint whose parameters
do not fit `config.model` raises :class:`UserInputError` naming the first mismatch. With
`config.model.quantization` (int8 | int4 | fp8) float weights are quantized on the host as they load and a
directory written with `convert --quantization` loads as it is (kaleido_jax/model/quantization.py).
`config.sample.loras` ('path[:scale]', ...) are merged into the weights as they load (kaleido_jax/convert/lora.py).

Every problem a user can cause (prompt, references, sizes, checkpoint) raises :class:`UserInputError` (or
data.references.ReferenceImageError) with one line that names the input and the fix; the command line
(cli/main.py) prints it on stderr and exits with status 2.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kaleido_jax import storage
from kaleido_jax import encoders as enc_lib
from kaleido_jax import weights
from kaleido_jax.convert import release as release_lib
from kaleido_jax.convert import common as conv_common
from kaleido_jax.convert import lora as lora_conv
from kaleido_jax.data import references as refs_lib
from kaleido_jax.diffusion import sampler as sampler_lib
from kaleido_jax.diffusion import caching
from kaleido_jax.model import codec as codec_lib
from kaleido_jax.model import dit as dit_lib
from kaleido_jax.model import quantization
from kaleido_jax.parallel import shardings as shardings_lib


class UserInputError(ValueError):
  """Bad input from the user: the message names it and says what to do."""


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def abstract_model(model_cfg: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State]:
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: dit_lib.KaleidoDiT(model_cfg, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def random_weights(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
  with nnx.use_eager_sharding(False):
    return nnx.split(dit_lib.KaleidoDiT(model_cfg, rngs=nnx.Rngs(seed)))


def weights_target(model_cfg: ml_collections.ConfigDict, mesh: Any = None) -> tuple[nnx.GraphDef, nnx.State, dict]:
  """(graphdef, abstract params, the load target): each parameter's sharding from its logical names on
  ``mesh``, or the default device without one."""
  graphdef, abstract = abstract_model(model_cfg)
  shardings = None
  if mesh is not None:
    shardings = nnx.to_pure_dict(shardings_lib.state_shardings(abstract, mesh))
  return graphdef, abstract, weights.abstract_target(nnx.to_pure_dict(abstract), shardings)


def load_weights(config: ml_collections.ConfigDict, checkpoint: str = '', workdir: str | None = None,
                 mesh: Any = None) -> tuple[nnx.GraphDef, nnx.State, str]:
  """(graphdef, params state, description of where they came from); see the module docstring.

  Every leaf lands in its sharding on ``mesh`` (kaleido_jax/weights): no device holds more than its shard
  and one leaf in flight. The LoRAs of ``config.sample.loras`` are merged as the float weights land, before
  any quantization; into a quantized checkpoint, dequantized, merged and quantized again.
  """
  loras = tuple(config.sample.get('loras', ()))
  graphdef, abstract, target = weights_target(config.model, mesh)
  if checkpoint == 'random':
    _, state = random_weights(config.model, config.seed)
    source, where = weights.HostSource(nnx.to_pure_dict(state), where='random weights',
                                       scheme=config.model.get('quantization', 'none')), 'random weights'
    try:
      pure = weights.load(source, target, updates=weights.lora_updates(loras, int(config.model.num_layers)),
                          num_layers=int(config.model.num_layers))
    except weights.WeightsError as e:
      raise UserInputError(f'{e} (--config.sample.loras / --lora)') from e
    nnx.replace_by_pure_dict(abstract, pure)
    return graphdef, abstract, where + (f' + LoRA {", ".join(loras)}' if loras else '')
  if not checkpoint:
    if workdir and weights.training_checkpoint_dir(workdir):
      checkpoint = workdir
    elif config.init_from.transformer:
      checkpoint = config.init_from.transformer
    else:
      raise UserInputError(f'no weights: {workdir or "the workdir"!r} has no training checkpoint and '
                           'config.init_from.transformer is empty; train first (--mode train), pass '
                           '--checkpoint PATH, or --checkpoint random for an untrained model')
  lc = config.train.get('lora')
  try:
    pure, where = weights.load_transformer(
        checkpoint, target, model_cfg=config.model, fmt=config.init_from.transformer_format, loras=loras,
        use_ema=bool(config.sample.use_ema), base=config.init_from.transformer,
        adapter_alpha=float(lc.alpha) if lc is not None else 0.0,
        rslora=bool(lc.get('rslora', False)) if lc is not None else False)
  except FileNotFoundError as e:
    raise UserInputError(str(e)) from e
  except weights.WeightsError as e:
    raise UserInputError(f'checkpoint {checkpoint!r} cannot be loaded for config.model: {e}; pass the config '
                         'the checkpoint was trained with (--config)') from e
  nnx.replace_by_pure_dict(abstract, pure)
  return graphdef, abstract, where


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


def check_request(config: ml_collections.ConfigDict, prompts: Sequence[str], num_refs: Sequence[int],
                  num_frames: int, height: int, width: int) -> None:
  """UserInputError for an empty prompt, too many references or a size the codec / patches cannot take.

  Needs only the config (no weights), so the CLI can refuse a request before loading anything.
  """
  for section in ('model', 'text_encoder'):
    try:
      quantization.check_scheme(config[section].get('quantization', 'none'), f'config.{section}.quantization')
    except ValueError as e:
      raise UserInputError(f'{e} (--config.{section}.quantization=...)') from e
  if config.sample.get('text_encoder_device', 'accelerator') not in enc_lib.TEXT_ENCODER_DEVICES:
    raise UserInputError(f'config.sample.text_encoder_device={config.sample.text_encoder_device!r}; choose one '
                         f'of {enc_lib.TEXT_ENCODER_DEVICES}')
  if config.sample.get('loras', ()):
    try:
      lora_conv.check_specs(tuple(config.sample.loras))
    except conv_common.ConversionError as e:
      raise UserInputError(f'{e} (--config.sample.loras / --lora)') from e
  try:
    sampler_lib.step_schedule(config.sample)
  except ValueError as e:
    raise UserInputError(f'{e} (--config.sample.timesteps / --steps)') from e
  try:
    caching.static_settings(config.sample)
  except caching.CacheError as e:
    raise UserInputError(f'{e} (--config.sample.cache)') from e
  for i, p in enumerate(prompts):
    if not isinstance(p, str) or not p.strip():
      raise UserInputError(f'prompt #{i} is empty; describe the video to make (--prompt "...")')
  max_refs = int(config.model.max_refs)
  for i, n in enumerate(num_refs):
    if n > max_refs:
      raise UserInputError(f'{n} reference images for prompt #{i}, but the model was trained for at most '
                           f'{max_refs} (config.model.max_refs); drop some --ref images')
  try:
    codec_lib.check_video_size(config.vae, num_frames, height, width)
  except ValueError as e:
    raise UserInputError(str(e)) from e
  t, s, _ = codec_lib.factors(config.vae)
  f, h, w = 1 + (num_frames - 1) // t, height // s, width // s
  pt, ph, pw = config.model.patch_size
  if f % pt or h % ph or w % pw:
    raise UserInputError(f'--size {height}x{width} / --frames {num_frames}: the latent {f}x{h}x{w} must be '
                         f'divisible by the patch {pt}x{ph}x{pw}; use a height and width divisible by '
                         f'{s * ph} (and {s * pw}), frames by {t * pt}')


def _as_batch(refs: Any, prompts: Any) -> tuple[list[list[Any]], list[str]]:
  """(refs, prompt) for one video or (list of ref lists, list of prompts) for a batch -> lists."""
  if isinstance(prompts, str):
    return [list(refs) if isinstance(refs, (list, tuple)) else [refs]], [prompts]
  prompts = list(prompts)
  refs = list(refs)
  if len(refs) != len(prompts):
    raise UserInputError(f'{len(prompts)} prompts but {len(refs)} reference sets; give one list of references '
                         'per prompt')
  return [list(r) if isinstance(r, (list, tuple)) else [r] for r in refs], prompts


def _resolve_release(config: ml_collections.ConfigDict, checkpoint: str) -> tuple[ml_collections.ConfigDict, str]:
  """A converted Kaleido release (convert/release.py) as the checkpoint or init_from.transformer: the config
  then reads its DiT, VAE, umT5 and tokenizer (a copy; the caller's config is left as it was)."""
  path = checkpoint or config.init_from.transformer
  if not release_lib.is_converted_release(path):
    return config, checkpoint
  config = config.copy_and_resolve_references()
  release_lib.apply(config, path)
  return config, storage.join(path, 'transformer') if checkpoint else checkpoint


class S2VPipeline:
  """Encoders + DiT weights + sampler settings; `generate` makes videos (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, encoders: enc_lib.Encoders, graphdef: nnx.GraphDef,
               state: nnx.State, *, mesh: Any = None, weights_from: str = '', workdir: str | None = None):
    self.config, self.encoders = config, encoders
    self.graphdef, self.state, self.mesh, self.weights_from = graphdef, state, mesh, weights_from
    self.workdir = workdir
    self.last_stats: dict[str, Any] = {}   # model_calls (DiT passes per video) of the last sample_latents
    if mesh is not None:
      self.state = jax.device_put(state, shardings_lib.state_shardings(state, mesh))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, *, workdir: str | None = None, checkpoint: str = '',
                  mesh: Any = None, encoders: enc_lib.Encoders | None = None) -> 'S2VPipeline':
    config, checkpoint = _resolve_release(config, checkpoint)
    graphdef, state, where = load_weights(config, checkpoint, workdir, mesh)
    encoders = encoders or enc_lib.Encoders.from_config(config, workdir=workdir)
    return cls(config, encoders, graphdef, state, mesh=mesh, weights_from=where, workdir=workdir)

  def release_weights(self) -> None:
    """Drops the DiT weights (a one-shot run does so before the VAE decodes); sampling again needs new ones."""
    self.state = None

  @property
  def max_refs(self) -> int:
    return int(self.config.model.max_refs)

  def check_request(self, prompts: Sequence[str], num_refs: Sequence[int], num_frames: int, height: int,
                    width: int) -> None:
    check_request(self.config, prompts, num_refs, num_frames, height, width)

  def prepare(self, refs: Any, prompt: Any, *, num_frames: int | None = None, height: int | None = None,
              width: int | None = None, seed: int | Sequence[int] | None = None,
              negative_prompt: str | None = None) -> dict[str, Any]:
    """Everything the sampler takes, as arrays: noise, text_cond, text_uncond, ref latents, ref_mask."""
    s = self.config.sample
    num_frames, height, width = (int(num_frames or s.num_frames), int(height or s.height),
                                 int(width or s.width))
    ref_lists, prompts = _as_batch(refs, prompt)
    self.check_request(prompts, [len(r) for r in ref_lists], num_frames, height, width)
    images, masks = [], []
    for r in ref_lists:
      img = refs_lib.prepare_references(r, height, width, self.max_refs)
      img, mask = refs_lib.pad_reference_slots(img, self.max_refs)
      images.append(img)
      masks.append(mask)
    ref_mask = np.stack(masks)
    ref_latents = self.encoders.references(np.stack(images), ref_mask) if self.max_refs else None
    seed = int(s.seed) if seed is None else seed
    seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else [seed + i for i in range(len(prompts))]
    neg = s.negative_prompt if negative_prompt is None else negative_prompt
    shape = self.encoders.latent_shape(num_frames, height, width)
    return dict(noise=sampler_lib.initial_noise(seeds, shape), text_cond=self.encoders.text(prompts),
                text_uncond=self.encoders.text([neg]), refs=ref_latents,
                ref_mask=jnp.asarray(ref_mask) if self.max_refs else None, ref_images=np.stack(images))

  def calibration(self, cfg: ml_collections.ConfigDict) -> dict[str, Any] | None:
    """The step-cache calibration sample.cache needs (caching.py), or None without a step cache."""
    if cfg.get('cache', 'none') == 'none':
      return None
    path = caching.calibration_path(cfg, self.workdir)
    if not storage.exists(path):
      raise UserInputError(f'sample.cache={cfg.cache!r} needs the step-cache calibration {path!r}, which does not '
                           'exist: run `python -m kaleido_jax.main --mode calibrate` with this model and config '
                           'first, or set --config.sample.cache_calibration=PATH')
    return caching.load_calibration(path)

  def sample_latents(self, inputs: dict[str, Any], cfg: ml_collections.ConfigDict,
                     on_step: Callable[[Any], None] | None = None, *, calibrate: bool = False) -> Any:
    """Latents (B, F, H, W, C); with ``calibrate`` (latents, per-step statistics) of an uncached run.

    Sets ``last_stats['model_calls']`` (DiT passes per video).
    """
    if self.state is None:
      raise UserInputError('this pipeline released its DiT weights (release_weights); build a new one')
    args = [inputs[k] for k in ('noise', 'text_cond', 'text_uncond', 'refs', 'ref_mask')]
    try:
      options = dict(cfg=cfg, on_step=on_step, return_stats=True, calibrate=calibrate,
                     calibration=None if calibrate else self.calibration(cfg))
      if self.mesh is None:
        return self._keep_stats(sampler_lib.sample(self.graphdef, self.state, *args, **options), calibrate)
    except caching.CacheError as e:
      raise UserInputError(f'{e} (--config.sample.*)') from e
    placed = [None if a is None else jax.device_put(a, shardings_lib.replicated(self.mesh) if np.shape(a)[0] == 1
                                                    else shardings_lib.batch_sharding(self.mesh, np.shape(a)))
              for a in args]  # a batch of one (the shared negative prompt) is on every device
    # Under the mesh the guidance branches (concatenated on the batch inside the step) and the prompts go over
    # data x fsdp as far as they divide it, the tokens over context (context-parallel attention,
    # model.context_parallel), the weights as their names say (fsdp, context, tensor): model/sharding.py.
    with jax.set_mesh(self.mesh):
      return self._keep_stats(sampler_lib.sample(self.graphdef, self.state, *placed, **options), calibrate)

  def _keep_stats(self, out: tuple, calibrate: bool) -> Any:
    latents, stats = out
    self.last_stats = {'model_calls': int(stats['model_calls'])}
    return (latents, stats) if calibrate else latents

  def sample_config(self, num_steps: int | None = None, guidance_scale: float | None = None,
                    shift: float | None = None) -> ml_collections.ConfigDict:
    cfg = self.config.sample.copy_and_resolve_references()
    with cfg.unlocked():
      if num_steps is not None:
        if int(num_steps) < 1:
          raise UserInputError(f'--steps {num_steps}: the sampler needs at least 1 step')
        cfg.num_steps = int(num_steps)
      if guidance_scale is not None:
        cfg.guidance_scale = float(guidance_scale)
      if shift is not None:
        cfg.shift = float(shift)
    return cfg

  def generate(self, refs: Any, prompt: Any, *, num_frames: int | None = None, height: int | None = None,
               width: int | None = None, num_steps: int | None = None, guidance_scale: float | None = None,
               seed: int | Sequence[int] | None = None, negative_prompt: str | None = None,
               on_step: Callable[[Any], None] | None = None) -> np.ndarray:
    """uint8 frames (B, F, H, W, 3); `refs` a list of images for one prompt or a list of lists for a batch."""
    cfg = self.sample_config(num_steps, guidance_scale)
    inputs = self.prepare(refs, prompt, num_frames=num_frames, height=height, width=width, seed=seed,
                          negative_prompt=negative_prompt)
    latents = self.sample_latents(inputs, cfg, on_step)
    return enc_lib.to_uint8(self.encoders.decode(latents))


def peak_memory_line(device: Any = None) -> str:
  """'peak accelerator memory: X GiB of Y GiB (device)' where the backend counts it (TPU, GPU), else ''."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if not stats or 'peak_bytes_in_use' not in stats:
    return ''
  gib = 1024 ** 3
  limit = stats.get('bytes_limit')
  of = f' of {limit / gib:.2f} GiB' if limit else ''
  return f'peak accelerator memory: {stats["peak_bytes_in_use"] / gib:.2f} GiB{of} ({device.device_kind})'


def generate(refs: Any, prompt: Any, *, config: ml_collections.ConfigDict, workdir: str | None = None,
             checkpoint: str = '', **options: Any) -> np.ndarray:
  """One-shot `S2VPipeline.from_config(...).generate(refs, prompt, **options)`."""
  return S2VPipeline.from_config(config, workdir=workdir, checkpoint=checkpoint).generate(refs, prompt, **options)
