r"""Ahead-of-time fit check: compile the real training step for a TPU slice on this (CPU) machine.

  python -m kaleido_jax.tools.aot --config configs/kaleido_14b.py --topology v5p:2x2x2 \
      [--config.mesh.fsdp=-1] [--config.model.remat_policy=full] [--batch_size 0] [--num_slices 2]
  python -m kaleido_jax.tools.aot --step sample --config configs/kaleido_14b.py --topology v6e:1x1 \
      --config.model.quantization=int8 [--config.sample.text_encoder_device=host]

With libtpu installed (`pip install "jax[tpu]==<jax version>"`), `get_topology_desc` gives abstract TPU
devices; the train step (same code as `kaleido_jax.train.step`, same shardings) is lowered for them and
compiled by the TPU compiler. Printed per chip: HBM for arguments (params, optimiser state, batch),
temporaries (activations, gradients, collectives' buffers), output not aliased to a donated input, generated
code, and their total against the chip's HBM capacity with the headroom; host memory the program offloads to;
FLOPs per step: the analytic model count (`kaleido_jax.train.flops`), the traced matmul census (what the
step runs, remat recomputation included) and XLA's cost analysis, labelled for what it is (it counts a
while loop's body once, so the scanned layers once); then "fits" or "does not fit". Nothing is allocated:
the model is built with `nnx.eval_shape`. Set JAX_PLATFORMS=cpu (the host backend stays CPU; the TPU backend
is only a compiler).
"""

from __future__ import annotations

import os

if __name__ == '__main__':  # the command compiles on the CPU host: set before JAX starts (cli/aot.py says why)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import re  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from kaleido_jax import pipeline  # noqa: E402
from kaleido_jax.diffusion import guidance  # noqa: E402
from kaleido_jax.diffusion import sampler as sampler_lib  # noqa: E402
from kaleido_jax.model import codec as codec_lib  # noqa: E402
from kaleido_jax.model import quantization  # noqa: E402
from kaleido_jax.model import text_encoder as te  # noqa: E402
from kaleido_jax.parallel import mesh as mesh_lib  # noqa: E402
from kaleido_jax.parallel import sampling_layout  # noqa: E402
from kaleido_jax.parallel import shardings as shardings_lib  # noqa: E402
from kaleido_jax.train import flops as flops_lib  # noqa: E402
from kaleido_jax.train import inputs  # noqa: E402
from kaleido_jax.train import loop  # noqa: E402
from kaleido_jax.train import state as state_lib  # noqa: E402
from kaleido_jax.train import step as step_lib  # noqa: E402


# HBM per chip in GiB (Cloud TPU documentation).
HBM_GIB = {'v4': 32, 'v5e': 16, 'v5litepod': 16, 'v5p': 95, 'v6e': 32,
           'tpu7x': 96}  # TPU7x: 192 GiB a chip of two TensorCores, each its own JAX device
GIB = 1024 ** 3
# XLA TPU's refusal, e.g. "... HLO temporaries (360.64G) exceeds available HBM (95.74G)".
_OOM = re.compile(r'RESOURCE_EXHAUSTED.*?\(([0-9.]+)([KMGT])\) exceeds', re.S)
_UNIT = {'K': 1024, 'M': 1024 ** 2, 'G': GIB, 'T': 1024 ** 4}


def topology_devices(topology: str, num_slices: int = 1):
  """Abstract TPU devices of `generation:AxBxC` (needs libtpu; no TPU), `num_slices` of them joined over DCN
  (each device's slice_index says which). One-chip slices (v6e:1x1, v5e:1x1, v5p:1x1x1) need
  chips_per_host_bounds=(1, 1, 1): without it libtpu assumes a full host's chips."""
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  dims = [int(d) for d in topology.split(':')[1].split('x')]
  extra = {'chips_per_host_bounds': (1, 1, 1)} if all(d == 1 for d in dims) else {}
  if num_slices > 1:
    extra['num_slices'] = num_slices
  return topologies.get_topology_desc(topology, platform='tpu', **extra).devices


