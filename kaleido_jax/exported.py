"""Run an exported Kaleido sampler (written by `--mode export`) with jax, numpy, sentencepiece and Pillow only.

  from kaleido_jax.exported import ExportedSampler
  s = ExportedSampler('/tmp/kaleido-demo/exported')
  frames = s(['A red circle moves right.'], [['red_circle.png']], seeds=[0])   # (1, F, H, W, 3) uint8

This module imports nothing else from kaleido_jax (copy the file next to the artifact to use it elsewhere; an
artifact in a bucket, `gs://...`, is read through etils.epath):
the tokenizer rule (umT5: HTML-unescaped, whitespace-collapsed text -> pieces, trimmed, + EOS, right-padded
with 0) and the reference preprocessing (fit inside the frame keeping the aspect ratio, white padding, alpha
composited on white) are restated here from kaleido_jax/model/text_encoder.py and
kaleido_jax/data/references.py, which stay the reference implementations.
"""

from __future__ import annotations

import html
import json
import os
import pathlib
import re
from typing import Any, Sequence

import jax
import numpy as np
import sentencepiece as spm
from PIL import Image


FORMAT = 'kaleido_jax.exported_sampler'
FORMAT_VERSION = 1
PROGRAM_FILE = 'program.jax_exported'
WEIGHTS_FILE = 'weights.npz'
SIGNATURE_FILE = 'signature.json'
INPUT_NAMES = ('seeds', 'input_ids', 'attention_mask', 'negative_ids', 'negative_mask', 'ref_images', 'ref_mask')


class ExportedSamplerError(ValueError):
  """The artifact or an input does not fit; the message says which and what to do."""


def _clean(text: str) -> str:
  return re.sub(r'\s+', ' ', html.unescape(html.unescape(text)).strip()).strip()


