"""Re-ranking against NumPy oracles: alpha-QE and DBA by their definitions, k-reciprocal by a port of the
reference implementation (zhunzhong07/person-re-ranking, python-version/re_ranking_ranklist.py)."""

import numpy as np
import pytest

from jaxret import metrics
from jaxret import rerank


def reference_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
  """The reference algorithm step by step, in NumPy with its float32 arrays (loops kept as in the original)."""
  original = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]])
  original = np.power(original, 2).astype(np.float32)
  original = np.transpose(1.0 * original / np.max(original, axis=0))
  v = np.zeros_like(original).astype(np.float32)
  # The reference's argsort is not stable; the data below has no ties, so any sort gives the same ranking.
  initial_rank = np.argsort(original).astype(np.int32)
  num_queries = q_g_dist.shape[0]
  num_all = q_g_dist.shape[0] + q_g_dist.shape[1]
  half = int(np.around(k1 / 2.0))

  def reciprocal(i, k):
    forward = initial_rank[i, :k + 1]
    backward = initial_rank[forward, :k + 1]
    return forward[np.where(backward == i)[0]]

  for i in range(num_all):
    k_reciprocal = reciprocal(i, k1)
    expansion = k_reciprocal
    for candidate in k_reciprocal:
      candidate_reciprocal = reciprocal(candidate, half)
      if len(np.intersect1d(candidate_reciprocal, k_reciprocal)) > 2.0 / 3 * len(candidate_reciprocal):
        expansion = np.append(expansion, candidate_reciprocal)
    expansion = np.unique(expansion)
    weight = np.exp(-original[i, expansion])
    v[i, expansion] = 1.0 * weight / np.sum(weight)
  original = original[:num_queries]
  if k2 != 1:
    v_qe = np.zeros_like(v, dtype=np.float32)
    for i in range(num_all):
      v_qe[i, :] = np.mean(v[initial_rank[i, :k2], :], axis=0)
    v = v_qe
  inverted = [np.where(v[:, i] != 0)[0] for i in range(num_all)]
  jaccard = np.zeros_like(original, dtype=np.float32)
  for i in range(num_queries):
    shared = np.zeros(shape=[1, num_all], dtype=np.float32)
    non_zero = np.where(v[i, :] != 0)[0]
    for k in non_zero:
      shared[0, inverted[k]] = shared[0, inverted[k]] + np.minimum(v[i, k], v[inverted[k], k])
    jaccard[i] = 1 - shared / (2.0 - shared)
  final = jaccard * (1 - lambda_value) + original * lambda_value
  return final[:num_queries, num_queries:]


def euclidean(a, b):
  return np.sqrt(np.maximum(np.sum((a[:, None].astype(np.float64) - b[None]) ** 2, axis=-1), 0))


def clustered(seed, num_queries, num_gallery, dim, num_items, noise=0.6):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_items, dim))
  query_labels = rng.integers(0, num_items, num_queries)
  gallery_labels = rng.integers(0, num_items, num_gallery)
  queries = centres[query_labels] + noise * rng.normal(size=(num_queries, dim))
  gallery = centres[gallery_labels] + noise * rng.normal(size=(num_gallery, dim))
  return queries.astype(np.float32), query_labels, gallery.astype(np.float32), gallery_labels


@pytest.mark.parametrize("k1,k2,lambda_value,chunk_size,pair_budget", [
    (20, 6, 0.3, 256, 1 << 22),  # the paper's parameters, one chunk
    (7, 3, 0.5, 16, 600),        # several distance chunks, and Jaccard chunks cut by the pair budget
])
def test_k_reciprocal_matches_the_reference(k1, k2, lambda_value, chunk_size, pair_budget):
  queries, query_labels, gallery, gallery_labels = clustered(0, 23, 57, 6, num_items=9)
  want = reference_re_ranking(euclidean(queries, gallery), euclidean(queries, queries),
                              euclidean(gallery, gallery), k1, k2, lambda_value)
  got = rerank.k_reciprocal_distances(queries, gallery, k1=k1, k2=k2, lambda_value=lambda_value,
                                      chunk_size=chunk_size, pair_budget=pair_budget)
  assert got.shape == (23, 57)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)
  assert np.ptp(want) > 0.3 and np.mean(want < 1 - 0.7 * lambda_value) > 0.05  # non-trivial Jaccard terms
  if k1 == 20:  # the direction, on this data: mAP@R 0.48 -> 0.55
    before = metrics.retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks=(1,))
    after = metrics.retrieval_metrics_from_distances(got, query_labels, gallery_labels, ks=(1,))
    assert after["map@r"] > before["map@r"] + 0.05


def test_k_reciprocal_cosine_without_local_expansion_matches_the_reference():
  queries, _, gallery, _ = clustered(1, 15, 30, 5, num_items=6)

  def cosine(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.clip(1 - a.astype(np.float64) @ b.T, 0, 2)

  want = reference_re_ranking(cosine(queries, gallery), cosine(queries, queries), cosine(gallery, gallery),
                              k1=6, k2=1, lambda_value=0.0)
  got = rerank.k_reciprocal_distances(queries, gallery, k1=6, k2=1, lambda_value=0.0, metric="cosine")
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=1e-5)


