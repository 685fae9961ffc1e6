"""Tests of the synthetic In-shop dataset: the renderer, the split layout and the TFDS builder (`tiny`)."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import inshop_features
from data_prep import synthetic_inshop
from data_prep.synthetic_inshop import __main__ as cli
from data_prep.synthetic_inshop import garments
from data_prep.synthetic_inshop import preview
from data_prep.synthetic_inshop import synthetic_inshop as builder_lib

_REPO = pathlib.Path(__file__).resolve().parents[1]
# img/<GENDER>/<Category>/id_<8 digits>/<NN>_<view number>_<view type>.jpg
_NAME = re.compile(r"^img/(WOMEN|MEN)/([A-Za-z_]+)/id_(\d{8})/(\d{2})_(\d)_(front|side|back|full|additional)"
                   r"\.jpg$")
_TINY = next(c for c in synthetic_inshop.BUILDER_CONFIGS if c.name == "tiny")


def _load_bench():
  spec = importlib.util.spec_from_file_location("colour_histogram_baseline",
                                                _REPO / "bench" / "colour_histogram_baseline.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _build(config, data_dir) -> synthetic_inshop.SyntheticInshop:
  builder = synthetic_inshop.SyntheticInshop(config=config, data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder


def _read(builder, split: str, decode: bool = True) -> list[dict]:
  decoders = None if decode else {"image": tfds.decode.SkipDecoding()}
  source = builder.as_data_source(split=split, decoders=decoders)
  return [source[i] for i in range(len(source))]


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  _build("tiny", data_dir)
  return data_dir


@pytest.fixture(scope="module")
def tiny_splits(tiny_dir):
  """Every example of every split, read back the way the trainer reads it (`tfds.data_source`)."""
  splits = {}
  for split in inshop_features.SPLITS:
    source = tfds.data_source("synthetic_inshop/tiny", data_dir=str(tiny_dir), split=split)
    splits[split] = [source[i] for i in range(len(source))]
  return splits


def test_split_sizes_and_features(tiny_splits):
  expected = {"train": _TINY.num_train_images, "query": _TINY.num_query_images,
              "gallery": _TINY.num_gallery_images}
  for split, examples in tiny_splits.items():
    assert len(examples) == expected[split], split
    for example in examples:
      assert set(example) == {"image", "image_name", "item_id", "category", "bbox", "has_bbox", "clothes_type",
                              "pose_type", "landmarks", "has_landmarks", "attributes", "has_attributes"}
      assert example["has_bbox"] and example["has_landmarks"] and example["has_attributes"]
      assert example["image"].dtype == np.uint8
      assert example["image"].shape == (_TINY.image_size, _TINY.image_size, 3)
      assert 0 <= int(example["category"]) < len(inshop_features.CATEGORY_NAMES)
  items = {split: {int(e["item_id"]) for e in examples} for split, examples in tiny_splits.items()}
  assert len(items["train"]) == _TINY.num_train_items
  assert len(items["query"]) == _TINY.num_test_items


def test_train_and_test_items_disjoint_and_every_test_item_in_query_and_gallery(tiny_splits):
  items = {split: {int(e["item_id"]) for e in examples} for split, examples in tiny_splits.items()}
  assert not items["train"] & (items["query"] | items["gallery"])
  assert items["query"] == items["gallery"]


def test_image_names_follow_inshop_layout(tiny_splits):
  names = []
  for examples in tiny_splits.values():
    for example in examples:
      name = _text(example["image_name"])
      match = _NAME.match(name)
      assert match, name
      category = f"{match.group(1)}/{match.group(2)}"
      assert inshop_features.CATEGORY_NAMES.index(category) == int(example["category"]), name
      assert int(match.group(3)) == int(example["item_id"]), name
      assert int(match.group(5)) == garments.VIEW_NUMBERS[match.group(6)], name
      names.append(name)
  assert len(set(names)) == len(names)
  # Every product keeps one category across its images.
  categories = {}
  for examples in tiny_splits.values():
    for example in examples:
      categories.setdefault(int(example["item_id"]), set()).add(int(example["category"]))
  assert all(len(c) == 1 for c in categories.values())


def test_rebuild_writes_the_same_jpeg_bytes_with_or_without_workers(tiny_dir, tmp_path):
  # Same settings under another name, rendered by two worker processes instead of in-process.
  parallel = dataclasses.replace(_TINY, name="tiny_parallel", num_workers=2)
  first = synthetic_inshop.SyntheticInshop(config="tiny", data_dir=str(tiny_dir))
  second = _build(parallel, tmp_path)
  for split in inshop_features.SPLITS:
    a = {_text(e["image_name"]): (e["image"], int(e["item_id"])) for e in _read(first, split, decode=False)}
    b = {_text(e["image_name"]): (e["image"], int(e["item_id"])) for e in _read(second, split, decode=False)}
    assert a == b, split


def test_prepared_folder_with_other_settings_is_refused(tiny_dir, tmp_path):
  copy = tmp_path / "tfds"
  shutil.copytree(tiny_dir, copy)
  metadata = copy / "synthetic_inshop" / "tiny" / "2.0.0" / "metadata.json"
  stored = json.loads(metadata.read_text())
  stored["settings"]["seed"] += 1
  metadata.write_text(json.dumps(stored))
  with pytest.raises(ValueError, match="other settings"):
    synthetic_inshop.SyntheticInshop(config="tiny", data_dir=str(copy))
  with pytest.raises(ValueError, match="other settings"):
    tfds.data_source("synthetic_inshop/tiny", data_dir=str(copy), split="query")
  # The unchanged folder is reused without complaint.
  synthetic_inshop.SyntheticInshop(config="tiny", data_dir=str(tiny_dir)).download_and_prepare()


def test_colour_histogram_baseline_on_tiny_is_far_from_perfect(tiny_splits):
  bench = _load_bench()
  query = np.stack([e["image"] for e in tiny_splits["query"]])
  gallery = np.stack([e["image"] for e in tiny_splits["gallery"]])
  query_ids = np.array([int(e["item_id"]) for e in tiny_splits["query"]])
  gallery_ids = np.array([int(e["item_id"]) for e in tiny_splits["gallery"]])
  recall = bench.recall_at_k(bench.rgb_histograms(query), query_ids, bench.rgb_histograms(gallery), gallery_ids,
                             ks=(1, len(gallery_ids)), distance=bench.l1)
  assert recall[1] <= 0.6
  assert recall[len(gallery_ids)] == 1.0  # every query's product is somewhere in the gallery


def test_recall_at_k_matches_python_loop():
  bench = _load_bench()
  rng = np.random.default_rng(0)
  query, gallery = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
  query_ids, gallery_ids = rng.integers(0, 4, 7), rng.integers(0, 4, 11)
  ks = (1, 3, 11)
  for distance in (None, bench.l1):
    got = bench.recall_at_k(query, query_ids, gallery, gallery_ids, ks, distance=distance, chunk=3)
    for k in ks:
      hits = 0
      for q in range(len(query)):
        if distance is None:
          d = [float(np.sum((query[q] - g) ** 2)) for g in gallery]
        else:
          d = [float(np.sum(np.abs(query[q] - g))) for g in gallery]
        nearest = sorted(range(len(gallery)), key=lambda j: (d[j], j))[:k]
        hits += any(gallery_ids[j] == query_ids[q] for j in nearest)
      assert got[k] == pytest.approx(hits / len(query)), (distance, k)


def test_rgb_histograms_sum_to_one_and_count_colours():
  bench = _load_bench()
  image = np.zeros((1, 4, 4, 3), np.uint8)
  image[0, :2] = (255, 0, 0)  # top half red
  hist = bench.rgb_histograms(image, bins=2)
  assert hist.shape == (1, 8)
  np.testing.assert_allclose(hist.sum(1), 1.0)
  np.testing.assert_allclose(hist[0, [0, 4]], [0.5, 0.5])  # black is code 0, red (1, 0, 0) is code 4


@pytest.mark.parametrize("category", range(len(inshop_features.CATEGORY_NAMES)))
def test_render_every_category_and_view_type(category):
  seen_types = set()
  for seed in range(4):
    product = garments.sample_product(np.random.default_rng([seed, category]), category)
    assert product.category == category and product.kind in garments.KINDS
    for index in range(5):
      view = garments.sample_view(np.random.default_rng([seed, category, index]), product)
      seen_types.add(view.view_type)
      for size, supersample in ((32, 2), (48, 1)):
        image = garments.render(product, view, size, supersample)
        assert image.dtype == np.uint8 and image.shape == (size, size, 3)
        assert image.std() > 3.0  # something was drawn over the background
      np.testing.assert_array_equal(garments.render(product, view, 32), garments.render(product, view, 32))
  assert len(seen_types) >= 3


def test_every_view_type_renders():
  product = garments.sample_product(np.random.default_rng(0), 3)
  view = garments.sample_view(np.random.default_rng(0), product)
  for view_type in garments.VIEW_TYPES:
    for on_model in (False, True):
      image = garments.render(product, dataclasses.replace(view, view_type=view_type, on_model=on_model), 32)
      assert image.shape == (32, 32, 3) and image.std() > 3.0


def test_products_of_one_category_share_its_palette():
  difficulty = garments.Difficulty(palette_size=3, colour_jitter=0.0)
  style = garments.CATEGORY_STYLES[3]
  allowed = {garments.COLOURS[name] for name in style.palette[:3]}
  for seed in range(20):
    product = garments.sample_product(np.random.default_rng(seed), 3, difficulty)
    assert product.main in allowed


def test_split_layout_of_inshop_config_matches_the_real_split_sizes():
  config = next(c for c in synthetic_inshop.BUILDER_CONFIGS if c.name == "inshop")
  layout = builder_lib.split_layout(config)
  assert len(layout["train"]) == 3997 and len(layout["query"]) == len(layout["gallery"]) == 3985
  assert sum(i.num_views for i in layout["train"]) == 25882
  assert sum(i.num_views for i in layout["query"]) == 14218
  assert sum(i.num_views for i in layout["gallery"]) == 12612
  assert min(i.num_views for split in layout.values() for i in split) >= 1
  train_ids = {i.item_id for i in layout["train"]}
  test_ids = {i.item_id for i in layout["query"]}
  assert not train_ids & test_ids and train_ids | test_ids == set(range(1, 7983))
  # Gallery views follow the query views of the same item, so no image is in both.
  for query, gallery in zip(layout["query"], layout["gallery"]):
    assert query.item_id == gallery.item_id and gallery.first_view == query.num_views
  counts = np.bincount([i.category for split in ("train", "query") for i in layout[split]])
  assert counts.max() - counts.min() <= 1  # categories balanced over all items


def test_bad_settings_raise_with_the_field_named():
  with pytest.raises(ValueError, match="query"):
    synthetic_inshop.SyntheticInshopConfig(name="bad", num_test_items=10, num_query_images=5)
  with pytest.raises(ValueError, match="palette_size"):
    garments.Difficulty(palette_size=0)
  with pytest.raises(ValueError, match="view_weights"):
    garments.Difficulty(view_weights=(1.0, 0.0))
  with pytest.raises(ValueError, match="category"):
    garments.sample_product(np.random.default_rng(0), len(inshop_features.CATEGORY_NAMES))


def test_contact_sheet_has_a_row_per_product_and_a_column_per_view():
  sheet = preview.contact_sheet(_TINY, num_products=2, num_views=3, zoom=1)
  size = _TINY.image_size
  assert sheet.dtype == np.uint8
  assert sheet.shape[0] == 2 * (size + 2) + 2
  assert sheet.shape[1] == 150 + 3 * (size + 2) + 2


def test_c2s_contact_sheet_shows_street_and_shop_rows_with_annotations():
  config = next(c for c in synthetic_inshop.BUILDER_CONFIGS if c.name == "c2s_tiny")
  plain = preview.contact_sheet(config, num_products=1, num_views=2, zoom=1)
  annotated = preview.contact_sheet(config, num_products=1, num_views=2, zoom=1, annotations=True)
  assert plain.shape == annotated.shape == (2 * (config.image_size + 2) + 2, 150 + 2 * (config.image_size + 2) + 2, 3)
  boxes = np.all(annotated == (255, 0, 0), axis=-1) & ~np.all(plain == (255, 0, 0), axis=-1)
  assert boxes[:config.image_size + 2].any() and boxes[config.image_size + 2:].any()  # a box in both rows


def test_importing_the_package_registers_the_builder(tmp_path):
  assert tfds.builder_cls("synthetic_inshop") is synthetic_inshop.SyntheticInshop
  builder = tfds.builder("synthetic_inshop/tiny", data_dir=str(tmp_path))
  assert builder.builder_config is _TINY
  assert builder.info.file_format.value == "array_record"
  assert not builder.is_prepared()


def test_command_prepares_a_config(tmp_path, capsys):
  cli.main(["--config", "tiny", "--data_dir", str(tmp_path)])
  assert "train 96" in capsys.readouterr().out
  assert len(tfds.data_source("synthetic_inshop/tiny", data_dir=str(tmp_path), split="gallery")) == 24


def test_workers_that_cannot_start_fail_with_advice(tmp_path):
  # Spawned workers re-import the main script; without a __main__ guard they die while starting.
  script = tmp_path / "unguarded.py"
  script.write_text("from data_prep import synthetic_inshop\n"
                    f"synthetic_inshop.SyntheticInshop(config='tiny', data_dir={str(tmp_path)!r}, "
                    "num_workers=2).download_and_prepare()\n")
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(_REPO)})
  assert result.returncode != 0
  assert "__name__" in result.stderr and "num_workers=0" in result.stderr


# ---- Annotations ----

def _products_and_views(count: int):
  """(product, view) pairs over every category, view type and occluder kind."""
  pairs = []
  for i in range(count):
    category = i % len(inshop_features.CATEGORY_NAMES)
    product = garments.sample_product(np.random.default_rng([i, 11]), category)
    view = garments.sample_view(np.random.default_rng([i, 12]), product)
    pairs.append((product, view))
  return pairs


def _silhouette_box(product, view, image_size, supersample):
  """Oracle: the bounding box of the silhouette's pixels, drawn with PIL at the supersampled size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  size = image_size * supersample
  polygons = garments.garment_polygons(product, view.arm_angle, view.leg_spread)
  matrix, offset = garments._frame(polygons, view, size)  # pylint: disable=protected-access
  mask = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(mask)
  for polygon in polygons:
    draw.polygon([tuple(q) for q in (polygon @ matrix.T + offset).tolist()], fill=255)
  ys, xs = np.nonzero(np.asarray(mask))
  if not len(xs):
    return None
  return (xs.min() / supersample, ys.min() / supersample, (xs.max() + 1) / supersample,
          (ys.max() + 1) / supersample)


