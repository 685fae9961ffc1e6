"""Every loss against an explicit float64 loop over all its tuples; gradients checked and finite."""

import doctest
import functools

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret import distances as distances_module
from jaxret import losses
from jaxret import miners

# ---------------------------------------------------------------------------------------------------------
# Float64 oracles: plain loops over anchors, pairs, triplets and quadruplets, straight from the definitions.


def distances_oracle(x, squared, metric):
  x = np.asarray(x, np.float64)
  if metric == "cosine":
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - xn @ xn.T
    np.fill_diagonal(d, 0.0)
    return d**2 if squared else d
  d2 = np.sum((x[:, None, :] - x[None, :, :])**2, axis=-1)
  return d2 if squared else np.sqrt(d2)


def _positives(labels, a):
  return [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]


def _negatives(labels, a):
  return [n for n in range(len(labels)) if labels[n] != labels[a]]


def triplet_oracle(d, labels, margin, mining):
  n = len(labels)
  if mining == "batch_hard":
    per_anchor = []
    for a in range(n):
      pos, neg = _positives(labels, a), _negatives(labels, a)
      if pos and neg:
        per_anchor.append(max(max(d[a, p] for p in pos) - min(d[a, k] for k in neg) + margin, 0.0))
    return np.mean(per_anchor) if per_anchor else 0.0
  if mining == "batch_all":
    positive_losses = []
    for a in range(n):
      for p in _positives(labels, a):
        for k in _negatives(labels, a):
          loss = d[a, p] - d[a, k] + margin
          if loss > 0:
            positive_losses.append(loss)
    return np.mean(positive_losses) if positive_losses else 0.0
  assert mining == "semi_hard"
  per_pair = []
  for a in range(n):
    neg = [d[a, k] for k in _negatives(labels, a)]
    if not neg:
      continue
    for p in _positives(labels, a):
      farther = [v for v in neg if v > d[a, p]]
      chosen = min(farther) if farther else max(neg)
      per_pair.append(max(d[a, p] - chosen + margin, 0.0))
  return np.mean(per_pair) if per_pair else 0.0


def _mean_of_positive(values):
  positive = [v for v in values if v > 0]
  return np.mean(positive) if positive else 0.0


def quadruplet_oracle(d, labels, margin1, margin2, adaptive_margin=False, mining="batch_hard"):
  n = len(labels)
  if adaptive_margin:
    pos_d = [d[i, j] for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]]
    neg_d = [d[i, j] for i in range(n) for j in range(n) if labels[i] != labels[j]]
    gap = (np.mean(neg_d) if neg_d else 0.0) - (np.mean(pos_d) if pos_d else 0.0)
    margin1, margin2 = gap, 0.5 * gap
  if mining == "batch_all":
    # Every (a, p, n) and every (a, p, {i, j}); each term averaged over its tuples with positive loss.
    term1 = [d[a, p] - d[a, k] + margin1 for a in range(n) for p in _positives(labels, a)
             for k in _negatives(labels, a)]
    term2 = [d[a, p] - d[i, j] + margin2 for a in range(n) for p in _positives(labels, a)
             for i in range(n) for j in range(i + 1, n)
             if labels[i] != labels[j] and labels[i] != labels[a] and labels[j] != labels[a]]
    return _mean_of_positive(term1) + _mean_of_positive(term2)
  assert mining == "batch_hard"
  per_anchor = []
  for a in range(n):
    pos, neg = _positives(labels, a), _negatives(labels, a)
    if not (pos and neg):
      continue
    d_ap = max(d[a, p] for p in pos)
    term1 = max(d_ap - min(d[a, k] for k in neg) + margin1, 0.0)
    pair_d = [d[i, j] for i in range(n) for j in range(n)
              if labels[i] != labels[j] and labels[i] != labels[a] and labels[j] != labels[a]]
    term2 = max(d_ap - min(pair_d) + margin2, 0.0) if pair_d else 0.0
    per_anchor.append(term1 + term2)
  return np.mean(per_anchor) if per_anchor else 0.0


