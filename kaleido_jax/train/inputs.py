"""Training inputs in latent space, one process-local slice of every global batch.

The trainer consumes `video_latents (B, F, H, W, C)`, `ref_latents (B, R, h, w, C)`, `ref_mask (B, R)` and
`text_embedding (B, L, D)` (CONTRIBUTING: the precomputed-latents form of a data example).

- `train.input = 'pipeline'`: `kaleido_jax.data.pipeline.make_dataset(config.data, ...)`, the Grain iterator of
  cross-paired samples. With `data.precomputed_latents=True` it yields these keys itself; otherwise it yields
  pixels and captions and `EncodedBatches` runs the frozen encoders (kaleido_jax/encoders.py: codec, umT5)
  on every batch in the input loop (the CPU demo's path, pixel codec; also any run without prepared latents).
- `train.input = 'synthetic_latents'`: `SyntheticLatents`, an in-memory, procedural source behind the same
  checkpointable-iterator protocol (get_state / set_state), used by tests, the demo and benchmarks until
  VAE-encoded data exists. Example i is a pure function of (seed, i): a per-identity latent pattern plus
  noise, the identity's text embedding, and 1..R references cut from the pattern (padded slots masked).
"""

from __future__ import annotations

import json
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from kaleido_jax import config as kcfg
from kaleido_jax import encoders
from kaleido_jax.data import pipeline
from kaleido_jax.model import codec as codec_lib
from kaleido_jax.parallel import shardings


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """(F, H, W, C) latents of a `data.num_frames x height x width` clip under the configured codec."""
  t, s, _ = codec_lib.factors(config.vae)
  return (1 + (config.data.num_frames - 1) // t, config.data.height // s, config.data.width // s,
          config.model.in_channels)


SYNTHETIC_TEXT_LEN = 8  # text tokens of SyntheticLatents' per-identity embeddings


