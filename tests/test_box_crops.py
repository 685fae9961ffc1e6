"""Box crops (`config.input.crop_to_box`): evaluation crops exactly, training crops inside the box, the batch
features that carry the boxes, and a training run on the consumer-to-shop data with crops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret import augment
from jaxret import decoded_cache
from jaxret import input_pipeline
from jaxret import trainer
from jaxret.models import input_conventions


def random_image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def normalized(pixels):
  """The float64 model input of uint8 pixels (ImageNet convention)."""
  mean = np.array(input_conventions.IMAGENET.mean)
  std = np.array(input_conventions.IMAGENET.std)
  return (pixels.astype(np.float64) / 255.0 - mean) / std


@pytest.mark.parametrize("margin,expected_rows,expected_cols", [
    (0.0, slice(8, 24), slice(4, 20)),  # The box exactly.
    (0.25, slice(4, 28), slice(0, 24)),  # Grown by 4 pixels on each side (clipped on the left).
])
def test_evaluation_crops_exactly_to_the_grown_box(margin, expected_rows, expected_cols):
  image = random_image(32, 32)
  bbox = np.array([[8 / 32, 4 / 32, 24 / 32, 20 / 32]], np.float32)  # ymin, xmin, ymax, xmax
  size = expected_rows.stop - expected_rows.start
  got = augment.eval_images(image[None], size, bbox=bbox, has_bbox=np.array([True]), box_margin=margin)
  crop = image[expected_rows, expected_cols]
  np.testing.assert_allclose(np.asarray(got[0], np.float64), normalized(crop), atol=1e-5)


def test_evaluation_without_a_box_embeds_the_whole_image():
  image = random_image(16, 16, seed=1)
  got = augment.eval_images(image[None], 16, bbox=np.array([[0.2, 0.2, 0.4, 0.4]], np.float32),
                            has_bbox=np.array([False]), box_margin=0.1)
  np.testing.assert_allclose(np.asarray(got[0], np.float64), normalized(image), atol=1e-5)


def test_training_crop_is_inside_the_box_and_is_the_box_without_randomness():
  image = random_image(40, 40, seed=2)
  bbox = np.array([10 / 40, 12 / 40, 30 / 40, 32 / 40], np.float32)  # a 20 x 20 box
  fixed = augment.Augmentation(image_size=20, crop_scale=(1.0, 1.0), aspect_range=(1.0, 1.0), color_jitter=0.0,
                               crop_to_box=True, box_margin=0.0)
  keys = augment.image_keys(0, jnp.int32(0), 8)
  got = augment.train_images(np.repeat(image[None], 8, 0), keys, fixed, np.repeat(bbox[None], 8, 0),
                             np.ones(8, bool))
  crop = normalized(image[10:30, 12:32])
  for b in range(8):  # Each is the box, flipped or not.
    picture = np.asarray(got[b], np.float64)
    assert min(np.abs(picture - crop).max(), np.abs(picture - crop[:, ::-1]).max()) < 1e-5

  region = augment.box_region(jnp.asarray(bbox), jnp.bool_(True), 0.1, 40, 40)
  random = augment.Augmentation(image_size=16, crop_scale=(0.2, 1.0), crop_to_box=True, box_margin=0.1)
  for seed in range(50):
    draws = augment.draw(jax.random.key(seed), random)
    top, left, height, width = np.asarray(augment.crop_in_region(draws, region), np.float64)
    r_top, r_left, r_height, r_width = np.asarray(region, np.float64)
    assert r_top - 1e-4 <= top and top + height <= r_top + r_height + 1e-4
    assert r_left - 1e-4 <= left and left + width <= r_left + r_width + 1e-4
    assert height >= 1 and width >= 1


def test_whole_image_region_draws_the_same_crop_as_before():
  """Without boxes, training crops are what `crop_box` always drew (runs without crops are unchanged)."""
  whole = jnp.array([0.0, 0.0, 48.0, 40.0])
  augmentation = augment.Augmentation(image_size=16, crop_scale=(0.3, 1.0))
  for seed in range(30):
    draws = augment.draw(jax.random.key(seed), augmentation)
    np.testing.assert_array_equal(np.asarray(augment.crop_in_region(draws, whole)).astype(np.int32),
                                  np.asarray(augment.crop_box(draws, 48, 40)))


def test_a_degenerate_box_is_at_least_one_pixel():
  region = augment.box_region(jnp.array([0.5, 0.5, 0.5, 0.5]), jnp.bool_(True), 0.1, 32, 32)
  assert float(region[2]) >= 1 and float(region[3]) >= 1
  out = augment.eval_images(random_image(32, 32)[None], 8, bbox=np.array([[0.5, 0.5, 0.5, 0.5]], np.float32),
                            has_bbox=np.array([True]))
  assert np.isfinite(np.asarray(out)).all()


def index_with(**features):
  n = 4
  labels = {"item_id": np.arange(n), "category": np.zeros(n, np.int64), "image_name": np.array(["a"] * n),
            **features}
  return decoded_cache.index_from_labels(labels)


def test_feature_columns_fill_a_missing_mask_and_convert_dtypes():
  index = index_with(bbox=np.zeros((4, 4), np.float64), attributes=np.ones((4, 3), np.int8))
  columns = input_pipeline.feature_columns(index, ("bbox", "has_bbox", "attributes"))
  assert columns["bbox"].dtype == np.float32 and columns["has_bbox"].dtype == bool and columns["has_bbox"].all()
  assert columns["attributes"].dtype == np.int8


def test_a_run_needing_a_feature_the_dataset_lacks_is_refused_with_its_reason():
  index = index_with()
  needs = {"bbox": "config.input.crop_to_box", "has_bbox": "config.input.crop_to_box"}
  with pytest.raises(input_pipeline.MissingFeatureError, match=r"'bbox' \(for config.input.crop_to_box\)"):
    trainer.check_batch_features(index, needs, "some_dataset")
  with pytest.raises(input_pipeline.MissingFeatureError, match="'bbox'"):
    input_pipeline.feature_columns(index, ("bbox",))


def test_eval_batches_carry_the_boxes_and_pad_them():
  index = index_with(bbox=np.tile(np.array([0.1, 0.2, 0.3, 0.4], np.float32), (4, 1)),
                     has_bbox=np.array([True, False, True, True]))
  split = decoded_cache.DecodedSplit("x", index, np.zeros((4, 8, 8, 3), np.uint8))
  batches = list(input_pipeline.eval_batches(split, global_batch=3, features=input_pipeline.BOX_FEATURES))
  assert [b["bbox"].shape for b in batches] == [(3, 4), (3, 4)]
  np.testing.assert_array_equal(np.concatenate([b["has_bbox"] for b in batches]),
                                [True, False, True, True, False, False])
  np.testing.assert_array_equal(batches[1]["valid"], [True, False, False])
