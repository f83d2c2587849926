"""`--mode sample --prompts FILE`: a prompt set -> one video per request in an output directory, resumable,
spread over every chip and host.

  python -m kaleido_jax.main --config C --workdir W --mode sample --prompts set.txt [--out DIR] [--checkpoint P]

FILE is upstream Kaleido's `sample_video.py` format, one request per line, `prompt@@image1@@image2@@image3`
(blank lines and `#` comments skipped), a JSON manifest: a list of `{"prompt": ..., "refs": [...], "seed"?: int,
"name"?: str}` (or `{"requests": [...]}`), or OpenS2V-Eval's own JSON as the benchmark ships it:
`{"<id>": {"img_paths": [...], "prompt": ..., "class_label": [...], "synthesis_flag": ...}}` (each id's video is
`<id>.mp4`, its `class_label` kept in its record). Image paths are relative to `root` (`sample.prompts_root`: the
benchmark folder), by default FILE's directory; a benchmark image path that leads outside the root is that
request's error.

Each request becomes `DIR/NAME.mp4`: NAME is its `name` or its position (`00007`), its seed its `seed` or
`sample.seed + position`, so a video depends on its request only, never on which chip or host made it. A video is
written atomically with a record `DIR/records/NAME.json`; a rerun skips every request that has both (a run killed
halfway loses only the videos in flight). A bad request (empty prompt, too many references, a missing or
unreadable image) is recorded with its error and the rest go on. `DIR/manifest.json` lists every request:
status (done | error), file, prompt, refs, seed, seconds.

Parallelism: the chips of a host form data-parallel groups of `fsdp x context x tensor` chips (config.mesh; one
chip each by default), every group holding the DiT and running the same program; groups take the requests
round-robin over all hosts (`position % groups == group`), so each request is made exactly once and by the same
program it would be made by on one chip. umT5 and the VAE are shared by a host's groups (on its first chip).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import posixpath
import re
import sys
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from kaleido_jax import storage
from kaleido_jax import media

RECORDS = 'records'
MANIFEST = 'manifest.json'
_NAME_OK = re.compile(r'[^A-Za-z0-9._-]+')


class PromptSetError(ValueError):
  """The prompt set itself cannot be read (not a bad request: those are recorded and skipped)."""


@dataclasses.dataclass
class Request:
  position: int
  name: str
  prompt: str
  refs: list[str]
  seed: int
  error: str = ''
  labels: list[str] | None = None  # OpenS2V-Eval's class_label

  def record(self, **extra: Any) -> dict[str, Any]:
    out = {'name': self.name, 'position': self.position, 'prompt': self.prompt, 'refs': self.refs,
           'seed': self.seed, **extra}
    if self.labels is not None:
      out['class_label'] = self.labels
    return out


def is_benchmark(data: Any) -> bool:
  """OpenS2V-Eval's JSON: ids mapped to objects with `img_paths`."""
  return (isinstance(data, dict) and bool(data) and 'requests' not in data and 'prompts' not in data
          and all(isinstance(v, dict) and 'img_paths' in v for v in data.values()))


def read_requests(path: str, *, base_seed: int = 0, max_refs: int = 3,
                  check_image: Callable[[str, int], None] | None = None, root: str = '') -> list[Request]:
  """Every request of FILE, the bad ones with their `error` set (see the module docstring)."""
  if not storage.path(path).is_file():
    raise PromptSetError(f'--prompts {path!r}: no such file')
  if root and not storage.path(root).is_dir():
    raise PromptSetError(f'sample.prompts_root {root!r}: no such directory')
  root = root or str(storage.path(storage.absolute(path)).parent)  # the file's folder, local or in a bucket
  text = storage.read_text(path)
  raw: list[dict[str, Any]] = []
  if path.lower().endswith('.json'):
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise PromptSetError(f'--prompts {path!r} is not valid JSON ({e})') from e
    if is_benchmark(data):
      raw = [{'name': k, 'prompt': v.get('prompt', ''), 'refs': list(v.get('img_paths') or []),
              'labels': [str(c) for c in v.get('class_label') or []], 'inside_root': True} for k, v in data.items()]
      data = raw
    data = data.get('requests', data.get('prompts')) if isinstance(data, dict) else data
    if not isinstance(data, list):
      raise PromptSetError(f'--prompts {path!r}: expected a list of {{"prompt", "refs"}} objects')
    raw = [d if isinstance(d, dict) else {'error': f'not an object: {d!r}'} for d in data]
  else:
    for line in text.splitlines():
      if not line.strip() or line.lstrip().startswith('#'):
        continue
      prompt, *refs = line.split('@@')
      raw.append({'prompt': prompt, 'refs': refs})
  requests, names = [], set()
  for i, d in enumerate(raw):
    given = [str(r).strip() for r in (d.get('refs') or []) if str(r).strip()]
    refs = [storage.resolve(root, r) for r in given]
    name = _NAME_OK.sub('_', str(d['name'])).strip('._') if d.get('name') else f'{i:05d}'
    req = Request(i, name or f'{i:05d}', str(d.get('prompt', '')).strip(), refs,
                  int(d['seed']) if d.get('seed') is not None else int(base_seed) + i, str(d.get('error', '')),
                  d.get('labels'))
    outside = [g for g, r in zip(given, refs) if d.get('inside_root') and not _inside(root, r)]
    if outside and not req.error:
      req.error = f'image path {outside[0]!r} leads outside the benchmark root {root!r}'
    if not req.error:
      req.error = _problem(req, max_refs, names, check_image)
    names.add(req.name)
    requests.append(req)
  return requests


