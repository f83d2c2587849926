"""`--mode eval`: score held-out synthetic requests made by the model or an exported sampler, or score a folder of
videos made elsewhere (`eval.samples_dir`); the metrics and tables are kaleido_jax/eval/."""

from __future__ import annotations

from typing import Any

import ml_collections

from kaleido_jax import exported as exported_lib
from kaleido_jax import pipeline as pipe_lib
from kaleido_jax import storage
from kaleido_jax.eval import runner


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  e = config.eval
  if e.get('benchmark', ''):  # OpenS2V-Eval on a folder of <id>.mp4
    from kaleido_jax.eval import opens2v  # lazy: OpenCV, dlib
    if not e.samples_dir:
      raise pipe_lib.UserInputError('eval.benchmark needs eval.samples_dir: the folder of <id>.mp4 to score')
    if not storage.exists(e.benchmark):
      raise pipe_lib.UserInputError(f'eval.benchmark={e.benchmark!r} does not exist')
    out = e.output_dir or storage.join(e.samples_dir, 'opens2v')
    try:
      report = opens2v.evaluate_folder(e.benchmark, e.samples_dir, out, root=e.benchmark_root,
                                       domain=e.benchmark_domain, weights=e.benchmark_weights,
                                       aesthetic_clip=e.aesthetic_clip, aesthetic_mlp=e.aesthetic_mlp,
                                       facesim_model=e.facesim_model, face_extractor=e.face_extractor,
                                       gme_model=e.gme_model, gme_dtype=e.gme_dtype,
                                       yoloworld_model=e.yoloworld_model, yoloworld_clip=e.yoloworld_clip,
                                       qalign_model=e.qalign_model, qalign_dtype=e.qalign_dtype)
    except ValueError as err:
      raise pipe_lib.UserInputError(str(err)) from err
    print(opens2v.total_line(report['total']))
    for vid, problem in sorted(report['problems'].items()):
      print(f'{vid}: {problem}')
    print(f'wrote the per-metric files and eval.md to {out}')
    return report
  if e.get('samples_dir', ''):
    results = runner.score_samples(config, e.samples_dir, e.output_dir or storage.join(e.samples_dir, 'eval'))
    print(results['table'])
    return results
  if e.exported:
    sampler = exported_lib.ExportedSampler(e.exported)
    v, d = sampler.video, config.data
    if (v['num_frames'], v['height'], v['width']) != (d.num_frames, d.height, d.width):
      raise pipe_lib.UserInputError(
          f'the exported sampler makes {v["num_frames"]}x{v["height"]}x{v["width"]} videos but the held-out '
          f'clips are {d.num_frames}x{d.height}x{d.width}; export with sample sizes equal to the data sizes')
    generators = {f'exported ({storage.path(e.exported).name})': runner.exported_generator(sampler)}
  else:
    pipe = pipe_lib.S2VPipeline.from_config(config, workdir=workdir, checkpoint=config.sample.checkpoint)
    generators = {f'model ({pipe.weights_from})': runner.pipeline_generator(pipe)}
  out_dir = e.output_dir or storage.join(workdir, 'eval')
  seed = runner.trained_seed(workdir) if not e.exported else None
  results = runner.evaluate(config, generators, out_dir, exclude_seed=seed)
  print(results['table'])
  print(f'wrote {storage.join(out_dir, "eval.json")}, {storage.join(out_dir, "eval.md")} and strips')
  return results
