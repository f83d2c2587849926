"""The report every prepare run ends with (`output_dir/report.json`): input == kept + sum(dropped), the synthesised
variants, how references were paired, and for raw videos the grounded lines (`output_dir/grounded.jsonl`)."""

from __future__ import annotations

import json
from typing import Any

from kaleido_jax import storage


def counts(dropped: dict[str, str]) -> dict[str, int]:
  out: dict[str, int] = {}
  for r in dropped.values():
    out[r] = out.get(r, 0) + 1
  return dict(sorted(out.items()))


def grounded_summary(data_cfg, output_dir, videos, shots, all_lines) -> dict[str, Any]:
  path = storage.join(output_dir, 'grounded.jsonl')
  storage.write_bytes(path, ''.join(json.dumps(line, sort_keys=True) + '\n'
                                    for line in sorted(all_lines, key=lambda l: l['clip'])).encode())
  return dict(videos=len(videos), shots=shots, grounded=path, grounding=data_cfg.prepare.grounding)


def format_report(report: dict[str, Any]) -> str:
  rows = [('input clips', report['input']), ('kept', report['kept'])]
  rows += [(f'dropped: {k}', v) for k, v in report['dropped'].items()]
  rows += [('synthesised variants', report['synthesised']), ('examples written', report['examples']),
           ('refs cross-paired', report['references']['cross']),
           ('refs far-frame fallback', report['references']['far_frame']),
           ('clips/s', report['clips_per_s'])]
  w = max(len(r[0]) for r in rows)
  return '\n'.join(f'{k:<{w}}  {v}' for k, v in rows)
