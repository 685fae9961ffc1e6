"""configs/deepfashion2_resnet50.py:smoke end to end on the synthetic consumer-to-shop data: box crops in
training and evaluation, DeepFashion2's metric logged (against Recall@K, its second source here), and the
`--detections` evaluation against the ground-truth boxes written as a detections file."""

import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from jaxret import decoded_cache
from jaxret import evaluation
from jaxret import garment_evaluation
from jaxret import input_pipeline
from jaxret import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(data_dir):
  spec = importlib.util.spec_from_file_location("df2", REPO / "configs" / "deepfashion2_resnet50.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.data_dir = str(data_dir)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  workdir = tmp_path_factory.mktemp("run")
  config = smoke_config(data_dir)
  assert config.input.dataset == "synthetic_inshop/c2s_tiny" and config.input.crop_to_box
  trainer.train_and_evaluate(config, str(workdir))
  return config, data_dir, workdir


def ground_truth_detections(config, data_dir, splits=("query", "gallery"), category_shift=0):
  """The garments' true boxes as a detections file: pixels of the stored photo, 1-based categories."""
  builder = input_pipeline.get_builder(config.input.dataset, str(data_dir))
  images = {}
  for split in splits:
    source = input_pipeline.read_split(builder, split)
    split_index = input_pipeline.open_decoded_split(config, builder, split, pixels=False).index
    for record in range(len(source)):
      with Image.open(io.BytesIO(source[record]["image"])) as photo:
        width, height = photo.size
      ymin, xmin, ymax, xmax = (float(v) for v in split_index.features["bbox"][record])
      name = str(split_index.image_names[record])
      images.setdefault(name, []).append({"box": [xmin * width, ymin * height, xmax * width, ymax * height],
                                          "score": 0.9,
                                          "category_id": (int(split_index.categories[record]) + category_shift) % 23 + 1})
  return {"box_format": "x1y1x2y2", "images": images}


def test_smoke_run_logs_deepfashion2_accuracy_equal_to_recall(trained):
  _, _, workdir = trained
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in rows if "recall@1" in r][-1]
  # One garment per photo and every garment of a product matching: top-k accuracy is Recall@K.
  assert last["df2/top@1"] == pytest.approx(last["recall@1"])
  assert last["df2/top@20"] == pytest.approx(last["recall@20"])
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_detections_of_the_true_boxes_score_as_the_ground_truth(trained, tmp_path):
  config, data_dir, workdir = trained
  path = tmp_path / "detections.json"
  path.write_text(json.dumps(ground_truth_detections(config, data_dir)))
  result = evaluation.evaluate_run(config, str(workdir), detections=str(path))
  for k in (1, 5, 10, 20):
    assert result[f"df2_detections/top@{k}"] == pytest.approx(result[f"df2/top@{k}"])
  # Detections of the wrong class never stand for a garment: every query is a miss.
  path.write_text(json.dumps(ground_truth_detections(config, data_dir, splits=("query",), category_shift=1)))
  result = evaluation.evaluate_run(config, str(workdir), detections=str(path))
  assert result["df2_detections/top@20"] == 0.0


def test_a_bad_detections_file_is_refused_by_the_command_line(trained, tmp_path):
  _, data_dir, workdir = trained
  path = tmp_path / "detections.json"
  path.write_text(json.dumps({"box_format": "x1y1x2y2", "images": {"no/such/image.jpg": []}}))
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
  completed = subprocess.run(
      [sys.executable, "-m", "jaxret.train", "--config", f"{REPO}/configs/deepfashion2_resnet50.py:smoke",
       "--workdir", str(workdir), f"--config.data_dir={data_dir}", "--eval_only", "--detections", str(path)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert completed.returncode != 0
  assert "error:" in completed.stderr and "no/such/image.jpg" in completed.stderr, completed.stderr


def test_nearest_gallery_matches_a_sort_and_pads_a_small_gallery():
  rng = np.random.default_rng(0)
  queries, gallery = rng.normal(size=(7, 5)), rng.normal(size=(30, 5))
  got = garment_evaluation.nearest_gallery(queries, gallery, metric="euclidean", chunk=4)
  distances = ((queries[:, None] - gallery[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(got, np.argsort(distances, axis=1, kind="stable")[:, :20])
  small = garment_evaluation.nearest_gallery(queries, gallery[:3], metric="cosine")
  assert small.shape == (7, 20) and (small[:, 3:] == -1).all() and set(small[0, :3]) == {0, 1, 2}


def test_ground_truth_reads_deepfashion2_fields_or_falls_back_to_products():
  bbox = np.array([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.4, 0.4]], np.float32)
  df2 = decoded_cache.index_from_labels({
      "item_id": np.array([5, 6, 7]), "category": np.array([0, 1, 2]),
      "image_name": np.array(["b.jpg", "a.jpg", "b.jpg"]), "bbox": bbox,
      "style": np.array([1, 0, 2]), "pair_id": np.array([9, 9, 4])})
  truth = garment_evaluation.ground_truth(df2)
  np.testing.assert_allclose(truth.boxes[0], [0.2, 0.1, 0.6, 0.5])  # (x1, y1, x2, y2)
  np.testing.assert_array_equal(truth.image_ids, [1, 0, 1])  # garments of one photo share it
  np.testing.assert_array_equal(truth.styles, [1, 0, 2])
  np.testing.assert_array_equal(truth.pair_ids, [9, 9, 4])
  inshop = decoded_cache.index_from_labels({
      "item_id": np.array([5, 6, 7]), "category": np.array([0, 1, 2]),
      "image_name": np.array(["x", "y", "z"]), "bbox": bbox})
  truth = garment_evaluation.ground_truth(inshop)
  np.testing.assert_array_equal(truth.styles, [1, 1, 1])
  np.testing.assert_array_equal(truth.pair_ids, [5, 6, 7])
