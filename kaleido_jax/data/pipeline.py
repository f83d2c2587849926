"""The Grain loader: prepared TFDS shards (or the in-memory synthetic set) -> process-local training batches.

API (stable; the trainer calls these):

    it = make_dataset(config.data, *, split, seed, process_index=None, process_count=None)
    batch = next(it)                      # process-local numpy batch, B = data.batch_size // process_count
    state = it.get_state(); it.set_state(state)   # grain DatasetIterator: checkpoint with the model
    arrays = to_global_arrays(batch, sharding)    # jax.Arrays with the global batch on the mesh

Batch keys (CONTRIBUTING, "Data"): video (B, F, H, W, 3) float32 [-1, 1], refs (B, R, H, W, 3) float32 [-1, 1]
white-padded, ref_mask (B, R) bool, subject_ids (B, R) int32 (-1 = padding), caption (list of B str), clip_id
(list of B str); from the synthetic source also subject_weight (B, F, H, W) float32 (synthetic.subject_weight:
the balanced subject map behind `diffusion.subject_loss_weight`). With `data.precomputed_latents` (shards written with encoders plugged into `prepare`):
video_latents (B, f, h, w, c), ref_latents (B, R, h', w', c) zero-padded, text_embedding (B, L, D), ref_mask,
subject_ids; no pixels.

Stages: source (`data.source`: 'tfds' = tfds ArrayRecord data source under data.data_dir, 'synthetic' =
synthetic.SyntheticSource behind the same random-access interface) -> grain.MapDataset -> per-process slice
(`process_index::process_count`, disjoint) -> seeded shuffle (reshuffled every epoch) -> repeat -> cross-pair
sampling (subjects in a random order, a random subset when there are more than `max_refs`, and for each
one of its cross-paired reference candidates) -> augmentation (each reference mirrored with probability `ref_flip`) -> to_iter_dataset
(`read_threads`, `prefetch`) -> batch (references padded to `max_refs`, mask) -> mp_prefetch when
`worker_count > 0` (needs absl flags parsed: run under `absl.app.run`).

Every random choice is grain's per-element rng (a function of seed and position), so restoring a state
reproduces exactly the batches an uninterrupted run would have produced (for a given `worker_count`: grain
interleaves worker slices, so the element order depends on it; every epoch still holds each record once).
A record that fails to decode is skipped and counted (`bad_record_count()`, per process; more than `max_bad_records` is fatal); a missing
dataset or shard raises FileNotFoundError before the first batch.
"""

from __future__ import annotations

import logging
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from kaleido_jax.data import synthetic

_BAD = {'count': 0}


def bad_record_count() -> int:
  """Records skipped because they failed to decode, in this process."""
  return _BAD['count']


class SkipBadRecords:
  """Random-access wrapper: a record that raises while reading becomes None (filtered), and is counted."""

  def __init__(self, source: Any, max_bad: int):
    self.source, self.max_bad = source, max_bad

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    try:
      return self.source[index]
    except Exception as e:  # pylint: disable=broad-except
      _BAD['count'] += 1
      logging.warning('skipping record %d: %s: %s', index, type(e).__name__, e)
      if _BAD['count'] > self.max_bad:
        raise RuntimeError(f'more than {self.max_bad} bad records; last: {e}') from e
      return None


def open_source(data_config: ml_collections.ConfigDict, split: str):
  if data_config.source == 'synthetic':
    return synthetic.make_source(data_config, split)
  if data_config.source == 'tfds':
    from kaleido_jax.data import tfds_builder  # lazy: import cost (TFDS imports TF)
    return tfds_builder.open_source(data_config.data_dir, split, data_config.dataset_name,
                                    data_config.local_data_dir)
  raise ValueError(f"unknown data.source {data_config.source!r}; use 'synthetic' | 'tfds'")


def _text(x: Any) -> str:
  if isinstance(x, np.ndarray):
    x = x.item()
  return x.decode() if isinstance(x, bytes) else str(x)


