"""umT5 encoder: parity with transformers, tokenizer, Wan's prompt padding, prompt cache."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from kaleido_jax.config import text_encoder_config
from kaleido_jax.model import text_encoder as te
from tests import fixtures_text as ft

MAXLEN = 48


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("ckpt"))
  ft.train_sentencepiece(os.path.join(d, "tokenizer"))
  return d


@pytest.fixture(scope="module")
def tokenizer(spm_dir):
  return te.Tokenizer(spm_dir)


@pytest.fixture(scope="module")
def encoder():
  return te.UMT5Encoder(text_encoder_config(**ft.TINY_UMT5), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
  """(transformers model, our converted encoder) sharing the same random weights."""
  pytest.importorskip("transformers")
  from kaleido_jax.convert.text_encoder import load_text_encoder
  model = ft.tiny_hf_umt5(seed=1)
  d = str(tmp_path_factory.mktemp("hf"))
  model.save_pretrained(d)
  return model, load_text_encoder(d, format="transformers"), d


@pytest.mark.torch
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20)])
def test_relative_buckets_match_transformers(buckets, max_distance):
  from transformers import UMT5Config
  from transformers.models.umt5.modeling_umt5 import UMT5Attention
  import torch
  attn = UMT5Attention(UMT5Config(relative_attention_num_buckets=buckets,
                                  relative_attention_max_distance=max_distance),
                       has_relative_attention_bias=True)
  ref = attn._relative_position_bucket(torch.arange(-700, 701)[None]).numpy()[0]
  ours = te.relative_position_buckets(701, 1401, buckets, max_distance)[700]
  np.testing.assert_array_equal(ours, ref)
  assert ours.min() == 0 and ours.max() == buckets - 1


@pytest.mark.torch
def test_parity_with_transformers_padded_batch(hf_pair):
  model, enc, _ = hf_pair
  rng = np.random.RandomState(0)
  ids = rng.randint(0, ft.TINY_UMT5["vocab_size"], (3, 160)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 37:] = 0
  mask[2, 150:] = 0
  ref = ft.hf_last_hidden(model, ids, mask)
  ours = np.asarray(enc(ids, mask))
  err = np.abs(ours - ref).max()
  print(f"umT5 parity max |err| = {err:.2e} (output max {np.abs(ref).max():.2f})")
  assert err < 1e-5
  # Padding really masks: changing padded tokens leaves valid rows unchanged.
  ids2 = ids.copy()
  ids2[1, 37:] = (ids2[1, 37:] + 5) % ft.TINY_UMT5["vocab_size"]
  np.testing.assert_allclose(np.asarray(enc(ids2, mask))[1, :37], ours[1, :37], atol=1e-6)


@pytest.mark.torch
def test_bfloat16_error_comparable_to_transformers_bfloat16(hf_pair):
  """In bf16 we stay as close to the fp32 reference as transformers' own bf16 run does."""
  import copy
  import torch
  from kaleido_jax.convert.text_encoder import load_text_encoder
  model, _, path = hf_pair
  rng = np.random.RandomState(4)
  ids = rng.randint(0, ft.TINY_UMT5["vocab_size"], (2, 64)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 30:] = 0
  ref = ft.hf_last_hidden(model, ids, mask)
  hf16 = ft.hf_last_hidden(copy.deepcopy(model).to(torch.bfloat16), ids, mask)
  ours16 = np.asarray(load_text_encoder(path, dtype="bfloat16")(ids, mask), np.float32)
  scale = np.abs(ref).max()
  hf_err, our_err = np.abs(hf16 - ref).max() / scale, np.abs(ours16 - ref).max() / scale
  print(f"bf16 relative max error: ours {our_err:.3%}, transformers {hf_err:.3%}")
  assert our_err < max(2 * hf_err, 0.02)


def test_encoder_no_mask_equals_full_mask(encoder):
  ids = np.random.RandomState(1).randint(0, 320, (2, 12)).astype(np.int32)
  np.testing.assert_allclose(np.asarray(encoder(ids)), np.asarray(encoder(ids, np.ones_like(ids))),
                             atol=1e-6)


def test_params_stacked_over_layers_with_logical_names(encoder):
  state = nnx.state(encoder, nnx.Param)
  q = state["blocks"]["q"]["kernel"]
  assert q.shape == (2, 32, 32)
  assert tuple(q.get_metadata()["out_sharding"]) == ("layers", "embed", "heads")
  assert state["blocks"]["relative_bias"].shape == (2, 32, 4)  # one bias table per layer (umT5)


