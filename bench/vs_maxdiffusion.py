r"""Side by side with maxdiffusion: its Wan2.1-14B programs and ours, compiled in one run for the same abstract TPU
slice, the same model and the same shapes (no TPU: libtpu's abstract topologies, as the AOT tool does).

  # once: a maxdiffusion checkout at the pinned commit, and the five packages its imports need beside ours
  git clone https://github.com/AI-Hypercomputer/maxdiffusion /src/maxdiffusion
  git -C /src/maxdiffusion checkout 7cfb8801d41d1728f0232cd7ee59e900a151fecf
  pip install --no-deps --target /src/maxdiffusion-deps aqtp==0.9.0 chex==0.1.92 tensorboardX==2.6.5 \
      jaxopt==0.8.5 toolz==1.2.0
  JAX_PLATFORMS=cpu python bench/vs_maxdiffusion.py --maxdiffusion_dir /src/maxdiffusion \
      --maxdiffusion_deps /src/maxdiffusion-deps [--rows train_720p_v5p8,denoise_720p_v7x8] [--out DIR] [--dry_run]

Why no virtual environment of its own: maxdiffusion asks for Python >= 3.12 and transformers < 5, but at this
commit its modules import and its programs build under ours (jax 0.10.2, flax 0.12.8, transformers 5, Python
3.11) once aqtp, chex, tensorboardX, jaxopt and toolz are on the path (`--no-deps`: nothing of ours is replaced)
and the Hugging Face `datasets` package, which only its data loaders use, is stubbed. Each side runs in its own
process (this script again, `--side`), so neither sees the other's modules.

Rows (`--rows`, default all):
- train_720p_v5p8: the training step at maxdiffusion's published setting (Wan2.1-14B, 720x1280x81, global batch 1,
  v5p-8 = 4 chips; its base_wan_14b.yml with the README's training flags: remat HIDDEN_STATE_WITH_OFFLOAD,
  flash attention, flash_min_seq_length 0). The README's `ici_fsdp_parallelism=4` no longer builds at this commit
  with batch 1 (its flash shard_map needs the batch divisible by data x fsdp), so theirs runs context 4, the
  equivalent sharding of one sample over four chips; ours (configs/kaleido_14b.py) runs context 4 as well, first
  with 0 references (text to video: the same program as theirs) and then with 3.
- denoise_{720p,480p}_{v7x8,v6e8}: one denoising call with classifier-free guidance as a batch of 2 (their
  `transformer_forward_pass_full_cfg`; ours: the DiT call with both guidance branches concatenated on the batch), on
  their inference docs' mesh for these slices: data 2 (the branches) x context 4.

Per chip (per JAX device: a v7x chip is two): HBM for arguments, temporaries, output and their total, and host
memory offloaded to; FLOPs and bytes accessed from XLA's cost analysis of the compiled program, which counts a
loop's body once (both programs scan their 40 layers, so these count one layer of 40); the traced matmul FLOPs
(`kaleido_jax.train.flops.matmul_census`: every dot_general of the traced program, scan bodies times their length,
the backward and remat recomputation included, with attention traced as XLA matmuls, since a Pallas kernel's
matmuls are invisible to both the trace and XLA) divided by the chips; the roofline lower bound on time per step
or call: those FLOPs over the chip's peak bf16 rate (Cloud TPU documentation). Ratios are ours / theirs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import types
from typing import Any

if __name__ == '__main__':  # compiles on the CPU host; the TPU backend is only a compiler
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from absl import app  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

MAXDIFFUSION_COMMIT = '7cfb8801d41d1728f0232cd7ee59e900a151fecf'
THEIR_CONFIG = os.path.join('src', 'maxdiffusion', 'configs', 'base_wan_14b.yml')
NEEDED = ('aqt', 'chex', 'tensorboardX', 'jaxopt', 'toolz')
# Per JAX device: (peak bf16 FLOP/s, HBM bytes/s, HBM GiB). Cloud TPU documentation: v5p 459 TFLOP/s, 2765 GB/s,
# 95 GiB per chip; v6e 918, 1640, 32; TPU7x 2307, 7380, 192 per chip of two TensorCores, each a JAX device.
CHIP = {'v5p': (459e12, 2765e9, 95), 'v6e': (918e12, 1640e9, 32), 'tpu7x': (2307e12 / 2, 7380e9 / 2, 96)}


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  kind: str            # train | denoise
  topology: str
  frames: int
  height: int
  width: int
  theirs: tuple[str, ...]   # pyconfig overrides
  ours: tuple[tuple[str, Any], ...]  # config overrides
  refs: tuple[int, ...] = (0, 3)

  @property
  def chip(self) -> str:
    return self.topology.split(':')[0]


_TRAIN = ('per_device_batch_size=0.25', 'remat_policy=HIDDEN_STATE_WITH_OFFLOAD', 'flash_min_seq_length=0',
          'ici_data_parallelism=1', 'ici_fsdp_parallelism=1', 'ici_context_parallelism=4',
          'ici_tensor_parallelism=1')
_DENOISE = ('per_device_batch_size=0.125', 'ici_data_parallelism=2', 'ici_fsdp_parallelism=1',
            'ici_context_parallelism=4', 'ici_tensor_parallelism=1', 'flash_min_seq_length=0')
ROWS = {r.name: r for r in (
    Row('train_720p_v5p8', 'train', 'v5p:2x2x1', 81, 720, 1280, _TRAIN,
        (('mesh.data', 1), ('mesh.fsdp', 1), ('mesh.context', 4), ('data.batch_size', 1))),
    Row('denoise_720p_v7x8', 'denoise', 'tpu7x:2x2x1', 81, 720, 1280, _DENOISE, ()),
    Row('denoise_480p_v7x8', 'denoise', 'tpu7x:2x2x1', 81, 480, 832, _DENOISE, ()),
    Row('denoise_720p_v6e8', 'denoise', 'v6e:2x4', 81, 720, 1280, _DENOISE, ()),
    Row('denoise_480p_v6e8', 'denoise', 'v6e:2x4', 81, 480, 832, _DENOISE, ()),
)}

_DIR = flags.DEFINE_string('maxdiffusion_dir', '', f'a maxdiffusion checkout (commit {MAXDIFFUSION_COMMIT[:8]})')
_DEPS = flags.DEFINE_string('maxdiffusion_deps', '', 'the --no-deps target holding aqtp, chex, tensorboardX, jaxopt, '
                            'toolz (see the module docstring)')
_ROWS = flags.DEFINE_list('rows', list(ROWS), 'rows to compile')
_OUT = flags.DEFINE_string('out', '', 'write vs_maxdiffusion.json / .md here')
_DRY = flags.DEFINE_bool('dry_run', False, 'check the checkout and print what would be compiled; compile nothing')
_SIDE = flags.DEFINE_enum('side', '', ['', 'theirs', 'ours'], 'internal: compile one side of one row')
_ROW = flags.DEFINE_string('row', '', 'internal: the row of --side')
_REFS = flags.DEFINE_integer('refs', 0, 'internal: references of --side ours')
_OURS = flags.DEFINE_list('ours', [], 'extra overrides of our side, key=value (e.g. model.remat_policy=full)')


class SetupError(Exception):
  """The maxdiffusion checkout or its extra packages are not what the script needs; the message says the fix."""


def check_checkout(mdir: str, deps: str) -> str:
  """The checkout's commit (or 'unknown' without git metadata); raises SetupError naming what is missing."""
  if not mdir:
    raise SetupError('--maxdiffusion_dir is required: a maxdiffusion checkout (see --help for the commands)')
  if not os.path.exists(os.path.join(mdir, THEIR_CONFIG)):
    raise SetupError(f'{mdir!r} is not a maxdiffusion checkout: no {THEIR_CONFIG}')
  missing = [m for m in NEEDED if not deps or not os.path.isdir(os.path.join(deps, m))]
  if missing:
    raise SetupError(f'--maxdiffusion_deps={deps!r} lacks {", ".join(missing)}: pip install --no-deps --target DIR '
                     'aqtp==0.9.0 chex==0.1.92 tensorboardX==2.6.5 jaxopt==0.8.5 toolz==1.2.0')
  try:
    return subprocess.run(['git', '-C', mdir, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def plan(rows) -> list[str]:
  out = []
  for r in rows:
    sides = ['theirs'] + [f'ours, {k} refs' for k in (r.refs if r.kind == 'train' else (0,))]
    what = ('training step, global batch 1' if r.kind == 'train' else 'denoising call, CFG batch 2')
    out.append(f'{r.name}: {what}, Wan2.1-14B at {r.frames}x{r.height}x{r.width} on {r.topology}; '
               f'{" | ".join(sides)}; theirs: {" ".join(r.theirs)}'
               + (f'; ours: {" ".join(f"{k}={v}" for k, v in r.ours)}' if r.ours else ''))
  return out


# ---------------------------------------------------------------------------------------------- shared


def _memory(compiled) -> dict[str, float]:
  from kaleido_jax.tools import aot  # pylint: disable=g-import-not-at-top
  return aot._memory(compiled)  # pylint: disable=protected-access


def _cost(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  return dict(xla_flops=float(cost.get('flops', float('nan'))),
              xla_bytes=float(cost.get('bytes accessed', float('nan'))))


def _census(fn, *args) -> float:
  from kaleido_jax.train import flops as flops_lib  # pylint: disable=g-import-not-at-top
  return float(sum(m.flops * n for m, n in flops_lib.matmul_census(fn, *args).items()))


# ---------------------------------------------------------------------------------------------- theirs


def _their_modules(mdir: str, deps: str):
  sys.path[:0] = [os.path.join(mdir, 'src'), deps]
  stub = types.ModuleType('datasets')  # only their input pipeline uses Hugging Face datasets
  stub.load_from_disk = stub.load_dataset = None
  stub.Dataset = stub.IterableDataset = object
  dist = types.ModuleType('datasets.distributed')
  dist.split_dataset_by_node = None
  stub.distributed = dist
  sys.modules.setdefault('datasets', stub)
  sys.modules.setdefault('datasets.distributed', dist)
  import maxdiffusion  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  return sys.modules['maxdiffusion']


def theirs(row: Row, mdir: str, deps: str) -> dict[str, Any]:
  """Their program for `row`, built as their trainer / pipeline builds it, with abstract weights."""
  _their_modules(mdir, deps)
  import functools  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flax.linen import partitioning as nn_partitioning  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from maxdiffusion import max_utils, pyconfig, tpu_utils  # pylint: disable=g-import-not-at-top
  from maxdiffusion.models import attention_flax, embeddings_flax  # pylint: disable=g-import-not-at-top
  from maxdiffusion.models.wan.transformers.transformer_wan import WanModel  # pylint: disable=g-import-not-at-top
  from maxdiffusion.pipelines.wan import wan_pipeline  # pylint: disable=g-import-not-at-top
  from maxdiffusion.trainers import base_wan_trainer, wan_trainer  # pylint: disable=g-import-not-at-top
  from kaleido_jax.tools import aot  # pylint: disable=g-import-not-at-top

  devices = aot.topology_devices(row.topology)
  kind = devices[0].device_kind
  # Their attention pads sequences to the chip's alignment, which it reads from jax.devices() (the CPU here).
  tpu = (tpu_utils.TpuType.TPU_7X if '7x' in kind.lower() else
         tpu_utils.TpuType.TPU_V6_LITE if 'v6' in kind.lower() else tpu_utils.TpuType.UNKNOWN)
  attention_flax.get_tpu_type = embeddings_flax.get_tpu_type = lambda: tpu
  pyconfig.initialize([None, os.path.join(mdir, THEIR_CONFIG), 'run_name=aot', 'output_dir=/tmp/vs_maxdiffusion',
                       'skip_jax_distributed_system=True', 'dataset_type=synthetic', 'write_metrics=False',
                       'write_timing_metrics=False', f'height={row.height}', f'width={row.width}',
                       f'num_frames={row.frames}'] + list(row.theirs), unittest=True)
  config = pyconfig.config
  n, pdbs = len(devices), config.per_device_batch_size
  # pyconfig sizes the global batch from jax.devices() (one CPU here): the slice's, as on the TPU.
  pyconfig._config.keys['global_batch_size_to_load'] = n if pdbs < 1 else int(n * pdbs)  # pylint: disable=protected-access
  pyconfig._config.keys['global_batch_size_to_train_on'] = max(1, int(n * pdbs))  # pylint: disable=protected-access
  try:
    flax.config.update('flax_always_shard_variable', False)  # as their train_wan.main does
  except LookupError:
    pass
  mesh = Mesh(max_utils.create_device_mesh(config, devices=devices), config.mesh_axes)
  rules = config.logical_axis_rules

  def model(attention, scan=True):
    """Their create_sharded_logical_transformer's config and dtypes, abstract (no Hugging Face weights)."""
    kw = dict(mesh=mesh, dtype=config.activations_dtype, weights_dtype=config.weights_dtype, attention=attention,
              precision=max_utils.get_precision(config), flash_block_sizes=max_utils.get_flash_block_sizes(config),
              remat_policy=config.remat_policy, names_which_can_be_saved=config.names_which_can_be_saved,
              names_which_can_be_offloaded=config.names_which_can_be_offloaded,
              flash_min_seq_length=config.flash_min_seq_length, dropout=config.dropout,
              mask_padding_tokens=config.mask_padding_tokens, scan_layers=scan,
              enable_jax_named_scopes=config.enable_jax_named_scopes,
              attention_config={'use_base2_exp': config.use_base2_exp,
                                'use_experimental_scheduler': config.use_experimental_scheduler,
                                'ulysses_shards': config.ulysses_shards,
                                'ulysses_attention_chunks': config.ulysses_attention_chunks})
    m = nnx.eval_shape(lambda rngs: WanModel(**kw, rngs=rngs), rngs=nnx.Rngs(jax.random.key(config.seed)))
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    for path, var in nnx.to_flat_state(params):  # their loader's dtypes (norms and embedders stay float32)
      var.value = jax.ShapeDtypeStruct(var.value.shape, wan_pipeline._final_param_dtype(path, config.weights_dtype))  # pylint: disable=protected-access
    return graphdef, params, rest

  def sharded(tree):
    with mesh, nn_partitioning.axis_rules(rules):
      sh = nnx.get_named_sharding(tree, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh), sh

  f, h, w = (row.frames - 1) // 4 + 1, row.height // 8, row.width // 8
  repl = NamedSharding(mesh, P())
  out = dict(side='maxdiffusion', commit=MAXDIFFUSION_COMMIT, mesh={k: int(v) for k, v in mesh.shape.items()},
             remat=config.remat_policy, attention=config.attention, chips=n)

  def build(attention):
    graphdef, params, rest = model(attention)
    if row.kind == 'train':
      scheduler, sched_state = base_wan_trainer.BaseWanTrainer.create_scheduler(None)
      sample = scheduler.sample_timesteps  # at batch 1 it squeezes (1,) to () (their HEAD): keep the batch axis
      scheduler.sample_timesteps = lambda rng, b: jnp.reshape(sample(rng, b), (b,))
      lr = max_utils.create_learning_rate_schedule(config.learning_rate, config.learning_rate_schedule_steps,
                                                   config.warmup_steps_fraction, config.max_train_steps)
      tx = max_utils.create_optimizer(config, lr)
      state = jax.eval_shape(lambda p, r: base_wan_trainer.TrainState.create(
          apply_fn=graphdef.apply, params=p, tx=tx, graphdef=graphdef, rest_of_state=r), params, rest)
      state, state_sh = sharded(state)
      data_sh = wan_trainer.WanTrainer.get_data_shardings(types.SimpleNamespace(config=config), mesh)
      b = config.global_batch_size_to_load
      data = {'latents': jax.ShapeDtypeStruct((b, 16, f, h, w), jnp.float32, sharding=data_sh['latents']),
              'encoder_hidden_states': jax.ShapeDtypeStruct((b, 512, 4096), jnp.float32,
                                                            sharding=data_sh['encoder_hidden_states'])}
      key = jax.eval_shape(lambda: jax.random.key(0))
      key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl)
      sched = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.asarray(x).dtype, sharding=repl),
                           sched_state)
      step = wan_trainer.WanTrainer.get_train_step(types.SimpleNamespace(config=config),
                                                   types.SimpleNamespace(scheduler=scheduler), mesh, state_sh,
                                                   data_sh)
      raw = functools.partial(wan_trainer.train_step, scheduler=scheduler, config=config)  # as get_train_step binds it
      return step, raw, (state, data, key, sched), {}
    params, _ = sharded(params)
    rest, _ = sharded(rest)
    b = max(1, int(n * pdbs))
    args = (graphdef, params, rest, jax.ShapeDtypeStruct((2 * b, 16, f, h, w), jnp.float32, sharding=repl),
            jax.ShapeDtypeStruct((2 * b,), jnp.int32, sharding=repl),
            jax.ShapeDtypeStruct((2 * b, config.max_sequence_length, 4096), jnp.float32, sharding=repl))
    fn = wan_pipeline.transformer_forward_pass_full_cfg.jitted
    return fn, fn, args, dict(guidance_scale=config.guidance_scale)

  jitted, _, args, kw = build(config.attention)
  with mesh, nn_partitioning.axis_rules(rules):
    t = time.time()
    compiled = jitted.lower(*args, **kw).compile()
    out['compile_s'] = time.time() - t
    out.update(_memory(compiled), **_cost(compiled))
    _, raw, args, kw = build('dot_product')  # attention as XLA matmuls, visible to the census
    out['census_flops'] = _census(functools.partial(raw, **kw) if kw else raw, *args) / n
  return out