def test_true_box_bounds_the_drawn_silhouette():
  for product, view in _products_and_views(46):
    annotations = garments.annotate(product, view, 64, 2)
    oracle = _silhouette_box(product, view, 64, 2)
    if oracle is None:  # the garment is outside the frame (a close-up of the background)
      continue
    # Rasterisation rounds polygon edges to whole pixels of the supersampled image: within 1 of them.
    np.testing.assert_allclose(annotations.bbox, oracle, atol=1.0, err_msg=f"{product.kind} {view.view_type}")


def test_landmarks_fill_the_slots_of_the_clothes_type_and_lie_in_the_box():
  seen_types = set()
  for product, view in _products_and_views(92):
    annotations = garments.annotate(product, view, 64, 2)
    landmarks = annotations.landmarks
    present = np.flatnonzero(landmarks[:, 0] != inshop_features.LANDMARK_ABSENT)
    assert tuple(present) == inshop_features.LANDMARK_SLOTS[annotations.clothes_type]
    seen_types.add(annotations.clothes_type)
    x1, y1, x2, y2 = annotations.bbox
    for visibility, x, y in landmarks[present]:
      inside = 0 <= x < 64 and 0 <= y < 64
      assert (visibility == inshop_features.TRUNCATED) == (not inside)
      if inside:  # every landmark is a point of the silhouette
        assert x1 - 1e-4 <= x <= x2 + 1e-4 and y1 - 1e-4 <= y <= y2 + 1e-4
  assert seen_types == {1, 2, 3}