def test_bfloat16_config_runs_with_fp32_norms():
  cfg = text_encoder_config(**ft.TINY_UMT5, dtype="bfloat16")
  enc16 = te.UMT5Encoder(cfg, rngs=nnx.Rngs(0))
  enc32 = te.UMT5Encoder(text_encoder_config(**ft.TINY_UMT5), rngs=nnx.Rngs(0))
  nnx.update(enc16, jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), nnx.state(enc32)))
  ids = np.random.RandomState(2).randint(0, 320, (1, 10)).astype(np.int32)
  a, b = enc16(ids), enc32(ids)
  assert a.dtype == jax.numpy.bfloat16
  assert np.abs(np.asarray(a, np.float32) - np.asarray(b)).max() < 0.05 * np.abs(np.asarray(b)).max()


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


def test_tokenizer_found_in_checkpoint_layouts(spm_dir, tmp_path):
  assert te.Tokenizer(spm_dir).path.endswith(os.path.join("tokenizer", "spiece.model"))
  flat = ft.train_sentencepiece(str(tmp_path / "flat"), filename="tokenizer.model")
  assert te.Tokenizer(str(tmp_path / "flat")).path == flat
  assert te.Tokenizer(flat).path == flat
  with pytest.raises(FileNotFoundError, match="spiece.model"):
    te.Tokenizer(str(tmp_path / "nowhere"))
  bad = tmp_path / "bad" / "spiece.model"
  bad.parent.mkdir()
  bad.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a sentencepiece model"):
    te.Tokenizer(str(bad.parent))


def test_tokenizer_eos_padding_and_trimming(tokenizer):
  assert tokenizer.eos_id == 1 and tokenizer.pad_id == 0
  ids, mask = tokenizer(["A red cat.", "  A   red\n cat. "], max_length=16)
  assert ids.shape == mask.shape == (2, 16) and ids.dtype == np.int32
  n = int(mask[0].sum())
  assert ids[0, n - 1] == tokenizer.eos_id and np.all(ids[0, n:] == 0) and np.all(mask[0, n:] == 0)
  np.testing.assert_array_equal(ids[0], ids[1])  # Wan's whitespace cleaning
  long_prompt = " ".join(["camera slowly pans across quiet city"] * 20)
  ids, mask = tokenizer([long_prompt], max_length=16)
  assert mask.sum() == 16 and ids[0, -1] == tokenizer.eos_id
  full = tokenizer.tokenize(long_prompt, 10_000)
  np.testing.assert_array_equal(ids[0, :15], full[:15])  # pieces trimmed, EOS kept last


@pytest.mark.torch
def test_tokenizer_matches_transformers_t5_tokenizer(tmp_path):
  """Wan's HuggingfaceTokenizer wraps transformers' tokenizer with padding='max_length', truncation."""
  import json
  from transformers import AutoTokenizer
  ft.train_sentencepiece(str(tmp_path))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer",
                                                               "extra_ids": 0}))
  hf = AutoTokenizer.from_pretrained(str(tmp_path))
  ours = te.Tokenizer(str(tmp_path))
  prompts = ["A red cat jumps over the lazy dog.", "  Two   birds, zebra!  ", "ünïcode 漢字 test",
             " ".join(["camera slowly pans"] * 30)]
  for max_length in (64, 16):
    ref = hf(prompts, padding="max_length", truncation=True, max_length=max_length,
             add_special_tokens=True, return_tensors="np")
    ids, mask = ours(prompts, max_length)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])


# ------------------------------------------------------------------------------------------------
# Wan's padding and the prompt cache
# ------------------------------------------------------------------------------------------------

PROMPTS = ["A red cat jumps over the lazy dog.", "Camera slowly pans across quiet city at night.",
           "Two birds."]


def test_encode_prompts_zero_beyond_length(encoder, tokenizer):
  out = np.asarray(te.encode_prompts(encoder, tokenizer, PROMPTS, MAXLEN))
  assert out.shape == (3, MAXLEN, 32)
  lengths = te.prompt_lengths(tokenizer, PROMPTS, MAXLEN)
  for i, n in enumerate(lengths):
    assert np.all(out[i, n:] == 0)
    assert np.all(np.abs(out[i, :n]).sum(-1) > 0)
    # Wan runs the padded sequence with a mask and keeps the first n rows: that equals encoding the n
    # tokens alone, since masked keys get no weight.
    ids, _ = tokenizer([PROMPTS[i]], MAXLEN)
    alone = np.asarray(encoder(ids[:, :n]))
    np.testing.assert_allclose(out[i, :n], alone[0], atol=1e-5)