def category_quadruplet_oracle(d, items, categories, margin1, margin2, weight1, weight2, mining="batch_hard"):
  n = len(items)
  terms1, terms2 = [], []
  for a in range(n):
    pos = [p for p in range(n) if p != a and items[p] == items[a]]
    neg1 = [k for k in range(n) if categories[k] == categories[a] and items[k] != items[a]]
    neg2 = [k for k in range(n) if categories[k] != categories[a]]
    if mining == "batch_all":  # Every (a, p, n1) and every (a, n1, n2).
      terms1 += [d[a, p] - d[a, k] + margin1 for p in pos for k in neg1]
      terms2 += [d[a, k] - d[a, m] + margin2 for k in neg1 for m in neg2]
      continue
    if mining == "random_expectation":  # Each anchor's expected loss over uniformly drawn tuples.
      if pos and neg1:
        terms1.append(np.mean([max(d[a, p] - d[a, k] + margin1, 0.0) for p in pos for k in neg1]))
      if neg1 and neg2:
        terms2.append(np.mean([max(d[a, k] - d[a, m] + margin2, 0.0) for k in neg1 for m in neg2]))
      continue
    if pos and neg1:
      terms1.append(max(max(d[a, p] for p in pos) - min(d[a, k] for k in neg1) + margin1, 0.0))
    if neg1 and neg2:
      terms2.append(max(max(d[a, k] for k in neg1) - min(d[a, k] for k in neg2) + margin2, 0.0))
  if mining == "batch_all":
    return weight1 * _mean_of_positive(terms1) + weight2 * _mean_of_positive(terms2)
  mean1 = np.mean(terms1) if terms1 else 0.0
  mean2 = np.mean(terms2) if terms2 else 0.0
  return weight1 * mean1 + weight2 * mean2


def random_triplet_expectation_oracle(d, labels, margin):
  """The expected random-tuple triplet loss: per valid anchor, the mean over all its (p, n); mean of those."""
  per_anchor = [np.mean([max(d[a, p] - d[a, k] + margin, 0.0) for p in _positives(labels, a)
                         for k in _negatives(labels, a)])
                for a in range(len(labels)) if _positives(labels, a) and _negatives(labels, a)]
  return np.mean(per_anchor) if per_anchor else 0.0


def contrastive_oracle(d, labels, margin):
  n = len(labels)
  per_pair = []
  for i in range(n):
    for j in range(i + 1, n):
      per_pair.append(d[i, j]**2 if labels[i] == labels[j] else max(margin - d[i, j], 0.0)**2)
  return np.mean(per_pair) if per_pair else 0.0


# ---------------------------------------------------------------------------------------------------------
# Random P x K batches with arbitrary label values in shuffled order.


def pk_batch(seed, num_classes, per_class, dim):
  rng = np.random.default_rng(seed)
  label_values = rng.choice(np.arange(-10**6, 10**6), size=num_classes, replace=False)
  class_index = rng.permutation(np.repeat(np.arange(num_classes), per_class))
  # Class centres plus noise, so that the hinges are a mix of active and inactive ones.
  centres = rng.normal(size=(num_classes, dim))
  x = centres[class_index] + 0.7 * rng.normal(size=(len(class_index), dim))
  return x.astype(np.float32), label_values[class_index]


# (P, K, D, margin, squared, metric): several P, K, D, margins and both distance kinds.
CASES = [
    (2, 2, 3, 0.5, False, "euclidean"),
    (3, 4, 8, 0.2, True, "euclidean"),
    (5, 3, 16, 1.0, False, "euclidean"),
    (8, 4, 32, 0.3, False, "euclidean"),
    (4, 6, 5, 2.0, True, "euclidean"),
    (6, 2, 10, 0.1, False, "cosine"),
    (3, 5, 7, 0.05, True, "cosine"),
]


