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
      assert set(example) == {"image", "image_name", "item_id", "category"}
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
  metadata = copy / "synthetic_inshop" / "tiny" / "1.0.0" / "metadata.json"
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
