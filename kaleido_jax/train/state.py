"""Train state: a plain pytree of fp32 master parameters, optimiser state, step and (optionally) EMA.

The model is split once (`nnx.split`) into a static graphdef and its parameters; the state holds the
parameters as a pure nested dict (`nnx.to_pure_dict`) so optax, orbax and jit shardings all see one simple
structure. The step function rebuilds the module with `nnx.merge` inside the loss.

State layout: {'step': int32 scalar, 'params': dict, 'opt_state': optax state, ['ema': dict], ['frozen': dict]}.
With ``train.lora.rank > 0`` (LoRA fine-tuning, kaleido_jax/model/lora.py) ``params`` holds only the adapters'
``nnx.LoRAParam`` factors (so gradients, AdamW moments and EMA are LoRA-sized) and ``frozen`` the base weights
in their own dtype (bf16 or quantized): an input of the step that is never differentiated, and never
checkpointed (a resumed run loads it again from ``init_from``).
The model is built abstractly (`nnx.eval_shape`) and then materialised by a jitted init whose outputs
already carry their NamedShardings, so a 14B model never exists unsharded on one device.
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kaleido_jax.model import lora as lora_lib
from kaleido_jax.parallel import shardings as shardings_lib

DEFAULT_MODEL_FACTORY = 'kaleido_jax.model.dit:KaleidoDiT'


def model_factory(config: ml_collections.ConfigDict) -> Callable[..., nnx.Module]:
  """`factory(config.model, rngs=...)` named by `config.train.model_factory` ('module:attr'); with
  `train.lora.rank > 0` the built model gets LoRA adapters on `train.lora.targets`."""
  spec = config.train.get('model_factory', '') or DEFAULT_MODEL_FACTORY
  module, attr = spec.split(':')
  base = getattr(importlib.import_module(module), attr)
  rank = lora_rank(config)
  if not rank:
    return base
  lc = config.train.lora

  def with_adapters(model_cfg, *, rngs):
    return lora_lib.add_adapters(base(model_cfg, rngs=rngs), rank, float(lc.alpha or rank), tuple(lc.targets),
                                 rngs=rngs, rslora=bool(lc.get('rslora', False)))
  return with_adapters


def lora_rank(config: ml_collections.ConfigDict) -> int:
  """train.lora.rank (0 = full fine-tuning)."""
  lc = config.train.get('lora')
  return int(lc.rank) if lc is not None else 0


def make_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """constant | warmup_constant (linear warmup) | cosine (linear warmup, cosine decay to 0)."""
  lr, warm, n = train_cfg.learning_rate, int(train_cfg.warmup_steps), int(train_cfg.num_steps)
  if train_cfg.schedule == 'constant':
    return optax.constant_schedule(lr)
  if train_cfg.schedule == 'warmup_constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warm, 1)), optax.constant_schedule(lr)], [warm])
  if train_cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(n, warm + 1), end_value=0.0)
  raise ValueError(f'unknown schedule {train_cfg.schedule!r}; use constant | warmup_constant | cosine')


MOMENTS_DTYPES = ('float32', 'bfloat16')


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clip (if grad_clip > 0), then AdamW (Kaleido: betas 0.9/0.95, wd 1e-4).

  `train.moments_dtype='bfloat16'` keeps Adam's first moment in bf16 (optax's `mu_dtype`: 2 bytes per
  parameter less, 7.1 GiB per chip for 14B on 4 chips); the second moment takes the parameters' dtype (optax has
  no nu dtype): float32 unless `model.param_dtype='bfloat16'`.
  """
  moments = train_cfg.get('moments_dtype', 'float32')
  if moments not in MOMENTS_DTYPES:
    raise ValueError(f'config.train.moments_dtype={moments!r}; choose one of {MOMENTS_DTYPES}')
  tx = optax.adamw(make_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                   weight_decay=train_cfg.weight_decay,
                   mu_dtype=None if moments == 'float32' else jnp.dtype(moments))
  if train_cfg.grad_clip and train_cfg.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), tx)
  return tx


@dataclasses.dataclass
class StateSpec:
  """What the step needs besides the arrays: the static graph, templates and shardings."""
  graphdef: Any
  abstract_params: nnx.State        # nnx State template of the trained variables (shapes only)
  rest: nnx.State                   # non-Param variables (empty for the DiT), kept constant
  abstract_frozen: nnx.State | None  # LoRA: template of the frozen base parameters; None for full fine-tuning
  abstract_state: dict              # ShapeDtypeStructs of the train state, with .sharding set
  shardings: dict                   # NamedSharding pytree matching the train state
  tx: optax.GradientTransformation


def _param_shardings(abstract_params: nnx.State, mesh: Mesh) -> dict:
  return nnx.to_pure_dict(shardings_lib.state_shardings(abstract_params, mesh))