def test_landmark_under_the_occluder_is_occluded_and_outside_the_image_truncated():
  product = garments.sample_product(np.random.default_rng(0), 13)  # WOMEN/Tees_Tanks: a top.
  view = dataclasses.replace(garments.sample_view(np.random.default_rng(0), product), view_type="front",
                             occluder="none", flip=False, rotation=0.0)
  clear = garments.annotate(product, view, 64)
  assert set(clear.landmarks[clear.landmarks[:, 0] >= 0, 0]) == {inshop_features.VISIBLE}
  _, x, y = clear.landmarks[0]  # left collar
  for occluder in ("box", "blob"):
    hidden = garments.annotate(product, dataclasses.replace(
        view, occluder=occluder, occluder_box=(x / 64, y / 64, 0.05, 0.05)), 64)
    assert hidden.landmarks[0, 0] == inshop_features.OCCLUDED
    assert hidden.landmarks[6, 0] == inshop_features.VISIBLE  # the hem is far from it
  moved = garments.annotate(product, dataclasses.replace(view, shift=(0.0, 0.6)), 64)
  assert moved.landmarks[6, 0] == inshop_features.TRUNCATED  # the hem falls below the image
  assert moved.bbox[3] == 64.0  # the box is clipped to the image


def test_attributes_mark_one_value_per_group():
  names = garments.ATTRIBUTE_NAMES
  groups = {}
  for index, name in enumerate(names):
    groups.setdefault(name.split(":")[0], []).append(index)
  assert set(groups) == {"pattern", "sleeve", "neckline", "colour"}
  for product, _ in _products_and_views(46):
    attributes = garments.product_attributes(product)
    assert attributes.dtype == np.int8 and attributes.shape == (len(names),)
    for group, indices in groups.items():
      values = attributes[indices]
      if group in ("sleeve", "neckline") and product.kind in garments.BOTTOM_KINDS:
        assert not values.any(), (group, product.kind)  # not applicable
      else:
        assert sorted(values) == [-1] * (len(indices) - 1) + [1], (group, product.kind)
    assert attributes[names.index(f"pattern:{product.pattern}")] == 1
  assert garments.colour_family(garments.COLOURS["burgundy"]) == "red"
  assert garments.colour_family((60, 96, 170)) == "blue"


