"""`run(config, workdir)`: the training loop (`python -m kaleido_jax.main --mode train`).

Order of a step: next batch → jitted step → loss check → metrics/hooks → checkpoint. Because the
data-iterator state, the train state and the per-step key (`fold_in(seed key, step)`) all advance together
and are saved together, a resumed run reproduces the uninterrupted run bit for bit (same mesh).

- Multi-host: `jax.distributed.initialize` when JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID are set (CPU: gloo collectives), or with no arguments on a TPU slice when
  KALEIDO_DISTRIBUTED=auto (launch/tpu.py sets it) or TPU_WORKER_HOSTNAMES lists several hosts. Every process feeds its slice of the global batch.
- Logs: clu metric_writers (TensorBoard under workdir + stdout) on process 0 only; ReportProgress
  (steps/s, ETA) and Profile (if train.profile_steps) hooks.
- SIGTERM (TPU preemption): finish the current step, save a checkpoint of it, exit cleanly.
- Non-finite loss: stop with `TrainingDiverged` naming the step; that state is never saved, so the last
  good checkpoint is untouched.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from kaleido_jax import config as kcfg
from kaleido_jax import storage
from kaleido_jax import weights
from kaleido_jax.convert import lora as lora_conv
from kaleido_jax.model import lora as lora_lib
from kaleido_jax.parallel import mesh as mesh_lib
from kaleido_jax.train import checkpoint as ckpt_lib
from kaleido_jax.train import console
from kaleido_jax.train import flops as flops_lib
from kaleido_jax.train import inputs as inputs_lib
from kaleido_jax.train import state as state_lib
from kaleido_jax.train import step as step_lib


class TrainingDiverged(RuntimeError):
  """Loss became NaN/inf; the message names the step."""


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Fail fast, before anything is built, on a config that cannot train on `num_devices` chips; tools.aot
  calls it for the slice it compiles for. (Which rows each host feeds is the mesh's: `inputs.data_shards`.)"""
  t = config.train
  problems = []
  if t.num_steps <= 0:
    problems.append(f'train.num_steps must be > 0, got {t.num_steps}')
  if t.schedule not in ('constant', 'warmup_constant', 'cosine'):
    problems.append(f'train.schedule {t.schedule!r} not in constant | warmup_constant | cosine')
  if t.grad_accum < 1:
    problems.append(f'train.grad_accum must be >= 1, got {t.grad_accum}')
  if not 0.0 <= t.ema_decay < 1.0:
    problems.append(f'train.ema_decay must be in [0, 1), got {t.ema_decay}')
  if t.checkpoint_every <= 0:
    problems.append(f'train.checkpoint_every must be > 0, got {t.checkpoint_every}')
  try:
    shape = mesh_lib.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    problems.append(str(e))
  else:
    dp = shape[0] * shape[1]
    b = config.data.batch_size
    if b % (dp * t.grad_accum):
      problems.append(f'data.batch_size={b} must be divisible by data*fsdp={dp} times '
                      f'grad_accum={t.grad_accum}')
  d = config.data
  if d.get('pairing', 'cross') not in ('cross', 'same_clip'):
    problems.append(f"data.pairing {d.pairing!r} not in cross | same_clip")
  elif d.get('pairing', 'cross') != 'cross' and d.source != 'synthetic':
    problems.append(f"data.pairing={d.pairing!r} applies to data.source='synthetic'; prepared shards are "
                    'cross-paired when they are written (data.prepare)')
  if config.diffusion.get('subject_loss_weight', 0.0) < 0:
    problems.append(f'diffusion.subject_loss_weight must be >= 0, got {config.diffusion.subject_loss_weight}')
  elif config.diffusion.get('subject_loss_weight', 0.0) > 0 and (d.source != 'synthetic' or
                                                                  t.input != 'pipeline'):
    problems.append("diffusion.subject_loss_weight needs the synthetic source's subject masks: data.source="
                    "'synthetic' with train.input='pipeline'")
  if d.get('synthesis', False) and d.source != 'synthetic':
    problems.append("data.synthesis applies to data.source='synthetic'; prepared shards hold their synthesised "
                    'variants already (data.prepare.synth_per_clip)')
  if config.model.dtype not in ('float32', 'bfloat16'):
    problems.append(f'model.dtype {config.model.dtype!r} not in float32 | bfloat16')
  rank = state_lib.lora_rank(config)
  if config.model.get('quantization', 'none') != 'none' and not rank:
    problems.append(f'model.quantization={config.model.quantization!r}: quantized weights take no gradients; '
                    'train with --config.model.quantization=none, or train LoRA adapters over the quantized base '
                    '(--config.train.lora.rank=16)')
  if rank < 0:
    problems.append(f'train.lora.rank must be >= 0 (0 = full fine-tuning), got {rank}')
  if rank:
    try:
      lora_lib.resolve_targets(tuple(config.train.lora.targets))
    except ValueError as e:
      problems.append(f'train.lora.targets: {e}')
    if config.train.lora.alpha < 0:
      problems.append(f'train.lora.alpha must be >= 0 (0 = the rank), got {config.train.lora.alpha}')
  if problems:
    raise kcfg.ConfigError('invalid training config: ' + '; '.join(problems))


