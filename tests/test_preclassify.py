"""Pre-classification search (jaxret.preclassify) against Python loops in float64."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxret import embedding
from jaxret import evaluation
from jaxret import input_pipeline
from jaxret import metrics
from jaxret import preclassify
from jaxret import run_config
from jaxret import sharding
from jaxret import workdir as run_dir


def ranks_oracle(queries, query_labels, query_categories, gallery, gallery_labels, gallery_categories, miss=None):
  """For each query, walk the allowed gallery images in (distance, index) order; count until the first correct
  (`miss`, default G, when there is none)."""
  gallery = np.float64(gallery)
  ranks = []
  for q, label, allowed_categories in zip(queries, query_labels, query_categories):
    distances = np.sum((np.float64(q)[None, :] - gallery) ** 2, axis=1)
    allowed = [g for g, category in enumerate(gallery_categories) if category >= 0 and category in allowed_categories]
    order = sorted(allowed, key=lambda g: (distances[g], g))
    ranks.append(next((i for i, g in enumerate(order) if gallery_labels[g] == label),
                      len(gallery) if miss is None else miss))
  return np.array(ranks)


def grid_data(seed, num_queries=37, num_gallery=53, num_categories=5):
  """Integer-grid embeddings (exact float32 distances, many exact ties) with products inside categories."""
  rng = np.random.default_rng(seed)
  gallery = rng.integers(0, 4, size=(num_gallery, 3)).astype(np.float32)
  gallery_labels = rng.integers(0, 12, num_gallery)
  category_of_product = rng.integers(0, num_categories, 13)
  gallery_categories = category_of_product[gallery_labels]
  gallery_categories[::11] = -1  # unknown categories: never searched
  queries = rng.integers(0, 4, size=(num_queries, 3)).astype(np.float32)
  query_labels = rng.integers(0, 13, num_queries)  # label 12 is never in the gallery: a miss
  scores = rng.normal(size=(num_queries, num_categories)).astype(np.float32)
  return queries, query_labels, scores, gallery, gallery_labels, gallery_categories


def test_category_scores_prefers_the_classifier_and_falls_back_to_capsule_lengths():
  logits, lengths = jnp.ones((2, 3)), jnp.zeros((2, 4))
  assert preclassify.category_scores({"category_logits": logits, "capsule_lengths": lengths}).shape == (2, 3)
  assert preclassify.category_scores({"capsule_lengths": lengths, "features": jnp.ones((2, 8))}).shape == (2, 4)
  with pytest.raises(preclassify.NoCategoryScoresError, match="config.model.num_categories"):
    preclassify.category_scores({"features": jnp.ones((2, 8))})


def test_top_categories_orders_by_score_and_breaks_ties_by_id():
  scores = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, -1.0, 2.0, 0.0]], np.float32)
  np.testing.assert_array_equal(preclassify.top_categories(scores, 1), [[1], [0]])
  np.testing.assert_array_equal(preclassify.top_categories(scores, 3), [[1, 3, 2], [0, 2, 3]])
  with pytest.raises(ValueError, match="between 1 and"):
    preclassify.top_categories(scores, 5)
  with pytest.raises(ValueError, match="between 1 and"):
    preclassify.top_categories(scores, 0)


def test_allowed_gallery_matches_a_loop():
  query_categories = np.array([[2, 0], [1, 3], [4, 4]])
  gallery_categories = np.array([0, 1, 2, 3, -1, 2])
  want = [[gc >= 0 and gc in set(row) for gc in gallery_categories] for row in query_categories]
  np.testing.assert_array_equal(preclassify.allowed_gallery(query_categories, gallery_categories), want)


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("chunk_size", [4, 128])
def test_ranks_match_the_oracle(k, chunk_size):
  queries, query_labels, scores, gallery, gallery_labels, gallery_categories = grid_data(seed=k)
  top = np.asarray(preclassify.top_categories(scores, k))
  got = preclassify.preclassified_ranks(queries, query_labels, top, gallery, gallery_labels, gallery_categories,
                                        chunk_size=chunk_size)
  want = ranks_oracle(queries, query_labels, top, gallery, gallery_labels, gallery_categories)
  np.testing.assert_array_equal(got, want)
  assert (want == len(gallery)).any() and (want < len(gallery)).any()  # both hits and misses are tested


def test_all_categories_allowed_is_the_unrestricted_ranking():
  queries, query_labels, scores, gallery, gallery_labels, gallery_categories = grid_data(seed=7)
  gallery_categories = np.abs(gallery_categories)  # every category known
  top = preclassify.top_categories(scores, scores.shape[1])
  got = preclassify.preclassified_ranks(queries, query_labels, top, gallery, gallery_labels, gallery_categories)
  np.testing.assert_array_equal(got, metrics.query_ranks(queries, query_labels, gallery, gallery_labels))


def test_cosine_ranks_match_the_oracle_on_normalised_embeddings():
  rng = np.random.default_rng(0)
  queries, gallery = rng.normal(size=(20, 6)), rng.normal(size=(30, 6))
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  query_labels, gallery_labels = rng.integers(0, 8, 20), rng.integers(0, 8, 30)
  top, gallery_categories = rng.permuted(np.tile(np.arange(4), (20, 1)), axis=1)[:, :2], rng.integers(0, 4, 30)
  got = preclassify.preclassified_ranks(queries.astype(np.float32), query_labels, top, gallery.astype(np.float32),
                                        gallery_labels, gallery_categories, metric="cosine")
  # On unit vectors 1 - cos = |q - g|^2 / 2 ranks as the squared distance.
  np.testing.assert_array_equal(got, ranks_oracle(queries, query_labels, top, gallery, gallery_labels,
                                                  gallery_categories))


def test_searched_fraction_and_top_k_accuracy_match_loops():
  query_categories = np.array([[2, 0], [1, 3], [4, 1]])
  gallery_categories = np.array([0, 1, 2, 3, -1, 2, 2, 1])
  want = [sum(gc >= 0 and gc in set(row) for gc in gallery_categories) / 8 for row in query_categories]
  np.testing.assert_allclose(preclassify.searched_fraction(query_categories, gallery_categories), want)
  assert preclassify.top_k_accuracy(query_categories, np.array([0, 2, 1])) == pytest.approx(2 / 3)


_SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jaxret import preclassify
data = np.load(sys.argv[1])
mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
ranks = preclassify.sharded_preclassified_ranks(data["q"], data["ql"], data["qc"], data["g"], data["gl"], data["gc"],
                                                data["gv"], mesh=mesh, chunk_size=16)
print(json.dumps({"devices": jax.device_count(), "ranks": np.asarray(ranks).tolist()}))
"""


