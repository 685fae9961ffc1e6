"""FashionNet (issue 20 item 2): landmark pooling against a NumPy loop, the landmarks loss against a float64
loop (value and gradient), landmarks through the training crop and flip against the augmented pixels, the
model's branches, VGG-16 weight import, and `configs/inshop_fashionnet.py:smoke` in the real trainer."""

import doctest
import importlib.util
import json
import pathlib

import backbone_reference as reference  # tests/ is on sys.path under pytest.
import chex
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxret import augment
from jaxret import landmark_augment
from jaxret import losses
from jaxret import models
from jaxret import trainer
from jaxret.models import import_weights
from jaxret.models import landmark_pooling

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_doctests():
  for module in (landmark_pooling, landmark_augment):
    assert doctest.testmod(module).failed == 0


# --- Landmark pooling ------------------------------------------------------------------------------------------


def pool_oracle(feature_map, locations, visible, window):
  """Python loops: the max over the window's cells inside the map, 0 where not visible."""
  batch, height, width, channels = feature_map.shape
  out = np.zeros((batch, locations.shape[1], channels))
  radius = window // 2
  for b in range(batch):
    for l in range(locations.shape[1]):
      if not visible[b, l]:
        continue
      x, y = locations[b, l]
      row = min(max(int(np.floor(y * height)), 0), height - 1)
      column = min(max(int(np.floor(x * width)), 0), width - 1)
      cells = [feature_map[b, i, j] for i in range(row - radius, row + radius + 1)
               for j in range(column - radius, column + radius + 1) if 0 <= i < height and 0 <= j < width]
      out[b, l] = np.max(cells, axis=0)
  return out


# (x, y) of hand-picked landmarks: centre, the four corners, on the edge of a cell, outside the image (a
# truncated landmark), and just inside the last cell.
LOCATIONS = [[0.5, 0.5], [0.0, 0.0], [0.999, 0.0], [0.0, 0.999], [1.0, 1.0], [0.4, 0.2], [-0.3, 1.4],
             [0.83, 0.61]]


@pytest.mark.parametrize("window", [1, 3, 5])
def test_landmark_pool_matches_loop_at_borders_and_gates(window):
  rng = np.random.default_rng(window)
  feature_map = rng.normal(size=(2, 5, 6, 4)).astype(np.float32)  # h != w: rows and columns not swapped
  locations = np.array([LOCATIONS, LOCATIONS[::-1]], np.float32)
  visible = rng.random((2, len(LOCATIONS))) < 0.7
  visible[0, :3] = True
  visible[1, 0] = False
  got = jax.jit(landmark_pooling.landmark_pool, static_argnums=3)(feature_map, locations, visible, window)
  chex.assert_shape(got, (2, len(LOCATIONS), 4))
  np.testing.assert_array_equal(np.asarray(got), pool_oracle(feature_map, locations, visible, window))
  assert np.all(np.asarray(got)[~visible] == 0)


def test_landmark_pool_gradient_goes_to_each_windows_maximum_of_visible_landmarks():
  rng = np.random.default_rng(0)
  feature_map = rng.normal(size=(2, 5, 6, 3))  # distinct values: every maximum is unique
  locations = np.array([LOCATIONS, LOCATIONS[::-1]], np.float32)
  visible = rng.random((2, len(LOCATIONS))) < 0.6
  grad = jax.grad(lambda f: jnp.sum(landmark_pooling.landmark_pool(f, locations, visible, 3)))(
      jnp.asarray(feature_map, jnp.float32))
  expected = np.zeros_like(feature_map)  # each visible window adds 1 at the cell of its maximum, per channel
  for b in range(2):
    for l in range(len(LOCATIONS)):
      if not visible[b, l]:
        continue
      x, y = locations[b, l]
      row, column = min(max(int(np.floor(y * 5)), 0), 4), min(max(int(np.floor(x * 6)), 0), 5)
      for c in range(3):
        cells = [(i, j) for i in range(row - 1, row + 2) for j in range(column - 1, column + 2)
                 if 0 <= i < 5 and 0 <= j < 6]
        i, j = max(cells, key=lambda cell: feature_map[b, cell[0], cell[1], c])
        expected[b, i, j, c] += 1
  np.testing.assert_array_equal(np.asarray(grad), expected)
  check_grads(lambda f: landmark_pooling.landmark_pool(f, locations, visible, 3),
              (jnp.asarray(feature_map, jnp.float32),), order=1, modes=("rev",), eps=1e-3)