def test_encode_prompts_trims_at_max_length(encoder, tokenizer):
  long_prompt = " ".join(PROMPTS * 10)
  out = np.asarray(te.encode_prompts(encoder, tokenizer, [long_prompt, "Two birds."], 24))
  assert out.shape == (2, 24, 32)
  assert np.all(np.abs(out[0]).sum(-1) > 0)  # every row used, nothing zeroed
  assert te.prompt_lengths(tokenizer, [long_prompt], 24) == [24]
  assert te.encode_prompts(encoder, tokenizer, [], 24).shape == (0, 24, 32)
  empty = np.asarray(te.encode_prompts(encoder, tokenizer, [""], 24))  # the CFG / dropout prompt: EOS only
  assert np.all(np.abs(empty[0, :1]).sum(-1) > 0) and np.all(empty[0, 1:] == 0)


def test_encode_prompts_chunked_equals_single_batch(encoder, tokenizer):
  whole = np.asarray(te.encode_prompts(encoder, tokenizer, PROMPTS, MAXLEN))
  chunked = np.asarray(te.encode_prompts(encoder, tokenizer, PROMPTS, MAXLEN, batch_size=2))
  np.testing.assert_allclose(chunked, whole, atol=1e-5)


def test_prompt_cache_computes_once_and_round_trips(encoder, tokenizer, tmp_path):
  cache = te.PromptCache(encoder, tokenizer, MAXLEN, batch_size=2)
  first = cache(PROMPTS)
  np.testing.assert_allclose(first, np.asarray(te.encode_prompts(encoder, tokenizer, PROMPTS, MAXLEN)),
                             atol=1e-5)
  assert len(cache) == 3
  n0 = te.prompt_lengths(tokenizer, PROMPTS[:1], MAXLEN)[0]
  assert cache.trimmed(PROMPTS[0]).shape == (n0, 32)  # stored trimmed
  path = str(tmp_path / "prompts.npz")
  cache.save(path)
  offline = te.PromptCache(None, None, MAXLEN).load(path)  # no encoder: must be served from the cache
  np.testing.assert_array_equal(offline([PROMPTS[2], PROMPTS[0]]), first[[2, 0]])
  assert PROMPTS[1] in offline and "never seen" not in offline
  with pytest.raises(KeyError, match="not cached"):
    offline(["never seen"])
  # Another max_length is another key.
  assert PROMPTS[0] not in te.PromptCache(None, None, MAXLEN + 1).load(path)


def test_a_cached_embedding_does_not_depend_on_which_prompts_missed_with_it(encoder, tokenizer):
  # A run resumed from a checkpoint starts with an empty cache and meets each caption beside other captions than
  # the uninterrupted run did: the embedding (what the trainer feeds) must be the same bits either way.
  alone = te.PromptCache(encoder, tokenizer, MAXLEN, batch_size=4)
  alone([PROMPTS[0]])
  for partners in ([PROMPTS[1]], [PROMPTS[2], PROMPTS[1]], PROMPTS[1:] + ["A cat sleeps."]):
    cache = te.PromptCache(encoder, tokenizer, MAXLEN, batch_size=4)
    cache(partners + [PROMPTS[0]])
    np.testing.assert_array_equal(cache.trimmed(PROMPTS[0]), alone.trimmed(PROMPTS[0]))


def test_pad_embedding():
  x = np.ones((3, 4), np.float32)
  y = te.pad_embedding(x, 5)
  assert y.shape == (5, 4) and y[:3].sum() == 12 and y[3:].sum() == 0
  with pytest.raises(ValueError, match="max_length"):
    te.pad_embedding(np.ones((6, 4)), 5)


@pytest.mark.torch
def test_encode_prompts_matches_wan_pipeline_on_transformers(hf_pair, tokenizer):
  """Wan: padded ids + mask through the torch encoder, keep [:len], zero-pad; vs ours end to end."""
  model, enc, _ = hf_pair
  ids, mask = tokenizer(PROMPTS, MAXLEN)
  ref = ft.hf_last_hidden(model, ids, mask)
  lengths = mask.sum(1)
  wan = np.zeros_like(ref)
  for i, n in enumerate(lengths):
    wan[i, :n] = ref[i, :n]
  ours = np.asarray(te.encode_prompts(enc, tokenizer, PROMPTS, MAXLEN))
  err = np.abs(ours - wan).max()
  print(f"umT5 prompt pipeline max |err| = {err:.2e}")
  assert err < 1e-5


def test_default_config_is_umt5_xxl_size():
  """Abstract build of the real encoder: 5.68B parameters (1.05B embedding + 24 x 193M layers)."""
  abstract = nnx.eval_shape(lambda: te.UMT5Encoder(text_encoder_config(), rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  total = sum(int(np.prod(x.shape)) for x in leaves)
  layer = 4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096 + 32 * 64
  assert total == 256384 * 4096 + 24 * layer + 4096
