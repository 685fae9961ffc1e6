"""Every loss against an explicit float64 loop over all its tuples; gradients checked and finite."""

import doctest
import functools

import jax
import jax.numpy as jnp
from jax import test_util as jtu
import numpy as np
import pytest

from jaxret import distances as distances_module
from jaxret import losses

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


def quadruplet_oracle(d, labels, margin1, margin2, adaptive_margin=False):
  n = len(labels)
  if adaptive_margin:
    pos_d = [d[i, j] for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]]
    neg_d = [d[i, j] for i in range(n) for j in range(n) if labels[i] != labels[j]]
    gap = (np.mean(neg_d) if neg_d else 0.0) - (np.mean(pos_d) if pos_d else 0.0)
    margin1, margin2 = gap, 0.5 * gap
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


def category_quadruplet_oracle(d, items, categories, margin1, margin2, weight1, weight2):
  n = len(items)
  terms1, terms2 = [], []
  for a in range(n):
    pos = [p for p in range(n) if p != a and items[p] == items[a]]
    neg1 = [k for k in range(n) if categories[k] == categories[a] and items[k] != items[a]]
    neg2 = [k for k in range(n) if categories[k] != categories[a]]
    if pos and neg1:
      terms1.append(max(max(d[a, p] for p in pos) - min(d[a, k] for k in neg1) + margin1, 0.0))
    if neg1 and neg2:
      terms2.append(max(max(d[a, k] for k in neg1) - min(d[a, k] for k in neg2) + margin2, 0.0))
  mean1 = np.mean(terms1) if terms1 else 0.0
  mean2 = np.mean(terms2) if terms2 else 0.0
  return weight1 * mean1 + weight2 * mean2


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


@pytest.mark.parametrize("mining", losses.TRIPLET_MINING)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triplet_matches_loop(case, mining):
  num_classes, per_class, dim, margin, squared, metric = case
  x, labels = pk_batch(hash((case, mining)) % 1000, num_classes, per_class, dim)
  fn = jax.jit(functools.partial(losses.triplet_loss, mining=mining, squared=squared, metric=metric))
  got = fn(x, labels, margin=margin)
  assert got.shape == () and got.dtype == jnp.float32
  assert_close(got, triplet_oracle(distances_oracle(x, squared, metric), labels, margin, mining))