def assert_close(got, want):
  assert np.isfinite(got)
  # Relative error under 1e-4 (absolute for a zero oracle).
  assert abs(float(got) - want) <= 1e-4 * max(abs(want), 1e-3), (float(got), want)


DETERMINISTIC_TRIPLET_MINING = [m for m in losses.TRIPLET_MINING if m != "random"]
KEY = jax.random.key(0)  # For the "random" mining; the other minings ignore it.


@pytest.mark.parametrize("mining", DETERMINISTIC_TRIPLET_MINING)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triplet_matches_loop(case, mining):
  num_classes, per_class, dim, margin, squared, metric = case
  x, labels = pk_batch(hash((case, mining)) % 1000, num_classes, per_class, dim)
  fn = jax.jit(functools.partial(losses.triplet_loss, mining=mining, squared=squared, metric=metric))
  got = fn(x, labels, margin=margin)
  assert got.shape == () and got.dtype == jnp.float32
  assert_close(got, triplet_oracle(distances_oracle(x, squared, metric), labels, margin, mining))


# Adaptive margins do not depend on the mining: one batch-all case with them is enough.
QUADRUPLET_CASES = ([(case, adaptive, "batch_hard") for case in CASES for adaptive in (False, True)]
                    + [(case, False, "batch_all") for case in CASES] + [(CASES[1], True, "batch_all")])


@pytest.mark.parametrize("case,adaptive_margin,mining", QUADRUPLET_CASES, ids=str)
def test_quadruplet_matches_loop(case, adaptive_margin, mining):
  num_classes, per_class, dim, margin, squared, metric = case
  x, labels = pk_batch(dim + num_classes, num_classes, per_class, dim)
  margin2 = 0.5 * margin
  fn = jax.jit(functools.partial(losses.quadruplet_loss, squared=squared, metric=metric,
                                 adaptive_margin=adaptive_margin, mining=mining))
  got = fn(x, labels, margin1=margin, margin2=margin2)
  assert got.shape == () and got.dtype == jnp.float32
  want = quadruplet_oracle(distances_oracle(x, squared, metric), labels, margin, margin2, adaptive_margin,
                           mining)
  assert_close(got, want)


def nested_categories(items, num_items):
  """Items nested in categories (every item's category is a function of the item), in two or three groups."""
  return (np.abs(items) % (2 + num_items % 2)) * 1000 + 7


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_category_quadruplet_matches_loop(case, mining):
  num_items, per_item, dim, margin, squared, metric = case
  x, items = pk_batch(3 * dim + num_items, num_items, per_item, dim)
  categories = nested_categories(items, num_items)
  kwargs = dict(margin1=margin, margin2=2 * margin, weight1=0.3, weight2=0.7, squared=squared, metric=metric,
                mining=mining)
  got = jax.jit(functools.partial(losses.category_quadruplet_loss, **kwargs))(x, items, categories)
  assert got.shape == () and got.dtype == jnp.float32
  want = category_quadruplet_oracle(distances_oracle(x, squared, metric), items, categories, margin,
                                    2 * margin, 0.3, 0.7, mining)
  assert_close(got, want)


def test_batch_all_negative_pair_sums_match_loop():
  # The kernel behind Chen's batch-all second term: sum and count over (a, p, {i, j}), including batches
  # with labels of one image only and labels of unequal sizes.
  rng = np.random.default_rng(4)
  for labels in ([5, 5, 9, 9, 2, 2], [1, 1, 1, 2, 3, 3, 4, 7, 7, 7, 7], [3, 3, 8, 8], [6] * 5):
    labels = rng.permutation(labels)
    d = distances_oracle(rng.normal(size=(len(labels), 3)), False, "euclidean")
    losses_above_zero = [d[a, p] - d[i, j] + 0.8 for a in range(len(labels)) for p in _positives(labels, a)
                         for i in range(len(labels)) for j in range(i + 1, len(labels))
                         if labels[i] != labels[j] and labels[a] not in (labels[i], labels[j])]
    losses_above_zero = [v for v in losses_above_zero if v > 0]
    total, count = jax.jit(losses.quadruplet.batch_all_negative_pair_sums)(
        jnp.asarray(d, jnp.float32), jnp.asarray(labels), 0.8)
    assert count == len(losses_above_zero)
    np.testing.assert_allclose(total, sum(losses_above_zero), rtol=1e-5, atol=1e-5)


