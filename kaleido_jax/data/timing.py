"""Seconds per stage of `prepare` (decode, shots, captions, grounding, identity, filters, cut-outs, synthesis,
pairing, encode, write), summed in this process; `report.json` gives their totals (`stage_seconds`). Beam's
workers send what they measured with their results (data/prepare/beam.py)."""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Iterator

_SECONDS: dict[str, float] = collections.defaultdict(float)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
  t = time.perf_counter()
  try:
    yield
  finally:
    _SECONDS[name] += time.perf_counter() - t


def take() -> dict[str, float]:
  """What this process measured since the last take, and start again from zero."""
  out = dict(_SECONDS)
  _SECONDS.clear()
  return out


def add(into: dict[str, float], more: dict[str, float]) -> dict[str, float]:
  for k, v in more.items():
    into[k] = into.get(k, 0.0) + float(v)
  return into
