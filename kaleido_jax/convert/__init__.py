"""PyTorch checkpoints (diffusers | wan | kaleido | transformers) -> kaleido_jax NNX state.

``python -m kaleido_jax.convert --component {transformer,vae,text_encoder} --format ... --input PATH
--output DIR`` writes an orbax checkpoint plus the component config; the ``load_*`` functions return
ready NNX modules, either from a PyTorch checkpoint or from a converted directory.
"""
