"""Kaleido-14B for sampling as upstream samples it: bf16 weights (no float32 masters), umT5-XXL in bf16, 512x896x81
with <= 3 refs, Euler on upstream's σ grid (sample.solver='kaleido'), 50 steps, shift 7, CFG 6, Kaleido's
negative prompt (480x832, the training size: --size 480x832).

One TPU chip (the memory plan of `python -m kaleido_jax.tools.aot --step sample`, bench/sample.py --aot):
  v6e-1 (32 GiB)  --config.model.quantization=int8
  v5e-1 (16 GiB)  --config.model.quantization=int4 --config.text_encoder.quantization=int8
  v5p-1 (95 GiB)  as it is (bf16)
The mesh, VAE tiles and umT5's device follow the chips the run has (`sample.layout='auto'`,
kaleido_jax/parallel/sampling_layout.py): one chip: no mesh, 256-px tiles on v5e, 512-px on v6e, umT5 on the host on
both; a host of n chips: guidance branches over data (2), tokens over context (n / 2).
Weights: --config.init_from.transformer=DIR (a converted, possibly `--quantization int8`, directory) and
init_from.vae / .text_encoder likewise; text_encoder.tokenizer_path for the umT5 sentencepiece model.
"""

from kaleido_jax import config as kcfg

TPU_SLICE = 'v5p:1x1x1'  # one v5p chip takes it as shipped (bf16); tests/test_configs.py checks the request there


def get_config():
  config = kcfg.base_config()
  config.model = kcfg.model_config(**kcfg.WAN_14B, dtype='bfloat16', param_dtype='bfloat16', attention='auto')
  config.text_encoder.dtype = 'bfloat16'
  config.data.update(max_refs=3)
  config.vae.update(decode_chunk_frames=1)
  config.mesh.update(data=-1, fsdp=1)  # (sample.layout='auto' sets the mesh from the chips at run time)
  config.sample.update(solver='kaleido', num_steps=50, shift=7.0, guidance_scale=6.0, num_frames=81, height=512,
                       width=896, negative_prompt=kcfg.KALEIDO_NEGATIVE_PROMPT, layout='auto')
  return config
