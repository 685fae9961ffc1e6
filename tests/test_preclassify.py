"""Pre-classification search (jaxret.preclassify) against Python loops in float64."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jaxret import metrics
from jaxret import preclassify


def ranks_oracle(queries, query_labels, query_categories, gallery, gallery_labels, gallery_categories):
  """For each query, walk the allowed gallery images in (distance, index) order; count until the first correct."""
  ranks = []
  for q, label, allowed_categories in zip(queries, query_labels, query_categories):
    allowed = [g for g in range(len(gallery)) if gallery_categories[g] >= 0
               and int(gallery_categories[g]) in {int(c) for c in allowed_categories}]
    order = sorted(allowed, key=lambda g: (float(np.sum((np.float64(q) - np.float64(gallery[g])) ** 2)), g))
    rank = next((i for i, g in enumerate(order) if gallery_labels[g] == label), len(gallery))
    ranks.append(rank)
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

