"""Metric-learning losses on a whole batch, as fixed-shape kernels over the `[B, B]` distance matrix.

Each loss takes the batch's embeddings `[B, D]` and integer labels `[B]` (a P x K batch: P products, K
images each, in any order; label values are arbitrary), mines its tuples online with boolean masks, and
returns a scalar. All of them

  * run under `jax.jit` (also on a sharded global batch): no Python loop over the batch, no dynamic shape;
  * use O(B^2) memory, never a `[B, B, B]` tuple tensor;
  * return 0, not NaN, when the batch has no valid tuple, and have finite gradients, also for duplicate
    embeddings;
  * return float32 for float32 (or bfloat16) embeddings, float64 for float64 ones.

An anchor is *valid* for a term when the tuples of that term exist for it (e.g. for batch-hard triplets:
at least one positive, i.e. another sample with its label, and one negative). Means are over valid anchors
(or pairs); a mean over nothing is 0.

The trainer looks losses up by config name with `get_loss(name)`; see `LOSSES`.

>>> import jax.numpy as jnp
>>> embeddings = jnp.array([[0., 0.], [0., 1.], [3., 0.], [3., 1.]])
>>> labels = jnp.array([7, 7, 42, 42])
>>> float(triplet_loss(embeddings, labels, margin=0.5))  # every anchor: max(1 - 3 + 0.5, 0)
0.0
>>> float(triplet_loss(embeddings, labels, margin=2.5))  # every anchor: 1 - 3 + 2.5
0.5
"""

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp

from jaxret import miners
from jaxret import reductions
from jaxret.distances import pairwise_distances
from jaxret.distances import safe_sqrt

__all__ = [
    "LOSSES",
    "TRIPLET_MINING",
    "category_quadruplet_loss",
    "contrastive_loss",
    "get_loss",
    "pairwise_distances",
    "quadruplet_loss",
    "triplet_loss",
]

TRIPLET_MINING = ("batch_hard", "batch_all", "semi_hard")


def _check_labels(labels: jax.typing.ArrayLike, batch_size: int, name: str) -> jax.Array:
  labels = jnp.asarray(labels)
  if labels.shape != (batch_size,):
    raise ValueError(f"{name} must have shape [batch_size] = ({batch_size},) to match the embeddings; got "
                     f"{labels.shape}.")
  if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
    raise ValueError(f"{name} must be integer class ids; got dtype {labels.dtype}. Cast them with "
                     ".astype(jnp.int32).")
  return labels


def _distances(embeddings: jax.typing.ArrayLike, *, squared: bool, metric: str) -> jax.Array:
  embeddings = jnp.asarray(embeddings)
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must be [batch_size, dim]; got shape {embeddings.shape}.")
  return pairwise_distances(embeddings, squared=squared, metric=metric)


def _hinge(x: jax.Array) -> jax.Array:
  return jnp.maximum(x, 0.0)


