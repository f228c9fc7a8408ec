"""Image decoding, cropping and resizing in TensorFlow (these run inside tf.data).

Every image leaves as RGB uint8 of the configured size: the model normalises on device.
"""
from typing import Optional

import tensorflow as tf

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The file extensions `decode_rgb` reads (lower case): what a folder of images and a WebDataset
# shard's image members are recognised by.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded image bytes (scalar tf.string) -> uint8 [h, w, 3].

  JPEG, GIF (first frame) and BMP decode directly. PNG of any mode (RGB, RGBA, palette, grey,
  grey + alpha; 8 or 16 bit) is decoded at 16 bits as RGBA and its alpha composited over white,
  so transparent pixels do not come out as whatever colour the file stored under them.
  Undecodable bytes raise InvalidArgumentError (the pipeline drops and counts them).
  """
  is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)
  return tf.cond(is_png, lambda: _decode_png(encoded),
                 lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))


def _decode_png(encoded: tf.Tensor) -> tf.Tensor:
  # Native channels (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA; palettes expand to 3 or 4): asking TF
  # for 4 channels fills a wrong alpha for low-bit-depth palette images. dtype=uint16 also reads
  # 8-bit files (values scaled by 257), so one path serves both depths.
  pixels = tf.cast(tf.io.decode_png(encoded, channels=0, dtype=tf.uint16), tf.float32) / 65535.0
  channels = tf.shape(pixels)[-1]
  has_alpha = tf.equal(channels % 2, 0)
  colour = pixels[..., :channels - tf.cast(has_alpha, tf.int32)] * tf.ones([1, 1, 3])
  alpha = tf.where(has_alpha, pixels[..., -1:], tf.ones_like(pixels[..., :1]))
  return tf.cast(tf.round((colour * alpha + (1.0 - alpha)) * 255.0), tf.uint8)


def crop_and_resize(image: tf.Tensor, size: tuple[int, int], *, random: bool = False,
                    min_area: float = 1.0, flip: bool = False,
                    seed: Optional[tf.Tensor] = None) -> tf.Tensor:
  """uint8 [h, w, 3] -> uint8 [H, W, 3] with (H, W) = size.

  The crop has the target's aspect ratio and covers a fraction of the largest such window drawn
  from [min_area, 1] (random=True; placed uniformly) or all of it (random=False: a centre crop).
  flip=True (with random=True) mirrors half the images left to right; leave it off for data whose
  text says "left of". `seed` (int [2]) makes the random choices a pure function of the example.
  """
  if random and seed is None:
    raise ValueError("crop_and_resize(random=True) needs a seed")
  height, width = size
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  crop_h = tf.minimum(shape[0], shape[1] * height / width)
  scale = 1.0
  if random:
    area_seed, place_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    scale = tf.sqrt(tf.random.stateless_uniform([], area_seed, minval=min_area, maxval=1.0))
  crop_h = tf.maximum(1.0, tf.floor(crop_h * scale))
  crop_w = tf.maximum(1.0, tf.floor(crop_h * width / height))
  crop_w = tf.minimum(crop_w, shape[1])
  if random:
    room = shape - tf.stack([crop_h, crop_w])
    top, left = tf.unstack(tf.random.stateless_uniform([2], place_seed) * room)
  else:
    top, left = (shape[0] - crop_h) / 2, (shape[1] - crop_w) / 2
  box = tf.cast(tf.stack([tf.floor(top), tf.floor(left), crop_h, crop_w]), tf.int32)
  crop = image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]

  def resize():
    out = tf.image.resize(crop, size, method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

  out = tf.cond(tf.reduce_all(tf.equal(tf.shape(crop)[:2], size)), lambda: crop, resize)
  if random and flip:
    mirror = tf.random.stateless_uniform([], flip_seed) < 0.5
    out = tf.cond(mirror, lambda: out[:, ::-1], lambda: out)
  return tf.ensure_shape(out, (height, width, 3))
