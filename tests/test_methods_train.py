"""The methods of issue 16 in the real trainer: each trains from its `methods_synthetic:smoke` run, and HTL's
class tree is rebuilt from the training split, saved with the checkpoint and restored on resume."""

import json
import pathlib
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxret import embedding
from jaxret import experiments
from jaxret import input_pipeline
from jaxret import samplers
from jaxret import samplers_htl
from jaxret import trainer
from jaxret import validation
from jaxret.losses import htl

REPO = pathlib.Path(__file__).resolve().parents[1]
SUITE = str(REPO / "configs" / "suites" / "methods_synthetic.py")
ISSUE_16_METHODS = ("multi_similarity", "proxy_anchor", "htl", "bier", "hdc", "abe", "grid", "capsule_margin")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.get_builder("synthetic_inshop/tiny", str(path))
  return str(path)


def smoke_config(name, data_dir, **changes):
  config = experiments.load_config(experiments.load_suite(f"{SUITE}:smoke")[name])
  config.data_dir = data_dir
  for field, value in changes.items():
    *parents, leaf = field.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def read_metrics(workdir):
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def test_every_method_of_the_suite_is_an_issue_16_method_or_older():
  assert set(ISSUE_16_METHODS) <= set(experiments.load_suite(SUITE))


def test_every_method_trains_in_the_trainer(tmp_path, data_dir):
  """All of them as one objective (one compile instead of eight): each term is logged and finite.

  Each method's own run is `python -m jaxret.experiments --suite configs/suites/methods_synthetic.py:smoke`
  (its configs are checked in tests/test_experiments.py); here the trainer runs every loss's code path.
  """
  config = smoke_config("bier", data_dir, total_steps=4, log_every=2, eval_every=4, checkpoint_every=4)
  config.loss.name = "+".join(ISSUE_16_METHODS)
  config.loss.hdc.level_dims = (128, 128, 112)  # As the suite's hdc run: the tiny model's 368 dimensions.
  result = trainer.train_and_evaluate(config, str(tmp_path / "all"))
  rows = [r for r in read_metrics(tmp_path / "all") if "loss" in r]
  assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
  for name in ISSUE_16_METHODS:
    values = [r[f"loss/{name}"] for r in rows]
    assert all(np.isfinite(values)), name
  assert 0 <= result["recall@1"] <= 1


def htl_tree(workdir, step):
  restored = ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step) / "default")
  return {key: np.asarray(value) for key, value in restored["loss_params"]["htl"].items()}


def test_htl_tree_is_rebuilt_saved_and_restored_and_feeds_the_anchor_neighbour_sampler(tmp_path, data_dir,
                                                                                       monkeypatch):
  config = smoke_config("htl", data_dir, **{"loss.htl.rebuild_every": 2, "total_steps": 6, "log_every": 2,
                                            "eval_every": 6, "checkpoint_every": 2,
                                            "input.sampler": "htl_anchor_neighbour"})
  samplers_used = []  # (first step, sampler) of every batch stream the trainer opens.
  original = input_pipeline.train_batches_from_config

  def recording(config, mode, split, sampler, mesh, *, first_step, **kwargs):
    samplers_used.append((first_step, sampler))
    return original(config, mode, split, sampler, mesh, first_step=first_step, **kwargs)

  monkeypatch.setattr(input_pipeline, "train_batches_from_config", recording)
  reference = tmp_path / "reference"
  trainer.train_and_evaluate(config, str(reference))
  # P x K until the first tree (step 2), then anchor-neighbour batches from each new tree (steps 2 and 4).
  assert [step for step, _ in samplers_used] == [0, 2, 4]
  assert isinstance(samplers_used[0][1].inner, samplers.PKSampler)
  for step, used in samplers_used[1:]:
    inner = used.inner  # Validation products are held out: the sampler draws from the other records.
    assert isinstance(inner, samplers_htl.AnchorNeighbourSampler)
    want = np.asarray(htl.nearest_classes(htl_tree(reference, step), inner.nearest_classes.shape[1]))
    np.testing.assert_array_equal(inner.nearest_classes, want)
    classes = inner.batch_classes(step)
    assert classes.shape == (2, 2) and len(set(classes.reshape(-1).tolist())) == 4
    assert len(used.batch_records(step)) == config.input.batch_size

  # The tree of step 2's checkpoint is htl.rebuild of the step-2 model's embeddings of the training records.
  tree = htl_tree(reference, 2)
  assert tree["thresholds"].max() > 0 and tree["class_spread"].max() > 0  # No longer the empty tree.
  embedder = embedding.Embedder(str(reference))  # Its latest checkpoint: step 6.
  assert embedder.step == 6
  embeddings, index, _ = embedder.embed_split("train")
  tree_6 = htl_tree(reference, 6)
  num_classes = tree_6["class_means"].shape[0]
  # Class indices as the trainer's sampler gives them: products of the training records in sorted order.
  held = validation.hold_out_products(index.item_ids, config.input.validation_products, config.seed)
  records = held.train_records
  _, class_index = np.unique(index.item_ids[records], return_inverse=True)
  assert class_index.max() + 1 == num_classes
  want = htl.rebuild(embeddings[records], class_index, num_classes, config.loss.htl.num_levels)
  for key in ("thresholds", "class_spread", "class_counts", "node_of_class"):
    np.testing.assert_allclose(tree_6[key], np.asarray(want[key]), rtol=1e-4, atol=1e-5, err_msg=key)

  # Killed after step 4: the rerun restores step 4's tree and ends where the reference did.
  resumed = tmp_path / "resumed"
  shutil.copytree(reference, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  samplers_used.clear()
  trainer.train_and_evaluate(config, str(resumed))
  assert [step for step, _ in samplers_used] == [4]  # Resumed from step 4's tree.
  assert read_metrics(resumed)[-2]["loss"] == pytest.approx(read_metrics(reference)[-2]["loss"], rel=1e-5)
  for key, value in htl_tree(reference, 6).items():
    np.testing.assert_allclose(htl_tree(resumed, 6)[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  assert read_metrics(resumed)[-1]["recall@1"] == pytest.approx(read_metrics(reference)[-1]["recall@1"])
