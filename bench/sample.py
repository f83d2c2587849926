"""Sampling speed: the one-compile lax.scan sampler vs a per-step loop, and a 1.3B step vs diffusers.

  python bench/sample.py [--config configs/demo.py] [--batch 1] [--repeats 3]
                         [--big-config configs/wan_1_3b.py] [--layers 1] [--frames 5] [--refs 1]
  python bench/sample.py --aot [--rows v6e-1,v5e-1] [--override model.attention=xla]   # the TPU fit table
  python bench/sample.py --caches [--workdir /tmp/kaleido-demo]   # step / CFG / text caches on the trained demo
      # (bench/caches.py: DiT calls per video, s / video, fidelity, presence)
  python bench/sample.py --skip-demo --frames 21 --refs 0 --cfg-batch 1   # true 480x832x81 size: 32760
      # video tokens; our scores need ~100 GiB per batch row (--cfg-batch 2: ~200 GiB), ~5 min per layer-call on 2 cores

Table 1 (demo config, random weights): seconds per video of `sampler.sample` (the whole denoising loop is one
`lax.scan` in one jit) beside the same model driven the diffusers way: a Python loop that dispatches one
jitted guided step (CFG batch, Euler update) per denoise step. Compile = first call - steady-state call.

Table 2 (1.3B architecture, fp32, random weights): one CFG denoise step (batch 2) at 480p tokens. A 30-layer
step at 32760 video tokens takes far too long on a 2-core CPU, so we *measure* `--layers` layers at `--frames`
latent frames (default 5 x 60 x 104 = 7800 video tokens, keeping the default run under ~10 minutes on 2
cores) and *extrapolate*: x 30/layers to the full depth (linear: every layer costs the same), x 2/batch
when the CFG batch was measured as one branch (`--cfg-batch auto` picks 1 when our materialised attention
scores would not fit in memory), and a FLOP-scaled estimate (kaleido_jax/train/flops.py, attention
quadratic in tokens) for 21 latent frames. The peer is diffusers' WanTransformer3DModel (torch eager,
inference_mode, same config and layer count) on the video tokens alone (diffusers has no references), beside
ours with refs=None; an extra row gives ours with `--refs` reference latents (1 frame of 60 x 104 each).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from kaleido_jax.diffusion import guidance, sampler, schedules  # noqa: E402
from kaleido_jax.model.dit import KaleidoDiT  # noqa: E402
from kaleido_jax.train import flops as flops_lib  # noqa: E402
from kaleido_jax.train import inputs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_LAYERS, FULL_FRAMES = 30, 21  # Wan2.1-1.3B depth; 81 frames -> 1 + 80/4 latent frames


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_cfg", os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def available_bytes() -> float:
  """MemAvailable: the memory a big attention buffer can take without swapping others' work out."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return float(line.split()[1]) * 1024
  except OSError:
    pass
  return float("inf")


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def first_and_median(fn, repeats: int) -> tuple[float, float]:
  """(first call incl. compile, median of `repeats` later calls)."""
  first = timed(fn)
  return first, statistics.median(timed(fn) for _ in range(max(1, repeats)))