@pytest.mark.parametrize("adaptive_margin", [False, True])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_quadruplet_matches_loop(case, adaptive_margin):
  num_classes, per_class, dim, margin, squared, metric = case
  x, labels = pk_batch(dim + num_classes, num_classes, per_class, dim)
  margin2 = 0.5 * margin
  fn = jax.jit(functools.partial(losses.quadruplet_loss, squared=squared, metric=metric,
                                 adaptive_margin=adaptive_margin))
  got = fn(x, labels, margin1=margin, margin2=margin2)
  assert got.shape == () and got.dtype == jnp.float32
  want = quadruplet_oracle(distances_oracle(x, squared, metric), labels, margin, margin2, adaptive_margin)
  assert_close(got, want)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_category_quadruplet_matches_loop(case):
  num_items, per_item, dim, margin, squared, metric = case
  x, items = pk_batch(3 * dim + num_items, num_items, per_item, dim)
  # Items nested in categories (every item's category is a function of the item), in two or three groups.
  categories = (np.abs(items) % (2 + num_items % 2)) * 1000 + 7
  kwargs = dict(margin1=margin, margin2=2 * margin, weight1=0.3, weight2=0.7, squared=squared, metric=metric)
  got = jax.jit(functools.partial(losses.category_quadruplet_loss, **kwargs))(x, items, categories)
  assert got.shape == () and got.dtype == jnp.float32
  want = category_quadruplet_oracle(distances_oracle(x, squared, metric), items, categories, margin,
                                    2 * margin, 0.3, 0.7)
  assert_close(got, want)


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
      values = [losses.triplet_loss(v, labels, margin=0.4, mining=m) for m in losses.TRIPLET_MINING]
      return values + [losses.quadruplet_loss(v, labels, margin1=0.4, margin2=0.2)]

    got = all_losses(x)
    want = [triplet_oracle(d, labels, 0.4, m) for m in losses.TRIPLET_MINING]
    want += [quadruplet_oracle(d, labels, 0.4, 0.2)]
    assert all(g.dtype == jnp.float64 for g in got)
    np.testing.assert_allclose(got, want, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------
# Gradients.

GRAD_LOSSES = {
    "batch_hard": lambda x, y, c: losses.triplet_loss(x, y, margin=0.5),
    "batch_all": lambda x, y, c: losses.triplet_loss(x, y, margin=0.5, mining="batch_all"),
    "semi_hard": lambda x, y, c: losses.triplet_loss(x, y, margin=0.5, mining="semi_hard", squared=True),
    "quadruplet": lambda x, y, c: losses.quadruplet_loss(x, y, margin1=0.5, margin2=0.3),
    "category_quadruplet": lambda x, y, c: losses.category_quadruplet_loss(x, y, c, margin2=0.5),
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
    values = [losses.triplet_loss(v, labels, margin=0.3, mining=m, squared=squared, metric=metric)
              for m in losses.TRIPLET_MINING]
    values += [
        losses.quadruplet_loss(v, labels, margin1=0.3, margin2=0.2, squared=squared, metric=metric),
        losses.quadruplet_loss(v, labels, margin1=0.3, margin2=0.2, squared=squared, metric=metric,
                               adaptive_margin=True),
        losses.category_quadruplet_loss(v, labels, categories, squared=squared, metric=metric),
        losses.contrastive_loss(v, labels, margin=0.5, metric=metric),
    ]
    return jnp.stack(values)

  def weighted_sum(v, labels, categories, weights):
    values = all_losses(v, labels, categories)
    return jnp.dot(weights, values), values

  # Gradients of weighted sums instead of a Jacobian (much faster to compile): a non-finite entry in the
  # gradient of any term makes that of the sum non-finite too.
  grad_fn = jax.jit(jax.grad(weighted_sum, has_aux=True))
  all_terms = np.ones(7, np.float32)
  mined_terms = np.array([1, 1, 1, 1, 1, 1, 0], np.float32)  # Without the contrastive loss.
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
      lambda v: sum(losses.triplet_loss(v, labels, margin=1.0, mining=m) for m in losses.TRIPLET_MINING)))
  value, grad = fn(x)
  assert value == 0.0 and np.all(grad == 0.0)


def test_single_example_batch():
  x = jnp.ones((1, 3))
  labels = jnp.zeros(1, jnp.int32)
  values = jax.jit(lambda v, y: [
      losses.triplet_loss(v, y, margin=1.0),
      losses.quadruplet_loss(v, y, margin1=1.0, margin2=1.0),
      losses.category_quadruplet_loss(v, y, y),
      losses.contrastive_loss(v, y, margin=1.0),
  ])(x, labels)
  np.testing.assert_array_equal(values, 0.0)


def test_invariant_to_batch_order_and_label_values():
  x, labels = pk_batch(2, 5, 3, 6)
  perm = np.random.default_rng(0).permutation(len(labels))
  relabelled = labels * 3 + 1
  categories = np.where(np.abs(labels) % 2 == 0, 1, 2)
  for name, fn in GRAD_LOSSES.items():
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
                                "grid", "capsule_margin"}
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
  batch = {"item_id": labels, "category": categories, "class_index": class_index,
           "rng": jnp.array([0, 1], jnp.uint32)}  # the key the trainer derives from the step
  # What the models return beside the embedding: capsule lengths (capsule models), BIER's head outputs.
  outputs = {"capsule_lengths": jnp.full((9, 2), 0.5), "bier_regularizer": x, "embedding_kernel": jnp.ones((5, 4))}
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
