"""Sharded functional step vs single device, loss decrease, schedules, mesh rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kaleido_jax import config as kcfg
from kaleido_jax.parallel import mesh as mesh_lib
from kaleido_jax.parallel import shardings
from kaleido_jax.train import inputs, state as state_lib, step as step_lib
from tests.train.common import tiny_config


def _train(config, mesh_overrides, devices, steps):
  config.mesh.update(mesh_overrides)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  spec = state_lib.build_spec(config, mesh)
  state = state_lib.init_state(config, spec, mesh)
  src = inputs.SyntheticLatents(config, seed=0)
  local = next(src)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in local.items()}
  fn, b_sh = step_lib.make_train_step(config, spec, mesh, shapes)
  losses = []
  shard = inputs.data_shards(mesh, config.data.batch_size)[0]
  for _ in range(steps):
    with jax.set_mesh(mesh):
      state, m = fn(state, inputs.to_global(local, b_sh, config.data.batch_size, shard), jax.random.key(0))
    losses.append(float(m['loss']))
    local = next(src)
  return np.array(losses), jax.device_get(state), spec


@pytest.fixture(scope='module')
def single():
  return _train(tiny_config(real_dit=True), {}, jax.devices()[:1], 2)


@pytest.mark.slow
@pytest.mark.parametrize('mesh', [dict(data=2, fsdp=2, tensor=2), dict(data=2, context=2, tensor=2)])
def test_sharded_step_matches_single_device(single, mesh):
  assert jax.device_count() == 8
  n = int(np.prod(list(mesh.values())))
  config = tiny_config(real_dit=True)
  losses, state, spec = _train(config, mesh, jax.devices()[:n], 2)
  ref_losses, ref_state, _ = single
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  diff = max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(state['params']), jax.tree.leaves(ref_state['params'])))
  print(f'mesh {mesh}: max |param diff| vs 1 device = {diff:.3g}')
  # Adam normalises updates, so float reassociation in sharded reductions shows up at a small fraction of
  # one step's update (lr = 1e-3 here, 2 steps): bound at 3% of the total possible movement.
  assert diff < 0.03 * 1e-3 * 2
  specs = [str(s.spec) for s in jax.tree.leaves(spec.shardings['params'])]
  for axis in ('tensor', 'fsdp'):  # parameters really are sharded over the mesh's model axes
    if axis in mesh:
      assert any(axis in s for s in specs), (axis, specs)
  if 'context' in mesh:  # the video latents really are split over context
    shapes = {'video_latents': jax.ShapeDtypeStruct((8, 3, 8, 8, 4), jnp.float32)}
    m = mesh_lib.make_mesh(config.mesh, jax.devices()[:n])
    assert 'context' in str(step_lib.batch_shardings(shapes, m)['video_latents'].spec)


@pytest.mark.slow
def test_loss_decreases_on_tiny_problem():
  config = tiny_config(real_dit=True, learning_rate=3e-3, schedule='warmup_constant', warmup_steps=5)
  losses, _, _ = _train(config, {}, jax.devices()[:1], 40)
  assert losses[-8:].mean() < 0.7 * losses[:4].mean(), losses


def test_grad_accumulation_and_bf16_and_ema_run():
  config = tiny_config(grad_accum=2, ema_decay=0.9)
  config.model.dtype = 'bfloat16'
  losses, state, _ = _train(config, dict(data=2), jax.devices()[:2], 2)
  assert np.all(np.isfinite(losses))
  for p, e in zip(jax.tree.leaves(state['params']), jax.tree.leaves(state['ema'])):
    assert p.dtype == np.float32 and e.dtype == np.float32  # fp32 master weights and EMA
  # EMA moved from the init toward the params but is not equal to them.
  assert any(not np.array_equal(p, e) for p, e in zip(jax.tree.leaves(state['params']),
                                                       jax.tree.leaves(state['ema'])))


def test_bf16_first_moment_halves_its_memory_and_still_trains():
  config = tiny_config(moments_dtype='bfloat16')
  losses, state, _ = _train(config, {}, jax.devices()[:1], 2)
  assert np.all(np.isfinite(losses))
  adam = state['opt_state'][1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {np.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {np.dtype(np.float32)}
  config.train.moments_dtype = 'float16'
  with pytest.raises(ValueError, match='moments_dtype'):
    state_lib.make_optimizer(config.train)


def test_schedules():
  t = kcfg.train_config(learning_rate=1.0, schedule='warmup_constant', warmup_steps=10, num_steps=100)
  s = state_lib.make_schedule(t)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(50)) == 1.0
  t.schedule = 'cosine'
  s = state_lib.make_schedule(t)
  assert float(s(10)) == pytest.approx(1.0) and float(s(55)) == pytest.approx(0.5, abs=1e-3)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-6)
  t.schedule = 'constant'
  assert float(state_lib.make_schedule(t)(77)) == 1.0
  t.schedule = 'linear'
  with pytest.raises(ValueError):
    state_lib.make_schedule(t)


def test_mesh_fill_and_rules():
  cfg = kcfg.mesh_config(data=-1, tensor=2)
  assert mesh_lib.mesh_shape(cfg, 8) == (4, 1, 1, 2)
  with pytest.raises(ValueError):
    mesh_lib.mesh_shape(kcfg.mesh_config(data=3), 8)
  with pytest.raises(ValueError):
    mesh_lib.mesh_shape(kcfg.mesh_config(data=-1, fsdp=-1), 8)
  mesh = mesh_lib.make_mesh(kcfg.mesh_config(data=2, fsdp=2, tensor=2))
  assert shardings.spec(('embed', 'mlp'), (8, 8), mesh) == jax.sharding.PartitionSpec('fsdp', 'tensor')
  # fsdp used once per array; indivisible dims are replicated.
  assert shardings.spec(('activation_batch', 'embed'), (4, 8), mesh) == jax.sharding.PartitionSpec(('data', 'fsdp'), None)
  assert shardings.spec(('embed', 'heads'), (3, 5), mesh) == jax.sharding.PartitionSpec(None, None)
  assert shardings.spec(('layers', 'embed', 'kv'), (2, 4, 4), mesh) == jax.sharding.PartitionSpec(None, 'fsdp', None)


@pytest.mark.slow
def test_grad_accumulation_averages_strided_microbatches():
  import optax
  config = tiny_config(grad_accum=2, grad_clip=0.0)
  config.data.batch_size = 4
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  spec = state_lib.build_spec(config, mesh)
  state = state_lib.init_state(config, spec, mesh)
  batch = jax.tree.map(jnp.asarray, next(inputs.SyntheticLatents(config, seed=0)))
  key = jax.random.key(0)
  new_state, m = jax.jit(step_lib.train_step_fn(config, spec))(state, batch, key)
  loss_fn = step_lib.make_loss_fn(config, spec)
  rng = jax.random.fold_in(key, 0)
  grads, losses = [], []
  for i in range(2):
    micro = jax.tree.map(lambda x: x[i::2], batch)  # examples i, i+2: the strided split
    (l, _), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state['params'], micro,
                                                                    jax.random.fold_in(rng, i))
    grads.append(g)
    losses.append(l)
  g = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  updates, _ = spec.tx.update(g, state['opt_state'], state['params'])
  want = optax.apply_updates(state['params'], updates)
  assert float(m['loss']) == pytest.approx(float(sum(losses) / 2), rel=1e-5)
  for a, b in zip(jax.tree.leaves(new_state['params']), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6)