def test_pose_types_follow_the_view():
  view = garments.sample_view(np.random.default_rng(0), garments.sample_product(np.random.default_rng(0), 0))
  expected = {("front", True): 1, ("side", True): 2, ("back", True): 3, ("full", True): 4,
              ("additional", True): 5, ("additional", False): 5, ("front", False): 6, ("back", False): 6}
  for (view_type, on_model), code in expected.items():
    assert garments.pose_type(dataclasses.replace(view, view_type=view_type, on_model=on_model)) == code


def test_annotation_features_are_the_real_builders():
  from data_prep.deepfashion_inshop import builder as inshop_builder  # pylint: disable=g-import-not-at-top
  real = tfds.features.FeaturesDict(inshop_builder.features())
  synthetic = synthetic_inshop.SyntheticInshop(config="tiny", data_dir="/nonexistent").info.features
  assert set(real.keys()) == set(synthetic.keys())
  for name in real:
    if name != "attributes":  # the synthetic vocabulary is its own (names in the metadata)
      assert repr(real[name]) == repr(synthetic[name]), name
  assert synthetic["attributes"].shape == (len(garments.ATTRIBUTE_NAMES),)


def test_tiny_annotations_read_back_in_image_units(tiny_dir):
  builder = synthetic_inshop.SyntheticInshop(config="tiny", data_dir=str(tiny_dir))
  assert builder.info.metadata["attribute_names"] == list(garments.ATTRIBUTE_NAMES)
  layout = builder_lib.split_layout(_TINY)["gallery"][0]
  product, views = builder_lib.product_and_views(_TINY, layout)
  index, view = views[0]
  name = builder_lib.image_name(layout, index, view.view_type)
  example = next(e for e in _read(builder, "gallery", decode=False) if _text(e["image_name"]) == name)
  truth = garments.annotate(product, view, _TINY.image_size, _TINY.supersample)
  x1, y1, x2, y2 = (v / _TINY.image_size for v in truth.bbox)
  np.testing.assert_allclose(example["bbox"], [y1, x1, y2, x2], rtol=1e-6)
  present = truth.landmarks[:, 0] >= 0
  np.testing.assert_allclose(example["landmarks"][present, 1:], truth.landmarks[present, 1:] / _TINY.image_size,
                             rtol=1e-6)
  np.testing.assert_array_equal(example["landmarks"][~present], [[-1, 0, 0]] * int((~present).sum()))
  np.testing.assert_array_equal(example["attributes"], garments.product_attributes(product))
  assert (example["clothes_type"], example["pose_type"]) == (truth.clothes_type, truth.pose_type)


