r"""Ahead-of-time fit check: compile the real training step for a TPU slice on this (CPU) machine.

  python -m kaleido_jax.tools.aot --config configs/kaleido_14b.py --topology v5p:2x2x2 \
      [--config.mesh.fsdp=-1] [--config.model.remat_policy=full] [--batch_size 0]

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
import re
import sys
import time
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags

# HBM per chip in GiB (Cloud TPU documentation).
HBM_GIB = {'v4': 32, 'v5e': 16, 'v5litepod': 16, 'v5p': 95, 'v6e': 32}
GIB = 1024 ** 3
# XLA TPU's refusal, e.g. "... HLO temporaries (360.64G) exceeds available HBM (95.74G)".
_OOM = re.compile(r'RESOURCE_EXHAUSTED.*?\(([0-9.]+)([KMGT])\) exceeds', re.S)
_UNIT = {'K': 1024, 'M': 1024 ** 2, 'G': GIB, 'T': 1024 ** 4}


def topology_devices(topology: str):
  """Abstract TPU devices of `generation:AxBxC` (needs libtpu; no TPU)."""
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return topologies.get_topology_desc(topology, platform='tpu').devices


def hbm_bytes(topology: str) -> int:
  gen = topology.split(':')[0].lower()
  if gen not in HBM_GIB:
    raise ValueError(f'unknown TPU generation {gen!r}; known: {sorted(HBM_GIB)}')
  return HBM_GIB[gen] * GIB


def analyse(config, topology: str, batch_size: int = 0, num_refs: int = -1) -> dict[str, Any]:
  """Lower + compile the train step for `topology`; returns the numbers the table prints."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kaleido_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from kaleido_jax.train import inputs, mesh as mesh_lib, state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top

  devices = topology_devices(topology)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  dp = mesh_lib.data_parallel_size(mesh)
  b = batch_size or dp
  r = config.data.max_refs if num_refs < 0 else num_refs
  f, h, w, c = inputs.latent_shape(config)
  text_len = config.text_encoder.max_length
  shapes = {'video_latents': jax.ShapeDtypeStruct((b, f, h, w, c), jnp.float32),
            'text_embedding': jax.ShapeDtypeStruct((b, text_len, config.model.text_dim), jnp.float32)}
  if r:
    shapes['ref_latents'] = jax.ShapeDtypeStruct((b, r, h, w, c), jnp.float32)
    shapes['ref_mask'] = jax.ShapeDtypeStruct((b, r), jnp.bool_)
  spec = state_lib.build_spec(config, mesh)
  t0 = time.time()
  jitted, b_sh = step_lib.make_train_step(config, spec, mesh, shapes)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=b_sh[k]) for k, v in shapes.items()}
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=jax.sharding.NamedSharding(mesh, jax.P()))
  v_tok, r_tok = flops_lib.tokens((f, h, w), r, (h, w), config.model.patch_size)
  analytic = flops_lib.train_step_flops(config.model, b, v_tok, r_tok, text_len)
  base = dict(topology=topology, chips=len(devices), mesh=dict(mesh.shape), batch=b, refs=r,
              video_tokens=v_tok, ref_tokens=r_tok,
              params=state_lib.count_params(spec.abstract_state['params']),
              remat=config.model.get('remat_policy', 'none'), attention=config.model.get('attention', ''),
              capacity=hbm_bytes(topology), analytic_flops_per_chip=analytic / len(devices))
  with jax.set_mesh(mesh):
    lowered = jitted.lower(spec.abstract_state, batch, key)
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      # The TPU compiler refuses programs that cannot fit: report its numbers as "does not fit".
      m = _OOM.search(str(e))
      if m is None:
        raise
      need = float(m.group(1)) * _UNIT[m.group(2)]
      return dict(base, args=float('nan'), temp=need, out=float('nan'), code=float('nan'), total=need,
                  xla_flops=float('nan'), census_flops_per_chip=census_flops(config, shapes) / len(devices),
                  compile_s=time.time() - t0, fits=False, note=str(e).splitlines()[0][:200])
  compile_s = time.time() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  args = mem.argument_size_in_bytes
  temp = mem.temp_size_in_bytes
  out = max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0)
  code = mem.generated_code_size_in_bytes
  total = args + temp + out + code
  return dict(base, args=args, temp=temp, out=out, code=code, total=total,
              host_temp=getattr(mem, 'host_temp_size_in_bytes', 0),
              xla_flops=float(cost.get('flops', float('nan'))) if cost else float('nan'),
              census_flops_per_chip=census_flops(config, shapes) / len(devices),
              compile_s=compile_s, fits=total <= hbm_bytes(topology))


def census_flops(config, shapes) -> float:
  """Matmul FLOPs of one step as traced (`flops.matmul_census`: backward, remat recomputation and every scan
  iteration included), on one host device with the `xla` attention kernel, whose matmuls are visible to the
  trace (a Pallas kernel's are not). Tracing only: nothing is compiled or allocated."""
  import jax  # pylint: disable=g-import-not-at-top
  from kaleido_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from kaleido_jax.train import mesh as mesh_lib, state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.model.attention = 'xla'
  config.mesh.update(data=1, fsdp=1, context=1, tensor=1)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices('cpu')[:1])
  spec = state_lib.build_spec(config, mesh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  census = flops_lib.matmul_census(step_lib.train_step_fn(config, spec), spec.abstract_state, shapes, key)
  return float(sum(m.flops * n for m, n in census.items()))


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


def _define_flags():
  """Flags exist only when this file runs as a script, so importing it (tests, notebooks) next to
  `kaleido_jax.main`, which owns --config in the same absl registry, does not collide."""
  return (
      config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Training config file.', lock_config=False),
      flags.DEFINE_string('topology', 'v5p:2x2x2', 'TPU slice: "<generation>:<AxBxC>", e.g. '
                          'v5p:2x2x2 (v5p-16), v6e:4x4 (v6e-16).'),
      flags.DEFINE_integer('batch_size', 0, 'Global batch; 0 = one sample per data-parallel shard '
                           '(data * fsdp).'),
      flags.DEFINE_integer('num_refs', -1, 'References per sample; -1 = data.max_refs.'),
  )


def main(argv):
  del argv
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  # Compile-only use of libtpu: don't take the one-process-per-host TPU lock.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print('error: libtpu is not installed; pip install "jax[tpu]==<your jax version>"', file=sys.stderr)
    sys.exit(2)
  config, topology, batch, refs = _FLAGS
  print(format_table(analyse(config.value, topology.value, batch.value, refs.value)))


if __name__ == '__main__':
  _FLAGS = _define_flags()
  app.run(main)
