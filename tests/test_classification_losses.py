"""The multi-task heads' losses (`category`, `attributes`) against float64 loops over every label: value and
gradient, masks, and the evaluation's category accuracy and attribute mAP against loops."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret import losses
from jaxret import metrics
from jaxret.losses import classification


def category_oracle(logits, labels, smoothing):
  total = 0.0
  for row, label in zip(np.asarray(logits, np.float64), labels):
    top = max(row)
    log_norm = top + math.log(sum(math.exp(v - top) for v in row))
    for c, value in enumerate(row):
      target = (1 - smoothing) * (c == label) + smoothing / len(row)
      total -= target * (value - log_norm)
  return total / len(labels)


def attribute_oracle(logits, attributes, has_attributes, max_weight):
  logits = np.asarray(logits, np.float64)
  num_rows, num_attributes = logits.shape
  weights = []
  for j in range(num_attributes):
    known = [i for i in range(num_rows) if has_attributes[i] and attributes[i, j] != 0]
    positives = sum(1 for i in known if attributes[i, j] > 0)
    negatives = len(known) - positives
    weights.append(min(max(negatives / max(positives, 1), 1.0), max_weight))
  total, count = 0.0, 0
  for i in range(num_rows):
    for j in range(num_attributes):
      if not has_attributes[i] or attributes[i, j] == 0:
        continue
      p = 1 / (1 + math.exp(-logits[i, j]))
      if attributes[i, j] > 0:
        total -= weights[j] * math.log(p)
      else:
        total -= math.log(1 - p)
      count += 1
  return total / max(count, 1)


def directional_check(fn, oracle, x, seed=0, step=1e-5):
  grad = np.asarray(jax.grad(fn)(jnp.asarray(x, jnp.float64)))
  assert np.isfinite(grad).all() and np.abs(grad).max() > 1e-4
  rng = np.random.default_rng(seed)
  for _ in range(3):
    direction = rng.normal(size=x.shape)
    numeric = (oracle(x + step * direction) - oracle(x - step * direction)) / (2 * step)
    assert abs(np.sum(grad * direction) - numeric) <= 1e-4 * max(abs(numeric), 1e-3)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_category_cross_entropy_matches_loop(smoothing):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)) * 3
  labels = np.array([0, 4, 2, 2, 1, 3])
  loss, accuracy = classification.category_cross_entropy(logits.astype(np.float32), labels,
                                                         label_smoothing=smoothing)
  want = category_oracle(logits, labels, smoothing)
  assert abs(float(loss) - want) <= 1e-5 * abs(want)
  assert float(accuracy) == pytest.approx(np.mean(np.argmax(logits, 1) == labels))
  with jax.enable_x64(True):
    directional_check(lambda z: classification.category_cross_entropy(z, labels, label_smoothing=smoothing)[0],
                      lambda z: category_oracle(z, labels, smoothing), logits)


def test_attribute_cross_entropy_matches_loop_with_unknown_labels_and_rows():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 7)) * 2
  attributes = rng.choice([-1, -1, -1, 0, 1], size=(5, 7)).astype(np.int8)
  attributes[:, 3] = -1  # An attribute without positives weighs its (absent) positives 1.
  attributes[0, 5] = 1
  has_attributes = np.array([True, True, False, True, True])
  for max_weight in (10.0, 1.5):
    got = classification.attribute_cross_entropy(logits.astype(np.float32), attributes, has_attributes,
                                                 max_positive_weight=max_weight)
    want = attribute_oracle(logits, attributes, has_attributes, max_weight)
    assert abs(float(got) - want) <= 1e-5 * abs(want)
  with jax.enable_x64(True):
    directional_check(lambda z: classification.attribute_cross_entropy(z, attributes, has_attributes),
                      lambda z: attribute_oracle(z, attributes, has_attributes, 10.0), logits)
    # Rows without annotations and unknown labels get no gradient.
    grad = np.asarray(jax.grad(lambda z: classification.attribute_cross_entropy(z, attributes, has_attributes))(
        jnp.asarray(logits)))
    assert np.all(grad[2] == 0) and np.all(grad[attributes == 0] == 0)


def test_attribute_loss_without_any_known_label_is_zero_and_finite():
  logits = jnp.ones((3, 4))
  value, grad = jax.value_and_grad(classification.attribute_cross_entropy)(
      logits, np.zeros((3, 4), np.int8), np.ones(3, bool))
  assert float(value) == 0.0 and np.isfinite(np.asarray(grad)).all()


def test_losses_name_the_missing_head_and_the_wrong_attribute_count():
  with pytest.raises(ValueError, match="config.model.num_categories"):
    losses.get_loss("category")({}, {"embedding": jnp.zeros((2, 3))}, {"category": jnp.zeros(2, jnp.int32)}, {
        "label_smoothing": 0.0})
  with pytest.raises(ValueError, match="config.model.num_attributes"):
    classification.attribute_cross_entropy(jnp.zeros((2, 3)), np.zeros((2, 4), np.int8), np.ones(2, bool))


def test_attribute_mean_average_precision_matches_loop():
  rng = np.random.default_rng(2)
  scores = rng.normal(size=(12, 5))
  labels = rng.choice([-1, 0, 1], size=(12, 5)).astype(np.int8)
  labels[:, 4] = -1  # No positive: left out of the mean.
  has = np.ones(12, bool)
  has[3] = False
  aps = []
  for j in range(5):
    rows = [i for i in range(12) if has[i] and labels[i, j] != 0]
    positives = [i for i in rows if labels[i, j] > 0]
    if not positives or len(positives) == len(rows):
      continue
    ranked = sorted(rows, key=lambda i: -scores[i, j])
    hits, total = 0, 0.0
    for rank, i in enumerate(ranked, 1):
      if labels[i, j] > 0:
        hits += 1
        total += hits / rank
    aps.append(total / len(positives))
  got = metrics.attribute_map(scores, labels, has)
  assert abs(got - np.mean(aps)) < 1e-12
