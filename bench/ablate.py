r"""Ablations of Kaleido's claims at equal compute: one model per factor value and seed, scored on held-out sets.

  JAX_PLATFORMS=cpu python bench/ablate.py --factor model.rope_scheme=kaleido,temporal,none --seeds 3 \
      --steps 1800 --out /tmp/ablate-rope [--config configs/demo.py] [--config.a.b=... overrides] \
      [--eval_seeds 0,1]

Factors: any config key; the paper's are `model.rope_scheme` (kaleido | temporal | none: R-RoPE against
Phantom-style temporal appending and no reference positions), `data.pairing` (cross | same_clip: cross-paired
references against references cut from the target clip), `data.synthesis` (true | false: background / geometry /
colour re-rendering of the targets) and `model.rope_ref_shift`.

Equal compute: every value of a seed trains the same number of steps on the same batches in the same order from
the same initial weights (`config.seed` = the seed; the content seed `data.synthetic_seed` stays the config's),
so a value differs from another only by the factor. Each run is scored on the held-out identities of every
content seed in `--eval_seeds` (default: the config's; another seed's lookalikes of training identities are
dropped, eval/runner.py), with the real clips scored once as the ceiling.

Resumable: runs live in OUT/runs/<key>=<value>/seed<k>/ (a workdir: checkpoints, TensorBoard, eval/); a finished
run is never retrained or rescored, an interrupted one resumes from its last checkpoint. OUT/ablation.json holds
every number, OUT/ablation.md the mean +- 95% CI (Student t over seeds) per value and metric and the
differences from the first value that are significant (Welch's t-test, p < 0.05; none can be with one seed),
OUT/ablation.png the same as bar charts with error bars.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# (metric, True when lower is better) in table order.
METRICS = (('fidelity_lpips', True), ('fidelity_histogram', True), ('subject_presence', False),
           ('subject_presence_min', False), ('binding_error', True), ('pose_copy_rate', True),
           ('copy_paste_rate', True), ('background_leakage', True), ('look_paste_rate', True),
           ('halo_paste_rate', True), ('motion_adherence', False))
P_SIGNIFICANT = 0.05


def parse_factor(config, text: str) -> tuple[str, list[str]]:
  """'a.b=v1,v2' -> ('a.b', ['v1', 'v2']); the key must exist in the config."""
  from kaleido_jax import config as kcfg  # pylint: disable=g-import-not-at-top
  if '=' not in text:
    raise ValueError(f'--factor {text!r}: write it as key=value1,value2 (e.g. model.rope_scheme=kaleido,none)')
  key, values = text.split('=', 1)
  line = kcfg.unknown_key_error(config, key, flag='--factor ')
  if line:
    raise ValueError(line[len('error: '):])
  values = [v.strip() for v in values.split(',') if v.strip()]
  if len(values) < 2:
    raise ValueError(f'--factor {text!r}: an ablation needs at least two values')
  return key, values


def run_config(base, key: str, value: str, seed: int, steps: int):
  """The config of one run: `base` with the factor set, `config.seed = seed`, `train.num_steps = steps`."""
  from kaleido_jax import config as kcfg  # pylint: disable=g-import-not-at-top
  config = base.copy_and_resolve_references()
  kcfg.set_path(config, key, value)
  config.seed = int(seed)
  config.train.num_steps = int(steps)
  config.eval.output_dir = ''
  return config


def _eval_dir(workdir: str, eval_seed: int) -> str:
  return os.path.join(workdir, f'eval_seed{eval_seed}')


def run_one(config, workdir: str, eval_seeds: Sequence[int], log=print) -> dict[int, dict[str, Any]]:
  """Train (or resume) one run and score it on each content seed; returns {eval seed: eval.json contents}."""
  from kaleido_jax import pipeline as pipe_lib  # pylint: disable=g-import-not-at-top
  from kaleido_jax.eval import runner  # pylint: disable=g-import-not-at-top
  manifest = os.path.join(workdir, 'run.json')
  spec = json.loads(config.to_json())
  if os.path.exists(manifest):
    with open(manifest) as fh:
      if json.load(fh) != spec:
        raise ValueError(f'{workdir} holds a run of a different config (its run.json); use another --out or '
                         'delete that directory')
  else:
    os.makedirs(workdir, exist_ok=True)
    with open(manifest + '.tmp', 'w') as fh:
      json.dump(spec, fh)
    os.replace(manifest + '.tmp', manifest)
  out = {}
  todo = [s for s in eval_seeds if not os.path.exists(os.path.join(_eval_dir(workdir, s), 'eval.json'))]
  if todo:
    from kaleido_jax.train import loop  # pylint: disable=g-import-not-at-top
    start = time.time()
    train = loop.run(config, workdir)
    if train['preempted']:
      raise KeyboardInterrupt(f'{workdir}: preempted at step {train["step"]}; rerun to resume')
    log(f'    trained {train["step"]} steps in {time.time() - start:.0f} s (last loss {train["loss"]:.4f})')
    pipe = pipe_lib.S2VPipeline.from_config(config, workdir=workdir)
    trained = runner.trained_seed(workdir)
    for s in todo:
      c = config.copy_and_resolve_references()
      c.data.synthetic_seed = int(s)
      runner.evaluate(c, {'model': runner.pipeline_generator(pipe)}, _eval_dir(workdir, s), exclude_seed=trained)
  for s in eval_seeds:
    with open(os.path.join(_eval_dir(workdir, s), 'eval.json')) as fh:
      out[s] = json.load(fh)
  return out


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
  """Mean and the half-width of its 95% Student-t confidence interval (NaN with fewer than two values)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if len(v) == 0:
    return float('nan'), float('nan')
  if len(v) < 2:
    return float(v.mean()), float('nan')
  return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def summarise(scores: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, tuple[float, float]]]:
  """{value: [per-seed means]} -> {value: {metric: (mean, ci95)}}."""
  return {v: {m: mean_ci([r.get(m, float('nan')) for r in rows]) for m, _ in METRICS} for v, rows in scores.items()}