def test_landmark_pool_refuses_bad_windows_and_shapes():
  feature_map, locations, visible = np.zeros((1, 4, 4, 2)), np.zeros((1, 3, 2)), np.ones((1, 3), bool)
  for window in (0, 2, -1):
    with pytest.raises(ValueError, match="odd number of cells"):
      landmark_pooling.landmark_pool(feature_map, locations, visible, window)
  with pytest.raises(ValueError, match="locations must be"):
    landmark_pooling.landmark_pool(feature_map, np.zeros((1, 3, 3)), visible)
  with pytest.raises(ValueError, match="visible must be"):
    landmark_pooling.landmark_pool(feature_map, locations, np.ones((1, 2), bool))


# --- The landmarks loss ----------------------------------------------------------------------------------------

# Ground truth `(visibility, x, y)` rows of 3 images x 4 slots: every code (visible 0, occluded 1, truncated 2
# with a position outside the image, absent -1); image 2 is not annotated (`has_landmarks` False).
LANDMARKS = np.array([
    [[0, 0.2, 0.3], [1, 0.7, 0.3], [2, 1.2, 0.5], [-1, 0.0, 0.0]],
    [[0, 0.5, 0.5], [0, 0.6, 0.9], [-1, 0.0, 0.0], [1, 0.1, 0.8]],
    [[0, 0.4, 0.4], [0, 0.3, 0.2], [0, 0.1, 0.1], [0, 0.9, 0.9]],
], np.float32)
HAS_LANDMARKS = np.array([True, True, False])


def loss_oracle(locations, logits, landmarks, has_landmarks, visibility_weight):
  """float64 loops over the hand-listed slots."""
  squared, cross_entropies, correct = [], [], []
  for b in range(landmarks.shape[0]):
    if not has_landmarks[b]:
      continue
    for l in range(landmarks.shape[1]):
      code = int(landmarks[b, l, 0])
      if code < 0:
        continue
      if code == 0:
        squared.append((locations[b, l, 0] - landmarks[b, l, 1]) ** 2 + (locations[b, l, 1] - landmarks[b, l, 2]) ** 2)
      target = min(code, logits.shape[-1] - 1)
      z = logits[b, l].astype(np.float64)
      cross_entropies.append(np.log(np.sum(np.exp(z))) - z[target])
      correct.append(np.argmax(z) == target)
  location = np.sum(squared) / max(len(squared), 1)
  visibility = np.sum(cross_entropies) / max(len(cross_entropies), 1)
  return location + visibility_weight * visibility, location, visibility, np.mean(correct)