def test_random_choice_is_uniform_over_the_mask():
  mask = np.array([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  draws = 4000
  index, valid = jax.jit(jax.vmap(miners.random_choice, in_axes=(None, 0)))(
      mask, jax.random.split(jax.random.key(1), draws))
  np.testing.assert_array_equal(valid, np.broadcast_to(mask.any(axis=1), (draws, 4)))
  assert np.all(mask[np.arange(4)[None, :].repeat(draws, 0)[:, [0, 1, 3]], index[:, [0, 1, 3]]])
  assert np.all(index[:, 2] == 0)
  for row in (0, 3):
    frequencies = np.bincount(index[:, row], minlength=5)[mask[row]] / draws
    # Each allowed column with probability 1 / count; 4 standard errors of 4000 draws is under 0.03.
    np.testing.assert_allclose(frequencies, 1 / mask[row].sum(), atol=0.03)


def test_random_tuples_average_to_the_loop_expectation():
  # With random tuples the loss of one step is one draw; over many keys it averages to each anchor's mean
  # over all its tuples, averaged over anchors (a float64 loop). Also: a key gives one value, keys differ.
  x, items = pk_batch(9, 4, 3, 5)
  categories = nested_categories(items, 4)
  d_plain = distances_oracle(x, False, "euclidean")
  d_squared = distances_oracle(x, True, "euclidean")
  keys = jax.random.split(jax.random.key(2), 3000)
  triplet = jax.jit(jax.vmap(lambda k: losses.triplet_loss(x, items, margin=1.5, mining="random", key=k)))
  quad = jax.jit(jax.vmap(lambda k: losses.category_quadruplet_loss(x, items, categories, margin1=2.0, margin2=5.0,
                                                                     mining="random", key=k)))
  triplet_draws, quad_draws = triplet(keys), quad(keys)
  assert triplet_draws.dtype == jnp.float32 and np.std(triplet_draws) > 0 and np.std(quad_draws) > 0
  np.testing.assert_allclose(np.mean(triplet_draws), random_triplet_expectation_oracle(d_plain, items, 1.5),
                             rtol=0.03)
  want = category_quadruplet_oracle(d_squared, items, categories, 2.0, 5.0, 0.1, 0.9, "random_expectation")
  np.testing.assert_allclose(np.mean(quad_draws), want, rtol=0.03)
  np.testing.assert_array_equal(triplet(keys[:5]), triplet(keys[:5]))
  with pytest.raises(ValueError, match="pass key="):
    losses.triplet_loss(x, items, margin=1.0, mining="random")
  with pytest.raises(ValueError, match="pass key="):
    losses.category_quadruplet_loss(x, items, categories, mining="random")


def test_category_quadruplet_defaults_match_issue():
  x, items = pk_batch(5, 4, 3, 6)
  categories = np.where(np.abs(items) % 2 == 0, 1, 2)
  got = losses.category_quadruplet_loss(x, items, categories)
  want = category_quadruplet_oracle(distances_oracle(x, True, "euclidean"), items, categories, 0.1, 1.0,
                                    0.1, 0.9)
  assert_close(got, want)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_contrastive_matches_loop(case):
  num_classes, per_class, dim, margin, _, metric = case
  x, labels = pk_batch(7 * dim + num_classes, num_classes, per_class, dim)
  margin = 3 * margin if metric == "euclidean" else margin
  got = jax.jit(functools.partial(losses.contrastive_loss, metric=metric))(x, labels, margin=margin)
  assert got.shape == () and got.dtype == jnp.float32
  assert_close(got, contrastive_oracle(distances_oracle(x, False, metric), labels, margin))


def test_quadruplet_with_two_labels_is_batch_hard_triplet():
  # No pair of labels that both differ from the anchor's: term2 is 0, not max(d_ap + margin2, 0).
  x, labels = pk_batch(11, 2, 5, 4)
  quad, triplet = jax.jit(lambda v, y: (losses.quadruplet_loss(v, y, margin1=0.7, margin2=5.0),
                                       losses.triplet_loss(v, y, margin=0.7)))(x, labels)
  np.testing.assert_allclose(quad, triplet, rtol=1e-6)


def test_float64_inputs_are_exact():
  # In float64 the vectorised kernels agree with the loops to rounding, so any larger float32 gap above
  # comes from float32 distances, not from the algorithms (e.g. the prefix sums of batch_all).
  with jax.enable_x64(True):
    x, labels = pk_batch(3, 6, 4, 8)
    x = x.astype(np.float64)
    d = distances_oracle(x, False, "euclidean")

    @jax.jit
    def all_losses(v):
      values = [losses.triplet_loss(v, labels, margin=0.4, mining=m) for m in DETERMINISTIC_TRIPLET_MINING]
      return values + [losses.quadruplet_loss(v, labels, margin1=0.4, margin2=0.2, mining=m)
                       for m in losses.quadruplet.QUADRUPLET_MINING]

    got = all_losses(x)
    want = [triplet_oracle(d, labels, 0.4, m) for m in DETERMINISTIC_TRIPLET_MINING]
    want += [quadruplet_oracle(d, labels, 0.4, 0.2, mining=m) for m in losses.quadruplet.QUADRUPLET_MINING]
    assert all(g.dtype == jnp.float64 for g in got)
    np.testing.assert_allclose(got, want, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# Gradients.

GRAD_LOSSES = {
    "batch_hard": lambda x, y, c: losses.triplet_loss(x, y, margin=0.5),
    "batch_all": lambda x, y, c: losses.triplet_loss(x, y, margin=0.5, mining="batch_all"),
    "semi_hard": lambda x, y, c: losses.triplet_loss(x, y, margin=0.5, mining="semi_hard", squared=True),
    "quadruplet": lambda x, y, c: losses.quadruplet_loss(x, y, margin1=0.5, margin2=0.3),
    "quadruplet_batch_all": lambda x, y, c: losses.quadruplet_loss(x, y, margin1=0.5, margin2=2.0,
                                                                   mining="batch_all"),
    "category_quadruplet": lambda x, y, c: losses.category_quadruplet_loss(x, y, c, margin2=0.5),
    "category_quadruplet_batch_all": lambda x, y, c: losses.category_quadruplet_loss(
        x, y, c, margin1=0.5, margin2=3.0, mining="batch_all"),
    "category_quadruplet_random": lambda x, y, c: losses.category_quadruplet_loss(
        x, y, c, margin1=3.0, margin2=3.0, mining="random", key=KEY),
    "triplet_random": lambda x, y, c: losses.triplet_loss(x, y, margin=0.5, mining="random", key=KEY),
    "contrastive": lambda x, y, c: losses.contrastive_loss(x, y, margin=2.0),
    "contrastive_cosine": lambda x, y, c: losses.contrastive_loss(x, y, margin=0.5, metric="cosine"),
    "triplet_cosine": lambda x, y, c: losses.triplet_loss(x, y, margin=0.2, metric="cosine"),
}


@pytest.mark.parametrize("name", sorted(GRAD_LOSSES))
def test_check_grads(name):
  with jax.enable_x64(True):
    x, labels = pk_batch(35, 3, 3, 5)
    x = x.astype(np.float64)
    categories = np.where(np.abs(labels) % 2 == 0, 1, 2)
    # Numerical differentiation is only valid away from ties between the mined distances (seed chosen so).
    for squared, metric in [(False, "euclidean"), (True, "euclidean"), (False, "cosine")]:
      d = distances_oracle(x, squared, metric)
      assert np.min(np.diff(np.sort(d[np.triu_indices(len(labels), 1)]))) > 4e-3
    fn = jax.jit(lambda v: GRAD_LOSSES[name](v, labels, categories))
    grad = jax.grad(fn)(x)
    assert np.max(np.abs(grad)) > 1e-2, "test data gives a zero loss: the check would be empty"
    jtu.check_grads(fn, (x,), order=1, modes=("rev",))


def test_adaptive_margins_are_constants_for_the_gradient():
  # check_grads does not apply: finite differences also move the margins, which the loss treats as
  # constants (stop_gradient). Instead: same value and gradient as fixed margins equal to the adaptive ones.
  x, labels = pk_batch(35, 3, 3, 5)
  d = distances_oracle(x, False, "euclidean")
  same = labels[:, None] == labels[None, :]
  off_diagonal = ~np.eye(len(labels), dtype=bool)
  gap = d[~same].mean() - d[same & off_diagonal].mean()
  adaptive = jax.jit(jax.value_and_grad(
      lambda v: losses.quadruplet_loss(v, labels, margin1=0.0, margin2=0.0, adaptive_margin=True)))
  fixed = jax.jit(jax.value_and_grad(
      lambda v: losses.quadruplet_loss(v, labels, margin1=gap, margin2=0.5 * gap)))
  (value, grad), (fixed_value, fixed_grad) = adaptive(x), fixed(x)
  assert value > 0
  np.testing.assert_allclose(value, fixed_value, rtol=1e-5)
  np.testing.assert_allclose(grad, fixed_grad, rtol=1e-4, atol=1e-6)


def _degenerate_batches():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 4)).astype(np.float32)
  with_duplicates = x.copy()
  with_duplicates[1] = with_duplicates[0]  # duplicate within a label
  with_duplicates[2] = with_duplicates[0]  # ... and across labels
  with_duplicates[7] = 0.0  # a zero vector (cosine)
  labels = np.array([3, 3, 5, 5, 8, 8, 9, 9])
  return {
      "duplicates": (with_duplicates, labels),
      "all_equal_embeddings": (np.ones((8, 4), np.float32), labels),
      "one_label": (x, np.full(8, 4)),
      "all_labels_distinct": (x, np.arange(8) * 11),
  }


@pytest.mark.parametrize("squared,metric", [(False, "euclidean"), (True, "euclidean"), (False, "cosine")])
def test_degenerate_batches_finite(squared, metric):

  def all_losses(v, labels, categories):
    values = [losses.triplet_loss(v, labels, margin=0.3, mining=m, squared=squared, metric=metric, key=KEY)
              for m in losses.TRIPLET_MINING]
    values += [
        losses.quadruplet_loss(v, labels, margin1=0.3, margin2=0.2, squared=squared, metric=metric),
        losses.quadruplet_loss(v, labels, margin1=0.3, margin2=0.2, squared=squared, metric=metric,
                               adaptive_margin=True),
        losses.quadruplet_loss(v, labels, margin1=0.3, margin2=0.2, squared=squared, metric=metric,
                               mining="batch_all"),
    ]
    values += [losses.category_quadruplet_loss(v, labels, categories, squared=squared, metric=metric, mining=m,
                                               key=KEY) for m in losses.quadruplet.CATEGORY_QUADRUPLET_MINING]
    values += [losses.contrastive_loss(v, labels, margin=0.5, metric=metric)]
    return jnp.stack(values)

  def weighted_sum(v, labels, categories, weights):
    values = all_losses(v, labels, categories)
    return jnp.dot(weights, values), values

  # Gradients of weighted sums instead of a Jacobian (much faster to compile): a non-finite entry in the
  # gradient of any term makes that of the sum non-finite too.
  grad_fn = jax.jit(jax.grad(weighted_sum, has_aux=True))
  num_terms = len(losses.TRIPLET_MINING) + 3 + len(losses.quadruplet.CATEGORY_QUADRUPLET_MINING) + 1
  all_terms = np.ones(num_terms, np.float32)
  mined_terms = np.array([1] * (num_terms - 1) + [0], np.float32)  # Without the contrastive loss.
  for batch, (x, labels) in _degenerate_batches().items():
    categories = labels // 4
    total_grad, values = grad_fn(x, labels, categories, all_terms)
    mined_grad, _ = grad_fn(x, labels, categories, mined_terms)
    assert np.all(np.isfinite(values)), (batch, values)
    assert np.all(np.isfinite(total_grad)) and np.all(np.isfinite(mined_grad)), batch
    if batch in ("one_label", "all_labels_distinct"):
      # No valid tuple for any of the mined losses (the contrastive loss, last, uses every pair).
      np.testing.assert_array_equal(values[:-1], 0.0)
      np.testing.assert_array_equal(mined_grad, 0.0)
      assert_close(values[-1], contrastive_oracle(distances_oracle(x, False, metric), labels, 0.5))


def test_no_valid_tuples_zero_loss_zero_grad():
  x = jnp.arange(12.0).reshape(6, 2)
  labels = jnp.arange(6)
  fn = jax.jit(jax.value_and_grad(
      lambda v: sum(losses.triplet_loss(v, labels, margin=1.0, mining=m, key=KEY) for m in losses.TRIPLET_MINING)))
  value, grad = fn(x)
  assert value == 0.0 and np.all(grad == 0.0)


def test_single_example_batch():
  x = jnp.ones((1, 3))
  labels = jnp.zeros(1, jnp.int32)
  values = jax.jit(lambda v, y: [
      losses.triplet_loss(v, y, margin=1.0),
      losses.quadruplet_loss(v, y, margin1=1.0, margin2=1.0),
      losses.quadruplet_loss(v, y, margin1=1.0, margin2=1.0, mining="batch_all"),
      losses.category_quadruplet_loss(v, y, y),
      losses.category_quadruplet_loss(v, y, y, mining="batch_all"),
      losses.category_quadruplet_loss(v, y, y, mining="random", key=KEY),
      losses.contrastive_loss(v, y, margin=1.0),
  ])(x, labels)
  np.testing.assert_array_equal(values, 0.0)


def test_invariant_to_batch_order_and_label_values():
  x, labels = pk_batch(2, 5, 3, 6)
  perm = np.random.default_rng(0).permutation(len(labels))
  relabelled = labels * 3 + 1
  categories = np.where(np.abs(labels) % 2 == 0, 1, 2)
  for name, fn in GRAD_LOSSES.items():
    if "random" in name:
      continue  # Random tuples are drawn by position: the same in distribution only.
    fn = jax.jit(fn)
    a = fn(x, labels, categories)
    b = fn(x[perm], relabelled[perm], categories[perm])
    np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=name)


