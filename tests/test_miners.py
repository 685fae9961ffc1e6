"""Miners against explicit loops, including exact ties (integer coordinates) and degenerate batches."""

import jax
import numpy as np
import pytest

from jaxret import miners


def squared_distances(x):
  x = np.asarray(x, np.float64)
  return np.sum((x[:, None, :] - x[None, :, :])**2, axis=-1)


def nearest_other_pair_oracle(d, labels):
  """Loop over all pairs (i, j) for every anchor."""
  n = len(labels)
  d_nn = np.zeros(n)
  has_pair = np.zeros(n, bool)
  for a in range(n):
    best = np.inf
    for i in range(n):
      for j in range(n):
        if labels[i] != labels[j] and labels[i] != labels[a] and labels[j] != labels[a]:
          best = min(best, d[i, j])
    has_pair[a] = np.isfinite(best)
    d_nn[a] = best if has_pair[a] else 0.0
  return d_nn, has_pair


def semi_hard_oracle(d, labels):
  n = len(labels)
  chosen = np.zeros((n, n))
  valid = np.zeros((n, n), bool)
  for a in range(n):
    negatives = [d[a, k] for k in range(n) if labels[k] != labels[a]]
    for p in range(n):
      if p == a or labels[p] != labels[a] or not negatives:
        continue
      farther = [v for v in negatives if v > d[a, p]]
      chosen[a, p] = min(farther) if farther else max(negatives)
      valid[a, p] = True
  return chosen, valid


@pytest.mark.parametrize("seed,num_labels,batch_size",
                         [(0, 2, 8), (1, 3, 9), (2, 5, 15), (3, 7, 14), (4, 12, 24)])
def test_nearest_other_pair_with_ties(seed, num_labels, batch_size):
  rng = np.random.default_rng(seed)
  # Small integer coordinates: many pairs at exactly the same squared distance.
  x = rng.integers(0, 3, size=(batch_size, 2)).astype(np.float32)
  label_values = rng.choice(10**6, size=num_labels, replace=False)
  labels = label_values[rng.permutation(np.arange(batch_size) % num_labels)]
  d = squared_distances(x).astype(np.float32)
  got_d, got_has = jax.jit(miners.nearest_other_pair)(d, labels)
  want_d, want_has = nearest_other_pair_oracle(d, labels)
  np.testing.assert_array_equal(got_has, want_has)
  np.testing.assert_array_equal(got_d, want_d)
  assert want_has.any() == (num_labels >= 3)


def test_nearest_other_pair_hub_label():
  # Label 0 (last row) sits between the two samples of label 1; labels 2..4 are far from everything. The
  # smallest pairs all involve labels 0 and 1, so anchors of those labels need the second-nearest logic.
  x = np.array([[0, 1], [1, 0], [0, 10], [0, 10.1], [10, 0], [10, 0.1], [-10, 0], [-10, 0.1], [0.5, 0.5]],
               np.float32)
  labels = np.array([1, 1, 2, 2, 3, 3, 4, 4, 0])
  d = np.sqrt(squared_distances(x)).astype(np.float32)
  got_d, got_has = miners.nearest_other_pair(d, labels)
  want_d, want_has = nearest_other_pair_oracle(d, labels)
  np.testing.assert_array_equal(got_has, want_has)
  np.testing.assert_allclose(got_d, want_d, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semi_hard_negatives_with_ties(seed):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 3, size=(12, 2)).astype(np.float32)
  labels = rng.permutation(np.arange(12) % 3) * 17
  # One label with a single member (no positives) and, in seed 0, ties between d_ap and d_an.
  labels[0] = 99
  d = squared_distances(x).astype(np.float32)
  positive, negative = miners.label_masks(labels)
  got, valid = jax.jit(miners.semi_hard_negatives)(d, positive, negative)
  want, want_valid = semi_hard_oracle(d, labels)
  np.testing.assert_array_equal(valid, want_valid)
  np.testing.assert_array_equal(got, want)


def test_semi_hard_anchor_without_negatives():
  d = squared_distances(np.arange(6, dtype=np.float32)[:, None])
  labels = np.zeros(6, int)
  positive, negative = miners.label_masks(labels)
  got, valid = miners.semi_hard_negatives(d, positive, negative)
  assert not np.any(valid)
  np.testing.assert_array_equal(got, 0.0)


def test_label_masks():
  positive, negative = miners.label_masks(np.array([5, 9, 5]))
  np.testing.assert_array_equal(positive, [[0, 0, 1], [0, 0, 0], [1, 0, 0]])
  np.testing.assert_array_equal(negative, [[0, 1, 0], [1, 0, 1], [0, 1, 0]])
