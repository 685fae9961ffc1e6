"""Multi-task heads on real runs: DenseNet121+OS+IS's smoke config, a capsule network with category and
attribute heads, the task metrics at evaluation, and the checks that refuse heads of the wrong size."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from jaxret import embedding
from jaxret import input_pipeline
from jaxret import models
from jaxret import run_config
from jaxret import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def config_of(name, arg="smoke"):
  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def rows_of(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.get_builder("synthetic_inshop/tiny", str(path))
  return str(path)


def test_densenet121_os_is_smoke_trains_both_paths_and_logs_category_accuracy(tmp_path, data_dir):
  config = config_of("inshop_densenet121_os_is")
  config.data_dir = data_dir
  assert config.model.pretrained is None and config.loss.name == "triplet+category"
  trainer.train_and_evaluate(config, str(tmp_path))
  rows = rows_of(tmp_path)
  losses_logged = [r for r in rows if "loss" in r]
  assert all(np.isfinite(r["loss/triplet"]) and np.isfinite(r["loss/category"]) for r in losses_logged)
  assert all(0 <= r["category/accuracy"] <= 1 for r in losses_logged)
  evals = [r for r in rows if "recall@1" in r]
  assert all(0 <= r["task/category_accuracy"] <= 1 for r in evals)
  # The relaxation module and the classifier are the model's "tasks" parameters.
  model = embedding.model_from_config(config)
  variables = embedding.init_variables(model, config)
  assert set(variables["params"]) == {"backbone", "head", "tasks"}
  assert {"relaxation_conv1", "relaxation_conv2", "category_classifier"} <= set(variables["params"]["tasks"])


def test_capsule_network_carries_category_and_attribute_heads_on_its_embedding():
  """The capsule networks take the task heads too (trained through the trainer by the OS+IS run above's code
  path; here the contract): logits on the embedding, parameters under "tasks"."""
  model = models.get_model("rccapsnet_tiny", num_categories=23, num_attributes=40)
  images = np.zeros((2, 32, 32, 3), np.float32)
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images)
  assert "tasks" in variables["params"]
  embedding_, aux = model.apply(variables, images)
  assert aux["category_logits"].shape == (2, 23) and aux["attribute_logits"].shape == (2, 40)
  assert variables["params"]["tasks"]["category_classifier"]["kernel"].shape == (embedding_.shape[1], 23)


def test_heads_of_the_wrong_size_are_refused_with_the_value_to_set(tmp_path, data_dir):
  config = config_of("demo")
  config.data_dir = data_dir
  config.model.num_categories = 13
  config.model.num_attributes = 7
  config.loss.name = "triplet+category"
  with pytest.raises(run_config.ConfigError) as error:
    trainer.train_and_evaluate(config, str(tmp_path))
  assert "set it to 23" in str(error.value) and "set it to 40" in str(error.value)


def test_task_heads_are_an_option_of_every_model_and_relaxation_needs_a_category_head():
  assert "num_categories" in models.model_fields("rccapsnet") and "feature_relaxation" in models.model_fields("vgg16")
  with pytest.raises(ValueError, match="set num_categories too"):
    models.get_model("resnet18_tiny", feature_relaxation=True)
  model = models.get_model("resnet18_tiny", num_categories=5, num_attributes=3)
  variables = model.init(jax.random.key(0), np.zeros((2, 32, 32, 3), np.float32))
  _, aux = model.apply(variables, np.zeros((2, 32, 32, 3), np.float32))
  assert aux["category_logits"].shape == (2, 5) and aux["attribute_logits"].shape == (2, 3)