def fit_on_white(image: Any, height: int, width: int) -> np.ndarray:
  """A path / PIL image / uint8 array -> (height, width, 3) uint8: fitted keeping aspect, white-padded."""
  img = image if isinstance(image, Image.Image) else (
      Image.open(image) if isinstance(image, (str, os.PathLike)) else Image.fromarray(np.asarray(image)))
  img = img.convert('RGBA')
  white = Image.new('RGBA', img.size, (255, 255, 255, 255))
  img = Image.alpha_composite(white, img).convert('RGB')
  scale = min(width / img.size[0], height / img.size[1])
  w, h = max(1, int(img.size[0] * scale)), max(1, int(img.size[1] * scale))
  img = img.resize((w, h), Image.LANCZOS)
  out = Image.new('RGB', (width, height), (255, 255, 255))
  out.paste(img, ((width - w) // 2, (height - h) // 2))
  return np.asarray(out)


def _file(directory: str, name: str):
  """A file of the artifact: a pathlib.Path, or for a bucket (`gs://...`) an etils.epath.Path (what orbax and TFDS
  use; imported only then)."""
  if '://' in directory:
    from etils import epath  # lazy: a bucket artifact only (keeps this file copyable)
    return epath.Path(directory) / name
  return pathlib.Path(directory) / name


class ExportedSampler:
  """Loads signature.json, the serialized program, the weights (if separate) and the tokenizer."""

  def __init__(self, directory: str):
    directory = str(directory)
    sig_path = _file(directory, SIGNATURE_FILE)
    if not sig_path.exists():
      raise ExportedSamplerError(f'{directory!r} is not an exported sampler (no {SIGNATURE_FILE}); create one '
                                 'with `python -m kaleido_jax.main --mode export`')
    self.signature = sig = json.loads(sig_path.read_text())
    if sig.get('format') != FORMAT or sig.get('format_version') != FORMAT_VERSION:
      raise ExportedSamplerError(f'{directory!r} has format {sig.get("format")!r} version '
                                 f'{sig.get("format_version")}; this loader reads {FORMAT!r} version '
                                 f'{FORMAT_VERSION}: re-export it with this kaleido_jax version')
    self.exported = jax.export.deserialize(bytearray(_file(directory, PROGRAM_FILE).read_bytes()))
    self.weights: list[jax.Array] = []
    if sig['weights'] == 'argument':
      # npz keeps bfloat16 / int4 / float8 (ml_dtypes) only as raw bytes ('V' dtypes): view them back as the
      # program's own input types. Read one leaf at a time (the archive is opened, not read whole) and put on the
      # device as it is read: the host holds one leaf, and calls pass device arrays (no upload per video).
      avals = self.exported.in_avals[:sig['num_weights']]
      with _file(directory, WEIGHTS_FILE).open('rb') as fh, np.load(fh) as data:
        self.weights = [jax.device_put(_as_dtype(data[f'w{i:05d}'], avals[i].dtype))
                        for i in range(sig['num_weights'])]
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(_file(directory, sig['tokenizer']).read_bytes())
    self.video = sig['video']
    self.max_refs, self.text_len = int(sig['max_refs']), int(sig['text_len'])

  @property
  def platforms(self) -> list[str]:
    return list(self.signature['platforms'])

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((len(prompts), self.text_len), np.int32)
    mask = np.zeros_like(ids)
    eos = int(self._sp.eos_id())
    for i, p in enumerate(prompts):
      t = list(self._sp.EncodeAsIds(_clean(p)))[:self.text_len - 1] + [eos]
      ids[i, :len(t)], mask[i, :len(t)] = t, 1
    return ids, mask

  def references(self, ref_sets: Sequence[Sequence[Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of images (paths / arrays / PIL) per video -> (B, R, H, W, 3) float32 [-1, 1], (B, R) mask."""
    h, w, r = self.video['height'], self.video['width'], self.max_refs
    images = np.ones((len(ref_sets), r, h, w, 3), np.float32)
    mask = np.zeros((len(ref_sets), r), bool)
    for i, refs in enumerate(ref_sets):
      if len(refs) > r:
        raise ExportedSamplerError(f'video #{i} has {len(refs)} references; this artifact takes at most {r}')
      for j, ref in enumerate(refs):
        images[i, j] = fit_on_white(ref, h, w).astype(np.float32) / 127.5 - 1.0
        mask[i, j] = True
    return images, mask

  def __call__(self, prompts: Sequence[str], ref_sets: Sequence[Sequence[Any]] | None = None, *,
               ref_images: np.ndarray | None = None, ref_mask: np.ndarray | None = None,
               seeds: Sequence[int] | None = None, negative_prompt: str | None = None) -> np.ndarray:
    """uint8 frames (B, F, H, W, 3). References as image lists (`ref_sets`) or prepared arrays."""
    prompts = list(prompts)
    if any(not p.strip() for p in prompts):
      raise ExportedSamplerError('empty prompt; describe the video to make')
    if ref_images is None:
      ref_images, ref_mask = self.references(ref_sets or [[] for _ in prompts])
    ref_images = np.asarray(ref_images)
    if ref_images.dtype == np.uint8:
      ref_images = ref_images.astype(np.float32) / 127.5 - 1.0
    if ref_mask is None:
      ref_mask = np.ones(ref_images.shape[:2], bool)
    seeds = np.arange(len(prompts), dtype=np.uint32) if seeds is None else np.asarray(seeds, np.uint32)
    ids, mask = self.tokenize(prompts)
    neg = self.signature['negative_prompt'] if negative_prompt is None else negative_prompt
    neg_ids, neg_mask = self.tokenize([neg])
    out = self.exported.call(self.weights, seeds, ids, mask, neg_ids, neg_mask,
                             np.asarray(ref_images, np.float32), np.asarray(ref_mask, bool))
    return np.asarray(out)


def run_prompt_set(sampler: ExportedSampler, prompts_file: str, output_dir: str, *, seed: int = 0,
                   root: str = '') -> dict[str, Any]:
  """The batch of `--mode sample --prompts` (kaleido_jax/batch.py: same names, seeds, records, manifest, resume;
  OpenS2V-Eval's JSON with `root` its benchmark folder) made by an exported sampler. Unlike the rest of this module it needs the kaleido_jax package (imported here)."""
  from kaleido_jax import batch  # lazy: the one helper here that needs the kaleido_jax package

  def make(req):
    return sampler([req.prompt], [req.refs], seeds=[req.seed])[0]  # ExportedSamplerError is a ValueError
  requests = batch.read_requests(prompts_file, base_seed=seed, max_refs=sampler.max_refs,
                                 check_image=lambda path, _: fit_on_white(path, 8, 8), root=root)
  stats = batch.run_requests(requests, output_dir, [make], fps=float(sampler.video.get('fps', 16)))
  return dict(stats, manifest=batch.write_manifest(output_dir, requests))


def _as_dtype(x: np.ndarray, dtype: Any) -> np.ndarray:
  return x.view(dtype) if x.dtype.kind == 'V' else x
