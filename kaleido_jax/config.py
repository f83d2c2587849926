"""The one configuration schema every config file starts from.

Config files under ``configs/`` are big_vision style: ``get_config()`` returns an
``ml_collections.ConfigDict``. They start from :func:`base_config` and override what differs, so every
key that exists anywhere exists everywhere and ``--config.a.b=value`` on an unknown key fails loudly.

Sections (each owned by one part of the package):
  model         KaleidoDiT architecture (kaleido_jax/model/dit.py)
  vae           Wan2.1 causal 3D VAE (kaleido_jax/model/vae.py)
  text_encoder  umT5 encoder + tokenizer (kaleido_jax/model/text_encoder.py)
  data          synthetic set, construction pipeline, Grain loader (kaleido_jax/data/)
  diffusion     flow-matching objective (kaleido_jax/diffusion/)
  sample        sampler / guidance / what --mode sample makes (diffusion/sampler.py, pipeline.py, cli/sample.py)
  train         optimiser, schedule, checkpoints, logging (kaleido_jax/train/)
  mesh          device mesh, ICI x DCN (kaleido_jax/parallel/mesh.py; logical rules: model/sharding.py)
  export        the exported sampler artifact (kaleido_jax/export.py, kaleido_jax/exported.py)
  eval          offline evaluation on held-out reference sets (kaleido_jax/eval/runner.py)
"""

from __future__ import annotations

import difflib
import importlib.util

import ml_collections

# Wan2.1 / diffusers `WanTransformer3DModel` 14B values (see shared DESIGN.md, table in section 1).
WAN_14B = dict(num_heads=40, head_dim=128, ffn_dim=13824, num_layers=40)
WAN_1_3B = dict(num_heads=12, head_dim=128, ffn_dim=8960, num_layers=30)

# Wan2.1's default negative prompt (wan/configs/shared_config.py, `sample_neg_prompt`), used by Kaleido's
# sampler as the unconditional text of classifier-free guidance.
WAN_NEGATIVE_PROMPT = (
    '色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，'
    'JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，'
    '手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走')
# Released Kaleido's `sample_neg_prompt` (configs/sampling/sample_wanvae_concat_14b.yaml): Wan's list without
# "画得不好的脸部，" (poorly drawn faces).
KALEIDO_NEGATIVE_PROMPT = WAN_NEGATIVE_PROMPT.replace('画得不好的脸部，', '')


class ConfigError(ValueError):
  """A config value the run cannot use; the CLI prints the message as one line and exits with status 2."""


def dotted_keys(node: ml_collections.ConfigDict, prefix: str = ''):
  """Every key path of a ConfigDict, 'a.b.c' (sections and leaves)."""
  for k in node.keys():
    path = f'{prefix}{k}'
    yield path
    if hasattr(node[k], 'keys'):
      yield from dotted_keys(node[k], path + '.')


def nearest_keys(config: ml_collections.ConfigDict, key: str, n: int = 3) -> list[str]:
  """Known key paths closest to a mistyped one (difflib), then those with the same last name."""
  known = list(dotted_keys(config))
  near = difflib.get_close_matches(key, known, n=n, cutoff=0.5)
  leaf = key.rsplit('.', 1)[-1]
  return near + [k for k in known if k.rsplit('.', 1)[-1] == leaf and k not in near][:n - len(near)]


def unknown_key_error(config: ml_collections.ConfigDict, key: str, flag: str = '--config.') -> str | None:
  """One error line for a key path the config does not define (None when it does)."""
  known = set(dotted_keys(config))
  if key in known:
    return None
  near = nearest_keys(config, key)
  hint = f"nearest known keys: {', '.join(near)}" if near else 'no known key is close'
  return f'error: {flag}{key}: unknown config key ({hint}); every key is defined in kaleido_jax/config.py'


