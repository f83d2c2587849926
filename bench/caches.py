r"""Fewer DiT calls per video on the trained demo checkpoint: step caches, the CFG cache, the text K/V cache.

  JAX_PLATFORMS=cpu python bench/sample.py --caches [--workdir /tmp/kaleido-demo] [--synthetic-seeds 0,1]
      [--calibration-seed 7] [--settings 'none,magcache 0.12']

Trains `configs/demo.py` into WORKDIR when it holds no checkpoint (~12 min on 2 cores). Calibrates the step caches
once (`--mode calibrate`'s code) on the held-out identities of `--calibration-seed`, a synthetic set that is *not*
scored, so no setting is tuned on a split it is measured on. Then, for every held-out set of `--synthetic-seeds`
(identities never seen in training), samples `eval.num_videos` videos with each setting (same seeds, same
requests) and prints per set and as the mean over sets: DiT passes per video (each guidance branch one, a
skipped step none), seconds per video (after a warm-up batch that compiles; CPU, informational), and the eval
metrics, each beside the uncached sampler. The issue's goal: a setting with >= 1.7x fewer calls at <= +0.01
fidelity_lpips and >= -0.03 subject_presence.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("fidelity_lpips", "fidelity_histogram", "subject_presence")
_KV = {"text_kv_cache": True}
_CFG = {"cfg_cache": True, "cfg_cache_period": 2}
SETTINGS = {
    "none": {},
    "text K/V cache": _KV,
    "cfg cache (period 2)": _CFG,
    "magcache 0.12 K2": {"cache": "magcache"},
    "magcache 0.25 K3": {"cache": "magcache", "magcache_threshold": 0.25, "magcache_max_skip": 3},
    "teacache 0.2": {"cache": "teacache"},
    "teacache 0.4": {"cache": "teacache", "teacache_threshold": 0.4},
    "magcache 0.12 K2 + cfg cache": {"cache": "magcache", **_CFG},
    "magcache 0.12 K2 + cfg cache + text K/V": {"cache": "magcache", **_CFG, **_KV},
    "teacache 0.2 + cfg cache": {"cache": "teacache", **_CFG},
}


def _config(workdir: str, synthetic_seed: int, overrides: dict):
  import runpy  # pylint: disable=g-import-not-at-top
  config = runpy.run_path(os.path.join(ROOT, "configs", "demo.py"))["get_config"]()
  config.data.synthetic_seed = synthetic_seed
  config.sample.update(overrides)
  config.sample.cache_calibration = os.path.join(workdir, "step_cache.json")
  return config


def main(args) -> None:
  from kaleido_jax.cli import calibrate  # pylint: disable=g-import-not-at-top
  from kaleido_jax import pipeline, weights  # pylint: disable=g-import-not-at-top
  from kaleido_jax.eval import runner  # pylint: disable=g-import-not-at-top
  if weights.training_checkpoint_dir(args.workdir) is None:
    print(f"training configs/demo.py into {args.workdir} first", flush=True)
    subprocess.run([sys.executable, "-m", "kaleido_jax.main", "--config", "configs/demo.py", "--mode", "train",
                    "--workdir", args.workdir], check=True, cwd=ROOT)
  cal = calibrate.run(_config(args.workdir, args.calibration_seed, {}), args.workdir)
  print(f"calibrated on the held-out set of data.synthetic_seed={args.calibration_seed} (not scored below)")
  names = [n for n in SETTINGS if not args.settings or n in args.settings.split(",")]
  if "none" not in names:
    names.insert(0, "none")
  per_set = []
  for seed in [int(s) for s in args.synthetic_seeds.split(",")]:
    base = _config(args.workdir, seed, {})
    requests = runner.heldout_requests(base, int(base.eval.num_videos))
    pipe = pipeline.S2VPipeline.from_config(base, workdir=args.workdir)
    results, frames = {}, {}
    for name in names:
      pipe.config = _config(args.workdir, seed, SETTINGS[name])
      gen = runner.pipeline_generator(pipe)
      bs = int(base.eval.batch_size)
      gen(requests[:bs], [0] * len(requests[:bs]))  # warm-up: compiles this setting's program
      start, parts, calls = time.time(), [], []
      for i in range(0, len(requests), bs):
        out, n = gen(requests[i:i + bs], [int(base.sample.seed) + i + k for k in range(len(requests[i:i + bs]))])
        parts.append(out)
        calls.append(n)
      seconds = (time.time() - start) / len(requests)
      frames[name] = np.concatenate(parts)
      results[name] = dict(model_calls=float(np.mean(calls)), seconds=seconds)
      print(f"  seed {seed}: {name}: {results[name]['model_calls']:.1f} calls, {seconds:.2f} s/video", flush=True)
    scored = runner.evaluate(base, {n: _replay(frames[n], requests) for n in names},
                             os.path.join(args.workdir, f"bench_caches_seed{seed}"), requests=requests)
    for n in names:
      results[n].update({m: scored["means"][n][m] for m in METRICS})
    per_set.append(results)
    print(f"\nheld-out set data.synthetic_seed={seed} ({len(requests)} videos)")
    print(_table(results))
  mean = {n: {k: float(np.mean([ps[n][k] for ps in per_set])) for k in per_set[0][n]} for n in names}
  print(f"\nmean over {len(per_set)} held-out sets (calibration: {len(cal['mag_ratios'])} steps, seed "
        f"{args.calibration_seed})")
  print(_table(mean))


def _replay(frames: np.ndarray, requests):
  """A generator that hands back already generated frames, in request order (scoring without resampling)."""
  index = {id(r): i for i, r in enumerate(requests)}

  def generate(batch, seeds):
    del seeds
    return frames[[index[id(r)] for r in batch]]
  return generate


def _table(results: dict) -> str:
  base = results["none"]
  lines = ["| setting | DiT calls / video | fewer calls | s / video | " + " | ".join(METRICS)
           + " | Δ lpips | Δ presence | goal (>=1.7x, Δlpips <= +0.01, Δpresence >= -0.03) |",
           "|---|" + "---|" * (len(METRICS) + 6)]
  for name, r in results.items():
    ratio = base["model_calls"] / r["model_calls"]
    d_l = r["fidelity_lpips"] - base["fidelity_lpips"]
    d_p = r["subject_presence"] - base["subject_presence"]
    goal = "met" if ratio >= 1.7 and d_l <= 0.01 and d_p >= -0.03 else ""
    lines.append(f"| {name} | {r['model_calls']:.1f} | {ratio:.2f}x | {r['seconds']:.2f} | "
                 + " | ".join(f"{r[m]:.4f}" for m in METRICS) + f" | {d_l:+.4f} | {d_p:+.4f} | {goal} |")
  return "\n".join(lines)
