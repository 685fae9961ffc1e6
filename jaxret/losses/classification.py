"""Classification losses of the multi-task heads (`models.heads.TaskHeads`): the garment's category (softmax
cross-entropy) and its attributes (multi-label binary cross-entropy, positives weighted up because they are
rare).

  category:   -mean_b log softmax(z_b)[y_b]                                    z = outputs["category_logits"]
  attributes: sum over known labels of w * BCE(a, t) / number of known labels  a = outputs["attribute_logits"]

Attribute labels are DeepFashion's: 1 (has it), -1 (has not), 0 (unknown, ignored); rows with
`has_attributes` False are ignored. The positive weight of attribute j is the batch's known negatives over
its known positives for j, clipped to [1, max_positive_weight] (negatives weigh 1): the positive and negative
labels of an attribute then count about equally, which is what FashionNet's and Bao's weighted
cross-entropies aim at; we estimate the ratio on the batch rather than on the dataset, so no statistics
of the training split are needed (docs/losses.md).

References:
  Z. Liu, P. Luo, S. Qiu, X. Wang, X. Tang. DeepFashion: Powering Robust Clothes Recognition and Retrieval with
    Rich Annotations. CVPR 2016 (FashionNet's category and attribute losses).
  S. Park, M. Shin, S. Ham, S. Choe, Y. Kang. Study on Fashion Image Retrieval Methods for Efficient Fashion
    Visual Search. CVPR Workshops 2019 (the object-category loss "OS").
"""

import jax
import jax.numpy as jnp

from jaxret.losses.inputs import check_labels
from jaxret.losses.registry import Loss
from jaxret.losses.registry import Option


def _logits(outputs, key: str, head: str) -> jax.Array:
  if key not in outputs:
    raise ValueError(f"The {head} loss reads outputs[{key!r}], which this model does not produce; give the model "
                     f"its {head} head (config.model.num_{head.replace('category', 'categories')}).")
  logits = jnp.asarray(outputs[key])
  if logits.ndim != 2:
    raise ValueError(f"outputs[{key!r}] must be [batch_size, classes]; got shape {logits.shape}.")
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def category_cross_entropy(logits: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *,
                           label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Mean softmax cross-entropy of `[B, C]` logits against `[B]` int labels, and the batch's accuracy.

  With `label_smoothing` s the target is `(1 - s) one_hot + s / C`.

  Returns:
    `(loss, accuracy)` scalars; accuracy is the fraction of rows whose argmax is the label.
  """
  logits = jnp.asarray(logits)
  labels = check_labels(labels, logits.shape[0], "labels")
  num_classes = logits.shape[1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  targets = (1.0 - label_smoothing) * targets + label_smoothing / num_classes
  loss = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))
  return loss, accuracy


def positive_weights(targets: jax.Array, known: jax.Array, max_positive_weight: float) -> jax.Array:
  """`[A]` weight of a positive label of each attribute: known negatives / known positives in the batch,
  clipped to [1, max_positive_weight] (1 for an attribute without positives)."""
  positives = jnp.sum(jnp.where(known, targets, 0.0), axis=0)
  negatives = jnp.sum(jnp.where(known, 1.0 - targets, 0.0), axis=0)
  return jnp.clip(negatives / jnp.maximum(positives, 1.0), 1.0, max_positive_weight)


def attribute_cross_entropy(logits: jax.typing.ArrayLike, attributes: jax.typing.ArrayLike,
                            has_attributes: jax.typing.ArrayLike, *, max_positive_weight: float = 10.0
                            ) -> jax.Array:
  """Weighted binary cross-entropy of `[B, A]` logits against `[B, A]` labels in {1, -1, 0 = unknown}.

  Args:
    logits: `[B, A]`.
    attributes: `[B, A]` int labels (1 has it, -1 has not, 0 unknown: ignored).
    has_attributes: `[B]` bool; rows without annotations are ignored.
    max_positive_weight: the most a positive label may weigh (see `positive_weights`).

  Returns:
    Scalar: the weighted sum of the known labels' cross-entropies over the number of known labels (0 when no
    label is known).
  """
  logits = jnp.asarray(logits)
  attributes = jnp.asarray(attributes)
  if attributes.shape != logits.shape:
    raise ValueError(f"attributes must have the logits' shape {logits.shape}; got {attributes.shape}. Set "
                     "config.model.num_attributes to the length of the dataset's attributes.")
  known = (attributes != 0) & jnp.asarray(has_attributes, bool)[:, None]
  targets = (attributes > 0).astype(logits.dtype)
  weights = jnp.where(targets > 0, positive_weights(targets, known, max_positive_weight)[None, :], 1.0)
  # log(sigmoid(a)) and log(1 - sigmoid(a)) without overflow.
  per_label = -(targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits))
  count = jnp.sum(known)
  return jnp.sum(jnp.where(known, weights * per_label, 0.0)) / jnp.maximum(count, 1).astype(logits.dtype)


def _apply_category(params, outputs, batch, *, label_smoothing):
  del params
  loss, accuracy = category_cross_entropy(_logits(outputs, "category_logits", "category"), batch["category"],
                                          label_smoothing=label_smoothing)
  return loss, {"accuracy": accuracy}


def _apply_attributes(params, outputs, batch, *, max_positive_weight):
  del params
  return attribute_cross_entropy(_logits(outputs, "attribute_logits", "attribute"), batch["attributes"],
                                 batch["has_attributes"], max_positive_weight=max_positive_weight)


CATEGORY = Loss(
    name="category",
    apply=_apply_category,
    options={"label_smoothing": Option(0.0, "Label smoothing of the softmax target.", minimum=0.0)},
    reference="Liu et al., DeepFashion (FashionNet), CVPR 2016; Park et al., CVPRW 2019 (OS).",
)

ATTRIBUTES = Loss(
    name="attributes",
    apply=_apply_attributes,
    options={"max_positive_weight": Option(10.0, "Largest weight of a positive attribute label.", minimum=1.0)},
    batch_features=("attributes", "has_attributes"),
    reference="Liu et al., DeepFashion (FashionNet), CVPR 2016.",
)