def _memory(compiled) -> dict[str, float]:
  """Per-chip bytes of a compiled program: arguments, temporaries, output not aliased, code, their total."""
  mem = compiled.memory_analysis()
  out = max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0)
  total = mem.argument_size_in_bytes + mem.temp_size_in_bytes + out + mem.generated_code_size_in_bytes
  return dict(args=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes, out=out,
              code=mem.generated_code_size_in_bytes, total=total,
              host_temp=getattr(mem, 'host_temp_size_in_bytes', 0))


def _compile(lowered) -> tuple[Any, dict[str, float] | None]:
  """(compiled, None) or (None, the refusal's numbers) when the TPU compiler says it cannot fit."""
  try:
    return lowered.compile(), None
  except Exception as e:  # pylint: disable=broad-except
    m = _OOM.search(str(e))
    if m is None:
      raise
    need = float(m.group(1)) * _UNIT[m.group(2)]
    return None, dict(args=float('nan'), temp=need, out=float('nan'), code=float('nan'), total=need,
                      host_temp=0, note=str(e).splitlines()[0][:200])


def hbm_bytes(topology: str) -> int:
  gen = topology.split(':')[0].lower()
  if gen not in HBM_GIB:
    raise ValueError(f'unknown TPU generation {gen!r}; known: {sorted(HBM_GIB)}')
  return HBM_GIB[gen] * GIB


def analyse(config, topology: str, batch_size: int = 0, num_refs: int = -1, num_slices: int = 1) -> dict[str, Any]:
  """Lower + compile the train step for `topology`; returns the numbers the table prints.

  The config is first validated as `--mode train` would on that slice (its chips, and the batch rows each of
  its hosts feeds): a config the trainer refuses raises `config.ConfigError` before anything compiles. The batch is the one the configured
  input yields (`train.inputs.batch_spec`: keys, shapes, dtypes); `batch_size` / `num_refs` (> 0 / >= 0)
  override `data.batch_size` / `data.max_refs` before validation.
  """

  config = config.copy_and_resolve_references()
  if batch_size:
    config.data.batch_size = int(batch_size)
  if num_refs >= 0:
    config.data.max_refs = int(num_refs)
  devices = topology_devices(topology, num_slices)
  loop.validate(config, len(devices))
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  inputs.data_shards(mesh, int(config.data.batch_size))  # every host's batch rows, as the trainer maps them
  shapes = inputs.batch_spec(config)
  b, r = int(config.data.batch_size), int(config.data.max_refs)
  f, h, w, _ = inputs.latent_shape(config)
  text_len = shapes['text_embedding'].shape[1]
  spec = state_lib.build_spec(config, mesh)
  t0 = time.time()
  jitted, b_sh = step_lib.make_train_step(config, spec, mesh, shapes)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in shapes.items()}
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=jax.sharding.NamedSharding(mesh, jax.P()))
  v_tok, r_tok = flops_lib.tokens((f, h, w), r, (h, w), config.model.patch_size)
  analytic = flops_lib.train_step_flops(config.model, b, v_tok, r_tok, text_len)
  base = dict(topology=topology if num_slices == 1 else f'{num_slices} x {topology}', chips=len(devices),
              mesh=dict(mesh.shape), batch=b, refs=r,
              video_tokens=v_tok, ref_tokens=r_tok,
              params=state_lib.count_params(spec.abstract_state['params']),
              remat=config.model.get('remat_policy', 'none'), attention=config.model.get('attention', ''),
              capacity=hbm_bytes(topology), analytic_flops_per_chip=analytic / len(devices))
  with jax.set_mesh(mesh):
    compiled, refused = _compile(jitted.lower(spec.abstract_state, batch, key))
  compile_s = time.time() - t0
  census = census_flops(config, shapes) / len(devices)
  if refused:  # the TPU compiler refuses programs that cannot fit: its numbers, "does not fit"
    return dict(base, **refused, xla_flops=float('nan'), census_flops_per_chip=census, compile_s=compile_s,
                fits=False)
  mem = _memory(compiled)
  return dict(base, **mem, **_xla_cost(compiled), census_flops_per_chip=census, compile_s=compile_s,
              fits=mem['total'] <= hbm_bytes(topology))