def _batch_all_triplet_sums(distances: jax.Array, positive_mask: jax.Array, negative_mask: jax.Array,
                            margin: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Sum and number of the positive triplet losses max(d_ap - d_an + margin, 0), without a B^3 tensor.

  For a fixed (a, p) with t = d_ap + margin, the negatives with positive loss are those with d_an < t, a
  prefix of a's sorted negatives; their loss sums to k * t - (sum of the k smallest d_an), with k found by
  binary search. O(B^2 log B) time and O(B^2) memory; the gradient is the same as the B^3 sum's.

  Returns:
    `(total, count)`: scalar sum of the losses and scalar (float) number of triplets with positive loss.
  """
  batch_size = distances.shape[0]
  sorted_negatives, num_negatives = miners.sorted_negative_distances(distances, negative_mask)
  # Work relative to each anchor's nearest negative (a constant for the gradient) so that k * t - prefix
  # below subtracts numbers of the size of the distances' spread, not of the distances themselves.
  shift = jax.lax.stop_gradient(jnp.where(num_negatives > 0, sorted_negatives[:, 0], 0.0))[:, None]
  is_negative = jnp.arange(batch_size)[None, :] < num_negatives[:, None]
  shifted = jnp.where(is_negative, sorted_negatives - shift, 0.0)
  prefix_sums = jnp.concatenate([jnp.zeros((batch_size, 1), shifted.dtype), jnp.cumsum(shifted, axis=1)],
                                axis=1)
  thresholds = distances + margin
  # Negatives with d_an < d_ap + margin, i.e. the triplets (a, p, n) with positive loss.
  counts = miners.searchsorted_rows(sorted_negatives, thresholds, side="left")
  sums = counts * (thresholds - shift) - jnp.take_along_axis(prefix_sums, counts, axis=1)
  total = jnp.sum(jnp.where(positive_mask, sums, 0.0))
  count = jnp.sum(jnp.where(positive_mask, counts, 0)).astype(distances.dtype)
  return total, count


def triplet_loss(embeddings: jax.typing.ArrayLike,
                 labels: jax.typing.ArrayLike,
                 *,
                 margin: jax.typing.ArrayLike,
                 mining: str = "batch_hard",
                 squared: bool = False,
                 metric: str = "euclidean") -> jax.Array:
  """Triplet loss max(d_ap - d_an + margin, 0) with online mining over the whole batch.

  Mining (a = anchor, p = positive: same label and p != a, n = negative: other label):
    * "batch_hard" (Hermans et al. 2017): per valid anchor (>= 1 positive and >= 1 negative),
      max(max_p d_ap - min_n d_an + margin, 0); mean over valid anchors.
    * "batch_all": every triplet (a, p, n); mean over the triplets whose loss is > 0 (0 if there is none).
    * "semi_hard" (Schroff et al. 2015, as in TF-Addons): per positive pair (a, p) whose anchor has a
      negative, n is the closest negative with d_an > d_ap, or a's farthest negative if there is none;
      max(d_ap - d_an + margin, 0) averaged over those pairs.

  Args:
    embeddings: `[B, D]` embeddings.
    labels: `[B]` integer labels.
    margin: the margin (a float, or a scalar array e.g. from a schedule).
    mining: "batch_hard", "batch_all" or "semi_hard".
    squared: use squared distances.
    metric: "euclidean" or "cosine", see `pairwise_distances`.

  Returns:
    Scalar loss.

  Raises:
    ValueError: for an unknown mining or metric, or badly shaped inputs.

  References:
    Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person Re-Identification", arXiv 2017.
    Schroff, Kalenichenko & Philbin, "FaceNet: A Unified Embedding for Face Recognition and Clustering",
    CVPR 2015.
  """
  if mining not in TRIPLET_MINING:
    raise ValueError(f"Unknown triplet mining {mining!r}; use one of {TRIPLET_MINING}.")
  distances = _distances(embeddings, squared=squared, metric=metric)
  labels = _check_labels(labels, distances.shape[0], "labels")
  positive, negative = miners.label_masks(labels)
  if mining == "batch_hard":
    hardest_positive, hardest_negative, valid = miners.batch_hard(distances, positive, negative)
    loss = reductions.masked_mean(_hinge(hardest_positive - hardest_negative + margin), valid)
  elif mining == "semi_hard":
    negative_distance, valid = miners.semi_hard_negatives(distances, positive, negative)
    loss = reductions.masked_mean(_hinge(distances - negative_distance + margin), valid)
  else:
    total, count = _batch_all_triplet_sums(distances, positive, negative, margin)
    loss = total / jnp.maximum(count, 1.0)
  return loss.astype(distances.dtype)


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
  distances = _distances(embeddings, squared=squared, metric=metric)
  labels = _check_labels(labels, distances.shape[0], "labels")
  positive, negative = miners.label_masks(labels)
  if adaptive_margin:
    margin1, margin2 = adaptive_margins(distances, positive, negative)
  hardest_positive, hardest_negative, valid = miners.batch_hard(distances, positive, negative)
  nearest_pair, has_pair = miners.nearest_other_pair(distances, labels)
  term1 = _hinge(hardest_positive - hardest_negative + margin1)
  term2 = jnp.where(has_pair, _hinge(hardest_positive - nearest_pair + margin2), 0.0)
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
  distances = _distances(embeddings, squared=squared, metric=metric)
  item_labels = _check_labels(item_labels, distances.shape[0], "item_labels")
  category_labels = _check_labels(category_labels, distances.shape[0], "category_labels")
  positive, other_item = miners.label_masks(item_labels)
  same_category, other_category = miners.label_masks(category_labels)
  same_category_negative = same_category & other_item

  hardest_positive, hardest_negative1, valid1 = miners.batch_hard(distances, positive, same_category_negative)
  farthest_negative1 = reductions.masked_max(distances, same_category_negative)
  hardest_negative2 = reductions.masked_min(distances, other_category)
  valid2 = jnp.any(same_category_negative, axis=1) & jnp.any(other_category, axis=1)
  term1 = reductions.masked_mean(_hinge(hardest_positive - hardest_negative1 + margin1), valid1)
  term2 = reductions.masked_mean(_hinge(farthest_negative1 - hardest_negative2 + margin2), valid2)
  return (weight1 * term1 + weight2 * term2).astype(distances.dtype)


def contrastive_loss(embeddings: jax.typing.ArrayLike,
                     labels: jax.typing.ArrayLike,
                     *,
                     margin: jax.typing.ArrayLike,
                     metric: str = "euclidean") -> jax.Array:
  """Contrastive loss (Hadsell et al. 2006) over all B (B - 1) / 2 pairs i < j of the batch.

  Per pair: d^2 for the same label, max(margin - d, 0)^2 for different labels; the loss is the plain mean
  over all pairs (Hadsell's factor 1/2 is dropped; it only rescales). 0 for B < 2.

  Args:
    embeddings: `[B, D]` embeddings.
    labels: `[B]` integer labels.
    margin: distance beyond which negatives cost nothing.
    metric: "euclidean" or "cosine", see `pairwise_distances`.

  Returns:
    Scalar loss.

  References:
    Hadsell, Chopra & LeCun, "Dimensionality Reduction by Learning an Invariant Mapping", CVPR 2006.
  """
  embeddings = jnp.asarray(embeddings)
  if metric == "euclidean":
    # Positives use the squared distance directly: no sqrt, so its gradient is exact at duplicates.
    squared_distances = _distances(embeddings, squared=True, metric=metric)
    distances = safe_sqrt(squared_distances)
  else:
    distances = _distances(embeddings, squared=False, metric=metric)
    squared_distances = jnp.square(distances)
  batch_size = distances.shape[0]
  labels = _check_labels(labels, batch_size, "labels")
  same = labels[:, None] == labels[None, :]
  per_pair = jnp.where(same, squared_distances, jnp.square(_hinge(margin - distances)))
  upper = jnp.triu(jnp.ones((batch_size, batch_size), dtype=bool), k=1)
  return reductions.masked_mean(per_pair, upper).astype(distances.dtype)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "triplet": triplet_loss,
    "quadruplet": quadruplet_loss,
    "category_quadruplet": category_quadruplet_loss,
    "contrastive": contrastive_loss,
}


def get_loss(name: str, **kwargs) -> Callable[..., jax.Array]:
  """The loss called `name` in `LOSSES`, with `kwargs` (e.g. margins from the config) bound.

  `get_loss("category_quadruplet")` takes `(embeddings, item_labels, category_labels)`; the others take
  `(embeddings, labels)`.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}; use one of {sorted(LOSSES)}.")
  return functools.partial(LOSSES[name], **kwargs) if kwargs else LOSSES[name]
