"""The TFDS dataset builder that writes prepared examples as ArrayRecord shards.

TFDS gives us what the pipeline needs for free: atomic writes (the version directory is written under an
`incomplete` name and renamed when every shard is complete), a `dataset_info.json` with the shard list, and
`as_data_source` random access for Grain. Frames are stored as `Tensor` uint8 features (not `Image`), which
the array_record reader decodes without TF image ops.

Buckets: open-source array_record opens local files only (its C++ reader and writer go through riegeli's
FdReader / FdWriter: google/array_record#120, google/riegeli#31), so
- a shard bound for `gs://` is written to a local temporary file and copied into the bucket (`_StagedArrayRecord`,
  TFDS' adapter for the format from the moment this module is imported: the local engine and every Beam worker
  that runs the pipeline's stages import it); TFDS writes the rest (dataset_info.json, the incomplete-dir
  rename) through etils.epath itself;
- a `gs://` data_dir is read from a per-host copy (`local_dataset_dir`, under `data.local_data_dir`; files
  already there at the same size are kept), or, for a data set larger than a host's disk, from a gcsfuse mount
  of the bucket passed as a local data_dir (README: Storage: buckets).

Features: video (F, H, W, 3) uint8, subject_ids (n,) int32, refs (C, H, W, 3) uint8 reference candidates and
ref_slots (C,) int32 (the subject each candidate shows), caption, clip_id,
pairing (json: per reference subject_id / clip / frame / mode), synthesis (json: ops applied), and optionally
video_latents, ref_latents, text_embedding float32 when encoders were plugged into `prepare`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from kaleido_jax import storage

NAME = 'kaleido_s2v'
VERSION = '1.0.0'


def features(num_frames: int, height: int, width: int,
             latent_shapes: dict[str, tuple] | None = None) -> tfds.features.FeaturesDict:
  zlib = tfds.features.Encoding.ZLIB
  spec = dict(
      video=tfds.features.Tensor(shape=(num_frames, height, width, 3), dtype=np.uint8, encoding=zlib),
      refs=tfds.features.Tensor(shape=(None, height, width, 3), dtype=np.uint8, encoding=zlib),
      subject_ids=tfds.features.Tensor(shape=(None,), dtype=np.int32),
      ref_slots=tfds.features.Tensor(shape=(None,), dtype=np.int32),
      caption=tfds.features.Text(),
      clip_id=tfds.features.Text(),
      pairing=tfds.features.Text(),
      synthesis=tfds.features.Text(),
  )
  for k, shape in (latent_shapes or {}).items():
    spec[k] = tfds.features.Tensor(shape=shape, dtype=np.float32)
  return tfds.features.FeaturesDict(spec)


class _StagedArrayRecord(file_adapters.ArrayRecordFileAdapter):
  """TFDS' ArrayRecord adapter, with shards bound for a bucket written locally first and then copied in."""

  @classmethod
  def write_examples(cls, path, iterator):
    if not storage.is_remote(path):
      return super().write_examples(path, iterator)
    tmp = tempfile.mkdtemp(prefix='kaleido-shard-')
    try:
      local = os.path.join(tmp, os.path.basename(str(path)))
      out = super().write_examples(local, iterator)
      storage.upload(local, path)
      return out
    finally:
      shutil.rmtree(tmp, ignore_errors=True)


file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.ARRAY_RECORD] = _StagedArrayRecord