def test_bfloat16_embeddings_give_float32():
  x, labels = pk_batch(0, 3, 2, 4)
  fn = jax.jit(functools.partial(losses.triplet_loss, margin=0.1))
  assert fn(jnp.asarray(x, jnp.bfloat16), labels).dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------------
# Registry, errors, docs.


def test_get_loss():
  assert set(losses.LOSSES) == {"triplet", "quadruplet", "category_quadruplet", "contrastive",
                                "multi_similarity", "proxy_anchor", "htl", "bier", "a_bier", "hdc", "abe",
                                "grid", "capsule_margin", "category", "attributes", "landmarks"}
  x, labels = pk_batch(1, 3, 3, 4)
  loss = losses.get_loss("triplet")
  options = loss.options_from({"margin": 0.2, "mining": "batch_all"})
  want = triplet_oracle(distances_oracle(x, False, "euclidean"), labels, 0.2, "batch_all")
  value, extra = jax.jit(lambda v, y: loss({}, {"embedding": v}, {"item_id": y}, options))(x, labels)
  assert_close(value, want)
  assert extra == {}
  assert losses.pairwise_distances is distances_module.pairwise_distances
  with pytest.raises(ValueError, match="Unknown loss 'arcface'"):
    losses.get_loss("arcface")


def test_every_loss_is_called_the_same_way():
  """The trainer's one call: (params, outputs, batch, options) for every registered loss, defaults valid."""
  x, labels = pk_batch(2, 3, 3, 4)
  class_index = np.unique(labels, return_inverse=True)[1]
  categories = class_index % 2
  landmarks = np.zeros((9, 8, 3), np.float32)  # (visibility, x, y): every slot visible at the centre
  landmarks[..., 1:] = 0.5
  batch = {"item_id": labels, "category": categories, "class_index": class_index,
           "rng": jnp.array([0, 1], jnp.uint32),  # the key the trainer derives from the step
           # Dataset features the losses declare (`Loss.batch_features`).
           "attributes": np.tile(np.array([1, -1, 0], np.int8), (9, 1)), "has_attributes": np.ones(9, bool),
           "landmarks": landmarks, "has_landmarks": np.ones(9, bool)}
  # What the models return beside the embedding: capsule lengths (capsule models), BIER's head outputs, the
  # task heads' and FashionNet's predictions.
  outputs = {"capsule_lengths": jnp.full((9, 2), 0.5), "bier_regularizer": x, "embedding_kernel": jnp.ones((5, 4)),
             "category_logits": jnp.zeros((9, 2)), "attribute_logits": jnp.zeros((9, 3)),
             "landmark_locations": jnp.full((9, 8, 2), 0.4), "visibility_logits": jnp.zeros((9, 8, 3))}
  # Sizes that fit D = 4 (the defaults are for the papers' 512-D embeddings).
  small = {"bier": {"learner_sizes": (1, 1, 2)}, "a_bier": {"learner_sizes": (1, 1, 2)},
           "hdc": {"level_dims": (1, 1, 2)}, "abe": {"num_learners": 2}}
  context = losses.LossContext(num_classes=3, num_categories=2, embedding_dim=4)
  for name, loss in losses.LOSSES.items():
    options = loss.options_from(small.get(name, {}))
    params = loss.init_params(jax.random.key(0), context, options)
    value, _ = jax.jit(lambda p, v: loss(p, {**outputs, "embedding": v}, batch, options))(params, x)
    assert value.shape == () and np.isfinite(value), name