def _opt_shardings(abstract_opt, params_sh: dict, abstract_pure: dict, mesh: Mesh):
  """Optimiser leaves that mirror a parameter (Adam mu/nu) get its sharding; the rest is replicated."""
  by_path = {}
  for path, sh in jax.tree_util.tree_flatten_with_path(params_sh)[0]:
    by_path[tuple(path)] = sh
  shapes = {tuple(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract_pure)[0]}

  def f(path, leaf):
    path = tuple(path)
    for i in range(len(path)):
      suffix = path[i:]
      if suffix in by_path and shapes[suffix] == leaf.shape:
        return by_path[suffix]
    return NamedSharding(mesh, P())
  return jax.tree_util.tree_map_with_path(f, abstract_opt)


def build_spec(config: ml_collections.ConfigDict, mesh: Mesh,
               factory: Callable[..., nnx.Module] | None = None) -> StateSpec:
  """Abstract model → graphdef, templates and the train state's shardings (nothing is allocated)."""
  factory = factory or model_factory(config)
  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: factory(config.model, rngs=nnx.Rngs(config.seed)))
  if lora_rank(config):
    graphdef, abstract_params, abstract_frozen, rest = nnx.split(abstract_model, nnx.LoRAParam, nnx.Param, ...)
  else:
    graphdef, abstract_params, rest = nnx.split(abstract_model, nnx.Param, ...)
    abstract_frozen = None
  tx = make_optimizer(config.train)
  abstract_pure = nnx.to_pure_dict(abstract_params)
  abstract_pure = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_pure)
  params_sh = _param_shardings(abstract_params, mesh)
  abstract_opt = jax.eval_shape(tx.init, abstract_pure)
  rep = NamedSharding(mesh, P())
  shardings = {'step': rep, 'params': params_sh,
               'opt_state': _opt_shardings(abstract_opt, params_sh, abstract_pure, mesh)}
  abstract = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': abstract_pure, 'opt_state': abstract_opt}
  if config.train.ema_decay > 0:
    shardings['ema'] = params_sh
    abstract['ema'] = abstract_pure
  if abstract_frozen is not None:
    shardings['frozen'] = _param_shardings(abstract_frozen, mesh)
    abstract['frozen'] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                      nnx.to_pure_dict(abstract_frozen))
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return StateSpec(graphdef, abstract_params, rest, abstract_frozen, abstract, shardings, tx)


def init_state(config: ml_collections.ConfigDict, spec: StateSpec, mesh: Mesh,
               factory: Callable[..., nnx.Module] | None = None,
               params: dict | None = None) -> dict:
  """Materialise the train state directly into its shardings (random init, or given `params`).

  With LoRA (`spec.abstract_frozen`), `params` are the *base* weights (the frozen part, kept in their dtype);
  the adapters always start from their own init (B = 0: the adapted model starts as the base).
  """
  factory = factory or model_factory(config)
  lora = spec.abstract_frozen is not None

  def init(params):
    with nnx.use_eager_sharding(False):
      model = factory(config.model, rngs=nnx.Rngs(config.seed))
    if lora:
      trained = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
      frozen = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
      frozen = params if params is not None else frozen
    else:
      trained = params if params is not None else nnx.to_pure_dict(nnx.state(model, nnx.Param))
    trained = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                           else x, trained)
    state = {'step': jnp.zeros((), jnp.int32), 'params': trained, 'opt_state': spec.tx.init(trained)}
    if config.train.ema_decay > 0:
      state['ema'] = jax.tree.map(jnp.copy, trained)
    if lora:
      state['frozen'] = jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype), frozen, spec.abstract_state['frozen'])
    return state

  with jax.set_mesh(mesh):
    if params is None:
      return jax.jit(lambda: init(None), out_shardings=spec.shardings)()
    # Donated: the loaded weights become the state's (fp32 leaves alias in place), no second copy stays live;
    # bf16 leaves cast to fp32 cannot alias, which JAX would warn about once per leaf.
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
      return jax.jit(init, out_shardings=spec.shardings, donate_argnums=0)(params)


def merge_model(spec: StateSpec, params: dict, frozen: dict | None = None) -> nnx.Module:
  """nnx.merge of the graphdef with a pure-dict of parameters (and LoRA's frozen base; used inside jit)."""
  template = jax.tree.map(lambda x: x, spec.abstract_params)
  nnx.replace_by_pure_dict(template, params)
  if spec.abstract_frozen is None:
    return nnx.merge(spec.graphdef, template, spec.rest)
  base = jax.tree.map(lambda x: x, spec.abstract_frozen)
  nnx.replace_by_pure_dict(base, frozen)
  return nnx.merge(spec.graphdef, template, base, spec.rest)


def checkpointed(state: dict) -> dict:
  """What a checkpoint holds: the state without LoRA's frozen base (init_from has it)."""
  return {k: v for k, v in state.items() if k != 'frozen'}


def count_params(abstract_params: dict) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(abstract_params))
