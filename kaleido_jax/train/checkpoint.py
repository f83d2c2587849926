"""orbax CheckpointManager for training: train state, data-iterator state and config in one step dir.

Items per step: `state` (StandardSave of {'step', 'params', 'opt_state', ['ema']}), `data` (grain's
CheckpointHandler: one `process_<i>-of-<n>.json` per process, so every host resumes its own input
stream), `config` (JSON). Retention: the newest `keep_checkpoints` plus every step divisible by
`keep_every` (orbax keep_period). Saves are async by default; `wait()` before reading or exiting.
Restore takes the *current* run's abstract state (ShapeDtypeStructs with NamedShardings), so a checkpoint
written on one mesh is restored onto whatever mesh the new run has.
"""

from __future__ import annotations

import json
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp

from kaleido_jax import storage


class _IteratorSnapshot:
  """The data iterator's position at save time (what grain's checkpoint handler reads)."""

  def __init__(self, data_iter: Any):
    state = data_iter.get_state()
    # grain's handler writes bytes states as text and json-dumps dict states (DatasetIterator); the
    # snapshot is not a DatasetIterator, so it hands over the same JSON text as bytes.
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:
  """Thin wrapper that fixes the item layout and retention policy."""

  def __init__(self, directory: str, train_cfg: ml_collections.ConfigDict):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(train_cfg.keep_checkpoints) or None,
        keep_period=int(train_cfg.keep_every) or None,
        enable_async_checkpointing=bool(train_cfg.async_checkpointing),
        create=True)
    self.manager = ocp.CheckpointManager(
        storage.absolute(directory), options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any, config: ml_collections.ConfigDict,
           force: bool = False) -> bool:
    items = {'state': ocp.args.StandardSave(state),
             'config': ocp.args.JsonSave(json.loads(config.to_json()))}
    if data_iter is not None:
      # Snapshot now: with async checkpointing the handler runs in a background thread, by which time the
      # loop may have pulled further batches; the saved position must be the one of `state`.
      items['data'] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iter))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """State restored into the shardings of `abstract_state`; `data_iter` (if given) is set in place."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out['state']

  def restore_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