def sample_latent_shape(config) -> tuple[int, int, int, int]:
  """(F, H, W, C) the sampler denoises at `config.sample` sizes, under whatever codec the config names.

  Prefers the codec's own factors (wan VAE or pixel codec); falls back to the data-size helper.
  """
  try:
    from kaleido_jax.model import codec as codec_lib
    t, s, _ = codec_lib.factors(config.vae)
    f, h, w = int(config.sample.num_frames), int(config.sample.height), int(config.sample.width)
    return (1 + (f - 1) // t, h // s, w // s, int(config.model.in_channels))
  except (ImportError, AttributeError, KeyError):
    return inputs.latent_shape(config)


# --- Table 1: the demo sampler ----------------------------------------------------------------------------

def demo_rows(args) -> tuple[list, str]:
  config = load_config(args.config)
  scfg = config.sample
  model = KaleidoDiT(config.model, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  shape = sample_latent_shape(config)
  b, slots, text_len = args.batch, int(config.model.max_refs), args.demo_text_len
  rng = np.random.default_rng(0)
  noise = sampler.initial_noise(list(range(b)), shape)
  text_cond = jnp.asarray(rng.normal(size=(b, text_len, config.model.text_dim)).astype(np.float32))
  text_uncond = jnp.asarray(rng.normal(size=(1, text_len, config.model.text_dim)).astype(np.float32))
  refs = ref_mask = None
  if slots:
    # 1..max_refs real references per video (at most 3, Kaleido's limit), the rest padded slots.
    refs = jnp.asarray(rng.normal(size=(b, slots) + shape[1:]).astype(np.float32))
    counts = rng.integers(1, min(3, slots) + 1, size=b)
    ref_mask = jnp.asarray(np.arange(slots)[None, :] < counts[:, None])
  steps = int(scfg.num_steps)
  text_scale = float(scfg.guidance_scale)
  image_scale = float(scfg.get("image_guidance_scale", 0.0))

  def scan_once():
    return jax.block_until_ready(sampler.sample(graphdef, state, noise, text_cond, text_uncond, refs, ref_mask,
                                                cfg=scfg))

  # The peer: one jitted guided step per dispatch, the Euler update in the same jit, timestep an argument
  # (so it compiles once), the loop in Python as diffusers' pipelines run it.
  sched = schedules.make_schedule("euler", steps, float(scfg.shift))

  @jax.jit
  def step(state, x, t, dt, text_cond, text_uncond, refs, ref_mask):
    def denoise(x, tt, text, r, m):
      return nnx.merge(graphdef, state)(x, tt, text, refs=r, ref_mask=m)
    v = guidance.guided_velocity(denoise, x, jnp.full((x.shape[0],), t, jnp.float32), text_cond, text_uncond,
                                 refs, ref_mask, text_scale=text_scale, image_scale=image_scale)
    return x + dt * v

  ts = [jnp.float32(t) for t in sched.timesteps]
  dts = [jnp.float32(d) for d in sched.sigmas[1:] - sched.sigmas[:-1]]

  def loop_once():
    x = noise
    for t, dt in zip(ts, dts):
      x = step(state, x, t, dt, text_cond, text_uncond, refs, ref_mask)
    return jax.block_until_ready(x)

  # First calls (compile), then the two loops interleaved so drift from other jobs on a shared machine hits
  # both alike; medians.
  scan_first = timed(scan_once)
  step_first = timed(lambda: jax.block_until_ready(step(state, noise, ts[0], dts[0], text_cond, text_uncond, refs,
                                                        ref_mask)))
  scan_t, loop_t = [], []
  for _ in range(max(1, args.repeats)):
    scan_t.append(timed(scan_once))
    loop_t.append(timed(loop_once))
  scan_steady, loop_steady = statistics.median(scan_t), statistics.median(loop_t)
  x_scan, x_loop = scan_once(), loop_once()
  step_compile = step_first - loop_steady / steps

  rows = [("`sampler.sample` (one jit, lax.scan)", scan_first - scan_steady, scan_steady),
          ("Python loop of a jitted step (diffusers-style)", step_compile, loop_steady)]
  tokens_v, tokens_r = flops_lib.tokens(shape, slots, shape[1:3], config.model.patch_size)
  branches = guidance.num_branches(text_scale, image_scale)
  check = (f"max |scan - loop| = {float(jnp.max(jnp.abs(x_scan - x_loop))):.1e}" if scfg.solver == "euler"
           else f"peer uses Euler updates on the {scfg.solver} run's step count (same model calls)")
  head = (f"### Sampler, {args.config}: {config.model.num_layers} layers, dim "
          f"{config.model.num_heads * config.model.head_dim}, latents {shape} ({config.vae.get('kind', 'wan')} "
          f"codec) = {tokens_v} video + {tokens_r} reference tokens ({slots} slots, real refs per video "
          f"{list(map(int, counts)) if slots else []}), text {text_len}, {steps} {scfg.solver} steps, CFG "
          f"{text_scale} ({branches} branches), batch {b}, fp32, {cores()} cores; {check}")
  table = [head, "",
           "| sampler | compile (s) | s / video | s / denoise step | speed-up vs loop |",
           "|---|---|---|---|---|"]
  loop_t = rows[1][2]
  for name, comp, steady in rows:
    table.append(f"| {name} | {comp:.2f} | {steady / b:.3f} | {steady / steps:.4f} | {loop_t / steady:.2f}x |")
  return rows, "\n".join(table)


# --- Table 2: a 1.3B-architecture denoise step ------------------------------------------------------------

def attention_bytes(batch: int, heads: int, tokens: int) -> float:
  """Our xla attention materialises fp32 logits and probabilities: 2 x B x H x L^2 x 4 bytes per layer.

  (Peak RSS of one layer at 7800 tokens, batch 2, was 12.7 GB against 10.9 GB from this formula.)
  """
  return 2.0 * batch * heads * tokens * tokens * 4


def pick_batch(choice: str, heads: int, tokens: int, avail: float) -> int:
  """CFG batch to measure: 2 (both branches) if the scores fit in half the free memory, else 1, else 0."""
  for b in ((2, 1) if choice == "auto" else (int(choice),)):
    if attention_bytes(b, heads, tokens) < 0.5 * avail:
      return b
  return 0


def big_rows(args) -> str:
  config = load_config(args.big_config)
  mcfg = config.model
  mcfg.update(num_layers=args.layers, dtype="float32", param_dtype="float32", remat_policy="none")
  _, h_lat, w_lat = (inputs.latent_shape(config)[:3])
  f_lat, c = args.frames, int(mcfg.in_channels)
  heads, dim = int(mcfg.num_heads), int(mcfg.num_heads * mcfg.head_dim)
  v_tok, r_tok = flops_lib.tokens((f_lat, h_lat, w_lat), args.refs, (h_lat, w_lat), mcfg.patch_size)
  avail = available_bytes()
  rng = np.random.default_rng(0)
  video = rng.normal(size=(2, f_lat, h_lat, w_lat, c)).astype(np.float32)
  text = rng.normal(size=(2, args.text_len, mcfg.text_dim)).astype(np.float32)
  t = np.full((2,), 500.0, np.float32)
  refs = rng.normal(size=(2, args.refs, h_lat, w_lat, c)).astype(np.float32) if args.refs else None
  notes = []

  def skipped(name, tokens):
    notes.append(f"{name} skipped: our attention scores at {tokens} tokens need "
                 f"~{attention_bytes(1, heads, tokens) / 2**30:.0f} GiB per batch row, over half of the "
                 f"{avail / 2**30:.0f} GiB available (use a smaller --frames / --refs)")

  model = KaleidoDiT(mcfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  del model

  @jax.jit
  def forward(state, video, t, text, refs):
    # All reference slots are real here, so no ref_mask (a mask adds one more L^2 buffer).
    return nnx.merge(graphdef, state)(video, t, text, refs=refs)

  measured = []  # (name, video tokens, ref tokens, measured batch, seconds)
  batch_plain = pick_batch(args.cfg_batch, heads, v_tok, avail)
  if batch_plain:
    plain = tuple(jnp.asarray(x[:batch_plain]) for x in (video, t, text))
    first, steady = first_and_median(
        lambda: forward(state, *plain, None).block_until_ready(), args.big_repeats)
    measured.append(("kaleido_jax (jit), refs=None", v_tok, 0, batch_plain, steady))
    notes.append(f"our compile + first call {first:.1f} s (compile ~{max(0.0, first - steady):.1f} s)")
  else:
    skipped("kaleido_jax refs=None row", v_tok)
  if args.refs:
    batch_refs = pick_batch(args.cfg_batch, heads, v_tok + r_tok, avail)
    if batch_refs:
      ref_args = tuple(jnp.asarray(x[:batch_refs]) for x in (video, t, text, refs))
      _, steady_r = first_and_median(lambda: forward(state, *ref_args).block_until_ready(), args.big_repeats)
      measured.append((f"kaleido_jax (jit), {args.refs} ref(s)", v_tok, r_tok, batch_refs, steady_r))
    else:
      skipped(f"{args.refs}-refs row", v_tok + r_tok)
  del state

  if not args.no_torch:
    import torch
    from diffusers import WanTransformer3DModel
    torch.set_num_threads(cores())
    torch.manual_seed(0)
    tm = WanTransformer3DModel(
        patch_size=tuple(mcfg.patch_size), num_attention_heads=heads, attention_head_dim=int(mcfg.head_dim),
        in_channels=c, out_channels=int(mcfg.out_channels), text_dim=int(mcfg.text_dim),
        freq_dim=int(mcfg.freq_dim), ffn_dim=int(mcfg.ffn_dim), num_layers=args.layers,
        cross_attn_norm=bool(mcfg.cross_attn_norm), qk_norm="rms_norm_across_heads", eps=float(mcfg.eps),
        rope_max_seq_len=1024).eval()
    # Same batch as our matched row (torch's SDPA does not materialise the scores, so 2 always fits).
    bt = batch_plain or (1 if args.cfg_batch != "2" else 2)
    tv = torch.from_numpy(video[:bt].transpose(0, 4, 1, 2, 3).copy())  # diffusers is channels-first
    tt, ttext = torch.from_numpy(t[:bt]), torch.from_numpy(text[:bt])

    def torch_fwd():
      with torch.inference_mode():
        return tm(tv, tt, ttext, return_dict=False)[0]

    # Eager has nothing to compile; one warm-up call anyway (allocator, thread pool).
    _, steady_t = first_and_median(torch_fwd, args.big_repeats)
    measured.append(("diffusers WanTransformer3DModel (torch eager)", v_tok, 0, bt, steady_t))
    del tm

  full_cfg = config.model.copy_and_resolve_references()
  full_cfg.num_layers = FULL_LAYERS
  v_full, _ = flops_lib.tokens((FULL_FRAMES, h_lat, w_lat), 0, (h_lat, w_lat), mcfg.patch_size)
  r_full = args.refs * (h_lat // mcfg.patch_size[1]) * (w_lat // mcfg.patch_size[2])
  depth = FULL_LAYERS / args.layers
  peer = next((m for m in measured if m[0].startswith("diffusers")), None)
  head = (f"### 1.3B-architecture denoise step, {args.big_config} (dim {dim}, {heads} heads, ffn {mcfg.ffn_dim}, "
          f"fp32, random weights), latent {f_lat}x{h_lat}x{w_lat} (81 frames = {FULL_FRAMES}), text "
          f"{args.text_len}, {cores()} cores. **Measured**: {args.layers} layer(s) at the batch in the table "
          f"(2 = both CFG branches; 1 = one branch, when our attention scores would not fit in memory). "
          f"**Extrapolated**: x{depth:g} to {FULL_LAYERS} layers (linear in depth) and x2/batch to the CFG "
          f"batch of 2; the last column further scales by analytic forward FLOPs (kaleido_jax/train/flops.py) "
          f"to {FULL_FRAMES} latent frames = {v_full} video tokens (an estimate: attention is quadratic in "
          f"tokens).")
  table = [head, "",
           f"| model | tokens (video + refs) | measured: {args.layers} layer(s) (s) | batch | "
           f"extrapolated: {FULL_LAYERS} layers, CFG batch 2 (s) | speed-up vs diffusers | "
           f"estimate: {FULL_FRAMES} frames, {FULL_LAYERS} layers, CFG (s) |",
           "|---|---|---|---|---|---|---|"]
  for name, vt, rt, bm, sec in measured:
    factor = depth * 2 / bm
    full = sec * factor
    scale = (flops_lib.forward_flops(full_cfg, v_full, r_full if rt else 0, args.text_len)
             / flops_lib.forward_flops(full_cfg, vt, rt, args.text_len))
    ratio = "-" if not peer else (f"{peer[4] * 2 / peer[3] / (sec * 2 / bm):.2f}x" if rt == 0 else "(more tokens)")
    table.append(f"| {name} | {vt} + {rt} | {sec:.2f} | {bm} | {full:.1f} (x{factor:g}) | {ratio} | "
                 f"{full * scale:.0f} (FLOPs x{scale:.2f}) |")
  table += ["", "; ".join(notes)]
  return "\n".join(table)


# The one-chip / many-chip sampling fit table (issue: the released Kaleido-14B on one TPU chip and many):
# (row, TPU topology, config overrides on configs/kaleido_14b_sample.py: 512x896x81 (upstream's sampling size;
# 480x832 before 2026-12-06), 3 refs, text CFG
# [, programs compiled: default DiT call, umT5 and a VAE decode chunk]).
_INT8_UMT5 = {'text_encoder.quantization': 'int8'}
_SET = {'sample.layout': 'config'}  # rows that name their own mesh / tiles / umT5 device
SAMPLE_AOT_ROWS = [
    # configs/kaleido_14b_sample.py as shipped (sample.layout='auto': mesh, VAE tiles and umT5's device from the
    # chips, kaleido_jax/parallel/sampling_layout.py) with the weight format each chip takes.
    ('shipped layout, v5e-1: int4, umT5 int8', 'v5e:1x1', {'model.quantization': 'int4', **_INT8_UMT5}),
    ('shipped layout, v6e-1: int8, umT5 int8', 'v6e:1x1', {'model.quantization': 'int8', **_INT8_UMT5}),
    ('shipped layout, v5p-1: bf16', 'v5p:1x1x1', {}),
    ('shipped layout, v6e-8: bf16', 'v6e:2x4', {}),
    ('shipped layout, v5p-8: bf16', 'v5p:2x2x1', {}),
    ('14B 512x896+3 refs, int8, v6e-1', 'v6e:1x1', {'model.quantization': 'int8', **_INT8_UMT5, **_SET}),
    ('14B 512x896+3 refs, int4, v5e-1 (umT5 int8, VAE 512-px tiles)', 'v5e:1x1',
     {'model.quantization': 'int4', **_INT8_UMT5, 'vae.tile_size': 512, **_SET}),
    ('14B 512x896+3 refs, bf16, v5p-1', 'v5p:1x1x1', {**_SET}),
    # The notebook's settings (S2VPipeline keeps its weights between videos: the resident plan must fit).
    ('notebook v6e-1: int8, umT5 int8 on the host, VAE 512-px tiles', 'v6e:1x1',
     {'model.quantization': 'int8', **_INT8_UMT5, 'sample.text_encoder_device': 'host', 'vae.tile_size': 512, **_SET}),
    ('notebook v5e-1: int4, umT5 int8 on the host, VAE 256-px tiles', 'v5e:1x1',
     {'model.quantization': 'int4', **_INT8_UMT5, 'sample.text_encoder_device': 'host', 'vae.tile_size': 256, **_SET}),
    ('14B 512x896+3 refs, int8 weights x int8 activations, v6e-1 (DiT only)', 'v6e:1x1',
     {'model.quantization': 'int8', 'model.quantize_activations': True, **_SET}, ('dit',)),
    ('14B 720p+3 refs, bf16, v6e-8, data 2 x context 4', 'v6e:2x4',
     {'sample.height': 720, 'sample.width': 1280, 'mesh.data': 2, 'mesh.context': 4,
      'model.context_parallel': 'ulysses', **_SET}),
    # The VAE runs replicated on every chip (its decode is not sharded): at 720p one chunk wants 30 GiB, so the
    # resident plan needs it in tiles.
    ('  same, VAE 512-px tiles', 'v6e:2x4',
     {'sample.height': 720, 'sample.width': 1280, 'mesh.data': 2, 'mesh.context': 4,
      'model.context_parallel': 'ulysses', 'vae.tile_size': 512, **_SET}),
]


def aot_table(args) -> str:
  """One row per program (DiT call, umT5, VAE chunk) and plan of every SAMPLE_AOT_ROWS entry."""
  from kaleido_jax import config as kcfg  # pylint: disable=g-import-not-at-top
  from kaleido_jax.tools import aot  # pylint: disable=g-import-not-at-top
  out = ["| row | slice | mesh | program | weights GiB | total GiB | % HBM | compile s | verdict |",
         "|---|---|---|---|---|---|---|---|---|"]
  print("\n".join(out), flush=True)
  for name, topo, overrides, *programs in SAMPLE_AOT_ROWS:
    if args.rows and not any(r in name for r in args.rows.split(",")):
      continue
    config = load_config("configs/kaleido_14b_sample.py")
    for k, v in overrides.items():
      kcfg.set_path(config, k, v)
    for o in args.override:
      kcfg.set_path(config, *o.split("=", 1))
    r = aot.analyse_sample(config, topo, **({"programs": programs[0]} if programs else {}))
    g = lambda x: f"{x / aot.GIB:.2f}"
    pct = lambda x: f"{100 * x / r['capacity']:.1f}"
    mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
    lines = []
    for prog, row in r["rows"].items():
      lines.append(f"| {name} | {topo} | {mesh} | {row['what']} | {g(row['weights'])} | {g(row['total'])} | "
                   f"{pct(row['total'])} | {row['compile_s']:.0f} | {'does not fit' if row.get('note') else ''} |")
    lines.append(f"| {name} | {topo} | {mesh} | plan: one-shot `--mode sample` peak | | {g(r['one_shot'])} | "
                 f"{pct(r['one_shot'])} | | {'fits' if r['fits'] else 'does not fit'} |")
    lines.append(f"| {name} | {topo} | {mesh} | plan: S2VPipeline, all resident (umT5 on "
                 f"{r['text_encoder_device']}) | | {g(r['resident'])} | {pct(r['resident'])} | | "
                 f"{'fits' if r['resident'] <= r['capacity'] else 'does not fit'} |")
    print("\n".join(lines), flush=True)
    out += lines
  return "\n".join(out)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--batch", type=int, default=1, help="videos per sampler call (demo table)")
  p.add_argument("--demo-text-len", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3, help="timed calls per demo sampler (median)")
  p.add_argument("--big-config", default="configs/wan_1_3b.py")
  p.add_argument("--layers", type=int, default=1, help="layers actually run for the 1.3B table")
  p.add_argument("--frames", type=int, default=5, help="latent frames for the 1.3B table (81 video frames = 21)")
  p.add_argument("--refs", type=int, default=1,
                 help="reference latents for ours' extra row (0 = no row; 3 at 5 frames needs ~14 GiB of scores)")
  p.add_argument("--text-len", type=int, default=512, help="text tokens of the 1.3B table (Wan: 512)")
  p.add_argument("--cfg-batch", choices=("auto", "1", "2"), default="auto",
                 help="batch measured for the CFG step (1 = one branch, x2 extrapolated)")
  p.add_argument("--big-repeats", type=int, default=1, help="timed calls per 1.3B row after a warm-up call")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--skip-demo", action="store_true")
  p.add_argument("--skip-big", action="store_true")
  p.add_argument("--aot", action="store_true", help="the TPU sampling fit table (SAMPLE_AOT_ROWS), nothing else")
  p.add_argument("--rows", default="", help="--aot: comma list of substrings of row names (default: all)")
  p.add_argument("--override", action="append", default=[], help="--aot: config key=value for every row")
  p.add_argument("--caches", action="store_true", help="the cache table on the trained demo (bench/caches.py)")
  p.add_argument("--workdir", default="/tmp/kaleido-demo", help="--caches: the demo workdir (trained if empty)")
  p.add_argument("--synthetic-seeds", default="0,1", help="--caches: scored held-out sets")
  p.add_argument("--calibration-seed", type=int, default=7, help="--caches: held-out set the calibration uses")
  p.add_argument("--settings", default="", help="--caches: comma list of setting names (default: all)")
  args = p.parse_args()
  if args.caches:
    import sys  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import caches  # pylint: disable=g-import-not-at-top
    caches.main(args)
    return
  if args.aot:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    aot_table(args)
    return
  jax.config.update("jax_default_matmul_precision", "highest")

  out = []
  if not args.skip_demo:
    out.append(demo_rows(args)[1])
  if not args.skip_big:
    out.append(big_rows(args))
  print("\n\n" + "\n\n".join(out))


if __name__ == "__main__":
  main()
