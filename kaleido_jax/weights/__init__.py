"""Weights into their shardings: one loader for training, sampling and export.

  pure, where = weights.load_transformer(path, target, model_cfg=config.model, fmt='diffusers', loras=...)

``target`` is a pure tree of ``jax.ShapeDtypeStruct`` with shardings (the trainer's abstract parameters, or
``weights.abstract_target(abstract model, shardings)`` for sampling). sources.py reads (orbax trees, PyTorch
files, host arrays); loader.py lands each leaf in its target sharding, merging LoRAs and quantizing on the way;
transformer.py tells what a path is (training checkpoint, converted directory, PyTorch checkpoint).
"""

from kaleido_jax.weights.loader import abstract_target, canonical, flat, load, nested_like
from kaleido_jax.weights.sources import HostSource, OrbaxSource, TorchSource, WeightsError, place
from kaleido_jax.weights.transformer import (float_abstract, is_converted, load_transformer, lora_updates,
                                             open_source, training_checkpoint_dir)

__all__ = ['HostSource', 'OrbaxSource', 'TorchSource', 'WeightsError', 'abstract_target', 'canonical', 'flat',
           'float_abstract', 'is_converted', 'load', 'load_transformer', 'lora_updates', 'nested_like',
           'open_source', 'place', 'training_checkpoint_dir']