def test_options_are_checked():
  loss = losses.get_loss("category_quadruplet")
  problems = loss.problems({"margn1": 0.1, "weight1": -1.0, "squared": "yes", "metric": "l1"})
  assert any("config.loss.category_quadruplet.margn1 is not an option" in p for p in problems)
  assert any("config.loss.category_quadruplet.weight1 must be >= 0.0" in p for p in problems)
  assert any("config.loss.category_quadruplet.squared must be True or False" in p for p in problems)
  assert any("config.loss.category_quadruplet.metric must be one of" in p for p in problems)
  assert len(problems) == 4
  assert loss.problems(loss.defaults()) == []
  with pytest.raises(ValueError, match="margn1"):
    loss.options_from({"margn1": 0.1})


def test_errors():
  x = jnp.ones((4, 3))
  labels = jnp.arange(4)
  with pytest.raises(ValueError, match="Unknown triplet mining"):
    losses.triplet_loss(x, labels, margin=0.1, mining="hardest")
  with pytest.raises(ValueError, match="Unknown metric"):
    losses.triplet_loss(x, labels, margin=0.1, metric="l1")
  with pytest.raises(ValueError, match="must have shape"):
    losses.quadruplet_loss(x, labels[:3], margin1=0.1, margin2=0.1)
  with pytest.raises(ValueError, match="integer class ids"):
    losses.contrastive_loss(x, labels.astype(jnp.float32), margin=1.0)
  with pytest.raises(ValueError, match="category_labels must have shape"):
    losses.category_quadruplet_loss(x, labels, labels[:, None])
  with pytest.raises(ValueError, match=r"\[batch_size, dim\]"):
    losses.triplet_loss(x[None], labels, margin=0.1)


def test_docstring_examples():
  for module in (losses.triplet, distances_module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
