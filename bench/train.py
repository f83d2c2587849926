r"""Training throughput on CPU (1 vs 8 virtual devices) and the AOT fit table for TPU slices.

  JAX_PLATFORMS=cpu python bench/train.py [--config configs/demo.py] [--steps 10] [--model_factory M:C]
  JAX_PLATFORMS=cpu python bench/train.py --aot [--rows 'v5p-8,v6e'] [--override model.attention=xla]

Throughput: each device count runs in a fresh subprocess (the virtual device count is fixed at JAX
start-up) with the config's mesh data=-1; the first step (compile) is excluded. Printed: steps/s,
tokens/s (video tokens), and the ratio against the 1-device run of the same invocation.
AOT: `kaleido_jax.tools.aot.analyse` for each row of AOT_ROWS (config, TPU slice, global batch, overrides),
one table of per-chip HBM (total includes generated code), host memory offloaded to, FLOPs and compile time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config(path, model_factory):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('bench_cfg', os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  if model_factory:
    config.train.model_factory = model_factory
  return config


def measure(config_path: str, steps: int, model_factory: str) -> dict:
  """Runs in the child: steps/s of the jitted step on all visible devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from kaleido_jax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from kaleido_jax.train import inputs, state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  config = _load_config(config_path, model_factory)
  config.mesh.update(data=-1, fsdp=1, context=1, tensor=1)
  n = jax.device_count()
  config.data.batch_size = max(config.data.batch_size, n) // n * n
  mesh = mesh_lib.make_mesh(config.mesh)
  spec = state_lib.build_spec(config, mesh)
  state = state_lib.init_state(config, spec, mesh)
  src = inputs.SyntheticLatents(config, seed=0)
  local = next(src)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in local.items()}
  fn, b_sh = step_lib.make_train_step(config, spec, mesh, shapes)
  batch = inputs.to_global(local, b_sh, config.data.batch_size, inputs.data_shards(mesh, config.data.batch_size)[0])
  rng = jax.random.key(0)
  with jax.set_mesh(mesh):
    state, m = fn(state, batch, rng)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
      state, m = fn(state, batch, rng)
    jax.block_until_ready(m)
    dt = time.perf_counter() - t
  f, h, w, _ = inputs.latent_shape(config)
  p = config.model.patch_size
  tokens = config.data.batch_size * (f // p[0]) * (h // p[1]) * (w // p[2])
  return dict(devices=n, batch=config.data.batch_size, steps_per_s=steps / dt,
              tokens_per_s=steps * tokens / dt)


def throughput(args) -> None:
  rows = []
  for n in (1, 8):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
               XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')
    out = subprocess.run([sys.executable, __file__, '--_child', '--config', args.config, '--steps',
                          str(args.steps), '--model_factory', args.model_factory],
                         env=env, capture_output=True, text=True, check=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
  base = rows[0]['steps_per_s']
  print(f'| devices | global batch | steps/s | tokens/s | steps/s vs 1 device |')
  print('|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['devices']} | {r['batch']} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
          f"{r['steps_per_s'] / base:.2f}x |")


# The fit table (issue: Kaleido-14B at pod scale): (row, config, TPU topology, global batch (0 = the config's
# data.batch_size, validated as the trainer would), config overrides).
_720P = {'data.height': 720, 'data.width': 1280}
_CP4 = {'mesh.fsdp': 1, 'mesh.context': 4}
_LORA = {'train.lora.rank': 16, 'model.param_dtype': 'bfloat16'}
_CP2 = {'mesh.fsdp': 4, 'mesh.context': 2, 'model.context_parallel': 'ulysses'}
AOT_ROWS = [
    ('14B 480p+3 refs, v5p-8, shipped', 'configs/kaleido_14b.py', 'v5p:2x2x1', 0, {}),
    ('  same, remat full (before)', 'configs/kaleido_14b.py', 'v5p:2x2x1', 0, {'model.remat_policy': 'full'}),
    ('  same, remat full, bf16 Adam mu', 'configs/kaleido_14b.py', 'v5p:2x2x1', 0,
     {'model.remat_policy': 'full', 'train.moments_dtype': 'bfloat16'}),
    ('14B 720p+3 refs, v5p-8, batch 1, context 4 gather', 'configs/kaleido_14b.py', 'v5p:2x2x1', 1, {**_720P, **_CP4}),
    ('  same, ulysses', 'configs/kaleido_14b.py', 'v5p:2x2x1', 1,
     {**_720P, **_CP4, 'model.context_parallel': 'ulysses'}),
    ('  same, ring', 'configs/kaleido_14b.py', 'v5p:2x2x1', 1, {**_720P, **_CP4, 'model.context_parallel': 'ring'}),
    ('14B 480p+3 refs, v6e-16', 'configs/kaleido_14b.py', 'v6e:4x4', 16, {}),
    ('  same, fsdp 8 x context 2 (half a sample per chip)', 'configs/kaleido_14b.py', 'v6e:4x4', 8,
     {'mesh.fsdp': 8, 'mesh.context': 2, 'model.context_parallel': 'ulysses'}),
    ('1.3B 480p+3 refs, v5e-8', 'configs/wan_1_3b.py', 'v5e:2x4', 0, {}),
    ('  same, remat full (before)', 'configs/wan_1_3b.py', 'v5e:2x4', 0, {'model.remat_policy': 'full'}),
    # Plain model code (the TPU program) vs the CPU rewrites of model/cpu.py forced on, as the model was written
    # before `model.cpu_kernels`.
    ('14B 480p+3 refs, v5p-8, CPU rewrites on (cpu_kernels=on)', 'configs/kaleido_14b.py', 'v5p:2x2x1', 0,
     {'model.cpu_kernels': 'on'}),
    ('1.3B 480p+3 refs, v5p-8', 'configs/wan_1_3b.py', 'v5p:2x2x1', 0, {}),
    ('1.3B 480p+3 refs, v5p-8, CPU rewrites on (cpu_kernels=on)', 'configs/wan_1_3b.py', 'v5p:2x2x1', 0,
     {'model.cpu_kernels': 'on'}),
    ('14B 720p+5 refs, v5p-16, batch 1, context 8', 'configs/kaleido_14b.py', 'v5p:2x2x2', 1,
     {**_720P, 'mesh.fsdp': 1, 'mesh.context': 8, 'data.max_refs': 5, 'model.max_refs': 5,
      'model.context_parallel': 'ulysses'}),
    # LoRA fine-tuning (train.lora): adapters on every block linear; the frozen base in bf16 (or int8) is an input
    # of the step, so only the adapters carry fp32 master weights and AdamW moments.
    ('14B LoRA r16 480p+3 refs, v5e-8, bf16 base, a sample per chip', 'configs/kaleido_14b.py', 'v5e:2x4', 8,
     _LORA),
    ('  LoRA, bf16 base, fsdp 4 x context 2 (ulysses)', 'configs/kaleido_14b.py', 'v5e:2x4', 0, {**_LORA, **_CP2}),
    ('  LoRA, int8 base, a sample per chip', 'configs/kaleido_14b.py', 'v5e:2x4', 8,
     {**_LORA, 'model.quantization': 'int8'}),
    ('  LoRA, int8 base, fsdp 4 x context 2 (ulysses)', 'configs/kaleido_14b.py', 'v5e:2x4', 0,
     {**_LORA, **_CP2, 'model.quantization': 'int8'}),
    ('14B full fine-tune 480p+3 refs, v5e-8 (no LoRA, for comparison)', 'configs/kaleido_14b.py', 'v5e:2x4', 8, {}),
    # Multislice: two v5p-8 slices joined over DCN; data spans the slices (mesh.dcn_data=-1), fsdp stays in a slice.
    ('14B 480p+3 refs, 2 x v5p-8 over DCN, data 2 x fsdp 4', 'configs/kaleido_14b.py', '2 x v5p:2x2x1', 8,
     {'mesh.data': 2, 'mesh.fsdp': 4}),
]


def aot_table(args) -> None:
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from kaleido_jax import config as kcfg  # pylint: disable=g-import-not-at-top
  from kaleido_jax.tools import aot  # pylint: disable=g-import-not-at-top
  print('| row | slice | mesh | batch | tokens/sample | remat | attention | args GiB | temp GiB | total GiB | '
        'HBM GiB | % HBM | host GiB | model TFLOP/chip | traced TFLOP/chip | compile s | verdict |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
  for name, path, topo, batch, overrides in AOT_ROWS:
    if args.rows and not any(r in name for r in args.rows.split(',')):
      continue
    config = _load_config(path, args.model_factory)
    for k, v in overrides.items():
      kcfg.set_path(config, k, v)
    for o in args.override:
      kcfg.set_path(config, *o.split('=', 1))
    _aot_row(aot, config, name, topo, batch)


def _aot_row(aot, config, name, topo, batch):
  from kaleido_jax.model import attention  # pylint: disable=g-import-not-at-top
  slices, _, one = topo.rpartition(' x ')  # '2 x v5p:2x2x1': two slices of v5p:2x2x1 over DCN
  try:
    r = aot.analyse(config, one, batch, num_slices=int(slices or 1))
  except Exception as e:  # pylint: disable=broad-except
    print(f'| {name} | {topo} | | | | | | | | | | | | | | | error: {type(e).__name__}: '
          f'{str(e).splitlines()[0][:120]} |', flush=True)
    return
  g = lambda x: x / aot.GIB
  mesh = 'x'.join(f'{k}{v}' for k, v in r['mesh'].items() if v > 1)
  cp = config.model.context_parallel if r['mesh']['context'] > 1 else ''
  kernel = attention.resolve_implementation(config.model.attention, config.model.dtype, 'tpu')
  print(f"| {name} | {topo} | {mesh} | {r['batch']} | {r['video_tokens'] + r['ref_tokens']} | {r['remat']} | "
        f"{kernel}{' ' + cp if cp else ''} | {g(r['args']):.2f} | {g(r['temp']):.2f} | "
        f"{g(r['total']):.2f} | {g(r['capacity']):.0f} | {100 * r['total'] / r['capacity']:.1f} | "
        f"{g(r.get('host_temp', 0)):.2f} | {r['analytic_flops_per_chip'] / 1e12:.0f} | "
        f"{r['census_flops_per_chip'] / 1e12:.0f} | {r['compile_s']:.0f} | "
        f"{'fits' if r['fits'] else 'does not fit'} |", flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--config', default='configs/demo.py')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--model_factory', default='')
  p.add_argument('--aot', action='store_true')
  p.add_argument('--rows', default='', help='comma list of substrings of AOT row names (default: all rows)')
  p.add_argument('--override', action='append', default=[],
                 help='config key=value applied to every AOT row, e.g. model.attention=xla')
  p.add_argument('--_child', action='store_true')
  args = p.parse_args()
  if args._child:  # pylint: disable=protected-access
    print(json.dumps(measure(args.config, args.steps, args.model_factory)))
  elif args.aot:
    aot_table(args)
  else:
    throughput(args)


if __name__ == '__main__':
  main()