def load_init_params(config: ml_collections.ConfigDict, target: dict) -> dict | None:
  """`config.init_from.transformer` landed straight in the train state's shardings (`target`: the abstract
  `params`, or LoRA's frozen base), or None without one. kaleido_jax/weights: no device holds more than its
  shard plus one leaf in flight, whatever the source (converted directory, training checkpoint, PyTorch files)."""
  path = config.init_from.transformer
  if not path:
    return None
  try:
    pure, where = weights.load_transformer(path, target, model_cfg=config.model,
                                           fmt=config.init_from.transformer_format)
  except (weights.WeightsError, FileNotFoundError) as e:
    raise kcfg.ConfigError(f'init_from.transformer: {e}') from e
  logging.info('initial weights: %s', where)
  return pure


def _tokens_per_step(config, batch) -> tuple[int, int, int]:
  shape = batch['video_latents'].shape
  video, _ = flops_lib.tokens(shape[1:4], 0, (0, 0), config.model.patch_size)
  refs = batch.get('ref_latents')
  ref = 0 if refs is None else flops_lib.tokens(shape[1:4], refs.shape[1], refs.shape[2:4],
                                                config.model.patch_size)[1]
  return video, ref, batch['text_embedding'].shape[1]


class _Preemption:
  """Whether to save and stop after a step, the same step on every host.

  One process: a SIGTERM handler sets a flag, read after the step. Several (jax.distributed): JAX's preemption
  service, which `jax.distributed.initialize` starts, catches the SIGTERM of any host and has the hosts agree
  on one step (the largest any has reached, plus one); orbax's `multihost.reached_preemption(step)`, asked by
  every host after every step, is True there on all of them, so they enter the checkpoint save (a collective)
  together and exit 0. No Python handler is installed then: it would take SIGTERM away from the service.
  """

  def __init__(self):
    self.flag = False
    self._old = None
    self.multihost = jax.process_count() > 1

  def __enter__(self):
    if self.multihost:
      return self

    def handler(signum, frame):
      del signum, frame
      logging.warning('SIGTERM: will checkpoint after the current step and exit')
      self.flag = True
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def reached(self, step: int) -> bool:
    if self.multihost:
      return ocp.multihost.reached_preemption(step)
    return self.flag

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


LORA_DIR = 'lora'


def save_adapter(config: ml_collections.ConfigDict, spec: state_lib.StateSpec, state: dict, workdir: str) -> str:
  """The trained LoRA adapters as WORKDIR/lora/pytorch_lora_weights.safetensors (diffusers / PEFT layout)."""
  key = 'ema' if 'ema' in state else 'params'
  adapters = multihost_utils.process_allgather(state[key], tiled=True)  # every process: host copies of the factors
  out = storage.join(workdir, LORA_DIR)
  if jax.process_index() == 0:
    # The base stays abstract (shapes only): the writer reads the adapters' factors alone.
    model = nnx.merge(spec.graphdef, _filled(spec.abstract_params, adapters), spec.abstract_frozen, spec.rest)
    alpha = float(config.train.lora.alpha or state_lib.lora_rank(config))
    if storage.is_remote(out):  # safetensors writes local files: written locally, then copied into the bucket
      with tempfile.TemporaryDirectory() as tmp:
        lora_conv.save_peft_lora(model, tmp, alpha=alpha)
        for f in os.listdir(tmp):
          storage.upload(os.path.join(tmp, f), storage.join(out, f))
    else:
      lora_conv.save_peft_lora(model, out, alpha=alpha)
    logging.info('wrote LoRA adapters (%s) to %s', key, out)
  return out