def _inside(root: str, path: str) -> bool:
  if storage.is_remote(root) or storage.is_remote(path):
    norm = lambda p: p.split('://', 1)[0] + '://' + posixpath.normpath(p.split('://', 1)[1])
    return storage.is_remote(path) and norm(path).startswith(norm(root).rstrip('/') + '/')
  return os.path.commonpath([os.path.realpath(root), os.path.realpath(path)]) == os.path.realpath(root)


def _problem(req: Request, max_refs: int, names: set[str], check_image) -> str:
  if req.name in names:
    return f'name {req.name!r} is used by an earlier request'
  if not req.prompt:
    return 'empty prompt'
  if len(req.refs) > max_refs:
    return f'{len(req.refs)} references, at most {max_refs}'
  for j, r in enumerate(req.refs):
    if not storage.path(r).is_file():
      return f'reference image {r!r} does not exist'
    if check_image is not None:
      try:
        check_image(r, j)
      except Exception as e:  # pylint: disable=broad-except  (any unreadable image is this request's error)
        return str(e).splitlines()[0]
  return ''


def is_done(out_dir: str, req: Request, ext: str) -> bool:
  return (storage.exists(storage.join(out_dir, RECORDS, req.name + '.json'))
          and storage.exists(storage.join(out_dir, req.name + ext)))


def _write_record(out_dir: str, name: str, record: dict[str, Any]) -> None:
  storage.write_bytes(storage.join(out_dir, RECORDS, name + '.json'),
                      json.dumps(record, ensure_ascii=False, indent=1).encode('utf-8'))


def write_manifest(out_dir: str, requests: Sequence[Request]) -> dict[str, Any]:
  """DIR/manifest.json from the records present (idempotent: any host may write it, the last one is complete)."""
  entries = []
  for req in requests:
    path = storage.join(out_dir, RECORDS, req.name + '.json')
    if storage.exists(path):
      entries.append(storage.read_json(path))
    else:
      entries.append(req.record(status='pending'))
  counts = {s: sum(e['status'] == s for e in entries) for s in ('done', 'error', 'pending')}
  manifest = {'requests': entries, **counts}
  storage.write_bytes(storage.join(out_dir, MANIFEST), json.dumps(manifest, ensure_ascii=False, indent=1).encode())
  return manifest


class Progress:
  """A tqdm bar over this host's requests with the rate in videos per hour."""

  def __init__(self, total: int, done: int = 0):
    self.bar = tqdm(total=total, initial=done, desc='videos', unit='video', file=sys.stderr)
    self.start, self.made, self.lock = time.time(), 0, threading.Lock()

  def update(self) -> float:
    with self.lock:
      self.made += 1
      per_hour = 3600.0 * self.made / max(time.time() - self.start, 1e-9)
      self.bar.set_postfix_str(f'{per_hour:.1f} videos/h')
      self.bar.update(1)
      return per_hour

  def close(self) -> None:
    self.bar.close()


def run_requests(requests: Sequence[Request], out_dir: str, make: Sequence[Callable[[Request], np.ndarray]], *,
                 fps: float, ext: str = '.mp4', group_offset: int = 0, num_groups: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
  """Makes this host's share of `requests` with `make` (one callable per local group: request -> uint8 frames).

  Group g of this host is global group `group_offset + g` of `num_groups`; it takes the requests whose position
  is that modulo `num_groups`. Returns {'made', 'skipped', 'errors', 'videos_per_hour'} for this host.
  """
  num_groups = num_groups or len(make)
  storage.path(storage.join(out_dir, RECORDS)).mkdir(parents=True, exist_ok=True)
  mine = [[r for r in requests if r.position % num_groups == group_offset + g] for g in range(len(make))]
  todo = [[r for r in share if not is_done(out_dir, r, ext)] for share in mine]
  skipped = sum(len(a) - len(b) for a, b in zip(mine, todo))
  # A run killed mid-write leaves `.NAME.*.partial.*` temporaries (media.py writes atomically); the request is
  # this group's alone, so its leftovers are removed before it is made again.
  names = {r.name for share in todo for r in share}
  for f in storage.listdir(out_dir):
    if f.startswith('.') and '.partial' in f and f[1:].split('.', 1)[0] in names:
      storage.path(storage.join(out_dir, f)).unlink()
  bar = Progress(sum(len(t) for t in todo)) if progress else None
  stats = {'made': 0, 'errors': 0, 'videos_per_hour': 0.0}
  lock = threading.Lock()

  def work(g: int) -> None:
    for req in todo[g]:
      t0 = time.time()
      if req.error:
        _write_record(out_dir, req.name, req.record(status='error', error=req.error))
        with lock:
          stats['errors'] += 1
        continue
      try:
        frames = make[g](req)
      except ValueError as e:  # a request the pipeline refuses (an image it cannot use): recorded, the rest go on
        _write_record(out_dir, req.name, req.record(status='error', error=str(e).splitlines()[0]))
        with lock:
          stats['errors'] += 1
        continue
      media.write_video(storage.join(out_dir, req.name + ext), frames, fps)
      _write_record(out_dir, req.name, req.record(status='done', file=req.name + ext,
                                                  seconds=round(time.time() - t0, 3)))
      with lock:
        stats['made'] += 1
      if bar is not None:
        stats['videos_per_hour'] = bar.update()

  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(make)) as pool:  # JAX runs groups concurrently
      for f in [pool.submit(work, g) for g in range(len(make))]:
        f.result()
  finally:
    if bar is not None:
      bar.close()
  return dict(stats, skipped=skipped)
