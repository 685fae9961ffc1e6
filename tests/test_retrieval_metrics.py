"""mAP@R, R-precision, precision@K and Recall@K per category against a NumPy oracle that sorts every ranking."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxret import metrics

KS = (1, 2, 5, 10)


def sq_distances(queries, gallery, metric="euclidean"):
  q = np.asarray(queries, np.float64)
  g = np.asarray(gallery, np.float64)
  if metric == "cosine":
    return 1 - (q @ g.T) / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(g, axis=1))
  return np.sum((q[:, None] - g[None]) ** 2, axis=-1)


def metrics_oracle(distances, query_labels, gallery_labels, ks, query_categories=None, category_names=None):
  """Float64 loop over queries: a stable argsort of each row, then every metric by its definition."""
  per_query = {name: [] for name in [f"recall@{k}" for k in ks] + [f"precision@{k}" for k in ks] +
               ["map@r", "r_precision"]}
  for i, row in enumerate(np.asarray(distances, np.float64)):
    relevant = gallery_labels[np.argsort(row, kind="stable")] == query_labels[i]
    num_relevant = int(relevant.sum())
    for k in ks:
      per_query[f"recall@{k}"].append(float(relevant[:k].any()))
      per_query[f"precision@{k}"].append(relevant[:k].sum() / k)
    if num_relevant == 0:
      per_query["map@r"].append(0.0)
      per_query["r_precision"].append(0.0)
      continue
    precisions = [relevant[:i + 1].sum() / (i + 1) for i in range(num_relevant) if relevant[i]]
    per_query["map@r"].append(sum(precisions) / num_relevant)
    per_query["r_precision"].append(relevant[:num_relevant].sum() / num_relevant)
  result = {name: float(np.mean(values)) for name, values in per_query.items()}
  if query_categories is not None:
    for category in sorted(set(query_categories.tolist())):
      name = str(category) if category_names is None else category_names[category]
      for k in ks:
        hits = [per_query[f"recall@{k}"][i] for i in range(len(query_labels)) if query_categories[i] == category]
        result[f"recall@{k}/{name}"] = float(np.mean(hits))
  return result


def clustered(rng, num_queries, num_gallery, dim, num_items=15, noise=0.9):
  centres = rng.normal(size=(num_items, dim))
  gallery_labels = rng.integers(0, num_items, num_gallery)
  query_labels = rng.integers(0, num_items + 1, num_queries)  # item num_items has no gallery image
  gallery = centres[gallery_labels] + noise * rng.normal(size=(num_gallery, dim))
  queries = centres[query_labels % num_items] + noise * rng.normal(size=(num_queries, dim))
  return queries.astype(np.float32), query_labels, gallery.astype(np.float32), gallery_labels


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("num_queries,num_gallery,chunk_size", [(37, 90, 16), (20, 300, 1024)])
def test_metrics_match_the_oracle(metric, num_queries, num_gallery, chunk_size):
  rng = np.random.default_rng(0)
  queries, query_labels, gallery, gallery_labels = clustered(rng, num_queries, num_gallery, 8)
  categories = rng.integers(0, 3, num_queries)
  names = ["dresses", "shirts", "denim"]
  got = metrics.retrieval_metrics(queries, query_labels, gallery, gallery_labels, KS, metric,
                                  query_categories=categories, category_names=names, chunk_size=chunk_size)
  want = metrics_oracle(sq_distances(queries, gallery, metric), query_labels, gallery_labels, KS, categories,
                        names)
  assert got == pytest.approx(want, abs=1e-12)
  assert set(got) == set(want)
  assert 0 < got["map@r"] < got["recall@10"] < 1  # neither trivial nor hopeless
  assert np.any(query_labels == 15)  # a query with no gallery image


def test_ties_are_broken_by_gallery_index():
  rng = np.random.default_rng(1)
  gallery = rng.integers(0, 3, size=(120, 2)).astype(np.float32)  # many exact ties
  queries = rng.integers(0, 3, size=(40, 2)).astype(np.float32)
  gallery_labels = rng.integers(0, 6, 120)
  query_labels = rng.integers(0, 6, 40)
  ks = (1, 3, 10, 40)
  got = metrics.retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks, chunk_size=16)
  assert got == pytest.approx(metrics_oracle(sq_distances(queries, gallery), query_labels, gallery_labels, ks),
                              abs=1e-12)
  # Zero distances of either sign are one tie: the correct image second among equals ranks second.
  distances = np.array([[0.0, -0.0, 1.0], [-0.0, 0.0, 1.0]], np.float32)
  relevance, _ = metrics.distance_relevance(distances, np.array([7, 5]), np.array([5, 7, 9]), depth=3)
  np.testing.assert_array_equal(relevance, [[False, True, False], [True, False, False]])


def test_hand_computed_values():
  # One query at 0; gallery at distances 1..6 along a line; its product at ranks 1, 3, 4 and 6 (R = 4).
  gallery = np.arange(1, 7, dtype=np.float32)[:, None]
  gallery_labels = np.array([3, 9, 3, 3, 9, 3])
  got = metrics.retrieval_metrics(np.zeros((1, 1), np.float32), np.array([3]), gallery, gallery_labels, (1, 2, 5))
  assert got["map@r"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 4) / 4)
  assert got["r_precision"] == pytest.approx(3 / 4)
  assert got["precision@2"] == pytest.approx(1 / 2)
  assert got["precision@5"] == pytest.approx(3 / 5)
  assert got["recall@1"] == 1.0
  # A query whose product is not in the gallery scores 0 everywhere (a miss, as in Recall@K).
  none = metrics.retrieval_metrics(np.zeros((1, 1), np.float32), np.array([4]), gallery, gallery_labels, (1, 2))
  assert all(value == 0.0 for value in none.values())


def test_padding_is_never_retrieved_nor_counted():
  distances = np.array([[0.0, 1.0, 2.0, 3.0]], np.float32)
  valid = np.array([False, True, True, False])
  relevance, num_positives = metrics.ranked_relevance(distances, np.array([3]), np.array([3, 4, 3, 3]), valid,
                                                      depth=5)
  np.testing.assert_array_equal(relevance, [[False, True, False, False, False]])
  assert int(num_positives[0]) == 1


def test_distance_matrix_path_equals_the_embedding_path():
  rng = np.random.default_rng(2)
  queries, query_labels, gallery, gallery_labels = clustered(rng, 29, 70, 4)
  distances = np.asarray(metrics.retrieval_distances(queries, gallery))
  categories = rng.integers(0, 2, 29)
  # chunk_size 8 does not divide 29: the last chunk overlaps the one before it.
  from_distances = metrics.retrieval_metrics_from_distances(distances, query_labels, gallery_labels, KS,
                                                            query_categories=categories, chunk_size=8)
  from_embeddings = metrics.retrieval_metrics(queries, query_labels, gallery, gallery_labels, KS,
                                              query_categories=categories, chunk_size=8)
  assert from_distances == from_embeddings
  assert from_distances == pytest.approx(
      metrics_oracle(distances, query_labels, gallery_labels, KS, categories), abs=1e-12)


def test_recall_agrees_with_recall_at_k():
  rng = np.random.default_rng(4)
  queries, query_labels, gallery, gallery_labels = clustered(rng, 50, 200, 6)
  got = metrics.retrieval_metrics(queries, query_labels, gallery, gallery_labels, KS)
  recall = metrics.recall_at_k(queries, query_labels, gallery, gallery_labels, KS)
  assert {k: got[f"recall@{k}"] for k in KS} == recall


def test_ranking_depth_covers_k_and_the_largest_r():
  gallery_labels = np.array([1, 1, 1, 2, 5, 5, 5, 5, 5])
  assert metrics.ranking_depth(np.array([1, 2, 7]), gallery_labels, ks=(1, 2)) == 3
  assert metrics.ranking_depth(np.array([1, 5]), gallery_labels, ks=(1, 2)) == 5
  assert metrics.ranking_depth(np.array([1, 5]), gallery_labels, ks=(1, 2), gallery_valid=np.arange(9) < 6) == 3
  assert metrics.ranking_depth(np.array([7]), gallery_labels, ks=(1, 10)) == 10


def test_bad_input_is_reported():
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="depth 2.*ranking_depth"):
    metrics.metrics_from_relevance(np.zeros((4, 2), bool), np.full(4, 3), ks=(1,))
  with pytest.raises(ValueError, match="depth 2.*ranking_depth"):
    metrics.metrics_from_relevance(np.zeros((4, 2), bool), np.ones(4), ks=(1, 5))
  with pytest.raises(ValueError, match="one category per query"):
    metrics.retrieval_metrics(x, np.zeros(4), x, np.zeros(4), query_categories=np.zeros(3))
  with pytest.raises(ValueError, match="same D"):
    metrics.retrieval_metrics(x, np.zeros(4), np.zeros((4, 2)), np.zeros(4))
  with pytest.raises(ValueError, match="one label per"):
    metrics.retrieval_metrics_from_distances(np.zeros((4, 5)), np.zeros(3), np.zeros(5))
  with pytest.raises(ValueError, match="Unknown metric"):
    metrics.retrieval_metrics(x, np.zeros(4), x, np.zeros(4), metric="manhattan")


_SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jaxret import metrics
data = np.load(sys.argv[1])
mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
out = {"devices": jax.device_count()}
for depth in (5, 20):  # below and above the 8 gallery images of each shard
  relevance, num_positives = metrics.sharded_query_relevance(
      data["q"], data["ql"], data["g"], data["gl"], data["gv"], depth=depth, mesh=mesh, chunk_size=16)
  out[str(depth)] = [np.asarray(relevance).tolist(), np.asarray(num_positives).tolist()]
print(json.dumps(out))
"""