def unknown_override(argv, default_path: str) -> str | None:
  """The error line for the first --config.a.b override in argv that the config file does not define."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is None and '--config' in argv[:-1]:
    path = argv[argv.index('--config') + 1]
  try:
    spec = importlib.util.spec_from_file_location('_kaleido_config', path or default_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception:  # pylint: disable=broad-except  # the parser's own error then stands
    return None
  for arg in argv:
    if arg.startswith('--config.'):
      line = unknown_key_error(config, arg[len('--config.'):].split('=', 1)[0])
      if line:
        return line
  return None


def set_path(config: ml_collections.ConfigDict, key: str, value) -> None:
  """config[a][b] = value for the dotted key 'a.b'; a string for a non-string key is parsed as that key's type
  (bench / notebook overrides), a list becomes a tuple."""
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    node = node[part]
  old = node[leaf]
  if isinstance(value, str) and old is not None and not isinstance(old, str):
    value = value.lower() in ('1', 'true') if isinstance(old, bool) else type(old)(value)
  node[leaf] = tuple(value) if isinstance(value, list) else value


def model_config(**overrides) -> ml_collections.ConfigDict:
  """The DiT section. Defaults are the Kaleido-14B architecture."""
  cfg = ml_collections.ConfigDict(dict(
      # Architecture (names follow diffusers' WanTransformer3DModel where one exists).
      patch_size=(1, 2, 2),
      in_channels=16,
      out_channels=16,
      num_heads=WAN_14B['num_heads'],
      head_dim=WAN_14B['head_dim'],
      ffn_dim=WAN_14B['ffn_dim'],
      num_layers=WAN_14B['num_layers'],
      text_dim=4096,           # umT5-XXL hidden size
      freq_dim=256,            # sinusoidal timestep features
      eps=1e-6,
      cross_attn_norm=True,    # affine LayerNorm before cross-attention (Wan: True)
      # R-RoPE (kaleido_jax/model/rope.py).
      rope_scheme='kaleido',   # kaleido | temporal | none
      rope_ref_shift=80,       # Kaleido's (80, 80) h/w offset for reference tokens
      rope_theta=10000.0,
      max_refs=3,              # Kaleido's released limit; inputs with more are rejected
      # Numerics and execution.
      dtype='float32',         # activations / matmuls: float32 | bfloat16
      param_dtype='float32',   # master weights
      # The precision policy (model/precision.py): parameters with any path component in this set stay float32
      # under a bf16 param_dtype and in the bf16 loss (time embedding and projection, modulation tables, norms,
      # qwix quantization scales), as diffusers' _keep_in_fp32_modules and Wan2.1 keep them.
      fp32_params=('time_linear_1', 'time_linear_2', 'time_proj', 'scale_shift_table', 'head_table',
                   'norm2_scale', 'norm2_bias', 'norm_q', 'norm_k', 'scale'),
      scan_layers=True,        # nnx.vmap-built, nnx.scan-run layers (flat compile time in depth)
      scan_unroll=1,           # layers per scan iteration (lax.scan unroll); >= num_layers is straight-line
                               # code over the same stacked parameters: faster steps on CPU, compile time
                               # grows with depth (configs/demo.py unrolls its 4 layers)
      remat_policy='none',     # none | full | dots_no_batch | dots_and_attention | offload | offload_attention
                               # (model/dit.py)
      cpu_kernels='auto',      # CPU-only rewrites (model/cpu.py): auto (on iff compiled for the CPU) | on | off
      attention='auto',        # auto (splash on TPU, cudnn on GPU for bf16, else xla) | xla | cudnn | splash
      context_parallel='gather',  # self-attention over a sequence split on mesh.context (model/attention.py):
                               # gather (all-gather keys / values) | ulysses (all-to-all to head shards;
                               # heads per device % context == 0) | ring (ppermute keys / values round the ring)
      # Weight quantization of the blocks' linears with qwix (model/quantization.py): none | int8 | int4 | fp8;
      # with quantize_activations, int8 x int8 (fp8 x fp8) matmuls instead of weight-only. For sampling.
      quantization='none',
      quantize_activations=False,
      # Splash tiles (model/attention.py SPLASH_BLOCKS); 0 = the TPU generation's default, clamped to the length.
      splash_blocks=ml_collections.ConfigDict(dict(
          block_q=0, block_kv=0, block_kv_compute=0, block_q_dkv=0, block_kv_dkv=0, block_kv_dkv_compute=0,
          block_q_dq=0, block_kv_dq=0)),
  ))
  cfg.update(overrides)
  return cfg


def vae_config(**overrides) -> ml_collections.ConfigDict:
  """The Wan2.1 VAE section. Defaults are the released Wan2.1 VAE (diffusers AutoencoderKLWan)."""
  cfg = ml_collections.ConfigDict(dict(
      kind='wan',              # wan (this causal 3D VAE) | pixel (identity codec: pixel-space diffusion, CPU demo)
      pixel_downsample=1,      # pixel codec only: spatial average pooling
      pixel_upsample='nearest',  # pixel codec only: decode by 'nearest' (each latent pixel fills its pooled
                                 # block, the box filter's footprint) or 'linear' (smoother, blurs edges)
      base_dim=96,
      z_dim=16,
      dim_mult=(1, 2, 4, 4),
      num_res_blocks=2,
      attn_scales=(),
      temporal_downsample=(False, True, True),
      # Per-channel latent statistics of the released VAE (diffusers AutoencoderKLWan config).
      latents_mean=(-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921),
      latents_std=(2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160),
      dtype='float32',
      decode_chunk_frames=1,   # latent frames per jitted decode step (causal cache carries the rest)
      tile_size=None,          # spatial tiling (pixels) for large frames; None = no tiling
      tile_overlap=32,
      cpu_kernels='auto',      # the CPU-only conv rewrites (model/vae.py, model/cpu.py): auto | on | off
  ))
  cfg.update(overrides)
  return cfg


def text_encoder_config(**overrides) -> ml_collections.ConfigDict:
  """The umT5 encoder section. Defaults are umT5-XXL as used by Wan2.1."""
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=256384,
      d_model=4096,
      d_kv=64,
      d_ff=10240,
      num_layers=24,
      num_heads=64,
      relative_attention_num_buckets=32,
      relative_attention_max_distance=128,
      eps=1e-6,
      max_length=512,          # Wan pads / trims every prompt to 512 tokens
      dtype='float32',
      tokenizer_path='',       # directory or file with the sentencepiece model
      quantization='none',     # none | int8 | int4 | fp8: the layers' linears (model/quantization.py)
  ))
  cfg.update(overrides)
  return cfg


def data_config(**overrides) -> ml_collections.ConfigDict:
  """Data section: synthetic set, construction pipeline (prepare) and the Grain loader."""
  cfg = ml_collections.ConfigDict(dict(
      source='synthetic',      # synthetic (in-memory, procedural) | tfds (prepared ArrayRecord shards)
      data_dir='',             # TFDS data_dir for source='tfds'
      dataset_name='kaleido_s2v',
      local_data_dir='',       # a gs:// data_dir is copied here on each host (array_record reads local files);
                               # '' = ~/.cache/kaleido_jax/data. Larger than a disk: mount it with gcsfuse
      split='train',
      num_frames=17,           # pixel frames per clip (1 + 4k)
      height=128,
      width=128,
      max_refs=3,              # reference slots per sample; unused slots are padded and masked
      num_identities=64,       # synthetic: distinct subject identities
      num_clips=512,           # synthetic: clips in the set
      heldout_identities=8,    # synthetic: identities never seen in training (evaluation split)
      heldout_clips=64,        # synthetic: clips in the 'heldout' split
      max_subjects=4,          # synthetic: subjects per clip are 1..max_subjects
      background='procedural', # synthetic: procedural (panning waves + grain) | plain (flat colour) | grey
      occluder_prob=0.3,       # synthetic: chance of a passing grey bar in a clip
      subject_scale=1.0,       # synthetic: multiplies every subject's size
      clip_nuisance=0.0,       # synthetic: strength (0..1) of each clip's own look, which a same-clip reference
                               #   carries and a cross-clip one does not (grade and focus named in the caption,
                               #   grain, the subjects' stretch, the cut-out halo; data/nuisance.py); 0 = none
      synthetic_seed=0,        # synthetic: content seed (the loader's `seed` only shuffles / augments)
      pairing='cross',         # synthetic: cross (references from other clips of the subject, Kaleido) |
                               #   same_clip (cut from the target clip itself: the non-cross-paired baseline)
      synthesis=False,         # synthetic: re-render each target clip (background, geometry, colour; synthesis.py)
      batch_size=1,            # global batch size
      shuffle=True,
      worker_count=0,          # grain worker processes (needs absl.app.run)
      prefetch=2,
      precomputed_latents=False,  # read VAE latents / text embeddings instead of pixels / captions
      ref_flip=0.5,            # loader augmentation: probability of mirroring each reference
      max_bad_records=100,     # loader: records that fail to decode are skipped; more than this is fatal
      read_threads=2,          # loader: grain read threads per process (or per worker)
      num_epochs=0,            # loader: 0 = repeat forever
      prepare=ml_collections.ConfigDict(dict(
          input_dir='', annotations='', output_dir='',
          min_height=64, min_width=64, min_frames=17,
          min_blur_var=20.0,            # Laplacian variance below this = blurry
          min_motion=0.5,               # mean |frame diff| (0..255) below this = static
          max_shake=40.0,               # mean |frame diff| above this = shaky / cut
          min_subject_area=0.01, max_subject_area=0.8,
          max_subject_box_area=0.9,     # a subject whose box covers more of the frame is the scene, not a subject
          max_border_touch=0.5,         # fraction of frames a subject box touches the border
          dedup_threshold=4,            # perceptual-hash Hamming distance for near-duplicates
          cutout_margin=0.1,
          refs_per_subject=2,           # cross-paired reference candidates per subject (loader picks one)
          synth_per_clip=1,             # extra synthesised variants per kept clip
          shard_size=64,
          split='train',                # TFDS split name the prepared examples are written to
          fps=8,                        # frame rate clips are decoded at (raw videos) and exported at (synthetic)
          # Raw videos (data/ingest.py): auto (the default) = the annotations where given (annotations.jsonl or
          #   `annotations`), else people, then transformers where detector_dir is given, else motion; none =
          #   annotations given;
          #   motion = background subtraction (static camera, no weights); people = people and faces (dlib,
          #   OpenCV: models in wheels, the grounding extra); transformers = detector + SAM.
          grounding='auto',
          captions='',                  # captions jsonl ({"video", "caption", ["start", "end"], ["subjects"]})
          captioner='',                 # local transformers image-to-text model dir for videos without a caption
          caption_from_subjects=False,  # a shot with no caption is captioned from its grounded subjects' phrases
                                        #   ('A person.'), never silently: off unless asked
          decode_short_side=0,          # downscale while decoding so the short side is at most this (0: as is)
          shot_threshold=0.5,           # colour-histogram distance that is always a cut (video.shot_cuts)
          window_stride=0,              # training windows per shot: 0 = one centred, else every `stride` frames
          motion_threshold=30.0,        # motion grounder: |frame - background| (0..255) that is foreground
          max_tracks=4,                 # subjects kept per shot (largest first)
          identity_threshold=0.35,      # descriptor distance under which two shots' tracks are one subject
          face_identity_threshold=0.6,  # face-embedding distance under which two people are one (dlib's 0.6)
          detector_dir='',              # transformers grounder: local OWLv2 / OWL-ViT / Grounding DINO directory
          segmenter_dir='',             # transformers grounder: local SAM directory ('' = box masks)
          box_threshold=0.2,            # transformers grounder: detection score threshold
          engine='local',               # local (one process) | beam (Apache Beam; beam_args -> PipelineOptions)
          beam_args='',                 # e.g. '--runner=DirectRunner --direct_num_workers=2
                                        #   --direct_running_mode=multi_processing'
      )),
  ))
  cfg.update(overrides)
  return cfg


def diffusion_config(**overrides) -> ml_collections.ConfigDict:
  """Flow-matching objective as Kaleido trains it (DESIGN.md, 'Sampling and training')."""
  cfg = ml_collections.ConfigDict(dict(
      logit_mean=0.0,           # sigma ~ logit-normal(mean, std) ...
      logit_std=1.0,
      shift_base=0.5,           # ... then shifted by e^mu, mu linear in token count
      shift_max=1.15,
      base_tokens=256,
      max_tokens=4096,
      use_resolution_shift=True,
      timestep_scale=1000.0,    # model timestep = 1000 * sigma
      text_dropout=0.1,         # probability of the empty-prompt embedding
      ref_dropout=0.0,          # probability of dropping each reference (masked out)
      all_refs_dropout=0.0,     # probability of dropping all of a sample's references (trains the
                                # no-reference branch of image guidance, sample.image_guidance_scale)
      subject_loss_weight=0.0,  # lambda: per-element loss weight 1 + lambda * u, u = each subject's pixels weighted
                                # by (mean subject area / its area), so a small second subject counts as much as a
                                # large one; normalised to mean 1 per clip (needs the synthetic source's masks)
  ))
  cfg.update(overrides)
  return cfg


def sample_config(**overrides) -> ml_collections.ConfigDict:
  """Sampler defaults: released Kaleido as upstream samples it (Euler on its grid, 50 steps, shift 7, text CFG 6,
  its negative prompt, 512x896x81)."""
  cfg = ml_collections.ConfigDict(dict(
      solver='kaleido',         # kaleido (Euler on upstream Kaleido's grid: schedules.kaleido_schedule) | euler
                                # (diffusers' FlowMatchEuler grid, Wan's) | unipc
      unipc_order=2,            # UniPC-BH2 order (Wan: 2); 1 | 2
      num_steps=50,
      shift=7.0,
      timesteps=(),             # explicit model timesteps, e.g. (1000, 750, 500, 250) for 4-step distilled LoRAs
                                # (with guidance_scale=1); replaces num_steps; () = the solver's grid
      warp_timesteps=False,     # map `timesteps` through `shift` (CausVid / LightX2V warp_denoising_step)
      # Fewer DiT calls per video (kaleido_jax/diffusion/caching.py); thresholds are traced: one compilation each.
      cache='none',             # step cache: none | magcache | teacache (both read cache_calibration)
      cache_calibration='',     # step_cache.json of --mode calibrate; '' = WORKDIR/step_cache.json
      magcache_threshold=0.12,  # MagCache's Wan2.1 defaults: accumulated-error bound, max consecutive skips,
      magcache_max_skip=2,      # and the fraction of first steps always computed
      magcache_retention=0.2,
      teacache_threshold=0.2,   # TeaCache: bound on the accumulated rescaled input change; first steps computed
      teacache_retention=0.1,
      cfg_cache=False,          # FasterCache-style: full guidance every cfg_cache_period steps, the conditional
      cfg_cache_period=2,       # branch alone between (the other branches from the cached differences),
      cfg_cache_start=0.2,      # after this fraction of the steps
      text_kv_cache=False,      # cross-attention keys / values of the prompt computed once, not every step
      guidance_scale=6.0,       # text classifier-free guidance; same references in both branches
      image_guidance_scale=0.0, # optional third branch without references (0 = off)
      negative_prompt=KALEIDO_NEGATIVE_PROMPT,  # unconditional text of CFG ('' = the empty prompt); Wan
                                # checkpoints: WAN_NEGATIVE_PROMPT (configs/wan_1_3b.py)
      num_frames=81,
      height=512,               # upstream's sampling size, 512x896 ("Supports 512P"); it trains at 480x832
      width=896,
      fps=16,
      seed=0,
      # What `--mode sample` generates (cli/main.py's --prompt / --ref / --out / --checkpoint set these).
      prompt='',
      prompts_root='',          # the folder a prompt set's image paths are relative to ('' = the set's own folder;
                                # OpenS2V-Eval: the benchmark folder)
      prompts='',               # a prompt set (Kaleido's prompt@@img lines or a JSON manifest): one video per request
                                # in the output directory, resumable, over every chip and host (kaleido_jax/batch.py)
      refs=(),                  # reference image paths, one per subject (at most model.max_refs)
      output='',                # video path (.mp4 / .gif); '' = WORKDIR/samples/sample.mp4
      checkpoint='',            # '' = the workdir's latest training checkpoint, else init_from.transformer
      use_ema=True,             # sample with the EMA weights when the checkpoint has them
      loras=(),                 # LoRA files merged into the DiT as it loads, 'path' or 'path:scale' each (diffusers /
                                # PEFT, Wan / ComfyUI or kohya layout; kaleido_jax/convert/lora.py); --lora PATH:SCALE
      gif=True,                 # also write a GIF and a PNG strip next to the video
      text_encoder_device='accelerator',  # where umT5 lives and runs: accelerator | host (the host CPU; keeps the
                                # 5.7B encoder out of HBM, prompts are encoded once each)
      layout='config',          # config (mesh, VAE tiles, umT5 device as set) | auto (chosen from the chips the run
                                # has: kaleido_jax/parallel/sampling_layout.py)
  ))
  cfg.update(overrides)
  return cfg


def train_config(**overrides) -> ml_collections.ConfigDict:
  """Optimiser and loop. Defaults are Kaleido's public fine-tune recipe."""
  cfg = ml_collections.ConfigDict(dict(
      num_steps=1000,
      learning_rate=5e-6,
      schedule='constant',      # constant | warmup_constant | cosine
      warmup_steps=0,
      b1=0.9,
      b2=0.95,
      weight_decay=1e-4,
      grad_clip=0.1,
      grad_accum=1,
      moments_dtype='float32',  # Adam first moment: float32 | bfloat16 (train/state.py make_optimizer)
      ema_decay=0.0,            # 0 = no EMA
      log_every=10,
      console='log',            # log (clu's writer lines, INFO logs) | progress (one line: steps/s, ETA; train/console.py)
      checkpoint_every=500,
      keep_checkpoints=3,
      keep_every=0,             # also keep every K-th step forever (0 = off)
      async_checkpointing=True,
      lock_stale_s=900.0,       # seconds: a WORKDIR/train.lock not refreshed this long is taken over
      profile_steps=0,          # clu Profile for this many steps (0 = off)
      input='synthetic_latents',  # synthetic_latents (in-memory latents) | pipeline (data.make_dataset)
      model_factory='',         # 'module:Class' called as Class(config.model, rngs=...); '' = KaleidoDiT
      stop_on_nan=True,         # non-finite loss -> stop, naming the step; no checkpoint of that state
      peak_tflops_per_device=0.0,  # for MFU; 0 = look up jax.devices()[0].device_kind (unknown -> no MFU)
      # LoRA fine-tuning (kaleido_jax/model/lora.py): rank 0 trains every weight; rank r > 0 trains only rank-r
      # adapters on `targets` (block linears: paths, leaf names or groups attention | self_attn | cross_attn |
      # qkv | ffn | all) over a frozen base from init_from (model.param_dtype / model.quantization: bf16 or
      # quantized); the adapters are written as WORKDIR/lora/pytorch_lora_weights.safetensors (diffusers / PEFT).
      lora=ml_collections.ConfigDict(dict(rank=0, alpha=0.0, targets=('attention', 'ffn'), rslora=False)),
  ))
  cfg.update(overrides)
  return cfg