# ---------------------------------------------------------------------------------------------- ours


def ours(row: Row, refs: int) -> dict[str, Any]:
  """Our program for `row`: the AOT tool's train step (configs/kaleido_14b.py) or DiT denoising call
  (configs/kaleido_14b_sample.py), at the row's shapes."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from kaleido_jax import config as kcfg  # pylint: disable=g-import-not-at-top
  from kaleido_jax.tools import aot  # pylint: disable=g-import-not-at-top

  def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()

  extra = [kv.split('=', 1) for kv in _OURS.value]
  if row.kind == 'train':
    config = load('kaleido_14b')
    config.data.update(num_frames=row.frames, height=row.height, width=row.width)
    for k, v in list(row.ours) + extra:
      kcfg.set_path(config, k, v)
    r = aot.analyse(config, row.topology, batch_size=1, num_refs=refs)
    return dict(side='kaleido_jax', mesh=r['mesh'], remat=r['remat'], attention=r['attention'], chips=r['chips'],
                refs=refs, compile_s=r['compile_s'], census_flops=r['census_flops_per_chip'],
                xla_flops=r['xla_flops'], xla_bytes=r.get('xla_bytes', float('nan')),
                **{k: r[k] for k in ('args', 'temp', 'out', 'code', 'total', 'host_temp')})
  config = load('kaleido_14b_sample')
  config.sample.update(num_frames=row.frames, height=row.height, width=row.width, guidance_scale=5.0,
                       image_guidance_scale=0.0)
  for k, v in list(row.ours) + extra:
    kcfg.set_path(config, k, v)
  r = aot.analyse_sample(config, row.topology, batch_size=1, num_refs=refs, programs=('dit',))
  d = r['rows']['dit']
  return dict(side='kaleido_jax', mesh=r['mesh'], chips=r['chips'], refs=refs, compile_s=d['compile_s'],
              census_flops=d.get('census_flops', float('nan')), xla_flops=d.get('xla_flops', float('nan')),
              xla_bytes=d.get('xla_bytes', float('nan')),
              **{k: d.get(k, float('nan')) for k in ('args', 'temp', 'out', 'code', 'total', 'host_temp')})


# ---------------------------------------------------------------------------------------------- the table


def _side(row: Row, side: str, refs: int = 0) -> dict[str, Any]:
  """One side of one row in its own process (their modules never meet ours)."""
  cmd = [sys.executable, os.path.abspath(__file__), f'--side={side}', f'--row={row.name}', f'--refs={refs}',
         f'--maxdiffusion_dir={_DIR.value}', f'--maxdiffusion_deps={_DEPS.value}', f'--ours={",".join(_OURS.value)}']
  p = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
  if p.returncode or not lines:
    tail = (p.stderr.strip().splitlines() or ['(no output)'])[-1]
    return dict(side=side, error=f'exit {p.returncode}: {tail[:300]}')
  return json.loads(lines[-1][len('RESULT '):])


def roofline(r: dict[str, Any], row: Row) -> float:
  return r.get('census_flops', float('nan')) / CHIP[row.chip][0]


def markdown(results: dict[str, list[dict[str, Any]]], commit: str) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  gib = lambda x: f'{x / 1024 ** 3:.2f}'
  lines = [f'maxdiffusion {commit[:12]} vs kaleido_jax; jax {jax.__version__}, libtpu compiler; per JAX device '
           '(v7x: a TensorCore, half a chip).', '',
           '| row | side | mesh | args GiB | temp GiB | total GiB | host GiB | matmul TFLOPs | roofline s | '
           'XLA TFLOPs (1 of 40 layers) | XLA GB accessed | ours / theirs (total, temp, FLOPs) |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for name, sides in results.items():
    row = ROWS[name]
    base = sides[0]
    for s in sides:
      if 'error' in s:
        lines.append(f'| {name} | {s["side"]} | — | {s["error"]} | | | | | | | | |')
        continue
      who = s['side'] + (f', {s["refs"]} refs' if s['side'] == 'kaleido_jax' else '')
      ratio = ('' if s is base or 'error' in base else
               f'{s["total"] / base["total"]:.2f}x, {s["temp"] / base["temp"]:.2f}x, '
               f'{s["census_flops"] / base["census_flops"]:.2f}x')
      mesh = ' '.join(f'{k}{v}' for k, v in s['mesh'].items() if v > 1) or 'one'
      lines.append(f'| {name} | {who} | {mesh} | {gib(s["args"])} | {gib(s["temp"])} | {gib(s["total"])} | '
                   f'{gib(s.get("host_temp", 0))} | {s["census_flops"] / 1e12:.1f} | {roofline(s, row):.2f} | '
                   f'{s["xla_flops"] / 1e12:.1f} | {s["xla_bytes"] / 1e9:.1f} | {ratio} |')
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  if _SIDE.value:  # internal: one side of one row, its numbers on one line
    row = ROWS[_ROW.value]
    r = theirs(row, _DIR.value, _DEPS.value) if _SIDE.value == 'theirs' else ours(row, _REFS.value)
    print('RESULT ' + json.dumps(r, default=float))
    return
  unknown = [r for r in _ROWS.value if r not in ROWS]
  if unknown:
    print(f'error: --rows {",".join(unknown)}: unknown; the rows are {", ".join(ROWS)}')
    sys.exit(2)
  rows = [ROWS[r] for r in _ROWS.value]
  try:
    commit = check_checkout(_DIR.value, _DEPS.value)
  except SetupError as e:
    print(f'error: {e}')
    sys.exit(2)
  if commit not in ('unknown', MAXDIFFUSION_COMMIT):
    print(f'note: the checkout is at {commit[:12]}, not the pinned {MAXDIFFUSION_COMMIT[:12]}')
  print(f'maxdiffusion {commit}; would compile:' if _DRY.value else f'maxdiffusion {commit}; compiling:')
  for line in plan(rows):
    print('  ' + line)
  if _DRY.value:
    return
  results = {}
  for row in rows:
    results[row.name] = [_side(row, 'theirs')] + [_side(row, 'ours', k)
                                                   for k in (row.refs if row.kind == 'train' else (0,))]
    print(json.dumps({row.name: results[row.name]}, default=float))
  md = markdown(results, commit)
  print(md)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, 'vs_maxdiffusion.json'), 'w') as f:
      json.dump(dict(commit=commit, results=results), f, indent=1, default=float)
    with open(os.path.join(_OUT.value, 'vs_maxdiffusion.md'), 'w') as f:
      f.write(md)


if __name__ == '__main__':
  app.run(main)