def _text_dropout(config: ml_collections.ConfigDict) -> bool:
  return float(config.diffusion.text_dropout) > 0


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the configured input yields (keys, shapes, dtypes) as the train step consumes it.

  One function for the trainer (which checks its first batch against it) and tools.aot (which compiles
  exactly this batch): `video_latents`, `text_embedding` (umT5's `max_length` tokens; SyntheticLatents' own
  length), `ref_latents` / `ref_mask` when `data.max_refs` > 0, `empty_text_embedding` when the encoders run in
  the input loop or precomputed latents meet text dropout (its unconditional input: the empty prompt's embedding), `subject_weight` when the subject-balanced loss is on.
  """
  b = int(config.data.batch_size)
  f, h, w, c = latent_shape(config)
  r = int(config.data.max_refs)
  text_len = SYNTHETIC_TEXT_LEN if config.train.input == 'synthetic_latents' else int(config.text_encoder.max_length)
  text = jax.ShapeDtypeStruct((b, text_len, int(config.model.text_dim)), np.float32)
  spec = {'video_latents': jax.ShapeDtypeStruct((b, f, h, w, c), np.float32), 'text_embedding': text}
  if r:
    spec['ref_latents'] = jax.ShapeDtypeStruct((b, r, h, w, c), np.float32)
    spec['ref_mask'] = jax.ShapeDtypeStruct((b, r), np.bool_)
  if config.train.input == 'pipeline' and (not config.data.precomputed_latents or _text_dropout(config)):
    spec['empty_text_embedding'] = text
  if config.diffusion.get('subject_loss_weight', 0.0) > 0:
    spec['subject_weight'] = jax.ShapeDtypeStruct((b, f, h, w), np.float32)
  return spec


class DataShard(NamedTuple):
  """The batch rows one process feeds: `rows` of every global batch (sorted; the k-th example its loader yields
  lands in row rows[k]), and its loader's shard `index` of `count` (processes whose devices hold the same rows
  load the same shard, with the same seeds)."""
  index: int
  count: int
  rows: tuple[int, ...]


def data_shards(mesh: Mesh, global_batch: int) -> dict[int, DataShard]:
  """Every process's DataShard, computed from the mesh: the rows its devices hold under the batch sharding.

  The batch is sharded over (data, fsdp) (`parallel.shardings.batch_sharding`). On a real slice the mesh follows
  the ICI topology (`parallel.mesh.make_mesh`), so a host's devices need not be neighbours on (data, fsdp): on
  v5p-16 with fsdp 8 host 0 holds rows 0, 2, 4, 6. Any equal share is fine: a process loads as many examples as
  it holds rows and places them there (`to_global`). When `context` or `tensor` spans hosts, several processes
  hold the same rows (each a different part of the sequence or of the heads): they form one group that loads
  one shard. Row sets of unequal size, or two processes sharing some rows but not all, are refused (ConfigError).
  """
  sharding = shardings.batch_sharding(mesh, (global_batch,))
  held: dict[int, set[int]] = {}
  for device, index in sharding.devices_indices_map((global_batch,)).items():
    held.setdefault(device.process_index, set()).update(range(*index[0].indices(global_batch)))
  rows = {p: tuple(sorted(r)) for p, r in held.items()}
  groups = list(dict.fromkeys(rows[p] for p in sorted(rows)))  # shard i: the i-th distinct row set by process
  problem = None
  if len({len(r) for r in groups}) > 1:
    problem = 'row sets of different sizes'
  elif sum(len(r) for r in groups) != len(set().union(*groups)):
    problem = 'overlapping row sets'
  if problem:
    listing = '; '.join(f'process {p}: {list(r[:8])}{"..." if len(r) > 8 else ""}' for p, r in sorted(rows.items()))
    raise kcfg.ConfigError(
        f'the mesh {dict(mesh.shape)} gives the processes {problem} of a batch of {global_batch} ({listing}): '
        'choose mesh sizes whose (data, fsdp) groups split evenly over the hosts')
  return {p: DataShard(groups.index(r), len(groups), r) for p, r in sorted(rows.items())}


def shard_seed(seed: int, shard: DataShard) -> int:
  """The loader seed of one data shard: shuffles and augmentation differ between shards (and processes that
  load different rows), and agree between processes of one group."""
  if shard.count == 1:
    return int(seed)
  return int(np.random.SeedSequence([int(seed), shard.index, shard.count]).generate_state(1)[0] >> 1)


def check_batch(local: dict, spec: dict[str, jax.ShapeDtypeStruct], shard: DataShard) -> None:
  """ValueError naming every key whose process-local array differs from `spec` (the shard's rows)."""
  problems = []
  for k, want in spec.items():
    if k not in local:
      problems.append(f'{k} missing (the input yields {sorted(local)})')
      continue
    x = np.asarray(local[k])
    shape = (len(shard.rows),) + tuple(want.shape[1:])
    if tuple(x.shape) != shape or x.dtype != want.dtype:
      problems.append(f'{k} is {x.dtype}{list(x.shape)}, the step was built for {np.dtype(want.dtype)}{list(shape)}')
  if problems:
    raise ValueError('the input pipeline yields another batch than its config describes: ' + '; '.join(problems))


class EncodedBatches:
  """Pixel batches of the data pipeline -> latent batches, keeping the wrapped iterator's checkpoint state."""

  def __init__(self, pixels: Any, encoders: Any):
    self.pixels, self.encoders = pixels, encoders

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    return self.encoders.encode_batch(next(self.pixels))

  def get_state(self) -> Any:
    return self.pixels.get_state()

  def set_state(self, state: Any) -> None:
    # grain's checkpoint handler hands non-DatasetIterator objects their state as the saved JSON bytes.
    self.pixels.set_state(json.loads(state) if isinstance(state, (bytes, str)) else state)

  def start_prefetch(self) -> None:  # grain's checkpoint handler calls this after a restore
    if hasattr(self.pixels, 'start_prefetch'):
      self.pixels.start_prefetch()


class SyntheticLatents:
  """Deterministic, checkpointable iterator of process-local latent batches: row r of global batch s is example
  s * batch_size + r, so any split of the rows over processes assembles the same global batch (default: all)."""

  def __init__(self, config: ml_collections.ConfigDict, *, seed: int, rows: Sequence[int] | None = None,
               text_len: int = SYNTHETIC_TEXT_LEN):
    b = config.data.batch_size
    self.rows = tuple(range(b) if rows is None else rows)
    if any(not 0 <= r < b for r in self.rows):
      raise ValueError(f'rows {list(self.rows)} outside a global batch of {b}')
    self.global_batch = b
    self.shape = latent_shape(config)
    self.refs = config.data.max_refs
    self.text_len, self.text_dim = text_len, config.model.text_dim
    self.ids = max(1, config.data.num_identities)
    self.seed = seed
    table_rng = np.random.default_rng([seed, 0xC0FFEE])
    self.patterns = table_rng.standard_normal((self.ids,) + self.shape).astype(np.float32)
    self.texts = table_rng.standard_normal((self.ids, text_len, self.text_dim)).astype(np.float32)
    self.index = 0  # batches consumed

  def _example(self, i: int) -> dict:
    rng = np.random.default_rng([self.seed, i])
    ident = int(rng.integers(self.ids))
    video = self.patterns[ident] + 0.1 * rng.standard_normal(self.shape).astype(np.float32)
    n = int(rng.integers(1, self.refs + 1)) if self.refs else 0
    refs = np.zeros((self.refs,) + self.shape[1:], np.float32)
    frames = rng.integers(self.shape[0], size=max(n, 1))
    for j in range(n):
      refs[j] = self.patterns[ident, frames[j]]
    return {'video_latents': video, 'ref_latents': refs, 'ref_mask': np.arange(self.refs) < n,
            'text_embedding': self.texts[ident]}

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    start = self.index * self.global_batch
    ex = [self._example(start + r) for r in self.rows]
    self.index += 1
    return {k: np.stack([e[k] for e in ex]) for k in ex[0]}

  # grain's orbax CheckpointHandler protocol (bytes state for non-DatasetIterator iterators).
  def get_state(self) -> bytes:
    return json.dumps({'index': self.index, 'seed': self.seed}).encode()

  def set_state(self, state: bytes) -> None:
    d = json.loads(state)
    if d['seed'] != self.seed:
      raise ValueError(f'data state is for seed {d["seed"]}, this run uses {self.seed}')
    self.index = int(d['index'])

  def start_prefetch(self) -> None:
    pass


def make_input(config: ml_collections.ConfigDict, *, seed: int, shard: DataShard | None = None,
               workdir: str | None = None):
  """The process-local training iterator named by `config.train.input` for this process's `shard` (default:
  one shard per process; the trainer passes `data_shards(mesh, ...)`'s); workdir: where encoders cache."""
  if shard is None:
    b, pc, pi = int(config.data.batch_size), jax.process_count(), jax.process_index()
    shard = DataShard(pi, pc, tuple(range(pi * b // pc, (pi + 1) * b // pc)))
  if config.train.input == 'synthetic_latents':  # example i is a function of (seed, i): no per-shard seed
    return SyntheticLatents(config, seed=seed, rows=shard.rows)
  if config.train.input == 'pipeline':
    try:
      data = pipeline.make_dataset(config.data, split=config.data.split, seed=shard_seed(seed, shard),
                                   process_index=shard.index, process_count=shard.count,
                                   empty_text=_text_dropout(config))
    except FileNotFoundError as e:  # no dataset, a missing shard or the empty prompt's embedding: one line
      raise kcfg.ConfigError(str(e)) from e
    if config.data.precomputed_latents:
      return data
    return EncodedBatches(data, encoders.Encoders.from_config(config, workdir=workdir))
  raise ValueError(f"unknown train.input {config.train.input!r}; use 'synthetic_latents' | 'pipeline'")


def to_global(batch: dict, shardings: dict, global_batch: int, shard: DataShard) -> dict:
  """Process-local rows (the `shard`'s, in its order) → global jax.Arrays with the step's input shardings.

  Each addressable device gets its block gathered from the local rows, whatever else its sharding splits (the
  latent frames over `context`), so processes of one group (same rows) each place only their devices' parts.
  """
  local = {r: k for k, r in enumerate(shard.rows)}
  out = {}
  for k, s in shardings.items():
    x = np.asarray(batch[k])

    def block(index, x=x):
      want = range(*index[0].indices(global_batch))
      missing = [r for r in want if r not in local]
      if missing:
        raise ValueError(f'a device of this process holds batch rows {missing[:8]} outside its shard '
                         f'{list(shard.rows[:8])}')
      return x[(np.asarray([local[r] for r in want]),) + tuple(index[1:])]
    out[k] = jax.make_array_from_callback((global_batch,) + x.shape[1:], s, block)
  return out