def _filled(template, pure):
  state = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(state, pure)
  return state


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train; returns the last step, its loss, the losses of this run's steps, whether preempted, the state, this
  process's data shard and the bytes in use per device after the first step."""
  if config.train.get('console', 'log') not in ('log', 'progress'):
    raise kcfg.ConfigError(f"train.console {config.train.console!r} not in log | progress")
  with console.quiet_logs(config.train.get('console', 'log') == 'progress'):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  mesh_lib.initialize_distributed()
  validate(config, jax.device_count())
  storage.check_writable_dir(workdir)  # a local directory or a bucket prefix (kaleido_jax/storage.py)
  is_main = jax.process_index() == 0
  lock = storage.WorkdirLock(workdir, float(config.train.lock_stale_s)) if is_main else None
  refused = ''
  if lock is not None:
    try:
      lock.acquire()
    except storage.StorageError as e:
      refused, lock = str(e), None
    else:
      if lock.took_over:
        logging.warning('took over the lock of a dead run in %s: %s', workdir, lock.took_over)
  refused = _from_process_0(refused)  # every host learns process 0's verdict before any other collective
  if refused:
    raise storage.StorageError(refused)
  try:
    return _train(config, workdir, is_main)
  finally:
    if lock is not None:
      lock.release()


def _from_process_0(text: str, size: int = 4096) -> str:
  """Process 0's `text` on every process (one collective; nothing to do on one process)."""
  if jax.process_count() == 1:
    return text
  buf = np.zeros(size, np.uint8)
  raw = text.encode()[:size - 1]
  buf[:len(raw)] = np.frombuffer(raw, np.uint8)
  got = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(got).rstrip(b'\0').decode(errors='replace')