@pytest.mark.parametrize("states", [3, 2])
def test_landmarks_loss_matches_loop_value_and_gradient(states):
  rng = np.random.default_rng(states)
  locations = rng.random((3, 4, 2))
  logits = rng.normal(size=(3, 4, states))
  loss = losses.get_loss("landmarks")
  assert loss.batch_features == ("landmarks", "has_landmarks")
  batch = {"landmarks": LANDMARKS, "has_landmarks": HAS_LANDMARKS}

  def value(locations, logits):
    outputs = {"embedding": jnp.zeros((3, 2)), "landmark_locations": locations, "visibility_logits": logits}
    return loss(None, outputs, batch, loss.options_from({"visibility_weight": 0.5}))

  (total, metrics) = jax.jit(value)(jnp.asarray(locations, jnp.float32), jnp.asarray(logits, jnp.float32))
  expected = loss_oracle(locations, logits, LANDMARKS, HAS_LANDMARKS, 0.5)
  np.testing.assert_allclose(float(total), expected[0], rtol=1e-5)
  np.testing.assert_allclose(float(metrics["location"]), expected[1], rtol=1e-5)
  np.testing.assert_allclose(float(metrics["visibility"]), expected[2], rtol=1e-5)
  np.testing.assert_allclose(float(metrics["visibility_accuracy"]), expected[3], rtol=1e-6)

  # The gradient against central differences of the float64 loop.
  grads = jax.grad(lambda p, z: value(p, z)[0], argnums=(0, 1))(jnp.asarray(locations, jnp.float32),
                                                                 jnp.asarray(logits, jnp.float32))
  for argnum, point in enumerate((locations, logits)):
    numeric = np.zeros_like(point)
    for index in np.ndindex(point.shape):
      step = np.zeros_like(point)
      step[index] = 1e-6
      args_plus = [locations, logits]
      args_minus = [locations, logits]
      args_plus[argnum] = point + step
      args_minus[argnum] = point - step
      numeric[index] = (loss_oracle(*args_plus, LANDMARKS, HAS_LANDMARKS, 0.5)[0] -
                        loss_oracle(*args_minus, LANDMARKS, HAS_LANDMARKS, 0.5)[0]) / 2e-6
    np.testing.assert_allclose(np.asarray(grads[argnum]), numeric, atol=1e-5)
  # Slots without a target get no gradient: absent ones, unannotated images, non-visible locations.
  assert np.all(np.asarray(grads[0])[2] == 0) and np.all(np.asarray(grads[1])[2] == 0)
  assert np.all(np.asarray(grads[0])[0, 1:] == 0) and np.all(np.asarray(grads[1])[0, 3] == 0)


def test_landmarks_loss_without_annotations_is_zero_and_finite():
  outputs = {"landmark_locations": jnp.full((2, 4, 2), 0.5), "visibility_logits": jnp.zeros((2, 4, 3))}
  batch = {"landmarks": LANDMARKS[:2], "has_landmarks": np.array([False, False])}
  loss = losses.get_loss("landmarks")
  value, _ = loss(None, outputs, batch, loss.defaults())
  assert float(value) == 0.0
  grads = jax.grad(lambda o: loss(None, o, batch, loss.defaults())[0])(outputs)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_landmarks_loss_names_what_is_missing():
  loss = losses.get_loss("landmarks")
  batch = {"landmarks": LANDMARKS, "has_landmarks": HAS_LANDMARKS}
  with pytest.raises(ValueError, match="config.model.name='fashionnet'"):
    loss(None, {"embedding": jnp.zeros((3, 2))}, batch, loss.defaults())
  with pytest.raises(ValueError, match="number of landmarks"):
    loss(None, {"landmark_locations": jnp.zeros((3, 8, 2)), "visibility_logits": jnp.zeros((3, 8, 3))}, batch,
         loss.defaults())


# --- Landmarks through the training crop and flip --------------------------------------------------------------


def blob_image(size, row, column):
  """`[size, size, 3]` uint8 black with a white 3x3 blob centred on pixel (row, column)."""
  image = np.zeros((size, size, 3), np.uint8)
  image[row - 1:row + 2, column - 1:column + 2] = 255
  return image