def welch(scores: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
  """{value: {metric: p}}: Welch's t-test of each later value against the first, per metric (NaN with fewer than
  two seeds on either side; 0 or 1 when both sides are constant)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  values = list(scores)
  out = {}
  for v in values[1:]:
    out[v] = {}
    for m, _ in METRICS:
      a = [r[m] for r in scores[values[0]] if m in r and np.isfinite(r[m])]
      b = [r[m] for r in scores[v] if m in r and np.isfinite(r[m])]
      if len(a) < 2 or len(b) < 2:
        out[v][m] = float('nan')
      elif np.std(a) == 0 and np.std(b) == 0:
        out[v][m] = 0.0 if np.mean(a) != np.mean(b) else 1.0
      else:
        out[v][m] = float(stats.ttest_ind(b, a, equal_var=False).pvalue)
  return out


def significant(scores: dict[str, list[dict[str, float]]]) -> list[str]:
  """One line per (value, metric) differing from the first value at p < P_SIGNIFICANT (Welch's t-test)."""
  base = list(scores)[0]
  lines = []
  for v, ps in welch(scores).items():
    for m, lower in METRICS:
      p = ps[m]
      if np.isfinite(p) and p < P_SIGNIFICANT:
        a = [r[m] for r in scores[base] if m in r and np.isfinite(r[m])]
        b = [r[m] for r in scores[v] if m in r and np.isfinite(r[m])]
        better = (np.mean(b) < np.mean(a)) == lower
        lines.append(f'{v} vs {base}: {m} {np.mean(b):.4f} vs {np.mean(a):.4f} ({"better" if better else "worse"}, '
                     f'p = {p:.3f})')
  return lines


def markdown(key: str, scores, summary, ceiling: dict[str, float], lines: list[str], info: str) -> str:
  cols = [m for m, _ in METRICS]
  head = '| ' + key + ' | seeds | ' + ' | '.join(f'{m} {"↓" if lower else "↑"}' for m, lower in METRICS) + ' |'
  out = [f'# Ablation: {key}', '', info, '', head, '|---|---|' + '---|' * len(cols)]
  fmt = lambda mc: '—' if not np.isfinite(mc[0]) else (f'{mc[0]:.4f}' if not np.isfinite(mc[1])
                                                       else f'{mc[0]:.4f} ± {mc[1]:.4f}')
  for v, row in summary.items():
    out.append(f'| {v} | {len(scores[v])} | ' + ' | '.join(fmt(row[m]) for m in cols) + ' |')
  out.append('| real clips (ceiling) | — | ' + ' | '.join(
      '—' if m not in ceiling else f'{ceiling[m]:.4f}' for m in cols) + ' |')
  out += ['', 'Mean ± 95% confidence half-width (Student t) over seeds; each seed\'s number is the mean over its '
          'evaluation videos (and evaluation sets).', '']
  pvalues = welch(scores)
  if any(np.isfinite(p) for ps in pvalues.values() for p in ps.values()):
    out += [f'Welch\'s t-test against {list(scores)[0]}, p per metric:', '',
            '| value | ' + ' | '.join(cols) + ' |', '|---|' + '---|' * len(cols)]
    out += [f'| {v} | ' + ' | '.join('—' if not np.isfinite(ps[m]) else f'{ps[m]:.3f}' for m in cols) + ' |'
            for v, ps in pvalues.items()]
    out.append('')
  if lines:
    out += ['Significant differences from the first value (Welch\'s t-test, p < 0.05):', ''] + [f'- {l}' for l in lines]
  else:
    out.append('No difference from the first value is significant at p < 0.05'
               + (' (one seed per value: no test is possible).' if min(map(len, scores.values())) < 2 else '.'))
  return '\n'.join(out) + '\n'


def plot(path: str, key: str, summary) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  values = list(summary)
  rows = -(-len(METRICS) // 4)
  fig, axes = plt.subplots(rows, 4, figsize=(16, 3 * rows))
  for ax, (m, lower) in zip(axes.ravel(), METRICS):
    means = [summary[v][m][0] for v in values]
    errs = [summary[v][m][1] if np.isfinite(summary[v][m][1]) else 0.0 for v in values]
    ax.bar(range(len(values)), np.nan_to_num(means), yerr=errs, capsize=4,
           color=[f'C{i}' for i in range(len(values))])
    ax.set_xticks(range(len(values)), values, fontsize=8)
    ax.set_title(f'{m} ({"lower" if lower else "higher"} is better)', fontsize=9)
  for ax in axes.ravel()[len(METRICS):]:
    ax.axis('off')
  fig.suptitle(f'{key}: mean ± 95% CI over seeds')
  fig.tight_layout()
  fig.savefig(path + '.tmp.png', dpi=80)
  plt.close(fig)
  os.replace(path + '.tmp.png', path)


def run(base, key: str, values: Sequence[str], seeds: int, steps: int, out: str,
        eval_seeds: Sequence[int] | None = None, log=print) -> dict[str, Any]:
  """Every (value, seed) run, then ablation.json / .md / .png under `out`; returns the summary dict."""
  eval_seeds = list(eval_seeds) if eval_seeds else [int(base.data.synthetic_seed)]
  scores: dict[str, list[dict[str, float]]] = {v: [] for v in values}
  runs, ceiling_rows = [], []
  for seed in range(seeds):  # seeds outermost: a partial ablation already covers every value
    for v in values:
      workdir = os.path.join(out, 'runs', f'{key}={v}', f'seed{seed}')
      log(f'[{len(runs) + 1}/{seeds * len(values)}] {key}={v} seed {seed}: {workdir}')
      evals = run_one(run_config(base, key, v, seed, steps), workdir, eval_seeds, log=log)
      model = {s: next(m for n, m in e['means'].items() if n.startswith('model')) for s, e in evals.items()}
      row = {m: float(np.nanmean([model[s].get(m, np.nan) for s in eval_seeds])) for m, _ in METRICS
             if any(m in model[s] for s in eval_seeds)}
      scores[v].append(row)
      if seed == 0 and v == values[0]:
        ceiling_rows = [next(m for n, m in e['means'].items() if not n.startswith('model')) for e in evals.values()]
      runs.append(dict(value=v, seed=seed, workdir=workdir, means=row))
  summary = summarise(scores)
  ceiling = {m: float(np.mean([r[m] for r in ceiling_rows if m in r])) for m, _ in METRICS
             if any(m in r for r in ceiling_rows)}
  lines = significant(scores)
  info = (f'{seeds} seed(s) x {len(values)} values, {steps} training steps each (same batches, data order and '
          f'initial weights per seed), scored on the held-out identities of content seed(s) '
          f'{", ".join(map(str, eval_seeds))} ({int(base.eval.num_videos)} videos each).')
  os.makedirs(out, exist_ok=True)
  result = dict(factor=key, values=list(values), seeds=seeds, steps=steps, eval_seeds=eval_seeds, runs=runs,
                summary={v: {m: list(mc) for m, mc in row.items()} for v, row in summary.items()},
                ceiling=ceiling, significant=lines, welch_p=welch(scores))
  with open(os.path.join(out, 'ablation.json.tmp'), 'w') as fh:
    json.dump(result, fh, indent=2)
  os.replace(os.path.join(out, 'ablation.json.tmp'), os.path.join(out, 'ablation.json'))
  md = markdown(key, scores, summary, ceiling, lines, info)
  with open(os.path.join(out, 'ablation.md.tmp'), 'w') as fh:
    fh.write(md)
  os.replace(os.path.join(out, 'ablation.md.tmp'), os.path.join(out, 'ablation.md'))
  plot(os.path.join(out, 'ablation.png'), key, summary)
  result['markdown'] = md
  return result


FLAGS = flags.FLAGS
_CONFIG = None


def _define_flags() -> None:
  """Only when run as a script: importing this module (the tests do) must not define absl flags that clash
  with kaleido_jax.main's --config."""
  global _CONFIG
  _CONFIG = config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'demo.py'),
                                            'base config file (big_vision style)', lock_config=True)
  flags.DEFINE_string('factor', None, 'key=value1,value2,... (e.g. model.rope_scheme=kaleido,temporal,none)')
  flags.DEFINE_integer('seeds', 3, 'training seeds per value')
  flags.DEFINE_integer('steps', None, 'training steps per run (default: the config\'s train.num_steps)')
  flags.DEFINE_string('out', None, 'output directory (runs/, ablation.md, ablation.json, ablation.png)')
  flags.DEFINE_string('eval_seeds', '', 'content seeds whose held-out identities score each run '
                      '(default: the config\'s)')


def _fail(line: str) -> None:
  print(f'error: {line}', file=sys.stderr)
  sys.exit(2)


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}')
  if not FLAGS.factor or not FLAGS.out:
    _fail('--factor key=v1,v2 and --out DIR are required (see the module docstring)')
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  base = _CONFIG.value
  try:
    key, values = parse_factor(base, FLAGS.factor)
    eval_seeds = [int(s) for s in FLAGS.eval_seeds.split(',') if s.strip()]
    result = run(base, key, values, FLAGS.seeds, FLAGS.steps or int(base.train.num_steps), FLAGS.out, eval_seeds)
  except ValueError as e:
    _fail(str(e))
  print(result['markdown'])
  print(f'wrote {os.path.join(FLAGS.out, "ablation.md")}, ablation.json and ablation.png')


def parse_flags(argv):
  from kaleido_jax import config as kcfg  # pylint: disable=g-import-not-at-top
  try:
    return FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(kcfg.unknown_override(argv, _CONFIG.default) or f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  from kaleido_jax import config as _kcfg  # pylint: disable=g-import-not-at-top
  _bad = _kcfg.unknown_override(sys.argv, os.path.join(ROOT, 'configs', 'demo.py'))
  if _bad:  # config_flags parses the overrides while the flag is defined: check them first
    print(_bad, file=sys.stderr)
    sys.exit(2)
  _define_flags()
  app.run(main, flags_parser=parse_flags)
