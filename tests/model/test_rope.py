"""R-RoPE position ids follow the released Kaleido formula; tables match diffusers' rotary embedding."""

import numpy as np
import pytest

from kaleido_jax.model import rope


@pytest.mark.parametrize("ref_grids", [[(3, 4)], [(3, 4), (2, 2)], [(1, 5), (2, 3), (4, 4), (2, 2)],
                                       [(2, 2)] * 5])
def test_kaleido_ids_follow_the_formula(ref_grids):
  video = (3, 4, 5)
  ids = rope.position_ids(video, ref_grids, scheme="kaleido", ref_shift=80)
  assert ids.dtype == np.int32
  assert ids.shape == (sum(h * w for h, w in ref_grids) + 3 * 4 * 5, 3)
  start = 0
  for i, (h, w) in enumerate(ref_grids):
    part = ids[start:start + h * w]
    expect = [(i, 80 + y, 80 + x) for y in range(h) for x in range(w)]
    np.testing.assert_array_equal(part, expect)
    start += h * w
  expect_video = [(k, y, x) for k in range(3) for y in range(4) for x in range(5)]
  np.testing.assert_array_equal(ids[start:], expect_video)


def test_temporal_and_none_schemes():
  ids = rope.position_ids((2, 2, 2), [(2, 2), (2, 2)], scheme="temporal")
  np.testing.assert_array_equal(ids[:4, 0], 2)
  np.testing.assert_array_equal(ids[4:8, 0], 3)
  np.testing.assert_array_equal(ids[4:8, 1:], [(0, 0), (0, 1), (1, 0), (1, 1)])
  none = rope.position_ids((2, 2, 2), [(2, 2)], scheme="none")
  np.testing.assert_array_equal(none[:4], 0)
  with pytest.raises(ValueError, match="unknown R-RoPE scheme"):
    rope.position_ids((1, 1, 1), [], scheme="phantom")


def test_axis_split_is_wan_44_42_42():
  assert rope.axis_dims(128) == (44, 42, 42)
  assert rope.axis_dims(16) == (8, 4, 4)


@pytest.mark.torch
def test_tables_match_diffusers_rotary_embedding():
  import torch
  from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
  head_dim, grid = 128, (3, 4, 5)
  ref = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=1024)
  cos_t, sin_t = ref(torch.zeros(1, 16, grid[0], grid[1] * 2, grid[2] * 2))
  cos, sin = rope.rope_tables(rope.position_ids(grid, []), head_dim)
  # diffusers repeats each pair's angle twice (interleaved); ours holds one per pair.
  np.testing.assert_allclose(np.asarray(cos), cos_t[0, :, 0, 0::2].numpy(), atol=2e-6)
  np.testing.assert_allclose(np.asarray(sin), sin_t[0, :, 0, 1::2].numpy(), atol=2e-6)


def test_apply_rope_rotates_pairs_and_keeps_norms():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 6, 2, 12)).astype(np.float32)
  ids = rope.position_ids((1, 2, 3), [])
  cos, sin = rope.rope_tables(ids, 12)
  y = np.asarray(rope.apply_rope(x, cos, sin))
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(y[:, 0], x[:, 0], atol=1e-6)  # id (0, 0, 0) = identity
  assert not np.allclose(y[:, 1], x[:, 1])
