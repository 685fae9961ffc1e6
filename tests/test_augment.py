"""Augmentation on the device against a float64 NumPy oracle of the same crop box, flip and jitter."""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from jaxret import augment
from jaxret.models import input_conventions

AUGMENTATION = augment.Augmentation(image_size=24, crop_scale=(0.3, 0.9), color_jitter=0.3)
draw = jax.jit(augment.draw, static_argnums=1)  # Many small draws: one compiled call each.


def gradient_image(height=40, width=36) -> np.ndarray:
  """`[H, W, 3]` uint8: red grows left to right, green top to bottom, blue along the diagonal; so a crop changes
  the ranges, a flip reverses the red ramp, and brightness / contrast change every channel."""
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([np.round(255 * x / (width - 1)), np.round(255 * y / (height - 1)),
                   np.round(255 * (x + y) / (width + height - 2))], -1).astype(np.uint8)


def triangle_weights(in_size: int, start: float, length: float, out_size: int) -> np.ndarray:
  """`[out, in]` float64 weights of a box resampled with an antialiased triangle filter (PIL's bilinear)."""
  scale = out_size / length
  support = max(1.0 / scale, 1.0)
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    centre = start + (i + 0.5) / scale
    for j in range(in_size):
      weights[i, j] = max(0.0, 1.0 - abs(j + 0.5 - centre) / support)
    weights[i] /= weights[i].sum()
  return weights


def oracle_box(draws, height, width):
  area = height * width * float(draws.area_fraction)
  aspect = np.exp(float(draws.log_aspect))
  crop_w = int(np.clip(np.round(np.sqrt(area * aspect)), 1, width))
  crop_h = int(np.clip(np.round(np.sqrt(area / aspect)), 1, height))
  left = min(int(np.floor(float(draws.left_fraction) * (width - crop_w + 1))), width - crop_w)
  top = min(int(np.floor(float(draws.top_fraction) * (height - crop_h + 1))), height - crop_h)
  return top, left, crop_h, crop_w


def oracle_resize(image, box, size):
  top, left, height, width = box
  rows = triangle_weights(image.shape[0], top, height, size)
  cols = triangle_weights(image.shape[1], left, width, size)
  return np.einsum("ij,jkc,lk->ilc", rows, image.astype(np.float64), cols)


def oracle_augment(image, draws, augmentation, *, flip=None, jitter=True):
  """The augmentation in float64 from the same random numbers (`flip` / `jitter` override for contrasts)."""
  box = oracle_box(draws, *image.shape[:2])
  pixels = oracle_resize(image, box, augmentation.image_size) / 255.0
  if (bool(draws.flip) if flip is None else flip):
    pixels = pixels[:, ::-1]
  if jitter:
    mean = pixels.mean()
    pixels = np.clip((pixels * float(draws.brightness) - mean) * float(draws.contrast) + mean, 0.0, 1.0)
  return (pixels - np.array(augmentation.convention.mean)) / np.array(augmentation.convention.std)


def keys_with_flip(flip: bool, count: int = 2):
  """The first `count` keys (fold_in of key(0) with 0, 1, ...) whose draw flips (or not) with a visible crop."""
  found = []
  for i in range(100):
    key = jax.random.fold_in(jax.random.key(0), i)
    draws = draw(key, AUGMENTATION)
    box = oracle_box(draws, 40, 36)
    if bool(draws.flip) == flip and box[2:] != (40, 36) and abs(float(draws.brightness) - 1) > 0.05:
      found.append(key)
      if len(found) == count:
        return found
  raise AssertionError("no such key among 100")


@pytest.mark.parametrize("flip", [True, False])
def test_augmented_image_matches_the_numpy_oracle(flip):
  image = gradient_image()
  augment_image = jax.jit(augment.augment_image, static_argnums=2)
  for key in keys_with_flip(flip):
    draws = draw(key, AUGMENTATION)
    np.testing.assert_array_equal(augment.crop_box(draws, 40, 36), oracle_box(draws, 40, 36))
    got = np.asarray(augment_image(image, key, AUGMENTATION), np.float64)
    assert got.shape == (24, 24, 3)
    want = oracle_augment(image, draws, AUGMENTATION)
    np.testing.assert_allclose(got, want, atol=2e-4)
    # Each effect is visible: the other flip, no jitter, or the whole image instead of the crop are far off.
    assert np.abs(oracle_augment(image, draws, AUGMENTATION, flip=not flip) - want).max() > 1.0
    assert np.abs(oracle_augment(image, draws, AUGMENTATION, jitter=False) - want).max() > 0.1
    whole = ((oracle_resize(image, (0, 0, 40, 36), 24) / 255.0 - np.array(input_conventions.IMAGENET.mean))
             / np.array(input_conventions.IMAGENET.std))
    assert np.abs(oracle_augment(image, draws, AUGMENTATION, flip=False, jitter=False) - whole).max() > 0.2