def export_config(**overrides) -> ml_collections.ConfigDict:
  """`--mode export`: the jitted sampler (text encoder → sampler → decoder) as a `jax.export` artifact."""
  cfg = ml_collections.ConfigDict(dict(
      output='',                # artifact directory; '' = WORKDIR/exported
      weights='argument',       # argument (weights.npz beside the program) | baked (constants in the program)
      platforms=('cpu', 'cuda', 'tpu'),
      max_refs=0,               # reference slots of the artifact; 0 = model.max_refs
  ))
  cfg.update(overrides)
  return cfg


def eval_config(**overrides) -> ml_collections.ConfigDict:
  """`--mode eval`: generate for held-out synthetic reference sets and score them (kaleido_jax/eval/)."""
  cfg = ml_collections.ConfigDict(dict(
      num_videos=8,             # held-out clips to generate for
      batch_size=4,             # videos per sampler call
      exported='',              # run this exported artifact instead of the model code ('' = model code)
      samples_dir='',           # score this `--mode sample --prompts` output directory instead (its manifest's
                                # videos against their own references; no generation)
      output_dir='',            # '' = WORKDIR/eval
      benchmark='',             # OpenS2V-Eval's JSON: score samples_dir's <id>.mp4 as the benchmark does
                                # (kaleido_jax/eval/opens2v.py: its metric files, its Total, partial when a metric
                                # is absent)
      benchmark_root='',        # the benchmark folder its img_paths are relative to ('' = the JSON's folder)
      benchmark_domain='',      # open | single | human (the Total's weights); '' = from the JSON's file name
      benchmark_weights='',     # the benchmark's weight folder (OpenS2V-Weight): the paths below default to its
                                # aesthetic-model.pth, glint360k_curricular_face_r101_backbone.bin, face_extractor/
                                # and yolo_world_v2_l_image_prompt_adapter-719a7afb.pth
      aesthetic_clip='',        # Aesthetics: a transformers CLIP directory (openai/clip-vit-large-patch14)
      aesthetic_mlp='',         # Aesthetics: the benchmark's aesthetic-model.pth (LAION's MLP)
      facesim_model='',         # FaceSim-Cur: CurricularFace IR-101 glint360k_curricular_face_r101_backbone.bin
      face_extractor='',        # FaceSim-Cur: insightface's face_extractor/ (needs insightface + onnxruntime);
                                # without it faces are aligned by dlib, scored apart from the Total
      gme_model='',             # GmeScore: the gme-Qwen2-VL-7B-Instruct directory (safetensors, tokenizer.json)
      gme_dtype='bfloat16',     # GmeScore: the network's weights and activations (the benchmark runs float16)
      yoloworld_model='',       # NexusScore: YOLO-World's yolo_world_v2_l_image_prompt_adapter-719a7afb.pth ('' = in
                                # benchmark_weights); with gme_model
      yoloworld_clip='',        # NexusScore: the CLIP ViT-B/32 directory its image prompts go through
                                # (openai/clip-vit-base-patch32); NexusScore runs when this is given
      qalign_model='',          # MotionSmoothness: the Q-Align q-future/one-align directory (config.json, shards,
                                # tokenizer.model, preprocessor_config.json)
      qalign_dtype='bfloat16',  # MotionSmoothness: the network's weights (the benchmark runs float16)
      scorers=('lpips', 'histogram'),
      save_videos=4,            # write this many GIF strips of generated vs target
  ))
  cfg.update(overrides)
  return cfg


