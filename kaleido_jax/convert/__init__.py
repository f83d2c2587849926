"""PyTorch checkpoints (diffusers | wan | kaleido | transformers) -> kaleido_jax NNX state.

``python -m kaleido_jax.convert --component {transformer,vae,text_encoder} --format ... --input PATH
--output DIR`` writes an orbax checkpoint plus the component config; the ``load_*`` functions return
ready NNX modules, either from a PyTorch checkpoint or from a converted directory.
"""

import importlib as _importlib

# `kaleido_jax.convert.load_*` without importing every converter (and jax/flax) up front.
_LAZY = {"load_text_encoder": "text_encoder", "load_transformer": "transformer", "load_vae": "vae"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(_importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