def _xla_cost(compiled) -> dict[str, float]:
  """XLA's cost analysis of a compiled program, per chip: FLOPs and bytes accessed (a loop's body counted once)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  cost = cost or {}
  return dict(xla_flops=float(cost.get('flops', float('nan'))),
              xla_bytes=float(cost.get('bytes accessed', float('nan'))))


def census_flops(config, shapes) -> float:
  """Matmul FLOPs of one step as traced (`flops.matmul_census`: backward, remat recomputation and every scan
  iteration included), on one host device with the `xla` attention kernel, whose matmuls are visible to the
  trace (a Pallas kernel's are not). Tracing only: nothing is compiled or allocated."""
  config = config.copy_and_resolve_references()
  config.model.attention = 'xla'
  config.mesh.update(data=1, fsdp=1, context=1, tensor=1)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices('cpu')[:1])
  spec = state_lib.build_spec(config, mesh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  census = flops_lib.matmul_census(step_lib.train_step_fn(config, spec), spec.abstract_state, shapes, key)
  return float(sum(m.flops * n for m, n in census.items()))


def denoise_census(config, args) -> float:
  """Matmul FLOPs of one DiT denoising call with every guidance branch (`args`: the call's inputs after the
  weights), traced as `census_flops` traces the train step: one host device, the `xla` attention kernel."""
  config = config.copy_and_resolve_references()
  config.model.attention = 'xla'
  config.mesh.update(data=1, fsdp=1, context=1, tensor=1)
  s = config.sample
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices('cpu')[:1])
  graphdef, abstract = pipeline.abstract_model(config.model)
  plain = [None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]

  def denoise(state, x, t, text_c, text_u, refs, ref_mask):
    fn = sampler_lib.nnx_denoise_fn(graphdef, state)
    return guidance.guided_velocity(fn, x, t, text_c, text_u, refs, ref_mask, text_scale=float(s.guidance_scale),
                                    image_scale=float(s.get('image_guidance_scale', 0.0)))
  with jax.set_mesh(mesh):
    census = flops_lib.matmul_census(denoise, abstract, *plain)
  return float(sum(m.flops * n for m, n in census.items()))


def _abstract_with_shardings(state, mesh):
  """ShapeDtypeStructs of an abstract nnx State, each with the NamedSharding its logical names give."""
  leaves, treedef = jax.tree.flatten(state)
  shardings = jax.tree.leaves(shardings_lib.state_shardings(state, mesh))
  return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
                                      for x, sh in zip(leaves, shardings)])


def _bytes_per_chip(abstract) -> float:
  """Per-chip bytes of sharded ShapeDtypeStructs (int4 packs two values a byte)."""
  total = 0.0
  for x in jax.tree.leaves(abstract):
    shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    n = 1
    for d in shard:
      n *= d
    total += n * (0.5 if x.dtype == jnp.int4 else jnp.dtype(x.dtype).itemsize)
  return total