def mesh_config(**overrides) -> ml_collections.ConfigDict:
  """Device mesh (maxdiffusion axes, kaleido_jax/parallel/mesh.py): total sizes, -1 fills with the remaining
  devices; on a multislice job dcn_* say how many slices each axis spans (-1: the remaining ones)."""
  cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=1, context=1, tensor=1,
                                       dcn_data=-1, dcn_fsdp=1, dcn_context=1, dcn_tensor=1))
  cfg.update(overrides)
  return cfg


def base_config() -> ml_collections.ConfigDict:
  """Every key the package reads, with the released-Kaleido values where one exists."""
  config = ml_collections.ConfigDict()
  config.mode = 'train'         # train | sample | export | eval | prepare | demo | calibrate
  config.seed = 0
  config.model = model_config()
  config.vae = vae_config()
  config.text_encoder = text_encoder_config()
  config.data = data_config()
  config.diffusion = diffusion_config()
  config.sample = sample_config()
  config.train = train_config()
  config.mesh = mesh_config()
  config.export = export_config()
  config.eval = eval_config()
  # Where weights come from. '' = random init (tests, demo) or the workdir's own checkpoints.
  config.init_from = ml_collections.ConfigDict(dict(
      transformer='', transformer_format='diffusers',
      vae='', vae_format='diffusers',
      text_encoder='', text_encoder_format='transformers',
  ))
  return config
