r"""Training throughput on CPU (1 vs 8 virtual devices) and the AOT fit table for TPU slices.

  JAX_PLATFORMS=cpu python bench/train.py [--config configs/demo.py] [--steps 10] [--model_factory M:C]
  JAX_PLATFORMS=cpu python bench/train.py --aot [--aot_configs configs/wan_1_3b.py,configs/kaleido_14b.py]

Throughput: each device count runs in a fresh subprocess (the virtual device count is fixed at JAX
start-up) with the config's mesh data=-1; the first step (compile) is excluded. Printed: steps/s,
tokens/s (video tokens), and the ratio against the 1-device run of the same invocation.
AOT: `kaleido_jax.tools.aot.analyse` per config × slice, trying fsdp = all chips, then fsdp × tensor
(tensor 2/4/8 where it divides the heads) until one fits; batch = one sample per data-parallel shard.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICES = [('v5p-8', 'v5p:2x2x1'), ('v5p-16', 'v5p:2x2x2'), ('v5p-32', 'v5p:2x2x4'),
          ('v6e-16', 'v6e:4x4'), ('v6e-64', 'v6e:8x8')]


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
  from kaleido_jax.train import inputs, mesh as mesh_lib, state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
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
  batch = inputs.to_global(local, b_sh, config.data.batch_size)
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


def _meshes(chips: int, heads: int):
  """fsdp over all chips, then fsdp x tensor splits (tensor divides the heads) up to tensor=8."""
  out = [dict(fsdp=chips, tensor=1)]
  for t in (2, 4, 8):
    if chips % t == 0 and heads % t == 0 and chips // t >= 1:
      out.append(dict(fsdp=chips // t, tensor=t))
  return out


def aot_table(args) -> None:
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  from kaleido_jax.tools import aot  # pylint: disable=g-import-not-at-top
  print('| config | slice | mesh | remat | params (B) | args GiB | temp GiB | total GiB | HBM GiB | '
        'XLA TFLOP/chip | analytic TFLOP/chip | verdict |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  chips = {'v5p-8': 4, 'v5p-16': 8, 'v5p-32': 16, 'v6e-16': 16, 'v6e-64': 64}
  for path in args.aot_configs.split(','):
    for name, topo in SLICES:
      if args.slices and name not in args.slices.split(','):
        continue
      heads = _load_config(path, args.model_factory).model.num_heads
      for m in _meshes(chips[name], heads):
        config = _load_config(path, args.model_factory)
        for o in args.override:
          k, v = o.split('=', 1)
          node = config
          for part in k.split('.')[:-1]:
            node = node[part]
          node[k.split('.')[-1]] = type(node[k.split('.')[-1]])(v)
        config.mesh.update(data=1, context=1, **m)
        _aot_row(aot, config, path, name, topo)
        if not args.all_meshes and _LAST.get('fits'):
          break


_LAST = {}


def _aot_row(aot, config, path, name, topo):
  _LAST.clear()
  if True:
      try:
        r = aot.analyse(config, topo)
      except Exception as e:  # pylint: disable=broad-except
        print(f'| {os.path.basename(path)} | {name} | | | | | | | | | | error: {type(e).__name__}: '
              f'{str(e).splitlines()[0][:120]} |', flush=True)
        return
      _LAST.update(r)
      g = lambda x: x / aot.GIB
      mesh = 'x'.join(f'{k}{v}' for k, v in r['mesh'].items() if v > 1)
      print(f"| {os.path.basename(path)} | {name} | {mesh} | {r['remat']} | {r['params'] / 1e9:.2f} | "
            f"{g(r['args']):.1f} | {g(r['temp']):.1f} | {g(r['total']):.1f} | {g(r['capacity']):.0f} | "
            f"{r['xla_flops'] / 1e12:.1f} | {r['analytic_flops_per_chip'] / 1e12:.1f} | "
            f"{'fits' if r['fits'] else 'does not fit'} |", flush=True)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--config', default='configs/demo.py')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--model_factory', default='')
  p.add_argument('--aot', action='store_true')
  p.add_argument('--aot_configs', default='configs/wan_1_3b.py,configs/kaleido_14b.py')
  p.add_argument('--slices', default='', help='comma list of slice names (default: all)')
  p.add_argument('--override', action='append', default=[], help='config key=value, e.g. model.attention=xla')
  p.add_argument('--all_meshes', action='store_true', help='print every mesh, not just the first that fits')
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
