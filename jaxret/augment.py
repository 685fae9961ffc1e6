"""Training augmentation and input normalisation on the device: pure JAX functions on uint8 pixels.

The host hands the device uint8 pixels (`[B, C, C, 3]`, the decoded cache's resolution C); the trainer's jitted
step turns them into the model's input with `train_images` and the embedding step with `eval_images`:

  augmentation = Augmentation(image_size=64, crop_scale=(0.85, 1.0), color_jitter=0.1)
  inputs = train_images(pixels, image_keys(seed, step, len(pixels)), augmentation)   # [B, 64, 64, 3] float32
  inputs = eval_images(pixels, 64)                                                   # resize + normalise

Training augmentation of one image (`augment_image`), the same as jaxret's host pipeline did before: a random
resized crop (area fraction in `crop_scale`, aspect ratio log-uniform in `aspect_range`, integer box, bilinear
resampling with an antialiasing triangle filter as PIL's and TF's resize), a horizontal flip with probability
1/2, brightness and contrast jitter of relative strength `color_jitter`, then the model's input convention
(`jaxret.models.INPUT_CONVENTIONS`: channel order and `(x - mean) / std`). The random
numbers of an image come from its own key, derived from (seed, step, position in the global batch): the result
is a pure function of the config, the seed and the step, however many processes and devices share the batch.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxret.models import input_conventions

# `fold_in` tag of the augmentation's keys (the step's dropout key is the seed's key folded with the step, the
# loss's uses tag 3), so the streams never coincide.
_AUGMENT_STREAM = 4


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """What `train_images` does to an image (hashable: it is a constant of the jitted step).

  Attributes:
    image_size: side S of the model's square input.
    crop_scale: range of the crop's area as a fraction of the image's.
    aspect_range: range of the crop's width / height (drawn log-uniformly).
    color_jitter: brightness and contrast factors are drawn from `1 +- color_jitter`.
    convention: the model's input convention (channel order, per-channel mean and std of pixels in [0, 1]).
  """
  image_size: int
  crop_scale: tuple[float, float] = (0.6, 1.0)
  aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
  color_jitter: float = 0.2
  convention: input_conventions.InputConvention = input_conventions.IMAGENET


class Draws(NamedTuple):
  """The random numbers of one image's augmentation (float32 scalars; `flip` bool)."""
  area_fraction: jax.Array  # in crop_scale
  log_aspect: jax.Array  # in log(aspect_range)
  left_fraction: jax.Array  # in [0, 1): where the crop starts among its possible left edges
  top_fraction: jax.Array  # in [0, 1)
  flip: jax.Array
  brightness: jax.Array  # in 1 +- color_jitter
  contrast: jax.Array  # in 1 +- color_jitter


def draw(key: jax.Array, augmentation: Augmentation) -> Draws:
  """The random numbers of one image's augmentation from its key."""
  keys = jax.random.split(key, 7)
  low, high = augmentation.crop_scale
  log_low, log_high = jnp.log(augmentation.aspect_range[0]), jnp.log(augmentation.aspect_range[1])
  jitter = augmentation.color_jitter
  return Draws(
      area_fraction=jax.random.uniform(keys[0], (), minval=low, maxval=high),
      log_aspect=jax.random.uniform(keys[1], (), minval=log_low, maxval=log_high),
      left_fraction=jax.random.uniform(keys[2], ()),
      top_fraction=jax.random.uniform(keys[3], ()),
      flip=jax.random.bernoulli(keys[4]),
      brightness=1.0 + jax.random.uniform(keys[5], (), minval=-jitter, maxval=jitter),
      contrast=1.0 + jax.random.uniform(keys[6], (), minval=-jitter, maxval=jitter))


def crop_box(draws: Draws, height: int, width: int) -> jax.Array:
  """`[4]` int32 `(top, left, crop_height, crop_width)` of the random resized crop, inside the image.

  The crop covers `area_fraction` of the image with width / height `exp(log_aspect)`, each side rounded and
  clipped to the image; its corner is uniform over the positions where it fits.
  """
  area = height * width * draws.area_fraction
  aspect = jnp.exp(draws.log_aspect)
  crop_width = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, width).astype(jnp.int32)
  crop_height = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, height).astype(jnp.int32)
  left = jnp.minimum(jnp.floor(draws.left_fraction * (width - crop_width + 1)).astype(jnp.int32), width - crop_width)
  top = jnp.minimum(jnp.floor(draws.top_fraction * (height - crop_height + 1)).astype(jnp.int32),
                    height - crop_height)
  return jnp.stack([top, left, crop_height, crop_width])


