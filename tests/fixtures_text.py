"""Text-encoder test helpers: a sentencepiece model trained on the spot and tiny random umT5 references.

No network and no downloaded tokenizer: the sentencepiece model is trained from a few dozen generated
sentences (umT5's special ids: pad 0, eos 1, unk 2, no bos), so tokenisation is real but tiny.
"""

from __future__ import annotations

import os
import random

import numpy as np

TINY_UMT5 = dict(vocab_size=320, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128)

_WORDS = ("a red cat jumps over the lazy brown dog while two small birds sing in the tall green tree "
          "near river bank under bright blue sky person walks holding yellow umbrella on rainy street "
          "camera slowly pans across quiet city at night with glowing neon lights and wet roads").split()


def sentences(n: int = 60, seed: int = 0) -> list[str]:
  rnd = random.Random(seed)
  return [" ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(4, 14))).capitalize() + "."
          for _ in range(n)]


def train_sentencepiece(directory: str, vocab_size: int = 120, filename: str = "spiece.model") -> str:
  """Trains a unigram sentencepiece model into ``directory/filename`` and returns its path."""
  import sentencepiece as spm
  os.makedirs(directory, exist_ok=True)
  prefix = os.path.join(directory, "sp_tmp")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences()), model_prefix=prefix, vocab_size=vocab_size,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
      minloglevel=2, num_threads=1)
  out = os.path.join(directory, filename)
  os.replace(prefix + ".model", out)
  os.remove(prefix + ".vocab")
  return out


def tiny_hf_umt5(seed: int = 0, **overrides):
  """A random transformers ``UMT5EncoderModel`` in eval mode, with non-trivial norm weights."""
  import torch
  from transformers import UMT5Config, UMT5EncoderModel
  torch.manual_seed(seed)
  cfg = UMT5Config(**{**TINY_UMT5, **overrides}, dropout_rate=0.0)
  model = UMT5EncoderModel(cfg).eval()
  with torch.no_grad():  # ones by default: randomise so the norm weights are actually tested
    for name, p in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return model


def hf_last_hidden(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long))
  return out.last_hidden_state.float().numpy()
