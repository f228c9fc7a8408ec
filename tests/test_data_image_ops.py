"""Image decoding (every JPEG/PNG mode becomes RGB uint8) and crop/resize."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simvlm_jax.data import image_ops


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  out = io.BytesIO()
  image.save(out, format=fmt, **kwargs)
  return out.getvalue()


def _decode(data: bytes) -> np.ndarray:
  return image_ops.decode_rgb(tf.constant(data)).numpy()


# A 4x6 image: left half (200, 10, 10), right half (200, 100, 10).
RGB = np.zeros((4, 6, 3), np.uint8)
RGB[...] = (200, 10, 10)
RGB[:, 3:, 1] = 100


def test_jpeg_rgb_and_grayscale():
  rgb = _decode(_encode(Image.fromarray(np.full((8, 8, 3), (30, 140, 220), np.uint8)), "JPEG",
                        quality=100))
  assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
  np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), (30, 140, 220), atol=3)
  grey = _decode(_encode(Image.fromarray(np.full((8, 8), 90, np.uint8)), "JPEG", quality=100))
  assert grey.shape == (8, 8, 3)
  np.testing.assert_allclose(grey, 90, atol=2)


@pytest.mark.parametrize("mode", ["RGB", "P", "P256", "L", "LA", "1"])
def test_png_modes(mode):
  image = Image.fromarray(RGB)
  expected = RGB
  if mode in ("L", "LA"):
    image = Image.fromarray(RGB[..., 0]).convert(mode)
    expected = np.repeat(RGB[..., :1], 3, axis=-1)
  elif mode == "1":  # 1 bit per pixel
    image = Image.fromarray(RGB[..., 1] > 50)
    expected = np.repeat(np.where(RGB[..., 1:2] > 50, 255, 0), 3, axis=-1)
  elif mode == "P":  # a 2-colour palette is stored at 1 bit per pixel
    image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
  elif mode == "P256":
    image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
  out = _decode(_encode(image, "PNG"))
  assert out.shape == (4, 6, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, expected)


def test_png_rgba_is_composited_over_white():
  alpha = np.zeros((4, 6), np.uint8)
  alpha[:, :2] = 255  # opaque
  alpha[:, 2:4] = 0  # fully transparent: the stored colour must not show
  alpha[:, 4:] = 128  # half
  out = _decode(_encode(Image.fromarray(np.dstack([RGB, alpha]), "RGBA"), "PNG"))
  np.testing.assert_array_equal(out[:, :2], RGB[:, :2])
  np.testing.assert_array_equal(out[:, 2:4], 255)
  half = RGB[0, 4].astype(float) * 128 / 255 + 255 * (1 - 128 / 255)
  np.testing.assert_allclose(out[0, 4], half, atol=1)


def test_png_palette_with_transparency():
  image = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
  transparent_index = image.getpixel((0, 0))
  out = _decode(_encode(image, "PNG", transparency=transparent_index))
  np.testing.assert_array_equal(out[:, :3], 255)  # the transparent colour becomes white
  np.testing.assert_array_equal(out[:, 3:], RGB[:, 3:])


def test_png_16_bit_grey_and_rgb():
  grey16 = (np.arange(24).reshape(4, 6) * 2800).astype(np.uint16)
  out = _decode(_encode(Image.fromarray(grey16), "PNG"))
  np.testing.assert_array_equal(out[..., 0], np.round(grey16 / 257).astype(np.uint8))
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  rgb16 = RGB.astype(np.uint16) * 257 + 100  # not an exact multiple: checks the rounding
  out = _decode(tf.io.encode_png(tf.constant(rgb16)).numpy())
  np.testing.assert_array_equal(out, np.round(rgb16 / 257).astype(np.uint8))


def test_gif_first_frame():
  out = _decode(_encode(Image.fromarray(RGB).convert("P"), "GIF"))
  assert out.shape == (4, 6, 3)


@pytest.mark.parametrize("data", [b"", b"not an image at all",
                                  b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_undecodable_bytes_raise(data):
  with pytest.raises(tf.errors.InvalidArgumentError):
    _decode(data)


def test_truncated_jpeg_raises():
  data = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3),
                                                                    np.uint8)), "JPEG")
  with pytest.raises(tf.errors.InvalidArgumentError):
    _decode(data[:len(data) // 2])


def test_centre_crop_of_a_wide_image():
  image = np.zeros((20, 60, 3), np.uint8)
  image[:, 20:40] = 255  # the middle third is white
  out = image_ops.crop_and_resize(tf.constant(image), (10, 10)).numpy()
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, 255)


def test_same_size_passes_through_and_non_square_target():
  image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), np.uint8)
  np.testing.assert_array_equal(image_ops.crop_and_resize(tf.constant(image), (16, 16)), image)
  assert image_ops.crop_and_resize(tf.constant(image), (8, 12)).shape == (8, 12, 3)


def test_random_crop_is_a_function_of_the_seed():
  image = tf.constant(np.random.default_rng(2).integers(0, 256, (64, 64, 3), np.uint8))

  def crop(seed, **kwargs):
    return image_ops.crop_and_resize(image, (32, 32), random=True, min_area=0.3,
                                     seed=tf.constant(seed, tf.int64), **kwargs).numpy()

  np.testing.assert_array_equal(crop([0, 5]), crop([0, 5]))
  assert any(not np.array_equal(crop([0, 5]), crop([0, i])) for i in range(6, 10))
  full = image_ops.crop_and_resize(image, (32, 32)).numpy()
  no_crop = image_ops.crop_and_resize(image, (32, 32), random=True, min_area=1.0,
                                      seed=tf.constant([0, 1], tf.int64)).numpy()
  np.testing.assert_array_equal(no_crop, full)
  flips = [crop([1, i], flip=True) for i in range(8)]
  unflipped = [crop([1, i]) for i in range(8)]
  mirrored = [np.array_equal(f, u[:, ::-1]) for f, u in zip(flips, unflipped)]
  assert any(mirrored) and not all(mirrored)


def test_random_crop_needs_a_seed():
  with pytest.raises(ValueError, match="seed"):
    image_ops.crop_and_resize(tf.zeros([8, 8, 3], tf.uint8), (4, 4), random=True)