def test_resize_box_matches_pil():
  """A second source for the resampling: PIL's bilinear resize of a box (PIL rounds to uint8)."""
  image = gradient_image()
  for box in [(3, 5, 30, 20), (0, 0, 40, 36), (10, 2, 12, 33), (1, 1, 4, 5)]:
    top, left, height, width = box
    got = np.asarray(augment.resize_box(jnp.asarray(image), jnp.asarray(box), 24))
    pil = np.asarray(Image.fromarray(image).resize((24, 24), Image.BILINEAR,
                                                  box=(left, top, left + width, top + height)), np.float64)
    np.testing.assert_allclose(got, pil, atol=1.0)  # One uint8 step.
    np.testing.assert_allclose(got, oracle_resize(image, box, 24), atol=1e-3)


def test_crop_boxes_cover_the_configured_area_and_aspect_ranges():
  keys = jax.random.split(jax.random.key(1), 400)
  draws = jax.jit(jax.vmap(augment.draw, in_axes=(0, None)), static_argnums=1)(keys, AUGMENTATION)
  boxes = np.asarray(jax.jit(jax.vmap(augment.crop_box, in_axes=(0, None, None)), static_argnums=(1, 2))(
      draws, 200, 180))
  top, left, height, width = boxes.T
  assert (top >= 0).all() and (left >= 0).all() and (top + height <= 200).all() and (left + width <= 180).all()
  area = height * width / (200 * 180)
  aspect = width / height
  # Rounding to whole pixels moves the area by at most a side's worth; clipping can only shrink it.
  assert area.min() > 0.3 - 0.02 and area.max() < 0.9 + 0.02
  assert area.min() < 0.35 and area.max() > 0.85  # The range is used, not a constant.
  unclipped = (height < 200) & (width < 180)
  assert (aspect[unclipped] > 3 / 4 - 0.03).all() and (aspect[unclipped] < 4 / 3 + 0.03).all()
  assert 0.4 < np.mean(np.asarray(draws.flip)) < 0.6
  assert len(set(map(tuple, boxes))) > 350


def test_batch_augmentation_uses_one_key_per_position_of_the_global_batch():
  image = gradient_image()
  images = np.stack([image] * 4)
  keys = augment.image_keys(seed=7, step=jnp.int32(3), batch_size=4)
  train_images = jax.jit(augment.train_images, static_argnums=2)
  batch = np.asarray(train_images(images, keys, AUGMENTATION))
  assert batch.shape == (4, 24, 24, 3) and batch.dtype == np.float32
  for position in range(4):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 4), 3), position)
    want = oracle_augment(image, draw(key, AUGMENTATION), AUGMENTATION)
    np.testing.assert_allclose(batch[position], want, atol=2e-4)
  # The same picture at four positions gets four different augmentations; another step, others again.
  assert min(np.abs(batch[i] - batch[j]).max() for i in range(4) for j in range(i)) > 0.1
  other_step = np.asarray(train_images(images, augment.image_keys(7, jnp.int32(4), 4), AUGMENTATION))
  assert np.abs(other_step - batch).max() > 0.1


def test_eval_images_resize_the_whole_image_and_normalise():
  image = gradient_image(32, 32)
  normalised = (image / 255.0 - np.array(input_conventions.IMAGENET.mean)) / np.array(input_conventions.IMAGENET.std)
  eval_images = jax.jit(augment.eval_images, static_argnums=(1, 2))
  same_size = np.asarray(eval_images(image[None], 32))[0]
  np.testing.assert_allclose(same_size, normalised, atol=1e-6)  # Resizing to its own size is the identity.
  quarter = input_conventions.InputConvention((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
  smaller = np.asarray(eval_images(image[None], 20, quarter))[0]
  np.testing.assert_allclose(smaller, (oracle_resize(image, (0, 0, 32, 32), 20) / 255.0 - 0.5) / 0.25, atol=1e-4)


def test_normalisation_follows_the_model_input_convention():
  """BGR conventions reorder the channels before `(x - mean) / std`, as `InputConvention.normalize` on the host."""
  pixels = np.random.default_rng(0).uniform(0, 1, (2, 5, 5, 3))
  caffe = input_conventions.InputConvention(mean=(104 / 255, 117 / 255, 123 / 255), std=(1 / 255,) * 3,
                                            channels="BGR")
  for convention in (input_conventions.IMAGENET, input_conventions.INCEPTION, caffe):
    ordered = pixels[..., ::-1] if convention.channels == "BGR" else pixels
    want = (ordered - np.array(convention.mean)) / np.array(convention.std)  # float64
    got = np.asarray(augment.normalize(jnp.asarray(pixels, jnp.float32), convention))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(convention.normalize(pixels), want, rtol=1e-5, atol=1e-4)
