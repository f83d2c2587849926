"""`--mode demo` (configs/demo.py's default): train, then sample held-out reference sets, then evaluate.

  python -m kaleido_jax.main --config configs/demo.py --workdir /tmp/kaleido-demo

1. Train (kaleido_jax/train/loop.py) on the synthetic cross-paired clips; resumes from WORKDIR's checkpoints,
   so a second run skips straight to sampling.
2. Generate one video per held-out request (identities never seen in training, references cut from other
   clips) with the trained weights and, as the baseline, with untrained random weights.
3. Score both and the real clips (kaleido_jax/eval/runner.py): WORKDIR/eval/eval.md, eval.json and strips.
4. Write WORKDIR/samples/heldout_XX.mp4 (+ .gif and a .png strip: references above the frames), and beside it
   the request's references (heldout_XX_ref_J.png) and prompt (heldout_XX.txt), the inputs `--mode sample` takes.
Prints where everything is, the table, and the TensorBoard command for the training curves.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from kaleido_jax import media
from kaleido_jax import pipeline as pipe_lib
from kaleido_jax import storage
from kaleido_jax.eval import metrics
from kaleido_jax.cli import sample as sample_lib
from kaleido_jax.eval import runner
from kaleido_jax.train import console
from kaleido_jax.train import loop

# The console table's columns (eval.md has every metric).
DEMO_COLUMNS = ('fidelity_lpips', 'fidelity_histogram', 'subject_presence', 'subject_presence_min', 'binding_error',
                'pose_copy_rate', 'motion_adherence', 'frame_diff_mean', metrics.MODEL_CALLS)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  with console.quiet_logs(config.train.get('console', 'log') == 'progress'):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  print(f'training {config.train.num_steps} steps into {workdir} (resumes from its checkpoints)', flush=True)
  train = loop.run(config, workdir)
  trained = pipe_lib.S2VPipeline.from_config(config, workdir=workdir)
  graphdef, state = pipe_lib.random_weights(config.model, config.seed)
  untrained = pipe_lib.S2VPipeline(config, trained.encoders, graphdef, state, weights_from='random weights')
  requests = runner.heldout_requests(config, int(config.eval.num_videos))
  print(f'sampling and scoring {len(requests)} held-out videos with the trained and the untrained weights', flush=True)
  eval_dir = config.eval.output_dir or storage.join(workdir, 'eval')
  results = runner.evaluate(config, {'trained': runner.pipeline_generator(trained),
                                     'untrained': runner.pipeline_generator(untrained)},
                            eval_dir, requests=requests)
  samples = storage.join(workdir, 'samples')
  d = config.data
  written = []
  for i, r in enumerate(requests[:int(config.eval.save_videos)]):
    frames = trained.generate(list(r['refs']), r['prompt'], num_frames=d.num_frames, height=d.height,
                              width=d.width, seed=int(config.sample.seed) + i)[0]
    paths = sample_lib.output_paths(storage.join(samples, f'heldout_{i:02d}.mp4'), True)
    sample_lib.write_sample(paths, frames, r['refs'], float(config.sample.fps), sample_lib.view_scale(d.height))
    # The request's references and prompt beside it: what `--mode sample --ref ...` takes (README's example).
    for j, ref in enumerate(r['refs']):
      media.write_image(storage.join(samples, f'heldout_{i:02d}_ref_{j}.png'), ref)
    storage.write_bytes(storage.join(samples, f'heldout_{i:02d}.txt'), (r['prompt'] + '\n').encode())
    written.append((paths['gif'], r['prompt']))
  means = results['means']
  better = [k for k in means['trained'] if k.startswith('fidelity_')
            and means['trained'][k] < means['untrained'][k]]
  print(f'\ntrained {train["step"]} steps (last loss {train["loss"]:.4f}); weights: {trained.weights_from}')
  shown = {n: {k: v for k, v in m.items() if k in DEMO_COLUMNS} for n, m in means.items()}
  print(metrics.markdown_table(shown))
  print(f'trained beats untrained on {len(better)} of '
        f'{sum(k.startswith("fidelity_") for k in means["trained"])} fidelity metrics ({", ".join(better)})')
  for gif, prompt in written:
    print(f'  {gif}  <- "{prompt}"')
  print(f'evaluation: {storage.join(eval_dir, "eval.md")} (every metric, per subject) and eval.json; strips: '
        f'{storage.join(eval_dir, "video_XX.png")} (refs | trained | untrained | target)')
  print(f'training curves: tensorboard --logdir {workdir}')
  return {'train': train, 'eval': results, 'samples': written}