@pytest.mark.parametrize("crop_to_box", [False, True])
def test_augmented_landmarks_follow_the_augmented_pixels(crop_to_box):
  size, out = 48, 48
  augmentation = augment.Augmentation(image_size=out, crop_scale=(0.6, 1.0), color_jitter=0.0,
                                      crop_to_box=crop_to_box, box_margin=0.1)
  row, column = 26, 22
  image = blob_image(size, row, column)
  landmarks = np.full((8, 3), [-1.0, 0.0, 0.0], np.float32)
  landmarks[0] = [0, (column + 0.5) / size, (row + 0.5) / size]  # the centre of the blob's middle pixel
  count = 16
  keys = augment.image_keys(0, jnp.asarray(3), count)
  bbox = np.tile(np.array([[0.2, 0.25, 0.9, 0.8]], np.float32), (count, 1))
  has_bbox = np.ones(count, bool)
  pixels = augment.train_images(np.repeat(image[None], count, 0), keys, augmentation,
                                bbox if crop_to_box else None, has_bbox if crop_to_box else None)
  mapped = np.asarray(landmark_augment.augmented_landmarks(
      landmarks[None].repeat(count, 0), keys, augmentation, size, size, bbox if crop_to_box else None,
      has_bbox if crop_to_box else None))
  flips = [bool(augment.draw(k, augmentation).flip) for k in keys]
  assert any(flips) and not all(flips)
  for b in range(count):
    slot = 1 if flips[b] else 0  # a flipped left collar is a right collar
    assert mapped[b, slot, 0] == 0 and np.all(mapped[b, [s for s in range(8) if s != slot], 0] == -1)
    brightness = np.asarray(pixels[b]).sum(-1)
    brightness = brightness - brightness.min()
    # The blob's centre of brightness in the augmented image is the mapped landmark (the resampling filter is
    # symmetric, so it keeps the centre of the symmetric blob).
    centre_x = np.sum(brightness * (np.arange(out)[None, :] + 0.5)) / np.sum(brightness)
    centre_y = np.sum(brightness * (np.arange(out)[:, None] + 0.5)) / np.sum(brightness)
    assert abs(mapped[b, slot, 1] * out - centre_x) <= 0.25, (b, mapped[b, slot], centre_x)
    assert abs(mapped[b, slot, 2] * out - centre_y) <= 0.25, (b, mapped[b, slot], centre_y)


def test_landmarks_leaving_the_crop_become_truncated():
  rows = np.array([[0, 0.1, 0.5], [1, 0.9, 0.5], [2, 0.5, 0.5], [-1, 0.0, 0.0], [1, 0.5, 0.5], [0, 0.5, 0.05],
                   [0, 0.5, 0.5], [0, 0.5, 0.5]], np.float32)
  got = np.asarray(landmark_augment.landmarks_in_crop(rows, np.array([10, 20, 80, 60]), False, 100, 100))
  np.testing.assert_array_equal(got[:, 0], [2, 2, 2, -1, 1, 2, 0, 0])  # truncated stays truncated
  np.testing.assert_allclose(got[0, 1:], [(10 - 20) / 60, (50 - 10) / 80], rtol=1e-6)
  flipped = np.asarray(landmark_augment.landmarks_in_crop(rows, np.array([10, 20, 80, 60]), True, 100, 100))
  np.testing.assert_allclose(flipped[1], [got[0, 0], 1 - got[0, 1], got[0, 2]], rtol=1e-6)
  np.testing.assert_allclose(flipped[0], [got[1, 0], 1 - got[1, 1], got[1, 2]], rtol=1e-6)


# --- The model -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
  model = models.get_model("fashionnet_tiny", num_categories=5, num_attributes=7, landmark_window=1)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 3)), jnp.float32)
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images, train=False)
  return model, variables, images


def test_fashionnet_outputs_and_parameter_groups(tiny):
  model, variables, images = tiny
  assert set(variables["params"]) == {"backbone", "head", "tasks"}
  assert model.batch_inputs == ("landmarks", "has_landmarks") == trainer.model_batch_inputs(model)
  embedding, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  chex.assert_shape(embedding, (3, 64))
  np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0, rtol=1e-5)
  chex.assert_shape([aux["landmark_locations"], aux["visibility_logits"], aux["category_logits"],
                     aux["attribute_logits"], aux["features"]], [(3, 8, 2), (3, 8, 3), (3, 5), (3, 7), (3, 32)])
  # At evaluation it pools where it predicts, keeping what it predicts visible.
  np.testing.assert_array_equal(aux["pooled_landmarks"], aux["landmark_locations"])
  np.testing.assert_array_equal(aux["pooled_visible"], np.argmax(aux["visibility_logits"], -1) == 0)