# ---- The consumer-to-shop variant ----

_C2S_TINY = next(c for c in synthetic_inshop.BUILDER_CONFIGS if c.name == "c2s_tiny")


@pytest.fixture(scope="module")
def c2s_splits(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds_c2s")
  _build("c2s_tiny", data_dir)
  return {split: [s[i] for i in range(len(s))]
          for split in inshop_features.SPLITS
          for s in [tfds.data_source("synthetic_inshop/c2s_tiny", data_dir=str(data_dir), split=split)]}


def _box_sides(examples):
  boxes = np.stack([e["bbox"] for e in examples])
  return np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])


def test_c2s_queries_are_small_cluttered_occluded_and_gallery_is_clean(c2s_splits):
  query, gallery = c2s_splits["query"], c2s_splits["gallery"]
  lo, hi = _C2S_TINY.consumer_photos.garment_scale
  # The garment's longer side is the drawn scale (the box is clipped, so it may be smaller, never larger).
  assert np.all(_box_sides(query) <= hi + 0.02)
  assert np.median(_box_sides(query)) >= lo - 0.02
  # Shop photos are framed on the garment (short garments, such as shorts, fill less than the frame).
  assert np.all(_box_sides(gallery) >= 0.6) and np.median(_box_sides(gallery)) >= 0.85
  # Off-centre: the box centres of queries spread; gallery boxes are centred.
  centres = lambda ex: np.stack([(e["bbox"][:2] + e["bbox"][2:]) / 2 for e in ex])
  assert np.abs(centres(query) - 0.5).max() > 0.15
  np.testing.assert_allclose(centres(gallery), 0.5, atol=0.06)
  # Occluders hide landmarks in queries only.
  occluded = lambda ex: sum(int((e["landmarks"][:, 0] == inshop_features.OCCLUDED).any()) for e in ex)
  assert occluded(query) >= len(query) // 4 and occluded(gallery) == 0
  # Clutter: the background outside the box varies far more in queries than in the studio gallery.
  def background_std(example):
    image = example["image"].astype(np.float32)
    size = image.shape[0]
    ymin, xmin, ymax, xmax = (np.asarray(example["bbox"]) * size).round().astype(int)
    outside = np.ones((size, size), bool)
    outside[max(0, ymin - 4):ymax + 4, max(0, xmin - 4):xmax + 4] = False
    return image[outside].std() if outside.any() else 0.0
  assert np.median([background_std(e) for e in query]) > 2 * np.median([background_std(e) for e in gallery])


