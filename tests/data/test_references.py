"""Reference preprocessing: Kaleido's fit-and-pad-with-white, every image mode, clear errors, and
encoding each reference on its own."""

import io

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from kaleido_jax.data import references as R

RED = np.array([1.0, -1.0, -1.0], np.float32)
WHITE = np.ones(3, np.float32)


def _solid(w, h, color=(255, 0, 0), mode="RGB"):
  return Image.new(mode, (w, h), color)


def _save(img, path, **kw):
  img.save(path, **kw)
  return str(path)


# ------------------------------------------------------------------------------------------------
# Geometry: aspect ratio kept, white padding centred
# ------------------------------------------------------------------------------------------------


def test_wide_image_padded_top_and_bottom():
  out = R.load_reference(_solid(200, 100), 64, 64)
  assert out.shape == (64, 64, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:16], np.broadcast_to(WHITE, (16, 64, 3)))
  np.testing.assert_array_equal(out[48:], np.broadcast_to(WHITE, (16, 64, 3)))
  np.testing.assert_allclose(out[16:48], np.broadcast_to(RED, (32, 64, 3)), atol=1e-6)


def test_tall_image_padded_left_and_right_with_odd_delta():
  # 50x100 into 64x97: fitted 32x64, delta_w = 65 -> 32 white columns left, 33 right (Kaleido's split).
  out = R.load_reference(_solid(50, 100), 64, 97)
  assert R.fitted_size(50, 100, 97, 64) == (32, 64)
  assert np.all(out[:, :32] == 1.0) and np.all(out[:, 64:] == 1.0)
  np.testing.assert_allclose(out[:, 32:64], np.broadcast_to(RED, (64, 32, 3)), atol=1e-6)


def test_same_aspect_fills_the_frame_and_upscales():
  out = R.load_reference(_solid(16, 9), 90, 160)
  np.testing.assert_allclose(out, np.broadcast_to(RED, (90, 160, 3)), atol=1e-6)