class PairAndAugment(grain.transforms.RandomMap):
  """Record -> training example: cross-pair sampling, reference augmentation, padding to max_refs."""

  def __init__(self, data_config: ml_collections.ConfigDict, empty_text: np.ndarray | None = None):
    self.max_refs = data_config.max_refs
    self.flip = data_config.ref_flip
    self.latents = data_config.precomputed_latents
    self.empty_text = empty_text  # precomputed latents: the empty prompt's embedding, given to every example

  def random_map(self, rec: dict[str, Any], rng: np.random.Generator) -> dict[str, Any] | None:
    if rec is None:
      return None
    ids = np.asarray(rec['subject_ids'], np.int32)
    n = min(len(ids), self.max_refs)
    order = rng.permutation(len(ids))[:n]
    slots = np.asarray(rec['ref_slots'] if 'ref_slots' in rec else np.arange(len(ids)), np.int32)
    pick = np.asarray([rng.choice(np.nonzero(slots == s)[0]) for s in order], np.int64)  # one candidate each
    r = self.max_refs
    out = dict(ref_mask=np.arange(r) < n, subject_ids=np.full((r,), -1, np.int32),
               caption=_text(rec['caption']), clip_id=_text(rec['clip_id']))
    out['subject_ids'][:n] = ids[order]
    if self.latents:
      for k in ('video_latents', 'ref_latents', 'text_embedding'):
        if k not in rec:
          raise KeyError(f'data.precomputed_latents=True but the records have no {k!r} (prepare with encoders)')
      rl = np.asarray(rec['ref_latents'], np.float32)
      out['ref_latents'] = np.zeros((r,) + rl.shape[1:], np.float32)
      out['ref_latents'][:n] = rl[pick]
      out['video_latents'] = np.asarray(rec['video_latents'], np.float32)
      out['text_embedding'] = np.asarray(rec['text_embedding'], np.float32)
      if self.empty_text is not None:
        out['empty_text_embedding'] = self.empty_text
      return out
    refs = np.asarray(rec['refs'])[pick]
    flips = rng.random(n) < self.flip
    refs = np.where(flips[:, None, None, None], refs[:, :, ::-1], refs)
    video = np.asarray(rec['video'])
    padded = np.ones((r,) + video.shape[1:], np.float32)  # white
    padded[:n] = refs.astype(np.float32) / 127.5 - 1
    out['refs'] = padded
    out['video'] = video.astype(np.float32) / 127.5 - 1
    if 'subject_weight' in rec:  # synthetic source: the balanced subject term of the loss weight
      out['subject_weight'] = np.asarray(rec['subject_weight'], np.float32)
    return out


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
  out = {}
  for k in examples[0]:
    vals = [e[k] for e in examples]
    out[k] = vals if isinstance(vals[0], str) else np.stack(vals)
  return out


def make_dataset(data_config: ml_collections.ConfigDict, *, split: str, seed: int,
                 process_index: int | None = None, process_count: int | None = None, empty_text: bool = False):
  """Checkpointable iterator (grain DatasetIterator) of process-local batches; see the module docstring.

  ``empty_text`` (precomputed latents): every example also carries ``empty_text_embedding``, the empty
  prompt's embedding that ``prepare`` wrote beside the shards (text dropout's input; a clear error if absent).
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= pi < pc:
    raise ValueError(f'process_index {pi} not in [0, {pc})')
  if data_config.batch_size % pc:
    raise ValueError(f'global batch {data_config.batch_size} not divisible by {pc} processes')
  local_batch = data_config.batch_size // pc
  source = open_source(data_config, split)
  ds = grain.MapDataset.source(SkipBadRecords(source, data_config.max_bad_records))
  ds = ds[pi::pc]
  if len(ds) < local_batch:
    raise ValueError(f'process {pi} holds {len(ds)} records, fewer than its batch of {local_batch}')
  if data_config.shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(data_config.num_epochs or None)
  empty = None
  if empty_text and data_config.precomputed_latents:
    from kaleido_jax.data import tfds_builder  # lazy: import cost (TFDS imports TF)
    empty = tfds_builder.read_empty_text(data_config.data_dir, data_config.dataset_name)
  ds = ds.random_map(PairAndAugment(data_config, empty), seed=seed + 1)
  ds = ds.filter(lambda x: x is not None)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=data_config.read_threads,
                                            prefetch_buffer_size=max(1, data_config.prefetch * local_batch)))
  it = it.batch(local_batch, drop_remainder=True, batch_fn=collate)
  if data_config.worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count,
                                                     per_worker_buffer_size=data_config.prefetch))
  return iter(it)


def to_global_arrays(batch: dict[str, Any], sharding: Any, global_batch: int | None = None) -> dict[str, Any]:
  """Process-local batch -> global jax.Arrays via `jax.make_array_from_process_local_data`.

  `sharding`: one jax.sharding.Sharding for every array, or a dict key -> Sharding (keys absent are dropped).
  String lists (caption, clip_id) are passed through unchanged. `global_batch` defaults to local * processes.
  """
  out = {}
  for k, v in batch.items():
    if not isinstance(v, np.ndarray):
      out[k] = v
      continue
    s = sharding.get(k) if isinstance(sharding, dict) else sharding
    if s is None:
      continue
    gb = global_batch or v.shape[0] * jax.process_count()
    out[k] = jax.make_array_from_process_local_data(s, v, (gb,) + v.shape[1:])
  return out