def _train(config: ml_collections.ConfigDict, workdir: str, is_main: bool) -> dict[str, Any]:
  from clu import metric_writers, periodic_actions  # lazy: import cost (clu's writers import TensorFlow: seconds)
  mesh = mesh_lib.make_mesh(config.mesh)
  spec = state_lib.build_spec(config, mesh)
  shard = inputs_lib.data_shards(mesh, config.data.batch_size)[jax.process_index()]  # rows from the mesh
  data = inputs_lib.make_input(config, seed=config.seed, shard=shard, workdir=workdir)
  ckpt_dir = storage.join(workdir, 'checkpoints')
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, config.train)

  start = ckpt.latest_step()
  lora = spec.abstract_frozen is not None
  if start is not None:  # a resume restores the training checkpoint; init_from only for LoRA's frozen base
    logging.info('resuming from step %d', start)
    state = ckpt.restore(start, state_lib.checkpointed(spec.abstract_state), data)
    if lora:
      state['frozen'] = state_lib.init_state(
          config, spec, mesh, params=load_init_params(config, spec.abstract_state['frozen']))['frozen']
  else:
    start = 0
    # LoRA: init_from gives the frozen base (never checkpointed); full fine-tuning: the initial trained weights.
    # Passed straight in, never named here: init_state donates the loaded copy, so the run holds one set of
    # weights (a name kept in this frame would hold a second copy for the whole run: ~13 GiB per v5p-8 chip).
    state = state_lib.init_state(
        config, spec, mesh, params=load_init_params(config, spec.abstract_state['frozen' if lora else 'params']))

  # TensorBoard events: TF's writer reaches a bucket only through TF's own GCS client, so a bucket workdir gets
  # them written locally and copied in with epath on every log (storage.SyncedDir).
  events = storage.SyncedDir(workdir) if storage.is_remote(workdir) and is_main else None
  logdir = events.local if events is not None else workdir
  writer = metric_writers.create_default_writer(logdir, just_logging=not is_main)
  if start == 0 and is_main:
    writer.write_hparams({k: v for k, v in config.train.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  hooks = []
  progress = None
  if is_main and config.train.get('console', 'log') == 'progress' and start < config.train.num_steps:
    progress = console.ProgressLine(start, config.train.num_steps)
  if is_main:
    hooks.append(periodic_actions.ReportProgress(num_train_steps=config.train.num_steps, writer=writer))
    if config.train.profile_steps:
      hooks.append(periodic_actions.Profile(logdir=logdir, num_profile_steps=config.train.profile_steps))

  rng = jax.random.key(config.seed)
  train_step = None
  flops_per_step = tokens_per_step = None
  peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind,
                                         config.train.peak_tflops_per_device)
  last_log_time, last_log_step = time.time(), start
  step = start
  loss = None  # the last loss read from the device (none before the first read)
  losses = []
  live_bytes = None
  pending = []  # this run's per-step losses still on the device: read on the logging / checkpoint cadence

  def sync_losses() -> float | None:
    """Reads the pending losses (one host sync); stops on a NaN before anything after it is saved."""
    nonlocal loss
    if pending:
      first = step - len(pending) + 1
      values = [float(x) for x in jax.device_get(pending)]
      pending.clear()
      losses.extend(values)
      loss = values[-1]
      bad = [i for i, v in enumerate(values) if not np.isfinite(v)]
      if config.train.stop_on_nan and bad:
        raise TrainingDiverged(
            f'loss is {values[bad[0]]} at step {first + bad[0]}; stopping without saving. Last good checkpoint: '
            f'step {ckpt.latest_step()} in {ckpt_dir}')
    return loss

  preempted = False
  with _Preemption() as preemption:
    try:
      while step < config.train.num_steps:
        local = next(data)
        if train_step is None:
          shapes = inputs_lib.batch_spec(config)  # what tools.aot compiles too
          inputs_lib.check_batch(local, shapes, shard)
          train_step, b_sh = step_lib.make_train_step(config, spec, mesh, shapes)
          v_tok, r_tok, t_len = _tokens_per_step(config, shapes)
          tokens_per_step = config.data.batch_size * v_tok
          flops_per_step = flops_lib.train_step_flops(config.model, config.data.batch_size, v_tok, r_tok,
                                                      t_len)
        batch = inputs_lib.to_global(local, b_sh, config.data.batch_size, shard)
        with jax.set_mesh(mesh):
          state, metrics = train_step(state, batch, rng)
        step += 1
        pending.append(metrics['loss'])  # no host sync per step: the device runs ahead of the loop
        if live_bytes is None:  # what the run holds between steps, beside tools.aot's figure for this step
          live_bytes = live_bytes_per_device(state)
          logging.info('memory after the first step: %.3f GiB per device in use (largest local device)',
                       live_bytes / 2 ** 30)
        for h in hooks:
          h(step)
        log_now = step % config.train.log_every == 0 or step == config.train.num_steps
        stop = preemption.reached(step)
        save_now = stop or step % config.train.checkpoint_every == 0 or step == config.train.num_steps
        if log_now or save_now:
          sync_losses()
        if progress is not None:
          progress(step, loss)  # the loss as of the last sync (logging / checkpoint cadence)
        if log_now:
          now = time.time()
          steps_per_s = (step - last_log_step) / max(now - last_log_time, 1e-9)
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          scalars.update(steps_per_s=steps_per_s, tokens_per_s=steps_per_s * tokens_per_step,
                         tflops_per_device=steps_per_s * flops_per_step / jax.device_count() / 1e12)
          if peak:
            scalars['mfu'] = steps_per_s * flops_per_step / (peak * jax.device_count())
          writer.write_scalars(step, scalars)
          last_log_time, last_log_step = now, step
          if events is not None:
            writer.flush()
            events.sync()
        if stop:
          ckpt.save(step, state_lib.checkpointed(state), data, config, force=True)
          if lora:
            save_adapter(config, spec, state, workdir)
          preempted = True
          logging.warning('preempted: saved step %d, exiting', step)
          break
        if save_now:
          ckpt.save(step, state_lib.checkpointed(state), data, config)
          if lora:
            save_adapter(config, spec, state, workdir)
      sync_losses()
    finally:
      if progress is not None:
        progress.close()
      ckpt.close()
      writer.flush()
      if events is not None:
        events.sync()
  return {'step': step, 'loss': float('nan') if loss is None else loss, 'losses': losses, 'preempted': preempted, 'state': state, 'shard': shard,
          'live_bytes_per_device': live_bytes}


def live_bytes_per_device(wait_for: Any = None) -> int:
  """Bytes in use on this process's fullest device: the allocator's count where the backend keeps one (TPU,
  GPU: `memory_stats()['bytes_in_use']`), else the live jax.Arrays' shards on it (CPU)."""
  jax.block_until_ready(wait_for)
  stats = [d.memory_stats() for d in jax.local_devices()]
  if all(s and 'bytes_in_use' in s for s in stats):
    return max(int(s['bytes_in_use']) for s in stats)
  used = {d: 0 for d in jax.local_devices()}
  for a in jax.live_arrays():
    for shard in a.addressable_shards:
      if shard.device in used:
        used[shard.device] += shard.data.nbytes
  return max(used.values())