def test_c2s_has_the_in_shop_features_and_splits(c2s_splits):
  assert {split: len(e) for split, e in c2s_splits.items()} == {"train": 96, "query": 24, "gallery": 24}
  assert set(c2s_splits["query"][0]) == set(c2s_splits["gallery"][0]) == set(c2s_splits["train"][0])
  items = {split: {int(e["item_id"]) for e in examples} for split, examples in c2s_splits.items()}
  assert items["query"] == items["gallery"] and not items["train"] & items["query"]
  # Train mixes consumer photos (small garments) with shop photos.
  sides = _box_sides(c2s_splits["train"])
  assert (sides < 0.58).sum() >= 20 and (sides > 0.6).sum() >= 20


def test_c2s_views_start_from_the_same_base_views():
  """A consumer or shop photo keeps its view's lighting and pose, so the two variants share products."""
  small = next(c for c in synthetic_inshop.BUILDER_CONFIGS if c.name == "tiny")
  item = builder_lib.split_layout(_C2S_TINY)["query"][0]
  product_c2s, views_c2s = builder_lib.product_and_views(_C2S_TINY, item)
  product, views = builder_lib.product_and_views(small, item)
  assert product_c2s == product
  for (_, base), (_, photo) in zip(views, views_c2s):
    assert (photo.brightness, photo.flip, photo.noise_seed) == (base.brightness, base.flip, base.noise_seed)
    assert photo.background == "clutter"


def test_consumer_photo_settings_are_checked():
  with pytest.raises(ValueError, match="garment_scale"):
    garments.ConsumerPhotos(garment_scale=(0.6, 0.3))
  with pytest.raises(ValueError, match="occlusion_prob"):
    garments.ConsumerPhotos(occlusion_prob=1.5)
