"""The methods of issue 16 against float64 loops over hand-listed tuples: value (float32, under jit) and
gradient (float64 jax.grad against central differences of the loop), finite under masks, options checked."""

import itertools
import math

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret import losses
from jaxret import run_config
from jaxret import samplers_htl
from jaxret.losses import abe
from jaxret.losses import bier
from jaxret.losses import capsule_margin
from jaxret.losses import grid
from jaxret.losses import hdc
from jaxret.losses import htl
from jaxret.losses import multi_similarity
from jaxret.losses import proxy_anchor

# ---------------------------------------------------------------------------------------------------------
# Data and checks.


def clustered_batch(seed, num_classes, per_class, dim, noise=0.7):
  """A P x K batch in shuffled order: class centres plus noise, so that hinges and miners are mixed."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
  centres = rng.normal(size=(num_classes, dim))
  x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
  return x.astype(np.float32), labels.astype(np.int32)


def normalize(x, eps=1e-6):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def assert_close(got, want, rtol=1e-4):
  assert np.isfinite(got)
  assert abs(float(got) - want) <= rtol * max(abs(want), 1e-3), (float(got), want)


def assert_gradient_matches_oracle(fn, oracle, x, seed=0, num_directions=3, step=1e-5, grad=None):
  """jax.grad of `fn` (float64; or `grad` given) along random directions against central differences of
  the loop oracle."""
  grad = np.asarray(jax.jit(jax.grad(fn))(x) if grad is None else grad)
  assert np.all(np.isfinite(grad))
  assert np.max(np.abs(grad)) > 1e-4, "the data gives a zero gradient: the check would be empty"
  rng = np.random.default_rng(seed)
  for _ in range(num_directions):
    direction = rng.normal(size=x.shape)
    numeric = (oracle(x + step * direction) - oracle(x - step * direction)) / (2 * step)
    assert_close(np.sum(grad * direction), numeric)


# ---------------------------------------------------------------------------------------------------------
# Multi-Similarity.


def multi_similarity_oracle(x, labels, alpha=2.0, beta=40.0, threshold=0.5, margin=0.1, counts=None):
  """The official per-anchor loop (msight-tech/research-ms-loss), with empty sets skipped."""
  s = normalize(x) @ normalize(x).T
  total = 0.0
  for i in range(len(labels)):
    positives = [s[i, j] for j in range(len(labels)) if labels[j] == labels[i] and j != i and s[i, j] < 1 - 1e-5]
    negatives = [s[i, j] for j in range(len(labels)) if labels[j] != labels[i]]
    if not positives or not negatives:
      continue
    kept_negatives = [v for v in negatives if v + margin > min(positives)]
    kept_positives = [v for v in positives if v - margin < max(negatives)]
    if not kept_negatives or not kept_positives:
      if counts is not None:
        counts["skipped"] += 1
      continue
    if counts is not None:
      counts["used"] += 1
    total += 1 / alpha * math.log(1 + sum(math.exp(-alpha * (v - threshold)) for v in kept_positives))
    total += 1 / beta * math.log(1 + sum(math.exp(beta * (v - threshold)) for v in kept_negatives))
  return total / len(labels)


@pytest.mark.parametrize("case", [(4, 3, 8, 0.9, 40.0), (6, 2, 16, 2.0, 50.0)], ids=str)
def test_multi_similarity_matches_loop(case):
  num_classes, per_class, dim, noise, beta = case
  x, labels = clustered_batch(num_classes + dim, num_classes, per_class, dim, noise)
  counts = {"used": 0, "skipped": 0}
  want = multi_similarity_oracle(x, labels, beta=beta, counts=counts)
  assert counts["used"] > 0 and counts["skipped"] > 0, counts  # both branches of the miner are exercised
  got = jax.jit(lambda v, y: multi_similarity.multi_similarity_loss(v, y, beta=beta))(x, labels)
  assert got.dtype == jnp.float32
  assert_close(got, want)
  with jax.enable_x64(True):
    x64 = x.astype(np.float64)
    assert_gradient_matches_oracle(lambda v: multi_similarity.multi_similarity_loss(v, labels, beta=beta),
                                   lambda v: multi_similarity_oracle(v, labels, beta=beta), x64)


# ---------------------------------------------------------------------------------------------------------
# Proxy-Anchor.


def proxy_anchor_oracle(x, labels, proxies, alpha=32.0, delta=0.1):
  cos = normalize(x) @ normalize(proxies).T
  positive_total, with_positives, negative_total = 0.0, 0, 0.0
  for c in range(len(proxies)):
    members = [b for b in range(len(labels)) if labels[b] == c]
    others = [b for b in range(len(labels)) if labels[b] != c]
    if members:
      with_positives += 1
      positive_total += math.log(1 + sum(math.exp(-alpha * (cos[b, c] - delta)) for b in members))
    negative_total += math.log(1 + sum(math.exp(alpha * (cos[b, c] + delta)) for b in others))
  return positive_total / with_positives + negative_total / len(proxies)


def test_proxy_anchor_matches_loop():
  x, labels = clustered_batch(3, 4, 3, 8)
  labels = labels * 2  # classes 0, 2, 4, 6 of 9: most proxies have no positive in the batch
  proxies = np.asarray(proxy_anchor.init_proxies(jax.random.key(1), 9, 8))
  got = jax.jit(proxy_anchor.proxy_anchor_loss)(x, labels, proxies)
  assert_close(got, proxy_anchor_oracle(x, labels, proxies))
  with jax.enable_x64(True):
    x64, p64 = x.astype(np.float64), proxies.astype(np.float64)
    assert_gradient_matches_oracle(lambda v: proxy_anchor.proxy_anchor_loss(v, labels, p64),
                                   lambda v: proxy_anchor_oracle(v, labels, p64), x64)
    assert_gradient_matches_oracle(lambda p: proxy_anchor.proxy_anchor_loss(x64, labels, p),
                                   lambda p: proxy_anchor_oracle(x64, labels, p), p64, seed=1)


def test_proxy_anchor_params():
  loss = losses.get_loss("proxy_anchor")
  options = loss.options_from({})
  assert options["lr_multiplier"] == 100.0 and options["alpha"] == 32.0 and options["delta"] == 0.1
  context = losses.LossContext(num_classes=2000, num_categories=3, embedding_dim=64)
  params = loss.init_params(jax.random.key(0), context, options)
  # kaiming_normal_(mode="fan_out") of a [2000, 64] tensor: std sqrt(2 / 2000).
  assert params["proxies"].shape == (2000, 64)
  np.testing.assert_allclose(np.std(params["proxies"]), math.sqrt(2 / 2000), rtol=0.02)


# ---------------------------------------------------------------------------------------------------------
# HTL: the tree, the loss, the sampler.


def htl_tree_oracle(features, class_index, num_classes, num_levels):
  """Python loops over samples, node pairs and a breadth-first search per level."""
  r = normalize(features)
  members = {c: [i for i in range(len(class_index)) if class_index[i] == c] for c in range(num_classes)}

  def mean_distance(a, b, distinct):
    values = [np.sum((r[i] - r[j])**2) for i in a for j in b if not (distinct and i == j)]
    return np.mean(values)

  spread = np.array([mean_distance(members[c], members[c], True) if len(members[c]) >= 2 else 0.0
                     for c in range(num_classes)])
  d0 = np.mean([spread[c] for c in range(num_classes) if len(members[c]) >= 2])
  thresholds = [d0 + level * (4 - d0) / num_levels for level in range(num_levels + 1)]
  partitions = [[frozenset([c]) for c in range(num_classes)]]
  for level in range(1, num_levels):
    nodes = partitions[-1]
    samples = [[i for c in node for i in members[c]] for node in nodes]
    neighbours = {k: set() for k in range(len(nodes))}
    for a, b in itertools.combinations(range(len(nodes)), 2):
      if samples[a] and samples[b] and mean_distance(samples[a], samples[b], False) < thresholds[level]:
        neighbours[a].add(b)
        neighbours[b].add(a)
    seen, merged = set(), []
    for start in range(len(nodes)):
      if start in seen:
        continue
      component, queue = set(), [start]
      while queue:
        k = queue.pop()
        if k not in seen:
          seen.add(k)
          component |= nodes[k]
          queue.extend(neighbours[k])
      merged.append(frozenset(component))
    partitions.append(merged)
  partitions.append([frozenset(range(num_classes))])
  return partitions, np.array(thresholds), spread


def partitions_of(node_of_class):
  node_of_class = np.asarray(node_of_class)
  return [set(frozenset(np.flatnonzero(row == node).tolist()) for node in np.unique(row)) for row in node_of_class]


def htl_loss_oracle(x, labels, node_of_class, thresholds, spread, beta=0.1, squared=False, average="all_triplets"):
  x = normalize(x)
  node_of_class = np.asarray(node_of_class)

  def merge_distance(p, q):
    level = next(l for l in range(len(node_of_class)) if node_of_class[l, p] == node_of_class[l, q])
    return thresholds[level]

  total, triplets, active = 0.0, 0, 0
  for a in range(len(labels)):
    for p in range(len(labels)):
      if p == a or labels[p] != labels[a]:
        continue
      for n in range(len(labels)):
        if labels[n] == labels[a]:
          continue
        d_ap, d_an = np.sum((x[a] - x[p])**2), np.sum((x[a] - x[n])**2)
        if not squared:
          d_ap, d_an = np.sqrt(d_ap), np.sqrt(d_an)
        value = d_ap - d_an + beta + merge_distance(labels[a], labels[n]) - spread[labels[a]]
        triplets += 1
        if value > 0:
          total += value
          active += 1
  if average == "all_triplets":
    return total / (2 * triplets) if triplets else 0.0
  return total / active if active else 0.0


def htl_train_features(seed=0):
  """Features of 9 classes in 3 well separated groups of 3 (class 8 has no image), 5 images each."""
  rng = np.random.default_rng(seed)
  groups = rng.normal(size=(3, 6)) * 2.0
  centres = np.concatenate([groups[g] + 0.6 * rng.normal(size=(3, 6)) for g in range(3)])[:8]
  class_index = np.repeat(np.arange(8), 5)
  features = centres[class_index] + 0.25 * rng.normal(size=(40, 6))
  return features.astype(np.float32), class_index


def test_htl_tree_matches_loops():
  features, class_index = htl_train_features()
  tree = htl.rebuild(features, class_index, num_classes=9, num_levels=16)
  partitions, thresholds, spread = htl_tree_oracle(features.astype(np.float64), class_index, 9, 16)
  np.testing.assert_allclose(tree["thresholds"], thresholds, rtol=1e-5)
  np.testing.assert_allclose(tree["class_spread"], spread, rtol=1e-4, atol=1e-6)
  assert partitions_of(tree["node_of_class"]) == [set(p) for p in partitions]
  # The data has structure at several levels: not everything merges at once.
  assert len({len(p) for p in partitions}) >= 3, [len(p) for p in partitions]
  np.testing.assert_array_equal(tree["class_counts"], [5] * 8 + [0])


@pytest.mark.parametrize("squared,average", [(False, "all_triplets"), (True, "active_triplets")])
def test_htl_loss_matches_loop(squared, average):
  features, class_index = htl_train_features()
  tree = htl.rebuild(features, class_index, num_classes=9, num_levels=16)
  x, labels = clustered_batch(5, 4, 3, 6, noise=0.5)
  labels = labels * 2  # classes 0, 2, 4, 6: pairs that merge at different levels
  kwargs = dict(beta=0.1, squared=squared, average=average)
  got = jax.jit(lambda v: htl.hierarchical_triplet_loss(v, labels, tree, **kwargs))(x)
  tree64 = {k: np.asarray(v, np.float64) for k, v in tree.items()}
  oracle_tree = (tree64["node_of_class"], tree64["thresholds"], tree64["class_spread"])
  assert_close(got, htl_loss_oracle(x, labels, *oracle_tree, **kwargs))
  with jax.enable_x64(True):
    assert_gradient_matches_oracle(lambda v: htl.hierarchical_triplet_loss(v, labels, tree64, **kwargs),
                                   lambda v: htl_loss_oracle(v, labels, *oracle_tree, **kwargs),
                                   x.astype(np.float64))


def test_htl_before_the_first_tree_is_a_plain_triplet_loss():
  x, labels = clustered_batch(6, 3, 4, 5)
  context = losses.LossContext(num_classes=3, num_categories=1, embedding_dim=5)
  loss = losses.get_loss("htl")
  options = loss.options_from({})
  params = loss.init_params(jax.random.key(0), context, options)
  got, _ = jax.jit(lambda p, v: loss(p, {"embedding": v}, {"class_index": labels}, options))(params, x)
  # No tree yet: all thresholds and spreads 0, so beta is the margin of every triplet.
  assert_close(got, htl_loss_oracle(x, labels, np.asarray(params["node_of_class"]), np.zeros(17), np.zeros(3),
                                    beta=0.1))
  assert options["lr_multiplier"] == 0.0 and loss.problems({"lr_multiplier": 1.0})


def test_htl_tree_is_constant_for_the_gradient():
  features, class_index = htl_train_features()
  tree = htl.rebuild(features, class_index, num_classes=9)
  x, labels = clustered_batch(5, 4, 3, 6)
  grads = jax.jit(jax.grad(lambda t: htl.hierarchical_triplet_loss(x, labels * 2, t)))(tree)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))


def test_htl_nearest_classes():
  features, class_index = htl_train_features()
  tree = htl.rebuild(features, class_index, num_classes=9)
  nearest = np.asarray(htl.nearest_classes(tree, 8))
  node_of_class = np.asarray(tree["node_of_class"])
  means = np.asarray(tree["class_means"], np.float64)
  for c in range(8):
    level = [next(l for l in range(17) if node_of_class[l, c] == node_of_class[l, o]) for o in range(9)]
    key = [(level[o], 2 - 2 * means[c] @ means[o]) for o in range(8) if o != c]
    assert list(nearest[c, :7]) == [o for _, o in sorted(zip(key, [o for o in range(8) if o != c]))]
    assert nearest[c, 7] == 8  # the class without images comes last
  with pytest.raises(ValueError, match="num_neighbours"):
    htl.nearest_classes(tree, 9)


def test_htl_sampler_is_a_pure_function_of_seed_step_and_tree():
  rng = np.random.default_rng(0)
  counts = rng.integers(2, 6, size=30)
  counts[[3, 17]] = 1  # never sampled
  class_index = rng.permutation(np.repeat(np.arange(30), counts))
  nearest = np.stack([(c + np.arange(1, 8)) % 30 for c in range(30)])
  make = lambda seed: samplers_htl.AnchorNeighbourSampler(class_index, nearest, anchors_per_batch=3,
                                                          classes_per_anchor=4, images_per_class=3, seed=seed)
  sampler = make(7)
  assert sampler.batch_size == 36 and sampler.steps_per_epoch == 28 // 3
  for step in (0, 1, 5, 20):
    records = sampler.batch_records(step)
    np.testing.assert_array_equal(records, make(7).batch_records(step))  # a new instance: same batch
    groups = sampler.batch_classes(step)
    assert groups.shape == (3, 4) and len(set(groups.ravel())) == 12  # no class twice
    assert not {3, 17} & set(groups.ravel())
    taken = set(groups[:, 0])
    for group in groups:
      # The anchor's nearest usable classes not already in the batch, in order; random ones when the list
      # runs out.
      expected = [c for c in nearest[group[0]] if c not in (3, 17) and c not in taken][:3]
      assert list(group[1:1 + len(expected)]) == expected
      taken |= set(group)
    labels = class_index[records]
    np.testing.assert_array_equal(labels, np.repeat(groups.ravel(), 3))
  assert not np.array_equal(make(8).batch_records(0), sampler.batch_records(0))
  anchors = np.concatenate([sampler.batch_classes(s)[:, 0] for s in range(sampler.steps_per_epoch)])
  assert len(set(anchors)) == len(anchors)  # each class at most once per epoch as an anchor
  with pytest.raises(run_config.ConfigError, match="needs 40 classes"):
    samplers_htl.AnchorNeighbourSampler(class_index, nearest, anchors_per_batch=10, classes_per_anchor=4,
                                        images_per_class=2, seed=0)


# ---------------------------------------------------------------------------------------------------------
# BIER and A-BIER.


def bier_oracle(x, labels, sizes, alpha=2.0, beta=0.5, cost=25.0, shrinkage=0.06, initial=0.5, negative_weight=2.0,
                weights_from=None):
  """train_bier.py's build_train (non-eta style) as loops over ordered pairs.

  The boosting weights are under stop-gradient: with `weights_from` (the point a gradient is taken at) they
  come from there and only the deviances see `x`, so that differences of this loop give that gradient.
  """
  n = len(labels)
  same = [[labels[i] == labels[j] for j in range(n)] for i in range(n)]
  num_same = sum(map(sum, same))  # the diagonal included, as the released code
  num_other = n * n - num_same

  def similarities(v):
    blocks = np.split(np.asarray(v, np.float64), np.cumsum(sizes)[:-1], axis=1)
    return [normalize(block, eps=1e-5) @ normalize(block, eps=1e-5).T for block in blocks]

  learner_similarities = similarities(x)
  boosting_similarities = similarities(x if weights_from is None else weights_from)
  weights = [[1.0] * n for _ in range(n)]
  activation = [[initial] * n for _ in range(n)]
  total = 0.0
  for s, s_boost in zip(learner_similarities, boosting_similarities):
    for i in range(n):
      for j in range(n):
        m = 1.0 if same[i][j] else -cost
        pair_weight = 0.0 if i == j else (1 / num_same if same[i][j] else 1 / num_other)
        total += weights[i][j] * pair_weight * math.log(1 + math.exp(-alpha * (s[i, j] - beta) * m)) / len(sizes)
    for i in range(n):
      for j in range(n):
        m = 1.0 if same[i][j] else -cost
        activation[i][j] += shrinkage * alpha * (s_boost[i, j] - beta) * m
        weights[i][j] = 1 / (1 + math.exp(activation[i][j])) * (1.0 if same[i][j] else negative_weight)
  return total


def test_bier_matches_loop():
  x, labels = clustered_batch(9, 4, 3, 12)
  sizes = (3, 4, 5)
  got = jax.jit(lambda v: bier.bier_loss(v, labels, learner_sizes=sizes)[0])(x)
  assert_close(got, bier_oracle(x, labels, sizes))
  with jax.enable_x64(True):
    assert_gradient_matches_oracle(lambda v: bier.bier_loss(v, labels, learner_sizes=sizes)[0],
                                   lambda v: bier_oracle(v, labels, sizes, weights_from=x.astype(np.float64)),
                                   x.astype(np.float64))


def a_bier_adversarial_oracle(regressors, regularizer, sizes, lambda_weight):
  """build_pairwise_tower_loss for every pair i < j, and the parts that depend on the embedding."""
  blocks = np.split(np.asarray(regularizer, np.float64), np.cumsum(sizes)[:-1], axis=1)
  correlation, penalties = 0.0, 0.0
  for i, j in itertools.combinations(range(len(sizes)), 2):
    hidden = blocks[j]
    layers = regressors[f"{i}_{j}"]
    for index, layer in enumerate(layers):
      hidden = hidden @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
      if index < len(layers) - 1:
        hidden = np.maximum(hidden, 0.0)
      kernel, bias = np.asarray(layer["kernel"], np.float64), np.asarray(layer["bias"], np.float64)
      penalties += lambda_weight * np.mean([(np.sum(row**2) - 1)**2 for row in kernel])
      penalties += lambda_weight * max(0.0, np.sum(bias**2) - 1)
    correlation += -np.mean((blocks[i] * hidden)**2)
  return correlation, penalties


def kernel_penalty_oracle(kernel, sizes):
  blocks = np.split(np.asarray(kernel, np.float64), np.cumsum(sizes)[:-1], axis=1)
  return sum(np.mean([(np.sum(row**2) - 1)**2 for row in block]) for block in blocks)


def test_a_bier_matches_loop_and_reverses_the_gradient():
  x, labels = clustered_batch(10, 3, 3, 12)
  sizes = (3, 4, 5)
  rng = np.random.default_rng(0)
  regularizer = rng.normal(size=x.shape)
  kernel = 0.4 * rng.normal(size=(7, 12))
  loss = losses.get_loss("a_bier")
  options = loss.options_from({"learner_sizes": sizes, "regressor_hidden_size": 6, "lambda_div": 0.3,
                               "lambda_weight": 2.0})
  context = losses.LossContext(num_classes=3, num_categories=1, embedding_dim=12)
  params = loss.init_params(jax.random.key(2), context, options)
  assert sorted(params["regressors"]) == ["0_1", "0_2", "1_2"]
  assert [layer["kernel"].shape for layer in params["regressors"]["0_2"]] == [(5, 6), (6, 3)]
  # Biases away from 0 so that their penalty is exercised.
  params = jax.tree.map(lambda p: p + 0.7 if p.ndim == 1 else p, params)
  batch = {"item_id": labels}

  def total(p, v, reg, ker):
    return loss(p, {"embedding": v, "bier_regularizer": reg, "embedding_kernel": ker}, batch, options)[0]

  def oracle(p, v, reg, ker):
    correlation, penalties = a_bier_adversarial_oracle(p["regressors"], reg, sizes, 2.0)
    return (bier_oracle(v, labels, sizes)
            + 0.3 * (correlation + penalties + 2.0 * kernel_penalty_oracle(ker, sizes)))

  assert_close(jax.jit(total)(params, x, regularizer.astype(np.float32), kernel.astype(np.float32)),
               oracle(params, x, regularizer, kernel))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x64 = x.astype(np.float64)
    flat, unflatten = ravel_pytree(p64)
    grads = jax.jit(jax.grad(lambda f, r, k: total(unflatten(f), x64, r, k), argnums=(0, 1, 2)))(
        flat, regularizer, kernel)
    # Regressors and the embedding kernel: the ordinary gradient.
    assert_gradient_matches_oracle(None, lambda f: oracle(unflatten(f), x64, regularizer, kernel),
                                   np.asarray(flat), grad=grads[0])
    assert_gradient_matches_oracle(None, lambda k: oracle(p64, x64, regularizer, k), kernel, grad=grads[2])
    # The learner outputs behind the gradient-reversal layer: minus the gradient of the loop.
    assert_gradient_matches_oracle(None, lambda r: oracle(p64, x64, r, kernel), regularizer, grad=-grads[1])


def test_bier_test_embedding():
  x = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
  x[2, :3] = 0.0  # a zero block stays zero (norm floor 1e-5, as eval_bier.py)
  got = np.asarray(bier.bier_test_embedding(x, (3, 4, 5)))
  want = np.concatenate([normalize(b, 1e-5) * (b.shape[1] / 12) for b in np.split(x, [3, 7], axis=1)], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_reverse_gradient():
  value, grad = jax.value_and_grad(lambda v: jnp.sum(bier.reverse_gradient(v) ** 2))(jnp.array([1.0, -2.0]))
  assert value == 5.0
  np.testing.assert_array_equal(grad, [-2.0, 4.0])


# ---------------------------------------------------------------------------------------------------------
# HDC.


def hdc_oracle(x, labels, dims, fractions, margin=1.0, cascade=False):
  n = len(labels)
  pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
  negatives = [(i, j) for i, j in pairs if labels[i] != labels[j]]
  candidates = negatives
  total, start = 0.0, 0
  for size, fraction in zip(dims, fractions):
    block = normalize(np.asarray(x, np.float64)[:, start:start + size])
    start += size
    d = {(i, j): np.sum((block[i] - block[j])**2) for i, j in pairs}
    positive_terms = [d[p] for p in pairs if labels[p[0]] == labels[p[1]]]
    kept = sorted(candidates, key=lambda p: d[p])[:math.floor(fraction * len(negatives) + 1e-4)]
    negative_terms = [max(margin - d[p], 0.0) for p in kept]
    count = len(positive_terms) + sum(t > 0 for t in negative_terms)
    total += (sum(positive_terms) + sum(negative_terms)) / max(count, 1)
    if cascade:
      candidates = kept
  return total


@pytest.mark.parametrize("cascade", [False, True])
def test_hdc_matches_loop(cascade):
  x, labels = clustered_batch(12, 4, 3, 15, noise=1.0)
  dims, fractions = (4, 5, 6), (1.0, 0.5, 0.2)
  fn = lambda v: hdc.hdc_loss(v, labels, level_dims=dims, negative_fractions=fractions, margin=1.5,
                              cascade=cascade)[0]
  oracle = lambda v: hdc_oracle(v, labels, dims, fractions, 1.5, cascade)
  assert_close(jax.jit(fn)(x), oracle(x))
  with jax.enable_x64(True):
    assert_gradient_matches_oracle(fn, oracle, x.astype(np.float64))


def test_hdc_cascade_differs_from_independent_levels():
  x, labels = clustered_batch(12, 4, 3, 15, noise=1.0)
  kwargs = dict(level_dims=(4, 5, 6), negative_fractions=(1.0, 0.3, 0.1), margin=1.5)
  independent, cascaded = jax.jit(lambda v: (hdc.hdc_loss(v, labels, **kwargs)[1][2],
                                             hdc.hdc_loss(v, labels, cascade=True, **kwargs)[1][2]))(x)
  assert abs(float(independent) - float(cascaded)) > 1e-4


# ---------------------------------------------------------------------------------------------------------
# ABE-M.


def abe_oracle(x, labels, num_learners, margin=1.0, lambda_div=1.0, divergence_margin=1.0, reduction="sum"):
  blocks = [normalize(b) for b in np.split(np.asarray(x, np.float64), num_learners, axis=1)]
  n = len(labels)
  metric = 0.0
  for f in blocks:
    terms = []
    for i in range(n):
      for j in range(i + 1, n):
        d = np.linalg.norm(f[i] - f[j])
        terms.append(d**2 if labels[i] == labels[j] else max(margin - d, 0.0)**2)
    metric += np.mean(terms)
  divergence = sum(max(divergence_margin - np.sum((blocks[m][i] - blocks[k][i])**2), 0.0)
                   for i in range(n) for m in range(num_learners) for k in range(num_learners) if m != k)
  if reduction == "mean":
    divergence /= n
  return metric + lambda_div * divergence


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_abe_matches_loop(reduction):
  x, labels = clustered_batch(14, 3, 3, 12)
  # Learner 3 is learner 2 plus a little noise: their divergence hinge is active.
  x[:, 9:12] = x[:, 6:9] + 0.2 * np.random.default_rng(0).normal(size=(9, 3))
  kwargs = dict(margin=1.2, lambda_div=0.7, divergence_margin=1.5, divergence_reduction=reduction)
  fn = lambda v: abe.abe_loss(v, labels, num_learners=4, **kwargs)[0]
  oracle = lambda v: abe_oracle(v, labels, 4, 1.2, 0.7, 1.5, reduction)
  assert_close(jax.jit(fn)(x), oracle(x))
  with jax.enable_x64(True):
    assert_gradient_matches_oracle(fn, oracle, x.astype(np.float64))


# ---------------------------------------------------------------------------------------------------------
# Grid loss.


def grid_oracle(x, labels, grid_size, temperature, scores):
  s = normalize(x) @ normalize(x).T
  per_query = []
  for q in range(len(labels)):
    positives = [j for j in range(len(labels)) if j != q and labels[j] == labels[q]]
    if not positives:
      continue
    negatives = sorted((j for j in range(len(labels)) if labels[j] != labels[q]), key=lambda j: -scores[q, j])
    candidates = positives + negatives[:max(grid_size - len(positives), 0)]
    numerator = sum(math.exp(s[q, j] / temperature) for j in positives)
    denominator = sum(math.exp(s[q, j] / temperature) for j in candidates)
    per_query.append(-math.log(numerator / denominator))
  return np.mean(per_query) if per_query else 0.0


@pytest.mark.parametrize("negatives", ["hardest", "random"])
def test_grid_matches_loop(negatives):
  x, labels = clustered_batch(15, 5, 3, 8)
  key = jnp.array([3, 11], jnp.uint32)
  kwargs = dict(grid_size=6, temperature=0.5, negatives=negatives, rng=key)
  fn = lambda v: grid.grid_loss(v, labels, **kwargs)
  random_scores = np.asarray(jax.random.uniform(key, (15, 15), jnp.float32), np.float64)
  oracle = lambda v: grid_oracle(v, labels, 6, 0.5, normalize(v) @ normalize(v).T if negatives == "hardest"
                                 else random_scores)
  assert_close(jax.jit(fn)(x), oracle(x))
  with jax.enable_x64(True):
    assert_gradient_matches_oracle(fn, oracle, x.astype(np.float64))


def test_grid_random_negatives_follow_the_key():
  x, labels = clustered_batch(15, 5, 3, 8)
  fn = jax.jit(lambda key: grid.grid_loss(x, labels, grid_size=4, rng=key))
  a, b = fn(jnp.array([0, 1], jnp.uint32)), fn(jnp.array([0, 2], jnp.uint32))
  assert a == fn(jnp.array([0, 1], jnp.uint32)) and a != b
  with pytest.raises(ValueError, match="batch\\['rng'\\]"):
    grid.grid_loss(x, labels)


# ---------------------------------------------------------------------------------------------------------
# Capsule margin loss.


def capsule_margin_oracle(lengths, labels, m_plus=0.9, m_minus=0.1, weight=0.5):
  total = 0.0
  for b in range(len(labels)):
    for k in range(lengths.shape[1]):
      if k == labels[b]:
        total += max(m_plus - lengths[b, k], 0.0)**2
      else:
        total += weight * max(lengths[b, k] - m_minus, 0.0)**2
  return total / len(labels)


def test_capsule_margin_matches_loop():
  rng = np.random.default_rng(0)
  lengths = rng.uniform(0.0, 1.0, size=(6, 5)).astype(np.float32)
  labels = np.array([0, 4, 2, 2, 1, 3])
  fn = lambda v: capsule_margin.capsule_margin_loss(v, labels, negative_weight=0.3)
  oracle = lambda v: capsule_margin_oracle(v, labels, weight=0.3)
  assert_close(jax.jit(fn)(lengths), oracle(lengths))
  with jax.enable_x64(True):
    assert_gradient_matches_oracle(fn, oracle, lengths.astype(np.float64))
  bf16 = jax.jit(fn)(jnp.asarray(lengths, jnp.bfloat16))
  assert bf16.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------------
# Every new loss through the registry: degenerate batches, dtypes, options.

NEW_LOSSES = ("multi_similarity", "proxy_anchor", "htl", "bier", "a_bier", "hdc", "abe", "grid", "capsule_margin")
DIM = 12
SMALL_OPTIONS = {
    "bier": {"learner_sizes": (3, 4, 5)},
    "a_bier": {"learner_sizes": (3, 4, 5), "regressor_hidden_size": 4},
    "hdc": {"level_dims": (3, 4, 5)},
    "abe": {"num_learners": 3},
}


def registry_losses():
  """`fn(x, labels) -> [num new losses]` values of every new loss called as the trainer calls it."""
  context = losses.LossContext(num_classes=16, num_categories=4, embedding_dim=DIM)
  calls = []
  for name in NEW_LOSSES:
    loss = losses.get_loss(name)
    options = loss.options_from(SMALL_OPTIONS.get(name, {}))
    calls.append((loss, options, loss.init_params(jax.random.key(0), context, options)))

  def values(v, labels):
    outputs = {"embedding": v, "capsule_lengths": jax.nn.sigmoid(v[:, :4]), "bier_regularizer": v,
               "embedding_kernel": jnp.ones((5, DIM), v.dtype)}
    batch = {"item_id": labels, "class_index": labels, "category": labels % 4,
             "rng": jnp.array([0, 3], jnp.uint32)}
    return jnp.stack([loss(params, outputs, batch, options)[0] for loss, options, params in calls])

  return values


def degenerate_batches():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, DIM)).astype(np.float32)
  duplicates = x.copy()
  duplicates[1] = duplicates[0]  # within a label
  duplicates[2] = duplicates[0]  # across labels
  duplicates[7] = 0.0  # a zero vector
  labels = np.array([3, 3, 5, 5, 8, 8, 9, 9])
  return {
      "duplicates": (duplicates, labels),
      "all_equal_embeddings": (np.ones((8, DIM), np.float32), labels),
      "one_label": (x, np.full(8, 4)),
      "all_labels_distinct": (x, np.arange(8)),
  }


# Losses that have no tuple (hence value 0 and zero gradient) in the batch.
NO_TUPLE = {
    "one_label": {"multi_similarity", "htl", "grid"},
    "all_labels_distinct": {"multi_similarity", "htl", "grid"},
}


def test_degenerate_batches_finite():
  values_fn = registry_losses()

  def weighted_sum(v, labels, weights):
    values = values_fn(v, labels)
    return jnp.dot(weights, values), values

  # Gradients of weighted sums instead of a Jacobian (one compile): a non-finite entry in the gradient of
  # any loss makes that of the sum non-finite too.
  grad_fn = jax.jit(jax.grad(weighted_sum, has_aux=True))
  for batch, (x, labels) in degenerate_batches().items():
    grad, values = grad_fn(x, labels, np.ones(len(NEW_LOSSES), np.float32))
    assert values.dtype == jnp.float32 and np.all(np.isfinite(values)), (batch, values)
    assert np.all(np.isfinite(grad)), batch
    empty = np.array([name in NO_TUPLE.get(batch, ()) for name in NEW_LOSSES])
    if empty.any():
      grad, values = grad_fn(x, labels, empty.astype(np.float32))
      np.testing.assert_array_equal(values[empty], 0.0)
      np.testing.assert_array_equal(grad, 0.0)


def test_bfloat16_embeddings_give_float32():
  x, labels = degenerate_batches()["duplicates"]
  values = jax.jit(registry_losses())(jnp.asarray(x, jnp.bfloat16), labels)
  assert values.dtype == jnp.float32 and np.all(np.isfinite(values))


def test_new_losses_are_registered_with_valid_defaults():
  for name in NEW_LOSSES:
    loss = losses.get_loss(name)
    assert loss.name == name and loss.reference
    assert loss.problems(loss.defaults()) == [], name
    assert "weight" not in loss.options  # the per-term weight is the trainer's, for sums of losses
  defaults = {name: losses.get_loss(name).defaults() for name in NEW_LOSSES}
  assert defaults["multi_similarity"] == {"alpha": 2.0, "beta": 40.0, "threshold": 0.5, "mining_margin": 0.1}
  assert defaults["bier"]["learner_sizes"] == (96, 160, 256) and defaults["bier"]["shrinkage"] == 0.06
  assert defaults["hdc"]["negative_fractions"] == (1.0, 0.5, 0.2) and defaults["hdc"]["margin"] == 1.0
  assert defaults["htl"]["beta"] == 0.1 and defaults["htl"]["num_levels"] == 16
  assert defaults["capsule_margin"] == {"positive_margin": 0.9, "negative_margin": 0.1, "negative_weight": 0.5}


@pytest.mark.parametrize("name,options,message", [
    ("multi_similarity", {"alpha": 0.0}, "alpha must be > 0.0"),
    ("proxy_anchor", {"lr_multiplier": -1.0}, "lr_multiplier must be >= 0.0"),
    ("htl", {"average": "some"}, "average must be one of"),
    ("bier", {"learner_sizes": 512}, "learner_sizes must be a tuple"),
    ("hdc", {"cascade": 1}, "cascade must be True or False"),
    ("abe", {"num_learners": 2.5}, "num_learners must be an integer"),
    ("grid", {"negatives": "semi_hard"}, "negatives must be one of"),
    ("capsule_margin", {"positive_margin": -0.1}, "positive_margin must be >= 0.0"),
])
def test_bad_options_are_refused(name, options, message):
  problems = losses.get_loss(name).problems(options)
  assert len(problems) == 1 and message in problems[0], problems


def test_shape_errors_say_what_to_do():
  x, labels = clustered_batch(0, 3, 2, 12)
  with pytest.raises(ValueError, match="adds up to 11, but the embedding has 12"):
    bier.bier_loss(x, labels, learner_sizes=(3, 4, 4))
  with pytest.raises(ValueError, match="one fraction in \\(0, 1\\] per level"):
    hdc.hdc_loss(x, labels, level_dims=(6, 6), negative_fractions=(1.0, 0.5, 0.2))
  with pytest.raises(ValueError, match="must divide the embedding size 12"):
    abe.abe_loss(x, labels, num_learners=5)
  with pytest.raises(ValueError, match="bier_regularizer"):
    losses.get_loss("a_bier")({}, {"embedding": x}, {"item_id": labels},
                              losses.get_loss("a_bier").options_from({"learner_sizes": (4, 4, 4)}))
  with pytest.raises(ValueError, match="capsule model"):
    losses.get_loss("capsule_margin")({}, {"embedding": x}, {"category": labels},
                                      losses.get_loss("capsule_margin").defaults())
  with pytest.raises(ValueError, match="proxies must be"):
    proxy_anchor.proxy_anchor_loss(x, labels, np.ones((3, 5)))
  context = losses.LossContext(num_classes=3, num_categories=1, embedding_dim=12)
  with pytest.raises(ValueError, match="adds up to 512"):
    losses.get_loss("a_bier").init_params(jax.random.key(0), context, losses.get_loss("a_bier").defaults())