class KaleidoS2V(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Cross-paired subject-to-video examples; the examples come from `prepare` (an iterable of dicts)."""

  name = NAME
  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): 'Cross-paired, filtered, synthesised subject-to-video examples.'}

  # TFDS' default code_path probes `importlib_resources`, which this environment lacks; the file is known.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def __init__(self, *, feature_dict: tfds.features.FeaturesDict, splits: dict[str, Any],
               **kwargs: Any):
    self._feature_dict = feature_dict
    self._splits = splits
    super().__init__(file_format='array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=self._feature_dict)

  def _split_generators(self, dl_manager):
    del dl_manager
    # A Beam PTransform (prepare's Beam engine) is built by TFDS' Beam writer as it is.
    return {name: fn if hasattr(fn, 'expand') else self._generate_examples(fn) for name, fn in self._splits.items()}

  def _generate_examples(self, fn):
    for key, ex in fn():
      yield key, ex


def dataset_dir(data_dir: str, name: str = NAME) -> str:
  return storage.join(data_dir, name, VERSION)


def local_dataset_dir(data_dir: str, name: str = NAME, local_root: str = '') -> str:
  """A local directory holding the prepared dataset: its own for a local data_dir; for a bucket, a copy under
  `local_root` (default ~/.cache/kaleido_jax/data) mirroring bucket/path, files already there at the same size
  kept. array_record reads local files only (module doc)."""
  d = dataset_dir(data_dir, name)
  if not storage.is_remote(d):
    return d
  root = local_root or os.path.join(os.path.expanduser('~'), '.cache', 'kaleido_jax', 'data')
  if not storage.exists(storage.join(d, 'dataset_info.json')):
    raise FileNotFoundError(f'no prepared dataset at {d} (run `python -m kaleido_jax.main --mode prepare`)')
  return storage.mirror_dir(d, os.path.join(root, d.split('://', 1)[1]))


def write(data_dir: str, feature_dict: tfds.features.FeaturesDict, splits: dict[str, Any],
          num_shards: int | None, beam_options: Any = None) -> str:
  """Write the splits as ArrayRecord shards under data_dir/kaleido_s2v/1.0.0 (atomically); returns that dir.

  A split is a callable giving (key, example) pairs, or, with `beam_options` (Beam PipelineOptions), a
  PTransform from the pipeline's root to (key, example) pairs. `num_shards=None` lets TFDS size the shards by
  bytes (64 MiB to 1 GiB each, its defaults).
  """
  b = KaleidoS2V(feature_dict=feature_dict, splits=splits, data_dir=data_dir)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      num_shards=None if num_shards is None else max(1, num_shards), beam_options=beam_options))
  return dataset_dir(data_dir)


# The empty prompt's text embedding (L, D) float32, beside the shards of a dataset prepared with a text encoder:
# text dropout's unconditional input when training from precomputed latents (CFG samples with umT5's encoding
# of a prompt, never with zeros, so dropout must train on the same kind of input).
EMPTY_TEXT_FILE = 'empty_text_embedding.npy'


def write_empty_text(data_dir: str, embedding: np.ndarray, name: str = NAME) -> str:
  path = epath.Path(dataset_dir(data_dir, name)) / EMPTY_TEXT_FILE
  with path.open('wb') as f:
    np.save(f, np.asarray(embedding, np.float32))
  return str(path)


def read_empty_text(data_dir: str, name: str = NAME) -> np.ndarray:
  """The empty prompt's embedding of a prepared dataset; FileNotFoundError naming the file and the fix."""
  path = epath.Path(dataset_dir(data_dir, name)) / EMPTY_TEXT_FILE
  if not path.exists():
    raise FileNotFoundError(
        f'{path} is missing: text dropout on precomputed latents trains on the empty prompt\'s embedding, which '
        '`python -m kaleido_jax.main --mode prepare` writes when it encodes text (re-run it with the text encoder, or '
        'set --config.diffusion.text_dropout=0)')
  with path.open('rb') as f:
    return np.load(f).astype(np.float32)


def num_shards(data_dir: str, split: str, name: str = NAME) -> int:
  """How many shards a written split has (from its dataset_info.json)."""
  return len(tfds.builder_from_directory(dataset_dir(data_dir, name)).info.splits[split].filenames)


def open_source(data_dir: str, split: str, name: str = NAME, local_root: str = ''):
  """Random-access source of a prepared split (a bucket's is copied to this host first: `local_dataset_dir`);
  a missing dataset or shard is a clear error."""
  d = local_dataset_dir(data_dir, name, local_root)
  if not os.path.exists(os.path.join(d, 'dataset_info.json')):
    raise FileNotFoundError(f'no prepared dataset at {d} (run `python -m kaleido_jax.main --mode prepare`)')
  builder = tfds.builder_from_directory(d)
  if split not in builder.info.splits:
    raise ValueError(f'split {split!r} not in {d}; it has {sorted(builder.info.splits)}')
  missing = [f for f in builder.info.splits[split].filenames if not os.path.exists(os.path.join(d, f))]
  if missing:
    raise FileNotFoundError(f'{len(missing)} shard(s) of {name}/{split} missing under {d}: {missing[:3]}')
  return builder.as_data_source(split=split)