def expansion_oracle(points, database, n, alpha, exclude_self):
  """Float64: unit rows, n most similar by a stable sort (self skipped), weights max(s, 0)^alpha, renormalise."""
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  points, database = unit(points.astype(np.float64)), unit(database.astype(np.float64))
  out = []
  for i, p in enumerate(points):
    similarity = database @ p
    order = [j for j in np.argsort(-similarity, kind="stable") if not (exclude_self and j == i)][:n]
    out.append(p + sum(max(similarity[j], 0.0) ** alpha * database[j] for j in order))
  return unit(np.array(out))


@pytest.mark.parametrize("n,alpha", [(1, 3.0), (3, 0.0), (4, 0.5)])
def test_alpha_query_expansion_and_dba_match_the_oracle(n, alpha):
  queries, _, gallery, _ = clustered(3, 21, 40, 6, num_items=5, noise=1.5)
  got_queries = rerank.alpha_query_expansion(queries, gallery, num_neighbours=n, alpha=alpha, chunk_size=8)
  np.testing.assert_allclose(np.asarray(got_queries), expansion_oracle(queries, gallery, n, alpha, False),
                             atol=1e-5)
  got_gallery = rerank.database_side_augmentation(gallery, num_neighbours=n, alpha=alpha, chunk_size=16)
  np.testing.assert_allclose(np.asarray(got_gallery), expansion_oracle(gallery, gallery, n, alpha, True),
                             atol=1e-5)


def test_expansion_skips_self_by_index_and_weighs_negative_similarity_zero():
  gallery = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.1]], np.float32)  # 0 and 1 are duplicates
  augmented = np.asarray(rerank.database_side_augmentation(gallery, num_neighbours=2, alpha=1.0))
  # Row 0 averages itself with its duplicate (weight 1) and row 2 (similarity < 0: weight 0).
  np.testing.assert_allclose(augmented[0], [1.0, 0.0], atol=1e-6)
  # Row 2's neighbours both have negative similarity: it stays itself.
  np.testing.assert_allclose(augmented[2], gallery[2] / np.linalg.norm(gallery[2]), atol=1e-6)


def test_reranked_distances_composes_the_methods():
  queries, _, gallery, _ = clustered(4, 10, 30, 4, num_items=4)
  unit = rerank.unit_rows
  cosine = lambda q, g: np.asarray(metrics.retrieval_distances(q, unit(g), "cosine"))
  np.testing.assert_array_equal(np.asarray(rerank.reranked_distances(queries, gallery, "none")),
                                np.asarray(metrics.retrieval_distances(queries, gallery)))
  aqe = rerank.alpha_query_expansion(queries, gallery, num_neighbours=3, alpha=2.0)
  np.testing.assert_allclose(rerank.reranked_distances(queries, gallery, "aqe", num_neighbours=3, alpha=2.0),
                             cosine(aqe, gallery), atol=1e-6)
  dba = rerank.database_side_augmentation(gallery, num_neighbours=3, alpha=2.0)
  np.testing.assert_allclose(rerank.reranked_distances(queries, gallery, "dba", num_neighbours=3, alpha=2.0),
                             cosine(queries, dba), atol=1e-6)
  both = rerank.alpha_query_expansion(queries, dba, num_neighbours=3, alpha=2.0)
  np.testing.assert_allclose(rerank.reranked_distances(queries, gallery, "dba+aqe", num_neighbours=3, alpha=2.0),
                             cosine(both, dba), atol=1e-6)
  # The shapes and parameters of a reference test above: no new compilation.
  queries, _, gallery, _ = clustered(0, 23, 57, 6, num_items=9)
  np.testing.assert_array_equal(rerank.reranked_distances(queries, gallery, "k_reciprocal"),
                                rerank.k_reciprocal_distances(queries, gallery))


def test_bad_input_is_reported():
  x = np.zeros((4, 3), np.float32)
  with pytest.raises(ValueError, match="Unknown re-ranking method"):
    rerank.reranked_distances(x, x, "diffusion")
  with pytest.raises(ValueError, match="same D"):
    rerank.reranked_distances(x, np.zeros((4, 2)), "aqe")
  with pytest.raises(ValueError, match="num_neighbours must be between 1 and 3"):
    rerank.database_side_augmentation(x, num_neighbours=4)
  with pytest.raises(ValueError, match="alpha must be >= 0"):
    rerank.alpha_query_expansion(x, x, alpha=-1.0)
  with pytest.raises(ValueError, match="k1 < Q \\+ G"):
    rerank.k_reciprocal_distances(x, x, k1=8)
  with pytest.raises(ValueError, match="lambda_value"):
    rerank.k_reciprocal_distances(x, x, k1=2, lambda_value=1.5)