def analyse_sample(config, topology: str, batch_size: int = 1, num_refs: int = -1,
                   programs: tuple[str, ...] = ('dit', 'umt5', 'vae')) -> dict[str, Any]:
  """Compile, for `topology`, what sampling runs: one DiT denoising call with every guidance branch at
  `config.sample`'s size, the umT5 encoder on (prompt, negative prompt) and one VAE decode chunk (`programs`
  picks which; the plans count only those); returns each program's per-chip HBM and the memory plans' peaks
  (see `format_sample_table`)."""

  devices = topology_devices(topology)
  sampling_layout.apply(config, devices)  # sample.layout='auto': the mesh, tiles and umT5 device the run picks there
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  s = config.sample
  t_f, s_f, z = codec_lib.factors(config.vae)
  f, h, w = 1 + (s.num_frames - 1) // t_f, s.height // s_f, s.width // s_f
  r = config.model.max_refs if num_refs < 0 else num_refs
  b = batch_size
  branches = guidance.num_branches(float(s.guidance_scale), float(s.get('image_guidance_scale', 0.0)))
  text_len, text_dim = config.text_encoder.max_length, config.model.text_dim
  rep = jax.sharding.NamedSharding(mesh, jax.P())
  sds = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
  v_tok, r_tok = flops_lib.tokens((f, h, w), r, (h, w), config.model.patch_size)
  rows: dict[str, dict[str, Any]] = {}

  # The DiT: one denoising call, guidance branches concatenated on the batch (diffusion/guidance.py).
  graphdef, abstract = pipeline.abstract_model(config.model)
  weights = _abstract_with_shardings(abstract, mesh)

  def denoise(state, x, t, text_c, text_u, refs, ref_mask):
    fn = sampler_lib.nnx_denoise_fn(graphdef, state)
    return guidance.guided_velocity(fn, x, t, text_c, text_u, refs, ref_mask, text_scale=float(s.guidance_scale),
                                    image_scale=float(s.get('image_guidance_scale', 0.0)))

  args = (weights, sds((b, f, h, w, z)), sds((b,)), sds((b, text_len, text_dim)), sds((1, text_len, text_dim)),
          sds((b, r, h, w, z)) if r else None, sds((b, r), jnp.bool_) if r else None)
  t0 = time.time()
  with jax.set_mesh(mesh):
    compiled, refused = _compile(jax.jit(denoise).lower(*args))
  rows['dit'] = dict(refused or dict(_memory(compiled), **_xla_cost(compiled)), weights=_bytes_per_chip(weights),
                     compile_s=time.time() - t0, census_flops=denoise_census(config, args[1:]) / len(devices),
                     what=f'DiT denoising call: {branches} branch(es) x {b} video(s), {v_tok} video + {r_tok} '
                          f'ref tokens, {quantization.weight_bytes(nnx.merge(graphdef, abstract)) / 1e9:.2f} '
                          f'GB of weights ({config.model.get("quantization", "none")})')

  # umT5 on the prompt and the negative prompt (skipped when it lives on the host).
  te_on_chip = config.sample.get('text_encoder_device', 'accelerator') == 'accelerator' and 'umt5' in programs
  te_graph, te_abstract = nnx.split(nnx.eval_shape(lambda: te.UMT5Encoder(config.text_encoder,
                                                                         rngs=nnx.Rngs(0))))
  te_weights = _abstract_with_shardings(te_abstract, mesh)

  def encode(state, ids, mask):
    return nnx.merge(te_graph, state)(ids, mask)

  if te_on_chip:
    t0 = time.time()
    with jax.set_mesh(mesh):
      compiled, refused = _compile(jax.jit(encode).lower(te_weights, sds((2, text_len), jnp.int32),
                                                         sds((2, text_len), jnp.int32)))
    rows['umt5'] = dict(refused or _memory(compiled), weights=_bytes_per_chip(te_weights),
                        compile_s=time.time() - t0,
                        what=f'umT5 encoder: 2 prompts x {text_len} tokens '
                             f'({config.text_encoder.get("quantization", "none")})')

  # One VAE decode chunk (the steady state: `vae.decode_chunk_frames` latent frames with the causal caches).
  if config.vae.get('kind', 'wan') == 'wan' and 'vae' in programs:
    vae_graph, vae_abstract = nnx.split(nnx.eval_shape(lambda: codec_lib.make_codec(config.vae,
                                                                                   rngs=nnx.Rngs(0))))
    vae_weights = _abstract_with_shardings(vae_abstract, mesh)
    tile = config.vae.get('tile_size') or 0
    th, tw = (min(h, tile // s_f), min(w, tile // s_f)) if tile else (h, w)
    chunk = int(config.vae.decode_chunk_frames or 1)
    first = lambda st, zc: nnx.merge(vae_graph, st).decode_step(zc, None, True)
    _, caches = jax.eval_shape(first, vae_abstract, jax.ShapeDtypeStruct((b, 1, th, tw, z), jnp.float32))
    caches = jax.tree.map(lambda x: sds(x.shape, x.dtype), caches)
    step = lambda st, zc, c: nnx.merge(vae_graph, st).decode_step(zc, c, False)
    t0 = time.time()
    with jax.set_mesh(mesh):
      compiled, refused = _compile(jax.jit(step).lower(vae_weights, sds((b, min(chunk, max(f - 1, 1)), th, tw, z)),
                                                       caches))
    rows['vae'] = dict(refused or _memory(compiled), weights=_bytes_per_chip(vae_weights),
                       compile_s=time.time() - t0,
                       what=f'VAE decode chunk: {chunk} latent frame(s) of {th}x{tw}' + (f' (tile {tile} px)'
                                                                                        if tile else ''))
  vae_w = rows['vae']['weights'] if 'vae' in rows else 0.0
  # One-shot run (`--mode sample`): umT5, then the DiT, then the VAE decode; the VAE's weights stay throughout.
  one_shot = max([rows['dit']['total'] + vae_w] + ([rows['umt5']['total'] + vae_w] if 'umt5' in rows else [])
                 + ([rows['vae']['total']] if 'vae' in rows else []))
  # S2VPipeline: every weight resident (umT5 too, on 'accelerator'), the largest program's working memory.
  resident_w = rows['dit']['weights'] + vae_w + (rows['umt5']['weights'] if 'umt5' in rows else 0.0)
  resident = resident_w + max(r_['total'] - r_['weights'] for r_ in rows.values())
  cap = hbm_bytes(topology)
  return dict(topology=topology, chips=len(devices), mesh=dict(mesh.shape), rows=rows, capacity=cap,
              one_shot=one_shot, resident=resident, text_encoder_device=config.sample.get('text_encoder_device',
                                                                                          'accelerator'),
              size=f'{s.num_frames}x{s.height}x{s.width}', refs=r, branches=branches,
              fits=one_shot <= cap and all('note' not in r_ for r_ in rows.values()))


def format_sample_table(r: dict[str, Any]) -> str:
  g = lambda x: f'{x / GIB:7.2f} GiB'
  pct = lambda x: f'{100 * x / r["capacity"]:5.1f}%'
  mesh = ' '.join(f'{k}={v}' for k, v in r['mesh'].items())
  lines = [f"topology {r['topology']} ({r['chips']} chips)  mesh {mesh}  sample {r['size']} + {r['refs']} refs, "
           f"{r['branches']} guidance branch(es); per-chip HBM of {g(r['capacity'])}"]
  for name, row in r['rows'].items():
    lines.append(f"{name:5s} {row['what']}")
    lines.append(f"      weights {g(row['weights'])}  arguments {g(row['args'])}  temporaries {g(row['temp'])}  "
                 f"total {g(row['total'])} ({pct(row['total'])})  compile {row['compile_s']:.1f} s"
                 + (f"  compiler: {row['note']}" if row.get('note') else ''))
  lines.append(f"plan  one-shot (--mode sample: umT5, free, DiT, free, VAE decode) peak {g(r['one_shot'])} "
               f"({pct(r['one_shot'])})")
  lines.append(f"plan  resident (S2VPipeline, umT5 on {r['text_encoder_device']}) peak {g(r['resident'])} "
               f"({pct(r['resident'])})")
  lines.append('fits' if r['fits'] else 'does not fit')
  return '\n'.join(lines)


def format_table(r: dict[str, Any]) -> str:
  g = lambda x: f'{x / GIB:8.2f} GiB'
  mesh = ' '.join(f'{k}={v}' for k, v in r['mesh'].items())
  lines = [
      f"topology {r['topology']} ({r['chips']} chips)  mesh {mesh}  remat {r['remat']}  "
      f"attention {r['attention']}",
      f"params {r['params'] / 1e9:.3f} B  batch {r['batch']}  tokens/sample {r['video_tokens']} video + "
      f"{r['ref_tokens']} refs ({r['refs']})  compile {r['compile_s']:.1f} s",
      f"per-chip HBM   arguments {g(r['args'])}",
      f"               temporaries {g(r['temp'])}",
      f"               output (not aliased) {g(r['out'])}",
      f"               generated code {g(r.get('code', float('nan')))}",
      f"               total {g(r['total'])} / capacity {g(r['capacity'])} "
      f"({100 * r['total'] / r['capacity']:.1f}%), headroom {g(r['capacity'] - r['total'])}",
      f"host memory    offloaded temporaries {g(r.get('host_temp', 0))}",
      f"FLOPs/chip/step  model (analytic, 3 x forward) {r['analytic_flops_per_chip']:.3e}   "
      f"traced matmuls (with remat recomputation) {r.get('census_flops_per_chip', float('nan')):.3e}",
      f"                 XLA cost analysis {r['xla_flops']:.3e} (counts each loop body once: the scanned "
      f"layers once, not a step total)",
      'fits' if r['fits'] else 'does not fit',
  ]
  if r.get('note'):
    lines.insert(-1, f"compiler: {r['note']}")
  return '\n'.join(lines)


if __name__ == '__main__':  # the command line lives in kaleido_jax/cli/aot.py
  from kaleido_jax.cli import aot as aot_cli  # pylint: disable=g-import-not-at-top
  aot_cli.entry()
