"""Recall@K against a NumPy oracle that sorts the whole gallery for every query."""

import numpy as np
import pytest

from jaxret import metrics


def recall_oracle(query_emb, query_labels, gallery_emb, gallery_labels, ks, metric="euclidean"):
  """Float64 loop: stable argsort of the distances, hit at K when a top-K label matches."""
  q = np.asarray(query_emb, np.float64)
  g = np.asarray(gallery_emb, np.float64)
  hits = {k: 0 for k in ks}
  for i in range(len(q)):
    if metric == "cosine":
      d = 1 - (g @ q[i]) / (np.linalg.norm(g, axis=1) * np.linalg.norm(q[i]))
    else:
      d = np.sum((g - q[i]) ** 2, axis=1)
    order = np.argsort(d, kind="stable")
    for k in ks:
      hits[k] += bool(np.any(gallery_labels[order[:k]] == query_labels[i]))
  return {k: hits[k] / len(q) for k in ks}


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("num_queries,num_gallery,dim,chunk_size", [
    (37, 53, 8, 16),      # several chunks, last one padded
    (100, 300, 16, 1024),  # one chunk larger than the queries
    (64, 2000, 4, 7),      # gallery much larger than a chunk of queries
])
def test_recall_matches_oracle(metric, num_queries, num_gallery, dim, chunk_size):
  rng = np.random.default_rng(0)
  num_items = 20
  gallery_labels = rng.integers(0, num_items, num_gallery)
  query_labels = rng.integers(0, num_items, num_queries)
  centres = rng.normal(size=(num_items, dim))
  gallery = centres[gallery_labels] + 0.9 * rng.normal(size=(num_gallery, dim))
  queries = centres[query_labels] + 0.9 * rng.normal(size=(num_queries, dim))
  ks = (1, 2, 5, 10, 50)
  got = metrics.recall_at_k(queries.astype(np.float32), query_labels, gallery.astype(np.float32),
                            gallery_labels, ks=ks, metric=metric, chunk_size=chunk_size)
  want = recall_oracle(queries, query_labels, gallery, gallery_labels, ks, metric)
  assert got == pytest.approx(want, abs=1e-9)
  assert 0 < got[1] < got[50] <= 1  # the data is neither trivial nor hopeless


def test_ties_are_broken_by_gallery_index():
  # Gallery 0 and 1 are the same vector; the query is equally far from both.
  gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]], np.float32)
  query = np.array([[0.0, 0.0]], np.float32)
  # Correct image second among equals: a stable sort ranks the wrong one first.
  assert metrics.recall_at_k(query, np.array([7]), gallery, np.array([5, 7, 9]), ks=(1, 2)) == {1: 0.0, 2: 1.0}
  # Correct image first among equals.
  assert metrics.recall_at_k(query, np.array([5]), gallery, np.array([5, 7, 9]), ks=(1, 2)) == {1: 1.0, 2: 1.0}
  # Many exact ties against the oracle.
  rng = np.random.default_rng(1)
  gallery = rng.integers(0, 3, size=(200, 2)).astype(np.float32)
  queries = rng.integers(0, 3, size=(50, 2)).astype(np.float32)
  gallery_labels = rng.integers(0, 10, 200)
  query_labels = rng.integers(0, 10, 50)
  ks = (1, 3, 10, 40)
  got = metrics.recall_at_k(queries, query_labels, gallery, gallery_labels, ks=ks, chunk_size=16)
  assert got == pytest.approx(recall_oracle(queries, query_labels, gallery, gallery_labels, ks), abs=1e-9)


def test_query_without_gallery_image_is_a_miss():
  gallery = np.eye(3, dtype=np.float32)
  queries = np.eye(3, dtype=np.float32)[:2]
  got = metrics.recall_at_k(queries, np.array([0, 42]), gallery, np.array([0, 1, 2]), ks=(1, 3))
  assert got == {1: 0.5, 3: 0.5}


def test_padding_in_the_gallery_is_never_retrieved():
  distances = np.array([[0.0, 1.0, 2.0]], np.float32)
  valid = np.array([False, True, True])
  rank = metrics.first_hit_rank(distances, np.array([3]), np.array([3, 4, 3]), valid)
  # Gallery 0 would match but is padding; the next correct one (index 2) has one negative before it.
  assert int(rank[0]) == 1
  rank_padded_negative = metrics.first_hit_rank(distances, np.array([3]), np.array([4, 4, 3]), valid)
  assert int(rank_padded_negative[0]) == 1  # the padded negative at distance 0 does not count


def test_bad_input_is_reported():
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="same D"):
    metrics.recall_at_k(x, np.zeros(4), np.zeros((4, 2)), np.zeros(4))
  with pytest.raises(ValueError, match="one label per embedding"):
    metrics.recall_at_k(x, np.zeros(3), x, np.zeros(4))
  with pytest.raises(ValueError, match="Unknown metric"):
    metrics.recall_at_k(x, np.zeros(4), x, np.zeros(4), metric="manhattan")


_SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jaxret import metrics
data = np.load(sys.argv[1])
mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
ranks = metrics.sharded_query_ranks(data["q"], data["ql"], data["g"], data["gl"], data["gv"], mesh=mesh,
                                    chunk_size=16)
print(json.dumps({"devices": jax.device_count(), "ranks": np.asarray(ranks).tolist()}))
"""


def test_gallery_sharded_over_devices_gives_the_exact_ranks(tmp_path):
  """4 fake CPU devices, each holding a quarter of the gallery (with padding and exact ties)."""
  import json
  import os
  import subprocess
  import sys  # pylint: disable=g-import-not-at-top,multiple-imports
  rng = np.random.default_rng(3)
  num_gallery, num_valid = 64, 57
  gallery = rng.integers(0, 4, size=(num_gallery, 3)).astype(np.float32)  # many exact ties
  gallery_labels = rng.integers(0, 12, num_gallery)
  valid = np.arange(num_gallery) < num_valid
  queries = rng.integers(0, 4, size=(41, 3)).astype(np.float32)
  query_labels = rng.integers(0, 13, 41)  # label 12 never in the gallery: a miss
  path = tmp_path / "data.npz"
  np.savez(path, q=queries, ql=query_labels, g=gallery, gl=gallery_labels, gv=valid)
  completed = subprocess.run(
      [sys.executable, "-c", _SHARDED_SCRIPT, str(path)], capture_output=True, text=True, timeout=120,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  assert completed.returncode == 0, completed.stderr
  result = json.loads(completed.stdout.strip().splitlines()[-1])
  assert result["devices"] == 4
  want = metrics.query_ranks(queries, query_labels, gallery[:num_valid], gallery_labels[:num_valid],
                             chunk_size=8)
  got = np.array(result["ranks"])
  # A miss is ranked past the whole gallery: the padded size there, the valid size here.
  np.testing.assert_array_equal(np.minimum(got, num_valid), np.asarray(want))
  for k in (1, 5, 20):
    oracle = recall_oracle(queries, query_labels, gallery[:num_valid], gallery_labels[:num_valid], (k,))[k]
    assert np.mean(got < k) == pytest.approx(oracle)


def test_euclidean_ranking_is_accurate_for_embeddings_far_from_the_origin():
  """Capsule embeddings have norm sqrt(23) with neighbours ~1e-3 apart: float32 |q|^2+|g|^2-2qg would fail."""
  rng = np.random.default_rng(5)
  base = rng.normal(size=368)
  base *= np.sqrt(23) / np.linalg.norm(base)
  gallery = base + 1e-3 * rng.normal(size=(300, 368))
  queries = base + 1e-3 * rng.normal(size=(50, 368))
  got = np.asarray(metrics.retrieval_distances(queries.astype(np.float32), gallery.astype(np.float32)))
  want = np.sum((queries[:, None] - gallery[None]) ** 2, axis=-1)
  np.testing.assert_array_equal(np.argmin(got, axis=1), np.argmin(want, axis=1))
  np.testing.assert_allclose(got, want, rtol=1e-3)


def test_rank_from_the_positive_table_equals_the_masked_passes():
  """`first_hit_rank_of_columns` against `first_hit_rank` on grid distances full of exact ties, with queries
  whose product has no gallery image, and `query_ranks` takes the masked path when a product overflows."""
  rng = np.random.default_rng(7)
  distances = rng.integers(0, 5, size=(60, 90)).astype(np.float32)  # ties everywhere, also across labels
  gallery_labels = rng.integers(0, 25, 90)
  query_labels = rng.integers(0, 28, 60)  # labels 25..27 are never in the gallery
  columns, valid, overflow = metrics.positive_columns(query_labels, gallery_labels)
  assert not bool(overflow)
  for q in range(60):  # the table lists exactly the gallery images of the query's product, ascending
    np.testing.assert_array_equal(np.asarray(columns[q])[np.asarray(valid[q])],
                                  np.flatnonzero(gallery_labels == query_labels[q]))
  got = metrics.first_hit_rank_of_columns(distances, columns, valid)
  want = metrics.first_hit_rank(distances, query_labels, gallery_labels)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert np.any(np.asarray(want) == 90) and np.any(np.asarray(want) == 0)

  *_, overflow = metrics.positive_columns(query_labels, gallery_labels, max_positives=2)
  assert bool(overflow)
  # 70 gallery images of product 0 (> POSITIVES_PER_QUERY): the masked passes, same ranks as the oracle.
  gallery = rng.integers(0, 3, size=(100, 2)).astype(np.float32)
  labels = np.concatenate([np.zeros(70, int), rng.integers(1, 5, 30)])
  queries = rng.integers(0, 3, size=(20, 2)).astype(np.float32)
  query_labels = rng.integers(0, 5, 20)
  ks = (1, 2, 5, 20)
  got = metrics.recall_at_k(queries, query_labels, gallery, labels, ks=ks, chunk_size=8)
  assert got == pytest.approx(recall_oracle(queries, query_labels, gallery, labels, ks), abs=1e-9)