def resize_box(image: jax.Array, box: jax.Array, size: int) -> jax.Array:
  """The `box` of `image` resampled to `[size, size, C]` float32, bilinear with antialiasing.

  Output pixel i samples the input at `box_start + (i + 0.5) * box_length / size` (pixel centres) with a
  triangle filter whose width grows with the downscaling factor (PIL's and TF's `resize`); pixels outside the
  box but inside the image take part near its edges, as in PIL's `resize(box=...)`.

  Args:
    image: `[H, W, C]` pixels (any real dtype).
    box: `[4]` `(top, left, height, width)` in pixels (`crop_box`).
    size: output side length.

  Returns:
    `[size, size, C]` float32, in the units of `image`.
  """
  box = box.astype(jnp.float32)
  scale = size / box[2:]
  translation = -box[:2] * scale
  return jax.image.scale_and_translate(image.astype(jnp.float32), (size, size, image.shape[-1]), (0, 1), scale,
                                       translation, method="linear", antialias=True)


def jitter_brightness_contrast(pixels: jax.Array, brightness: jax.Array, contrast: jax.Array) -> jax.Array:
  """`clip((pixels * brightness - m) * contrast + m, 0, 1)` with m the mean of `pixels` `[H, W, C]` in [0, 1]."""
  mean = jnp.mean(pixels)
  return jnp.clip((pixels * brightness - mean) * contrast + mean, 0.0, 1.0)


def normalize(pixels: jax.Array,
              convention: input_conventions.InputConvention = input_conventions.IMAGENET) -> jax.Array:
  """RGB `[..., 3]` pixels in [0, 1] -> the model's input: channels reordered (BGR conventions), then
  `(pixels - mean) / std` per channel (`InputConvention.normalize` on the device)."""
  if convention.channels == "BGR":
    pixels = pixels[..., ::-1]
  return (pixels - jnp.asarray(convention.mean, jnp.float32)) / jnp.asarray(convention.std, jnp.float32)


def augment_image(image: jax.Array, key: jax.Array, augmentation: Augmentation) -> jax.Array:
  """One training image: `[H, W, 3]` uint8 -> `[S, S, 3]` float32, cropped, flipped, jittered, normalised."""
  draws = draw(key, augmentation)
  box = crop_box(draws, image.shape[0], image.shape[1])
  pixels = resize_box(image, box, augmentation.image_size) / 255.0
  pixels = jnp.where(draws.flip, pixels[:, ::-1], pixels)
  pixels = jitter_brightness_contrast(pixels, draws.brightness, draws.contrast)
  return normalize(pixels, augmentation.convention)


def image_keys(seed: int, step: jax.Array, batch_size: int) -> jax.Array:
  """`[batch_size]` keys of the images of the global batch of `step`, one per position in the batch."""
  step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM), step)
  return jax.vmap(lambda position: jax.random.fold_in(step_key, position))(jnp.arange(batch_size))


def train_images(images: jax.Array, keys: jax.Array, augmentation: Augmentation) -> jax.Array:
  """`[B, H, W, 3]` uint8 -> `[B, S, S, 3]` float32 augmented model inputs, image b with `keys[b]`."""
  return jax.vmap(augment_image, in_axes=(0, 0, None))(images, keys, augmentation)


def eval_images(images: jax.Array, image_size: int,
                convention: input_conventions.InputConvention = input_conventions.IMAGENET) -> jax.Array:
  """`[B, H, W, 3]` uint8 -> `[B, S, S, 3]` float32: the whole image resized to S and normalised.

  With H = W = S this is exact normalisation of the pixels (the filter's weights are 0 and 1).
  """
  height, width = images.shape[1:3]
  whole = jnp.array([0, 0, height, width], jnp.int32)
  resized = jax.vmap(resize_box, in_axes=(0, None, None))(images, whole, image_size)
  return normalize(resized / 255.0, convention)
