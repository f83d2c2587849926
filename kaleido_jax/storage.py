"""Storage: every user path may be a local directory or a bucket (`gs://...`), through one abstraction, etils.epath
(what orbax and TFDS use). On a pod the only storage all hosts share is a bucket.

- `path(p)`: an `epath.Path` for a local path or a `gs://` URL (never `os.path` on a user path: that makes a local
  folder named `gs:`).
- `check_writable_dir(p)`: a bucket that does not exist, missing credentials or an object where a directory is
  expected is one `StorageError` line naming the path and the fix.
- `exists` / `read_text` / `read_json` / `listdir` / `walk_files` / `load_npz`, and `write_bytes` / `write_json` /
  `save_npz` (whole or not at all: a local temporary renamed, or one object upload).
- `local_file(p)` / `upload(local, p)`: for libraries that read or write local files only (sentencepiece,
  TensorBoard's writer), a local copy of a remote file and the way back; `local_copy(p)` for one block (a video
  FFmpeg decodes), `fetched(p)` once per process (checkpoint files safetensors / torch read), `mirror_dir` a
  prefix kept in step with a local directory (prepared shards: array_record reads local files only).
- `SyncedDir`: a local directory mirrored into a remote one (TensorBoard events: TF's own GCS client cannot be
  pointed at another endpoint, so events are written locally and copied with epath, which works against GCS and
  its emulator alike).
- `WorkdirLock`: one trainer per workdir (see its docstring for the rule).

On the emulator (tests): STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL point at it, EPATH_USE_TF=0 (epath then
uses gcsfs) and GOOGLE_AUTH_TOKEN_FOR_TESTING is set; production needs none of these.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Any, Iterator

import numpy as np
from etils import epath

REMOTE_PREFIXES = ('gs://',)


class StorageError(ValueError):
  """A storage path that cannot be used; the message names it and the fix (the CLI prints it, exit 2)."""


def is_remote(p: Any) -> bool:
  return str(p).startswith(REMOTE_PREFIXES)


def path(p: Any) -> epath.Path:
  return epath.Path(p)


def join(p: Any, *parts: str) -> str:
  return str(epath.Path(p).joinpath(*parts))


def absolute(p: Any) -> str:
  """`p` as an absolute local path, or the bucket URL as it is (orbax and records want one that does not depend on
  the current directory)."""
  return str(p) if is_remote(p) else os.path.abspath(p)


def resolve(base: Any, p: Any) -> str:
  """`p` relative to the directory `base`, unless `p` is already absolute or a bucket URL."""
  p = str(p)
  return p if is_remote(p) or os.path.isabs(p) else join(base, p)


def exists(p: Any) -> bool:
  return epath.Path(p).exists()


def read_text(p: Any) -> str:
  return epath.Path(p).read_text()


def read_json(p: Any) -> Any:
  return json.loads(epath.Path(p).read_text())


def write_bytes(p: Any, data: bytes) -> None:
  """Writes `p` whole or not at all: a local file through a temporary and os.replace; a bucket object is
  created by one upload (GCS objects appear complete or not at all)."""
  p = str(p)
  if is_remote(p):
    epath.Path(p).write_bytes(data)
    return
  tmp = f'{p}.tmp.{os.getpid()}.{threading.get_ident()}'  # batch sampling writes records from several threads
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, p)


def write_json(p: Any, obj: Any) -> None:
  write_bytes(p, json.dumps(obj, indent=1, sort_keys=True).encode())


def save_npz(p: Any, *, compressed: bool = False, **arrays: Any) -> None:
  buf = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buf, **arrays)
  write_bytes(p, buf.getvalue())


def load_npz(p: Any) -> dict[str, np.ndarray]:
  with epath.Path(p).open('rb') as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def listdir(p: Any) -> list[str]:
  """Names in the directory `p` (empty when it does not exist)."""
  d = epath.Path(p)
  return sorted(x.name for x in d.iterdir()) if d.is_dir() else []


def walk_files(p: Any) -> list[str]:
  """Every file under the directory `p`, as paths relative to it, sorted."""
  # epath's walk names a bucket's directories without the scheme ('bucket/dir'): compare without it.
  bare = str(p).split('://', 1)[1] if is_remote(p) else str(p)
  out = []
  for d, _, files in epath.Path(p).walk():
    rel = os.path.relpath(str(d).split('://', 1)[-1], bare)
    out += [f if rel == '.' else os.path.join(rel, f) for f in files]
  return sorted(out)


@contextlib.contextmanager
def local_copy(p: Any) -> Iterator[str]:
  """A local path holding the file `p` for the block: `p` itself, or a temporary download of a bucket object
  (for readers of local files only: FFmpeg / PyAV, sentencepiece)."""
  if not is_remote(p):
    yield str(p)
    return
  d = tempfile.mkdtemp(prefix='kaleido-copy-')
  try:
    yield local_file(p, d)
  finally:
    shutil.rmtree(d, ignore_errors=True)


_FETCHED: dict[str, str] = {}


def fetched(p: Any) -> str:
  """A local path holding the file or directory `p`: itself when local; a bucket's is downloaded once per process
  into a temporary directory removed at exit (for readers of local files: safetensors, torch.load, PyAV)."""
  p = str(p)
  if not is_remote(p):
    return p
  if p not in _FETCHED:
    d = tempfile.mkdtemp(prefix='kaleido-fetched-')
    atexit.register(shutil.rmtree, d, True)
    src = epath.Path(p)
    if src.is_dir():
      _FETCHED[p] = mirror_dir(p, os.path.join(d, src.name))
    elif src.exists():
      _FETCHED[p] = local_file(p, d)
    else:
      raise FileNotFoundError(f'{p!r} does not exist')
  return _FETCHED[p]


def mirror_dir(src: Any, dest: str) -> str:
  """Copies the files under `src` (a bucket prefix) into the local directory `dest`, skipping files already
  there at the same size; each file appears complete or not at all. Returns `dest`."""
  root = epath.Path(src)
  for rel in walk_files(src):
    local = os.path.join(dest, rel)
    if os.path.exists(local) and os.path.getsize(local) == (root / rel).stat().length:
      continue
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f'{local}.tmp.{os.getpid()}'
    with (root / rel).open('rb') as s, open(tmp, 'wb') as t:
      shutil.copyfileobj(s, t, 1 << 22)
    os.replace(tmp, local)
  return dest


def _bucket(p: str) -> str:
  return p.split('://', 1)[1].split('/', 1)[0]


def check_writable_dir(p: Any, what: str = 'workdir') -> epath.Path:
  """Creates `p` as a directory (a bucket prefix) and checks it can hold files; StorageError otherwise."""
  p = str(p)
  try:
    d = epath.Path(p)
    if d.exists() and not d.is_dir():
      raise StorageError(f'{what} {p!r} is a file, not a directory; give a directory (or a bucket prefix)')
    if is_remote(p):
      bucket = epath.Path(p.split('://', 1)[0] + '://' + _bucket(p))
      if not bucket.exists():
        raise StorageError(f'{what} {p!r}: bucket {_bucket(p)!r} does not exist (or these credentials cannot see '
                           f'it); create it (gcloud storage buckets create gs://{_bucket(p)}) or fix the name')
    d.mkdir(parents=True, exist_ok=True)
    return d
  except StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (auth / network errors of the storage client)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    low = msg.lower()
    creds = ('Cloud Storage credentials come from `gcloud auth application-default login`, '
             'GOOGLE_APPLICATION_CREDENTIALS (a service-account key) or, on a TPU VM, its service account')
    if any(k in low for k in ('credential', 'auth', '401', '403', 'anonymous', 'permission')):
      hint = f'no credentials that may use this bucket? {creds}'
    elif any(k in low for k in ('resolve', 'connect', 'timed out', 'unreachable', 'network')):
      hint = f'Cloud Storage cannot be reached from this machine: check its network; {creds}'
    else:
      hint = 'check the path'
    raise StorageError(f'{what} {p!r} cannot be used ({type(e).__name__}: {msg}); {hint}') from e


def local_file(p: Any, cache_dir: str | None = None) -> str:
  """A local path holding the file `p` (itself when local; a downloaded copy of a remote one)."""
  if not is_remote(p):
    return str(p)
  d = cache_dir or tempfile.mkdtemp(prefix='kaleido-storage-')
  local = os.path.join(d, os.path.basename(str(p)))
  with epath.Path(p).open('rb') as src, open(local, 'wb') as dst:
    shutil.copyfileobj(src, dst)
  return local


def upload(local: str, dest: Any) -> None:
  """Copies the local file to `dest` (local or remote), atomically for local destinations."""
  d = epath.Path(dest)
  d.parent.mkdir(parents=True, exist_ok=True)
  if not is_remote(dest):
    tmp = f'{dest}.tmp.{os.getpid()}'
    shutil.copyfile(local, tmp)
    os.replace(tmp, str(dest))
    return
  with open(local, 'rb') as src, d.open('wb') as dst:
    shutil.copyfileobj(src, dst)


@contextlib.contextmanager
def atomic_dir(output: Any, *, replace: bool = False) -> Iterator[str]:
  """Yields a local temporary directory that becomes `output` only once the block completes (nothing otherwise).

  A local `output` is swapped in with os.replace (an existing one is replaced only after the new one is
  complete, with `replace=True`; else FileExistsError); a bucket `output` gets the finished files copied in.
  """
  output = str(output)
  if not replace and path(output).exists():
    raise FileExistsError(f'{output!r} exists; choose a new output directory (nothing is overwritten)')
  parent = tempfile.gettempdir() if is_remote(output) else os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.partial-', dir=parent)
  try:
    yield tmp
    if is_remote(output):
      for root, _, files in os.walk(tmp):
        for f in files:
          upload(os.path.join(root, f), join(output, os.path.relpath(os.path.join(root, f), tmp)))
    elif os.path.exists(output):
      old = tempfile.mkdtemp(prefix='.replaced-', dir=parent)
      os.replace(output, os.path.join(old, 'previous'))
      os.replace(tmp, output)
      shutil.rmtree(old)
    else:
      os.replace(tmp, output)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


class SyncedDir:
  """A local directory whose files are copied into `remote` on `sync()` (new or grown files only)."""

  def __init__(self, remote: Any):
    self.remote = str(remote)
    self.local = tempfile.mkdtemp(prefix='kaleido-sync-')
    self._sizes: dict[str, int] = {}

  def sync(self) -> int:
    copied = 0
    for root, _, files in os.walk(self.local):
      for f in files:
        src = os.path.join(root, f)
        size = os.path.getsize(src)
        rel = os.path.relpath(src, self.local)
        if self._sizes.get(rel) != size:
          upload(src, join(self.remote, rel))
          self._sizes[rel] = size
          copied += 1
    return copied


class WorkdirLock:
  """One trainer per workdir, local or in a bucket: `WORKDIR/train.lock` names its holder.

  Rule: a trainer takes the lock at start and a thread of its own refreshes it every `stale_after / 6` seconds
  (at most every minute) while it holds it, whatever the step cadence (loading and compiling a 14B run take
  longer than `stale_after`); it removes the lock when it ends (done, preempted or stopped by an error). A second trainer refuses while the lock is
  fresh (one line naming the holder: host, pid, since when). A lock not refreshed for `stale_after` seconds is
  a killed run's: it is taken over, with a warning; on the holder's own host a lock whose process no longer
  exists is stale at once. Taking the lock writes it and reads it back (the last writer wins a race; the other
  sees a nonce it did not write and refuses).
  """

  NAME = 'train.lock'

  def __init__(self, workdir: Any, stale_after: float = 900.0):
    self.file = epath.Path(workdir) / self.NAME
    self.stale_after = float(stale_after)
    self.nonce = uuid.uuid4().hex
    self.info = {'host': socket.gethostname(), 'pid': os.getpid(), 'nonce': self.nonce}
    self.took_over: dict[str, Any] | None = None
    self._stop = threading.Event()
    self._beat: threading.Thread | None = None

  def _read(self) -> dict[str, Any] | None:
    try:
      return json.loads(self.file.read_text())
    except (FileNotFoundError, ValueError):
      return None

  def _stale(self, held: dict[str, Any]) -> bool:
    if time.time() - float(held.get('heartbeat', 0)) > self.stale_after:
      return True
    if held.get('host') == socket.gethostname():
      try:
        os.kill(int(held.get('pid', -1)), 0)
      except ProcessLookupError:
        return True
      except (PermissionError, ValueError):
        return False
    return False

  def _write(self, **extra: Any) -> None:
    self.file.write_text(json.dumps({**self.info, 'heartbeat': time.time(), **extra}))

  def acquire(self) -> 'WorkdirLock':
    held = self._read()
    if held and held.get('nonce') != self.nonce:
      if not self._stale(held):
        since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(held.get('started', 0))))
        raise StorageError(
            f'workdir {str(self.file.parent)!r} is in use by a trainer on {held.get("host")} (pid {held.get("pid")}, '
            f'since {since}); wait for it, use another --workdir, or if that run is dead remove {str(self.file)!r} '
            f'(a lock not refreshed for {self.stale_after:.0f} s is taken over)')
      self.took_over = held
    self.info['started'] = time.time()
    self._write()
    time.sleep(0.05)
    if (self._read() or {}).get('nonce') != self.nonce:
      raise StorageError(f'workdir {str(self.file.parent)!r}: another trainer took the lock at the same moment')
    self._stop.clear()
    self._beat = threading.Thread(target=self._beating, name='workdir-lock-heartbeat', daemon=True)
    self._beat.start()
    return self

  @property
  def interval(self) -> float:
    return min(60.0, self.stale_after / 6)

  def _beating(self) -> None:
    while not self._stop.wait(self.interval):
      try:
        self.heartbeat()
      except Exception as e:  # pylint: disable=broad-except  (a storage hiccup: the next beat tries again)
        logging.warning('workdir lock heartbeat failed: %s', e)

  def heartbeat(self) -> None:
    self._write()

  def release(self) -> None:
    self._stop.set()
    if self._beat is not None:
      self._beat.join()
      self._beat = None
    held = self._read()
    if held and held.get('nonce') == self.nonce:
      self.file.unlink()

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