def test_matches_kaleido_rule_on_a_textured_image():
  """The same steps Kaleido's _load_reference_images takes (Lanczos, ImageOps.expand white, /127.5)."""
  rng = np.random.RandomState(0)
  img = Image.fromarray(rng.randint(0, 256, (37, 83, 3), dtype=np.uint8))
  h, w = 48, 80
  ratio = img.width / img.height
  nw, nh = (w, int(w / ratio)) if ratio > w / h else (int(h * ratio), h)
  small = img.resize((nw, nh), Image.Resampling.LANCZOS)
  dw, dh = w - nw, h - nh
  padded = ImageOps.expand(small, (dw // 2, dh // 2, dw - dw // 2, dh - dh // 2), fill=(255, 255, 255))
  want = (np.asarray(padded).astype(np.float32) - 127.5) / 127.5
  np.testing.assert_array_equal(R.load_reference(img, h, w), want)


# ------------------------------------------------------------------------------------------------
# Modes and input kinds
# ------------------------------------------------------------------------------------------------


def _rgba_half_transparent():
  arr = np.zeros((20, 20, 4), np.uint8)
  arr[..., 0] = 255                  # red everywhere, including the hidden pixels
  arr[:, :10, 3] = 255               # left half opaque, right half fully transparent
  return Image.fromarray(arr, "RGBA")


def test_rgba_alpha_composited_on_white(tmp_path):
  for src in (_rgba_half_transparent(), _save(_rgba_half_transparent(), tmp_path / "a.png"),
              np.asarray(_rgba_half_transparent())):
    out = R.load_reference(src, 20, 20)
    np.testing.assert_allclose(out[:, :9], np.broadcast_to(RED, (20, 9, 3)), atol=1e-6)
    np.testing.assert_allclose(out[:, 11:], 1.0, atol=1e-6)   # not red, not black: white


def test_half_alpha_blends_with_white():
  img = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
  out = R.load_reference(img, 8, 8)
  np.testing.assert_allclose(out, (127 - 127.5) / 127.5, atol=1 / 127.5)


def test_greyscale_la_and_palette_with_transparency(tmp_path):
  grey = R.load_reference(_save(Image.new("L", (10, 10), 64), tmp_path / "g.png"), 10, 10)
  np.testing.assert_allclose(grey, (64 - 127.5) / 127.5, atol=1e-6)
  la = Image.new("LA", (10, 10), (0, 0))  # fully transparent black -> white
  assert np.all(R.load_reference(_save(la, tmp_path / "la.png"), 10, 10) == 1.0)
  pal = Image.new("P", (10, 10), 0)
  pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
  pal.paste(1, (0, 0, 5, 10))                 # left half = index 1 (blue), right half index 0 (red)
  path = _save(pal, tmp_path / "p.png", transparency=1)   # index 1 transparent
  out = R.load_reference(path, 10, 10)
  assert np.all(out[:, :5] == 1.0)
  np.testing.assert_allclose(out[:, 5:], np.broadcast_to(RED, (10, 5, 3)), atol=1e-6)
  gif = _save(pal, tmp_path / "p.gif", transparency=1)
  np.testing.assert_array_equal(R.load_reference(gif, 10, 10), out)


def test_16_bit_png_scaled_to_8_bit(tmp_path):
  arr = np.array([[0, 65535], [32896, 51400]], np.uint16)
  path = tmp_path / "d16.png"
  Image.fromarray(arr).save(path)
  opened = Image.open(path)
  assert opened.mode in ("I;16", "I")
  out = R.load_reference(str(path), 2, 2)
  np.testing.assert_allclose(out[..., 0], (np.array([[0, 255], [128, 200]]) - 127.5) / 127.5, atol=1e-6)


def test_jpeg_webp_bilevel_and_cmyk(tmp_path):
  jpg = R.load_reference(_save(_solid(30, 30, (0, 0, 255)), tmp_path / "a.jpg", quality=95), 16, 16)
  np.testing.assert_allclose(jpg[..., 2], 1.0, atol=0.05)
  assert np.all(jpg[..., 0] < -0.9)
  if features.check("webp"):
    webp = R.load_reference(_save(_rgba_half_transparent(), tmp_path / "a.webp", lossless=True), 20, 20)
    assert np.all(webp[:, 12:] == 1.0)
    np.testing.assert_allclose(webp[:, :8], np.broadcast_to(RED, (20, 8, 3)), atol=1e-6)
  one_bit = R.load_reference(_save(Image.new("1", (8, 8), 1), tmp_path / "b.png"), 8, 8)
  assert np.all(one_bit == 1.0)
  cmyk = R.load_reference(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg"), 8, 8)
  assert cmyk[..., 0].mean() > 0.9 and cmyk[..., 1].mean() < -0.8


def test_uint8_arrays_of_every_layout():
  base = np.full((6, 12), 200, np.uint8)
  outs = [R.load_reference(a, 6, 12) for a in (base, base[..., None], np.repeat(base[..., None], 3, -1),
                                                 np.concatenate([np.repeat(base[..., None], 3, -1),
                                                                 np.full((6, 12, 1), 255, np.uint8)], -1))]
  for o in outs:
    np.testing.assert_allclose(o, (200 - 127.5) / 127.5, atol=1e-6)


def test_exif_rotation_applied(tmp_path):
  img = _solid(40, 20)
  exif = img.getexif()
  exif[0x0112] = 6                            # rotate 90 degrees on display
  path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
  out = R.load_reference(path, 40, 40)        # displayed 20 wide, 40 tall -> white left/right
  assert np.all(out[:, :8] == 1.0) and np.all(out[:, 32:] == 1.0)
  assert out[:, 12:28, 0].min() > 0.8


def test_prepare_references_stacks_and_limits(tmp_path):
  paths = [_save(_solid(10 + i, 10), tmp_path / f"r{i}.png") for i in range(3)]
  out = R.prepare_references(paths, 16, 24, max_refs=3)
  assert out.shape == (3, 16, 24, 3) and out.dtype == np.float32
  assert out.min() >= -1.0 and out.max() <= 1.0
  assert R.prepare_references(paths[0], 16, 24).shape == (1, 16, 24, 3)
  assert R.prepare_references(np.zeros((4, 5, 3), np.uint8), 8, 8).shape == (1, 8, 8, 3)
  assert R.prepare_references(np.zeros((2, 4, 5, 3), np.uint8), 8, 8).shape == (2, 8, 8, 3)
  assert R.prepare_references([], 16, 24).shape == (0, 16, 24, 3)
  with pytest.raises(R.ReferenceImageError, match="got 4 reference images but at most 3"):
    R.prepare_references(paths + [paths[0]], 16, 24, max_refs=3)


def test_pad_reference_slots():
  refs = -np.ones((2, 4, 4, 3), np.float32)
  padded, mask = R.pad_reference_slots(refs, 3)
  assert padded.shape == (3, 4, 4, 3) and mask.tolist() == [True, True, False]
  assert np.all(padded[2] == 1.0) and np.all(padded[:2] == -1.0)
  with pytest.raises(R.ReferenceImageError, match="only 1 slots"):
    R.pad_reference_slots(refs, 1)


# ------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the image
# ------------------------------------------------------------------------------------------------


def test_bad_files_are_named(tmp_path):
  cases = {}
  cases["missing.png"] = (None, "does not exist")
  (tmp_path / "empty.png").write_bytes(b"")
  cases["empty.png"] = (None, "empty file")
  (tmp_path / "notes.png").write_text("these are not pixels")
  cases["notes.png"] = (None, "not an image")
  buf = io.BytesIO()
  Image.fromarray(np.random.RandomState(0).randint(0, 256, (64, 64, 3), np.uint8)).save(buf, "PNG")
  (tmp_path / "cut.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
  cases["cut.png"] = (None, "truncated or corrupt")
  (tmp_path / "folder.png").mkdir()
  cases["folder.png"] = (None, "is a directory")
  _save(_solid(30, 20), tmp_path / "big.png")
  cases["big.png"] = (500, r"30x20 = 600 pixels, over the limit of 500")
  for name, (limit, message) in cases.items():
    kw = {} if limit is None else {"max_pixels": limit}
    with pytest.raises(R.ReferenceImageError, match=message) as e:
      R.prepare_references([_save(_solid(4, 4), tmp_path / "ok.png"), str(tmp_path / name)], 8, 8, **kw)
    assert name in str(e.value) and "reference #1" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_bad_in_memory_inputs():
  with pytest.raises(R.ReferenceImageError, match="empty"):
    R.load_reference(np.zeros((0, 5, 3), np.uint8), 8, 8)
  with pytest.raises(R.ReferenceImageError, match="empty"):
    R.load_reference(Image.new("RGB", (0, 5)), 8, 8)
  with pytest.raises(R.ReferenceImageError, match="must be uint8"):
    R.load_reference(np.zeros((4, 4, 3), np.float32), 8, 8)
  with pytest.raises(R.ReferenceImageError, match=r"got \(4, 4, 2\)"):
    R.load_reference(np.zeros((4, 4, 2), np.uint8), 8, 8)
  with pytest.raises(R.ReferenceImageError, match="over the limit"):
    R.load_reference(_solid(30, 30), 8, 8, max_pixels=100)
  with pytest.raises(R.ReferenceImageError, match="got int"):
    R.load_reference(3, 8, 8)


# ------------------------------------------------------------------------------------------------
# Encoding each reference on its own
# ------------------------------------------------------------------------------------------------


def _causal_stand_in(calls):
  """A VAE-like encoder (B, F, H, W, 3) -> (B, F, H/2, W/2, 4) whose latent frames mix over time, so
  references stacked as frames of one video would contaminate each other."""
  def encode(video):
    calls.append(tuple(video.shape))
    b, f, h, w, _ = video.shape
    pooled = video.reshape(b, f, h // 2, 2, w // 2, 2, 3).mean(axis=(3, 5))
    z = np.concatenate([pooled, pooled.mean(-1, keepdims=True)], -1)
    return np.cumsum(z, axis=1) / np.arange(1, f + 1)[None, :, None, None, None]
  return encode


def test_encode_references_each_on_its_own():
  rng = np.random.RandomState(0)
  imgs = rng.uniform(-1, 1, (3, 8, 12, 3)).astype(np.float32)
  calls = []
  fn = _causal_stand_in(calls)
  z = R.encode_references(fn, imgs)
  assert z.shape == (3, 4, 6, 4)
  assert calls == [(3, 1, 8, 12, 3)]          # three 1-frame videos, not one 3-frame video
  for i in range(3):
    np.testing.assert_allclose(z[i], fn(imgs[i:i + 1, None])[0, 0], atol=1e-7)
  calls.clear()
  np.testing.assert_allclose(R.encode_references(fn, imgs, batch_size=2), z, atol=1e-7)
  assert calls == [(2, 1, 8, 12, 3), (1, 1, 8, 12, 3)]
  zb = R.encode_references(fn, np.stack([imgs, imgs[::-1]]))
  assert zb.shape == (2, 3, 4, 6, 4)
  np.testing.assert_allclose(zb[1], z[::-1], atol=1e-7)


def test_encode_references_with_jax_arrays_and_bad_contract():
  import jax.numpy as jnp
  imgs = jnp.zeros((2, 4, 4, 3))
  z = R.encode_references(lambda v: jnp.tile(v[:, :, ::2, ::2, :1], (1, 1, 1, 1, 5)), imgs, batch_size=1)
  assert z.shape == (2, 2, 2, 5)
  with pytest.raises(R.ReferenceImageError, match=r"expected \(B, 1, h, w, z\)"):
    R.encode_references(lambda v: v[:, 0], np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(R.ReferenceImageError, match=r"\(N, H, W, 3\)"):
    R.encode_references(lambda v: v, np.zeros((4, 4, 3), np.float32))