def test_gallery_sharded_over_8_devices_gives_the_exact_metrics(tmp_path):
  """8 fake CPU devices, each holding 8 gallery images (padding, exact ties, a query with no gallery image)."""
  rng = np.random.default_rng(3)
  num_gallery, num_valid = 64, 59
  gallery = rng.integers(0, 3, size=(num_gallery, 2)).astype(np.float32)
  gallery_labels = rng.integers(0, 8, num_gallery)
  valid = np.arange(num_gallery) < num_valid
  queries = rng.integers(0, 3, size=(41, 2)).astype(np.float32)
  query_labels = rng.integers(0, 9, 41)  # label 8 is never in the gallery
  path = tmp_path / "data.npz"
  np.savez(path, q=queries, ql=query_labels, g=gallery, gl=gallery_labels, gv=valid)
  completed = subprocess.run(
      [sys.executable, "-c", _SHARDED_SCRIPT, str(path)], check=False, capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert completed.returncode == 0, completed.stderr
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert result["devices"] == 8
  distances = sq_distances(queries, gallery[:num_valid])
  for depth in (5, 20):
    relevance, num_positives = (np.array(x) for x in result[str(depth)])
    want_relevance, want_positives = metrics.query_relevance(
        queries, query_labels, gallery[:num_valid], gallery_labels[:num_valid], depth=depth, chunk_size=8)
    np.testing.assert_array_equal(relevance, want_relevance)
    np.testing.assert_array_equal(num_positives, want_positives)
  ks = (1, 3)
  assert metrics.ranking_depth(query_labels, gallery_labels, ks, valid) <= 20
  got = metrics.metrics_from_relevance(relevance, num_positives, ks)
  assert got == pytest.approx(metrics_oracle(distances, query_labels, gallery_labels[:num_valid], ks), abs=1e-12)
