"""Config file for the CLI tests: tests/sampling_common.tiny_config() as a `--config` file."""

from tests.sampling_common import tiny_config


def get_config():
  return tiny_config()