def test_gallery_sharded_over_4_devices_gives_the_oracle_ranks(tmp_path):
  queries, query_labels, scores, gallery, gallery_labels, gallery_categories = grid_data(seed=3, num_gallery=64)
  num_valid = 57  # the last 7 rows are padding (one of them of an allowed category and at distance 0)
  gallery[num_valid] = queries[0]
  gallery_categories[num_valid] = 0
  valid = np.arange(64) < num_valid
  top = np.asarray(preclassify.top_categories(scores, 2))
  path = tmp_path / "data.npz"
  np.savez(path, q=queries, ql=query_labels, qc=top, g=gallery, gl=gallery_labels, gc=gallery_categories, gv=valid)
  completed = subprocess.run(
      [sys.executable, "-c", _SHARDED_SCRIPT, str(path)], capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  assert completed.returncode == 0, completed.stderr
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert result["devices"] == 4
  want = ranks_oracle(queries, query_labels, top, gallery[:num_valid], gallery_labels[:num_valid],
                      gallery_categories[:num_valid])
  got = np.array(result["ranks"])
  # A miss is ranked past the whole gallery: the padded size there, the valid size in the oracle.
  np.testing.assert_array_equal(np.where(got == 64, num_valid, got), want)



# The evaluation option (config.evals.preclassify_top_k) on the tiny synthetic dataset, untrained models.

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.get_builder("synthetic_inshop/tiny", str(path))
  return str(path)


def evaluator_of(data_dir, tmp_path, model=None, **evals):
  config = run_config.demo_config()
  config.input.dataset = "synthetic_inshop/tiny"
  config.model.update(model or {"name": "rccapsnet_tiny"})
  config.data_dir = data_dir
  config.input.cache_dir = str(tmp_path / "cache")
  config.input.image_size = 32
  config.evals.batch_size = 16
  config.evals.update(evals)
  run_config.validate(config, device_count=1)
  model = embedding.model_from_config(config)
  builder = input_pipeline.get_builder(config.input.dataset, data_dir)
  mesh = sharding.data_mesh()
  return evaluation.Evaluator(config, builder, model, mesh), embedding.init_variables(model, config)


def test_evaluation_matches_the_oracle_with_known_and_predicted_gallery_categories(data_dir, tmp_path):
  for gallery in preclassify.GALLERY_CATEGORIES:
    evaluator, variables = evaluator_of(data_dir, tmp_path, preclassify_top_k=2, preclassify_gallery=gallery)
    _, _, _, more = evaluator(variables)
    query, gallery_emb = (evaluator.embed_split(variables, split) for split in ("query", "gallery"))
    scores = {split: np.asarray(evaluator._category_scores_of_split(variables, split))[
        :len(evaluator.indexes[split])] for split in ("query", "gallery")}
    top = np.argsort(-scores["query"], axis=1, kind="stable")[:, :2]
    gallery_categories = (evaluator.indexes["gallery"].categories if gallery == "known"
                          else np.argmax(scores["gallery"], axis=1))
    ranks = ranks_oracle(query, evaluator.indexes["query"].item_ids, top, gallery_emb,
                         evaluator.indexes["gallery"].item_ids, gallery_categories, miss=np.inf)
    for k in evaluator.config.evals.ks:
      assert more[f"preclassify/recall@{k}"] == pytest.approx(np.mean(ranks < k), abs=1e-12), (gallery, k)
    want_fraction = np.mean([np.isin(gallery_categories, row).mean() for row in top])
    assert more["preclassify/gallery_fraction"] == pytest.approx(want_fraction)
    assert more["preclassify/category_accuracy"] == pytest.approx(
        np.mean([c in row for c, row in zip(evaluator.indexes["query"].categories, top)]))


def test_every_category_allowed_gives_the_unrestricted_recall(data_dir, tmp_path):
  evaluator, variables = evaluator_of(data_dir, tmp_path, preclassify_top_k=23)
  recalls, _, _, more = evaluator(variables)
  assert more["preclassify/gallery_fraction"] == 1.0
  assert {k: more[f"preclassify/recall@{k}"] for k in recalls} == recalls


def test_a_classifier_head_is_read_and_a_model_without_one_is_refused(data_dir, tmp_path):
  with pytest.raises(run_config.ConfigError, match="config.model.num_categories"):
    evaluator_of(data_dir, tmp_path, {"name": "resnet18_tiny"}, preclassify_top_k=1)
  with pytest.raises(run_config.ConfigError, match="preclassify_top_k=24 asks for more categories than the 23"):
    evaluator_of(data_dir, tmp_path, preclassify_top_k=24)
  with pytest.raises(run_config.ConfigError, match="preclassify_gallery='guessed' must be one of"):
    evaluator_of(data_dir, tmp_path, preclassify_gallery="guessed")
  evaluator, variables = evaluator_of(data_dir, tmp_path, {"name": "resnet18_tiny", "num_categories": 5},
                                      preclassify_top_k=1)
  assert evaluator._category_scores_of_split(variables, "query").shape[1] == 5  # the head's logits
  _, _, _, more = evaluator(variables)
  assert 0 <= more["preclassify/recall@1"] <= 1 and 0 < more["preclassify/gallery_fraction"] < 1


def test_runs_stored_before_the_fields_existed_resume_and_turning_it_on_changes_no_run():
  config = json.loads(run_config.base_config().to_json())
  stored = json.loads(json.dumps(config))
  del stored["evals"]["preclassify_top_k"], stored["evals"]["preclassify_gallery"]
  assert run_dir.config_changes(stored, config) == ([], [])
  config["evals"].update(preclassify_top_k=2, preclassify_gallery="predicted")
  assert run_dir.config_changes(stored, config) == (
      [], ["evals.preclassify_gallery: 'known' -> 'predicted'", "evals.preclassify_top_k: 0 -> 2"])
  config = run_config.base_config()
  config.evals.preclassify_top_k = -1  # (ml_collections refuses a float or a bool for this int field itself)
  with pytest.raises(run_config.ConfigError, match="preclassify_top_k=-1 must be a whole number"):
    run_config.validate(config, device_count=1)
