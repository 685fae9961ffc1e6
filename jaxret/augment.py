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
    crop_to_box: draw the crop inside the record's box (`config.input.crop_to_box`), not the whole image.
    box_margin: fraction of the box's side added on each side before cropping (`config.input.box_margin`).
  """
  image_size: int
  crop_scale: tuple[float, float] = (0.6, 1.0)
  aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
  color_jitter: float = 0.2
  convention: input_conventions.InputConvention = input_conventions.IMAGENET
  crop_to_box: bool = False
  box_margin: float = 0.0


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


def crop_in_region(draws: Draws, region: jax.Array) -> jax.Array:
  """`[4]` float32 `(top, left, crop_height, crop_width)` of the random resized crop inside `region`.

  The crop covers `area_fraction` of the region with width / height `exp(log_aspect)`, each side rounded and
  clipped to the region; its corner is uniform over the whole-pixel offsets where it fits.

  Args:
    draws: the image's random numbers.
    region: `[4]` `(top, left, height, width)` in pixels: the whole image, or a record's box (`box_region`).
  """
  region = jnp.asarray(region, jnp.float32)
  top0, left0, height, width = region[0], region[1], region[2], region[3]
  area = height * width * draws.area_fraction
  aspect = jnp.exp(draws.log_aspect)
  crop_width = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, width)
  crop_height = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, height)
  left = jnp.minimum(jnp.floor(draws.left_fraction * (width - crop_width + 1)), width - crop_width)
  top = jnp.minimum(jnp.floor(draws.top_fraction * (height - crop_height + 1)), height - crop_height)
  return jnp.stack([top0 + top, left0 + left, crop_height, crop_width])


def crop_box(draws: Draws, height: int, width: int) -> jax.Array:
  """`[4]` int32 `(top, left, crop_height, crop_width)` of the random resized crop, inside the whole image."""
  whole = jnp.array([0, 0, height, width], jnp.float32)
  return crop_in_region(draws, whole).astype(jnp.int32)


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


def augment_image(image: jax.Array, key: jax.Array, augmentation: Augmentation, bbox: jax.Array | None = None,
                  has_bbox: jax.Array | None = None) -> jax.Array:
  """One training image: `[H, W, 3]` uint8 -> `[S, S, 3]` float32, cropped, flipped, jittered, normalised.

  With `augmentation.crop_to_box`, the random crop is drawn inside the record's box (`bbox` `[4]` normalised
  `(ymin, xmin, ymax, xmax)`, grown by `box_margin`; the whole image where `has_bbox` is False) instead of
  inside the whole image.
  """
  draws = draw(key, augmentation)
  height, width = image.shape[0], image.shape[1]
  if augmentation.crop_to_box:
    if bbox is None or has_bbox is None:
      raise ValueError("crop_to_box needs each record's bbox and has_bbox.")
    box = crop_in_region(draws, box_region(bbox, has_bbox, augmentation.box_margin, height, width))
  else:
    box = crop_box(draws, height, width)
  pixels = resize_box(image, box, augmentation.image_size) / 255.0
  pixels = jnp.where(draws.flip, pixels[:, ::-1], pixels)
  pixels = jitter_brightness_contrast(pixels, draws.brightness, draws.contrast)
  return normalize(pixels, augmentation.convention)


def image_keys(seed: int, step: jax.Array, batch_size: int) -> jax.Array:
  """`[batch_size]` keys of the images of the global batch of `step`, one per position in the batch."""
  step_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM), step)
  return jax.vmap(lambda position: jax.random.fold_in(step_key, position))(jnp.arange(batch_size))


def train_images(images: jax.Array, keys: jax.Array, augmentation: Augmentation, bbox: jax.Array | None = None,
                 has_bbox: jax.Array | None = None) -> jax.Array:
  """`[B, H, W, 3]` uint8 -> `[B, S, S, 3]` float32 augmented model inputs, image b with `keys[b]` (and, for
  `crop_to_box`, its `bbox[b]` `[4]` and `has_bbox[b]`)."""
  if not augmentation.crop_to_box:
    return jax.vmap(augment_image, in_axes=(0, 0, None))(images, keys, augmentation)
  return jax.vmap(augment_image, in_axes=(0, 0, None, 0, 0))(images, keys, augmentation, bbox, has_bbox)


def eval_images(images: jax.Array, image_size: int,
                convention: input_conventions.InputConvention = input_conventions.IMAGENET, *,
                bbox: jax.Array | None = None, has_bbox: jax.Array | None = None,
                box_margin: float = 0.0) -> jax.Array:
  """`[B, H, W, 3]` uint8 -> `[B, S, S, 3]` float32: the whole image (or, given `bbox` `[B, 4]` and `has_bbox`
  `[B]`, each record's box grown by `box_margin`, as `box_region`) resized to S and normalised.

  With H = W = S and no box this is exact normalisation of the pixels (the filter's weights are 0 and 1).
  """
  height, width = images.shape[1:3]
  if bbox is None:
    whole = jnp.array([0, 0, height, width], jnp.int32)
    resized = jax.vmap(resize_box, in_axes=(0, None, None))(images, whole, image_size)
  else:
    regions = jax.vmap(box_region, in_axes=(0, 0, None, None, None))(bbox, has_bbox, box_margin, height, width)
    resized = jax.vmap(resize_box, in_axes=(0, 0, None))(images, regions, image_size)
  return normalize(resized / 255.0, convention)


def box_region(bbox: jax.Array, has_box: jax.Array, margin: float, height: int, width: int) -> jax.Array:
  """`[4]` float32 `(top, left, box_height, box_width)` in pixels of a record's box, grown and clipped.

  The box is grown by `margin` times its own side on each side (`margin=0.1` adds 10% of the height above and
  below, 10% of the width left and right), then clipped to the image; without a box (`has_box` False) the
  region is the whole image. Sides are at least one pixel (a degenerate box would make the resampling divide
  by zero). The result is what `resize_box` takes: evaluation crops to it exactly, training draws its random
  crop inside it (`crop_in_region`).

  Args:
    bbox: `[4]` `(ymin, xmin, ymax, xmax)` normalised to [0, 1] (TFDS `BBoxFeature`, the `bbox` feature of the
      In-shop and DeepFashion2 builders).
    has_box: scalar bool, False where the record has no box.
    margin: non-negative fraction of the box's side added on each side.
    height: image height H in pixels.
    width: image width W in pixels.
  """
  if margin < 0:
    raise ValueError(f"box margin must be >= 0 (a fraction of the box side), got {margin}.")
  bbox = bbox.astype(jnp.float32)
  box_height, box_width = bbox[2] - bbox[0], bbox[3] - bbox[1]
  ymin = jnp.clip(bbox[0] - margin * box_height, 0.0, 1.0)
  xmin = jnp.clip(bbox[1] - margin * box_width, 0.0, 1.0)
  ymax = jnp.clip(bbox[2] + margin * box_height, 0.0, 1.0)
  xmax = jnp.clip(bbox[3] + margin * box_width, 0.0, 1.0)
  grown = jnp.stack([ymin * height, xmin * width, jnp.maximum((ymax - ymin) * height, 1.0),
                     jnp.maximum((xmax - xmin) * width, 1.0)])
  whole = jnp.array([0.0, 0.0, height, width], jnp.float32)
  return jnp.where(has_box, grown, whole)
