"""Quadruplet losses: Chen et al.'s (a pair of other labels as a second negative) and QRCCapsNet's
category-aware one (same-category and other-category negatives), batch-hard mined, without `[B, B, B]`
tensors (see `jaxret.losses.triplet` for what every loss guarantees)."""

import jax
import jax.numpy as jnp

from jaxret import miners
from jaxret import reductions
from jaxret.distances import METRICS
from jaxret.losses.inputs import batch_distances
from jaxret.losses.inputs import check_labels
from jaxret.losses.inputs import hinge
from jaxret.losses.registry import Loss
from jaxret.losses.registry import Option

def adaptive_margins(distances: jax.typing.ArrayLike, positive_mask: jax.typing.ArrayLike,
                     negative_mask: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """The margins of Chen et al.'s margin-based online hard negative mining, as constants for the gradient.

  alpha = w * (mu_n - mu_p), with mu_p the mean distance over all ordered positive pairs (i != j, same
  label) of the batch and mu_n the mean over all ordered negative pairs (different labels), in the same
  distance the loss uses (squared or not); w = 1 for the first margin and 0.5 for the second. A mean over
  no pairs is 0. The margins are not clipped, so they are negative if negatives are on average closer.

  Args:
    distances: `[B, B]` distances.
    positive_mask: `[B, B]` booleans of positive pairs.
    negative_mask: `[B, B]` booleans of negative pairs.

  Returns:
    `(margin1, margin2)` scalars under `stop_gradient`.

  References:
    Chen, Chen, Zhang & Huang, "Beyond triplet loss: a deep quadruplet network for person
    re-identification", CVPR 2017, Sec. 3.3.
  """
  distances = jax.lax.stop_gradient(jnp.asarray(distances))
  gap = reductions.masked_mean(distances, negative_mask) - reductions.masked_mean(distances, positive_mask)
  return gap, 0.5 * gap


def quadruplet_loss(embeddings: jax.typing.ArrayLike,
                    labels: jax.typing.ArrayLike,
                    *,
                    margin1: jax.typing.ArrayLike,
                    margin2: jax.typing.ArrayLike,
                    squared: bool = False,
                    adaptive_margin: bool = False,
                    metric: str = "euclidean") -> jax.Array:
  """Quadruplet loss (Chen et al. 2017) with batch-hard mining.

  For every valid anchor a (at least one positive and one negative):
    term1 = max(d_ap - d_an + margin1, 0), d_ap = max over positives, d_an = min over negatives;
    term2 = max(d_ap - d_nn + margin2, 0), d_nn = min d(i, j) over pairs whose labels differ from each
            other and from a's label. term2 = 0 when there is no such pair (fewer than three labels in the
            batch): there is then no quadruplet for a, and no spurious pull on d_ap.
  The loss is the mean of term1 + term2 over valid anchors. d_nn is found without a `[B, B, B]` tensor,
  see `miners.nearest_other_pair`.

  Args:
    embeddings: `[B, D]` embeddings.
    labels: `[B]` integer labels.
    margin1: margin of the triplet term (ignored when `adaptive_margin`).
    margin2: margin of the pair-of-negatives term (ignored when `adaptive_margin`).
    squared: use squared distances.
    adaptive_margin: replace both margins by `adaptive_margins(...)` of this batch (w = 1 and 0.5).
    metric: "euclidean" or "cosine", see `pairwise_distances`.

  Returns:
    Scalar loss.

  References:
    Chen, Chen, Zhang & Huang, "Beyond triplet loss: a deep quadruplet network for person
    re-identification", CVPR 2017.
  """
  distances = batch_distances(embeddings, squared=squared, metric=metric)
  labels = check_labels(labels, distances.shape[0], "labels")
  positive, negative = miners.label_masks(labels)
  if adaptive_margin:
    margin1, margin2 = adaptive_margins(distances, positive, negative)
  hardest_positive, hardest_negative, valid = miners.batch_hard(distances, positive, negative)
  nearest_pair, has_pair = miners.nearest_other_pair(distances, labels)
  term1 = hinge(hardest_positive - hardest_negative + margin1)
  term2 = jnp.where(has_pair, hinge(hardest_positive - nearest_pair + margin2), 0.0)
  return reductions.masked_mean(term1 + term2, valid).astype(distances.dtype)


def category_quadruplet_loss(embeddings: jax.typing.ArrayLike,
                             item_labels: jax.typing.ArrayLike,
                             category_labels: jax.typing.ArrayLike,
                             *,
                             margin1: jax.typing.ArrayLike = 0.1,
                             margin2: jax.typing.ArrayLike = 1.0,
                             weight1: jax.typing.ArrayLike = 0.1,
                             weight2: jax.typing.ArrayLike = 0.9,
                             squared: bool = True,
                             metric: str = "euclidean") -> jax.Array:
  """Category-aware quadruplet loss of QRCCapsNet (Khatami & Fadaeieslam 2022, Eq. 1), batch-hard mined.

  With p = same item (p != a), n1 = same category but another item, n2 = another category:
    term1(a) = max(max_p d(a, p) - min_n1 d(a, n1) + margin1, 0), over anchors with a p and an n1;
    term2(a) = max(max_n1 d(a, n1) - min_n2 d(a, n2) + margin2, 0), over anchors with an n1 and an n2;
    loss = weight1 * mean(term1) + weight2 * mean(term2), each mean over its own valid anchors (0 if none).
  The first term separates items within a category, the second keeps categories apart.

  Args:
    embeddings: `[B, D]` embeddings.
    item_labels: `[B]` integer item (product) ids.
    category_labels: `[B]` integer category ids.
    margin1, margin2: margins of the two terms.
    weight1, weight2: weights of the two terms.
    squared: use squared distances (the paper's choice, hence the default).
    metric: "euclidean" or "cosine", see `pairwise_distances`.

  Returns:
    Scalar loss.

  References:
    Khatami & Fadaeieslam, "Fashion Image Retrieval With Quadruplet Capsule Networks" (QRCCapsNet), First
    Conference on Artificial Intelligence and Smart Computing, 2022, Eq. 1.
  """
  distances = batch_distances(embeddings, squared=squared, metric=metric)
  item_labels = check_labels(item_labels, distances.shape[0], "item_labels")
  category_labels = check_labels(category_labels, distances.shape[0], "category_labels")
  positive, other_item = miners.label_masks(item_labels)
  same_category, other_category = miners.label_masks(category_labels)
  same_category_negative = same_category & other_item

  hardest_positive, hardest_negative1, valid1 = miners.batch_hard(distances, positive, same_category_negative)
  farthest_negative1 = reductions.masked_max(distances, same_category_negative)
  hardest_negative2 = reductions.masked_min(distances, other_category)
  valid2 = jnp.any(same_category_negative, axis=1) & jnp.any(other_category, axis=1)
  term1 = reductions.masked_mean(hinge(hardest_positive - hardest_negative1 + margin1), valid1)
  term2 = reductions.masked_mean(hinge(farthest_negative1 - hardest_negative2 + margin2), valid2)
  return (weight1 * term1 + weight2 * term2).astype(distances.dtype)



QUADRUPLET = Loss(
    name="quadruplet",
    apply=lambda params, outputs, batch, **options: quadruplet_loss(outputs["embedding"], batch["item_id"],
                                                                    **options),
    options={
        "margin1": Option(0.2, "Margin of the triplet term."),
        "margin2": Option(0.1, "Margin of the pair-of-negatives term."),
        "squared": Option(False, "Use squared distances."),
        "adaptive_margin": Option(False, "Margins from the batch's mean distances (Chen et al. Sec. 3.3)."),
        "metric": Option("euclidean", "Distance: euclidean or cosine.", choices=METRICS),
    },
    reference="Chen, Chen, Zhang & Huang, CVPR 2017")

CATEGORY_QUADRUPLET = Loss(
    name="category_quadruplet",
    apply=lambda params, outputs, batch, **options: category_quadruplet_loss(
        outputs["embedding"], batch["item_id"], batch["category"], **options),
    options={
        "margin1": Option(0.1, "Margin of the same-category term (paper: 0.1)."),
        "margin2": Option(1.0, "Margin of the other-category term (paper: 1.0)."),
        "weight1": Option(0.1, "Weight of the same-category term (paper: 0.1).", minimum=0.0),
        "weight2": Option(0.9, "Weight of the other-category term (paper: 0.9).", minimum=0.0),
        "squared": Option(True, "Use squared distances (the paper's choice)."),
        "metric": Option("euclidean", "Distance: euclidean or cosine.", choices=METRICS),
    },
    reference="Khatami & Fadaeieslam 2022 (QRCCapsNet), Eq. 1")
