"""`--mode calibrate`: the step-cache calibration of a model (what sample.cache = magcache | teacache read).

Runs the uncached sampler with config.sample's solver, steps, shift and guidance on the request of
config.sample (--prompt / --ref, at sample.height x width) or, without a prompt, on `eval.num_videos` held-out
synthetic requests (at the data's size, as --mode eval), records per step MagCache's magnitude ratio of the
blocks' residual and TeaCache's input / output changes (kaleido_jax/diffusion/caching.py), averages them over the
runs, fits TeaCache's rescaling and writes sample.cache_calibration (default WORKDIR/step_cache.json).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from kaleido_jax import pipeline as pipe_lib
from kaleido_jax import storage
from kaleido_jax.diffusion import caching
from kaleido_jax.diffusion import sampler as sampler_lib
from kaleido_jax.eval import runner


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  s = config.sample
  pipe = pipe_lib.S2VPipeline.from_config(config, workdir=workdir, checkpoint=s.checkpoint)
  cfg = pipe.sample_config()
  if s.prompt:
    batches = [dict(refs=list(s.refs), prompt=s.prompt, size={}, seeds=int(s.seed))]
    what = f'prompt {s.prompt[:60]!r}'
  else:
    d, e = config.data, config.eval
    requests = runner.heldout_requests(config, int(e.num_videos))
    size = dict(num_frames=d.num_frames, height=d.height, width=d.width)
    batches = [dict(refs=[list(r['refs']) for r in requests[i:i + int(e.batch_size)]],
                    prompt=[r['prompt'] for r in requests[i:i + int(e.batch_size)]], size=size,
                    seeds=[int(s.seed) + i + k for k in range(len(requests[i:i + int(e.batch_size)]))])
               for i in range(0, len(requests), int(e.batch_size))]
    what = f'{len(requests)} held-out synthetic requests'
  stats = []
  for batch in batches:
    inputs = pipe.prepare(batch['refs'], batch['prompt'], seed=batch['seeds'], **batch['size'])
    _, st = pipe.sample_latents(inputs, cfg, calibrate=True)
    stats.append({k: np.asarray(st[k]) for k in ('mag_ratio', 'input_change', 'output_change')})
  record = caching.fit_calibration(stats, num_steps=sampler_lib.num_steps(cfg), solver=cfg.solver,
                                   shift=float(cfg.shift), what=f'{pipe.weights_from}; {what}')
  path = caching.save_calibration(record, caching.calibration_path(s, workdir))
  ratios = record['mag_ratios']
  print(f'step-cache calibration of {len(ratios)} steps over {len(stats)} runs: magnitude ratios '
        f'{min(ratios):.4f}..{max(ratios):.4f}; wrote {storage.absolute(path)}')
  return record
