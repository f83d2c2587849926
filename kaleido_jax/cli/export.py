"""`--mode export`: the jitted sampler as a `jax.export` artifact (kaleido_jax/export.py) that
`kaleido_jax.exported.ExportedSampler` runs without this package's model code."""

from __future__ import annotations

import ml_collections

from kaleido_jax import export as export_lib
from kaleido_jax import pipeline as pipe_lib
from kaleido_jax import storage


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  pipe = pipe_lib.S2VPipeline.from_config(config, workdir=workdir, checkpoint=config.sample.checkpoint)
  out = export_lib.export_sampler(pipe, config.export.output or storage.join(workdir, 'exported'),
                                  weights=config.export.weights, platforms=tuple(config.export.platforms),
                                  max_refs=config.export.max_refs or None)
  print(f'exported the sampler to {out} (platforms {", ".join(config.export.platforms)}, weights '
        f'{config.export.weights}); run it with kaleido_jax.exported.ExportedSampler({out!r})')
  return out
