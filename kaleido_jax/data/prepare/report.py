"""The report every prepare run ends with (`output_dir/report.json`): input == kept + sum(dropped), the synthesised
variants, how references were paired, and for raw videos the grounded lines (`output_dir/grounded.jsonl`)."""

from __future__ import annotations

import json
from typing import Any

from kaleido_jax import storage


class NothingSurvived(ValueError):
  """Every input was dropped: the message gives the drop counts and, per reason, the setting that fixes it."""


FIXES = {
    'no_caption': 'give captions (data.prepare.captions=FILE.jsonl) or a local captioner (data.prepare.captioner=DIR), '
                  'or caption shots from their grounded subjects (data.prepare.caption_from_subjects=True)',
    'too_short': 'lower data.num_frames / data.prepare.min_frames, or raise data.prepare.fps',
    'no_subject': 'try another data.prepare.grounding (people, motion, auto) or lower data.prepare.min_subject_area',
    'low_resolution': 'lower data.prepare.min_height / min_width',
    'blurry': 'lower data.prepare.min_blur_var',
    'static': 'lower data.prepare.min_motion',
    'shaky': 'raise data.prepare.max_shake',
    'subject_too_small': 'lower data.prepare.min_subject_area',
    'subject_too_large': 'raise data.prepare.max_subject_area / max_subject_box_area',
    'subject_truncated': 'raise data.prepare.max_border_touch',
    'unreadable': 'check the videos decode (ffprobe FILE)',
}


def nothing_survived(dropped: dict[str, str], errors: dict[str, str] | None = None) -> NothingSurvived:
  c = counts(dropped)
  fixes = [f'{r}: {FIXES[r]}' for r in c if r in FIXES]
  errs = f'; {len(errors)} unreadable ({sorted(errors)[:3]})' if errors else ''
  return NothingSurvived(f'no clip survived the filters (dropped {c}{errs}); ' + ('; '.join(fixes) or
                         'see report.json'))


def count_modes(by_subject: dict, pairing: list[dict]) -> None:
  """Adds one example's references (its `pairing` provenance) to {subject id: [cross, far_frame]}."""
  for q in pairing:
    pair = by_subject.setdefault(int(q['subject_id']), [0, 0])
    pair[q['mode'] != 'cross'] += 1


def references_by_grounder(by_subject: dict, lines: list[dict]) -> dict[str, dict[str, int]]:
  """{grounder: {'cross': n, 'far_frame': m}}: how each grounder's subjects got their references (a subject's
  grounder from the grounded lines; 'annotations' for subjects no grounder made)."""
  grounder = {int(s['id']): s.get('grounder') or 'annotations' for l in lines for s in l['subjects']}
  out: dict[str, dict[str, int]] = {}
  for sid, (cross, far) in by_subject.items():
    d = out.setdefault(grounder.get(int(sid), 'annotations'), {'cross': 0, 'far_frame': 0})
    d['cross'] += cross
    d['far_frame'] += far
  return dict(sorted(out.items()))


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
           ('refs far-frame fallback', report['references']['far_frame'])]
  rows += [(f'refs of {g} subjects', f"{d['cross']} cross-paired, {d['far_frame']} far-frame")
           for g, d in (report.get('references_by_grounder') or {}).items()]
  rows.append(('clips/s', report['clips_per_s']))
  stages = report.get('stage_seconds') or {}
  if stages:
    rows.append(('seconds by stage', ', '.join(f'{k} {v:.2f}' for k, v in stages.items())))
  w = max(len(r[0]) for r in rows)
  return '\n'.join(f'{k:<{w}}  {v}' for k, v in rows)
