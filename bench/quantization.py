r"""Quantized sampling on the trained demo checkpoint: eval metrics of int8 / fp8 / int4 weights vs float32.

  JAX_PLATFORMS=cpu python bench/quantization.py [--workdir /tmp/kaleido-demo] [--schemes int8,fp8,int4]
      [--synthetic-seeds 0,1]

Trains `configs/demo.py` into WORKDIR first when it holds no checkpoint (`--mode train`, ~12 min on 2 cores).
Then, for each synthetic seed (each a different held-out set of identities never seen in training), samples
`eval.num_videos` held-out reference sets with the float32 weights and with each quantized scheme (quantized
on load from the same float checkpoint, `model.quantization`), same seeds, and scores them with the eval
metrics. Printed: one markdown table per held-out set and the mean over sets, each scheme beside float32 and
its difference (the issue's bar: int8 within 0.005 fidelity_lpips). Also the DiT's weight bytes per scheme.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("fidelity_lpips", "fidelity_histogram", "subject_presence", "copy_paste_rate")


def _config(scheme: str, synthetic_seed: int):
  import runpy  # pylint: disable=g-import-not-at-top
  config = runpy.run_path(os.path.join(ROOT, "configs", "demo.py"))["get_config"]()
  config.model.quantization = scheme
  config.data.synthetic_seed = synthetic_seed
  return config


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="/tmp/kaleido-demo")
  p.add_argument("--schemes", default="int8,fp8,int4")
  p.add_argument("--synthetic-seeds", default="0,1", help="held-out sets (data.synthetic_seed values)")
  args = p.parse_args()
  from kaleido_jax import pipeline, weights  # pylint: disable=g-import-not-at-top
  from kaleido_jax.eval import runner  # pylint: disable=g-import-not-at-top
  from kaleido_jax.model import quantization as quant  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  if weights.training_checkpoint_dir(args.workdir) is None:
    print(f"training configs/demo.py into {args.workdir} first", flush=True)
    subprocess.run([sys.executable, "-m", "kaleido_jax.main", "--config", "configs/demo.py", "--mode", "train",
                    "--workdir", args.workdir], check=True, cwd=ROOT)
  schemes = ["none"] + [s for s in args.schemes.split(",") if s]
  per_set = []
  for seed in [int(s) for s in args.synthetic_seeds.split(",")]:
    base = _config("none", seed)
    requests = runner.heldout_requests(base, int(base.eval.num_videos))
    generators, sizes = {}, {}
    for scheme in schemes:
      config = _config(scheme, seed)
      pipe = pipeline.S2VPipeline.from_config(config, workdir=args.workdir)
      generators[scheme] = runner.pipeline_generator(pipe)
      sizes[scheme] = quant.weight_bytes(nnx.merge(pipe.graphdef, pipe.state))
    out = runner.evaluate(base, generators, os.path.join(args.workdir, f"bench_quantization_seed{seed}"),
                          requests=requests)
    per_set.append(out["means"])
    print(f"\nheld-out set data.synthetic_seed={seed} ({len(requests)} videos; DiT weights: "
          + ", ".join(f"{s} {sizes[s] / 1e6:.2f} MB" for s in schemes) + ")")
    print(_table({s: out["means"][s] for s in schemes}))
  mean = {s: {m: float(np.mean([ps[s][m] for ps in per_set])) for m in METRICS} for s in schemes}
  print(f"\nmean over {len(per_set)} held-out sets")
  print(_table(mean))


def _table(means: dict) -> str:
  lines = ["| weights | " + " | ".join(METRICS) + " | Δ fidelity_lpips vs float32 |",
           "|---|" + "---|" * (len(METRICS) + 1)]
  for scheme, row in means.items():
    delta = row["fidelity_lpips"] - means["none"]["fidelity_lpips"]
    lines.append(f"| {'float32' if scheme == 'none' else scheme} | "
                 + " | ".join(f"{row[m]:.4f}" for m in METRICS) + f" | {delta:+.4f} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