def test_fashionnet_pools_at_ground_truth_in_training_and_its_local_branch_counts(tiny):
  model, variables, images = tiny
  rng = np.random.default_rng(1)
  landmarks = np.concatenate([rng.integers(-1, 3, (3, 8, 1)), rng.random((3, 8, 2))], -1).astype(np.float32)
  has_landmarks = np.array([True, False, True])
  apply = jax.jit(lambda v, x, lm, has: model.apply(v, x, train=True, landmarks=lm, has_landmarks=has))
  embedding, aux = apply(variables, images, landmarks, has_landmarks)
  embedding = np.asarray(embedding)
  _, predicted = model.apply(variables, images, train=False)
  pooled_at, kept = np.asarray(aux["pooled_landmarks"]), np.asarray(aux["pooled_visible"])
  np.testing.assert_array_equal(pooled_at[[0, 2]], landmarks[[0, 2], :, 1:])
  np.testing.assert_array_equal(kept[[0, 2]], landmarks[[0, 2], :, 0] == 0)
  np.testing.assert_array_equal(pooled_at[1], predicted["landmark_locations"][1])  # not annotated
  # Moving the visible landmarks moves the embedding of the annotated images only.
  moved = landmarks.copy()
  moved[..., 0] = 0
  moved[..., 1:] = 1.0 - landmarks[..., 1:]
  other = np.asarray(apply(variables, images, moved, has_landmarks)[0])
  assert not np.allclose(other[[0, 2]], embedding[[0, 2]])
  np.testing.assert_allclose(other[1], embedding[1], rtol=1e-6)
  with pytest.raises(ValueError, match="landmarks must be"):
    model.apply(variables, images, train=True, landmarks=landmarks[:, :6])


def test_fashionnet_takes_vgg16_weights_into_its_backbone(tiny, tmp_path):
  _, variables, _ = tiny
  state_dict = reference.random_state_dict({k: tuple(v) for k, v in
                                            reference.load_reference()["tiny"]["vgg16_tiny"]["layout"].items()})
  save_file(state_dict, str(tmp_path / "vgg16_tiny.safetensors"))
  loaded = import_weights.import_backbone("fashionnet_tiny", variables, tmp_path / "vgg16_tiny.safetensors")
  np.testing.assert_array_equal(loaded["params"]["backbone"]["features_28"]["kernel"],
                                state_dict["features.28.weight"].transpose(2, 3, 1, 0))
  chex.assert_trees_all_equal(loaded["params"]["head"], variables["params"]["head"])
  chex.assert_trees_all_equal(loaded["params"]["tasks"], variables["params"]["tasks"])
  assert not models.config_problems({"name": "fashionnet_tiny", "pretrained": str(tmp_path / "vgg16_tiny.safetensors")})


def test_fashionnet_options_are_checked():
  problems = models.config_problems({"name": "fashionnet", "landmark_window": 2})
  assert problems == ["config.model (fashionnet): landmark_window must be an odd number of cells >= 1; got 2."]
  with pytest.raises(ValueError, match="num_visibility_states must be >= 2"):
    models.get_model("fashionnet_tiny", num_visibility_states=1)


# --- The config's smoke run in the real trainer ---------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jaxret import input_pipeline  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.get_builder("synthetic_inshop/tiny", str(path))
  return str(path)


def test_inshop_fashionnet_smoke_trains_every_loss_term(tmp_path, data_dir):
  """`python -m jaxret.train --config configs/inshop_fashionnet.py:smoke`: triplet, category, attributes and
  landmarks on the synthetic data's landmarks and attributes."""
  spec = importlib.util.spec_from_file_location("inshop_fashionnet", REPO / "configs" / "inshop_fashionnet.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  full = module.get_config()
  assert (full.model.name, full.model.num_categories, full.model.num_attributes) == ("fashionnet", 23, 463)
  assert full.loss.name == "triplet+category+attributes+landmarks"
  config = module.get_config("smoke")
  config.data_dir = data_dir
  assert config.model.name == "fashionnet_tiny" and config.model.pretrained is None
  result = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in rows if "loss" in r]
  assert logged and all(np.isfinite(r["loss"]) for r in logged)
  assert any(any(key.startswith("landmarks") for key in r) for r in logged), logged[-1].keys()
  assert 0 <= result["recall@1"] <= 1
  last = [r for r in rows if "recall@1" in r][-1]  # The task heads are scored at every evaluation.
  assert 0 <= last["task/category_accuracy"] <= 1 and 0 <= last["task/attribute_map"] <= 1
