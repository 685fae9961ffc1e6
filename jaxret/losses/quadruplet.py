"""Quadruplet losses: Chen et al.'s (a pair of other labels as a second negative) and QRCCapsNet's
category-aware one (same-category and other-category negatives), batch-hard or batch-all mined (or, for the
category-aware one, random tuples as in the published code), without `[B, B, B]` tensors (see
`jaxret.losses.triplet` for what every loss guarantees)."""

import jax
import jax.numpy as jnp

from jaxret import miners
from jaxret import reductions
from jaxret.distances import METRICS
from jaxret.losses.inputs import batch_distances
from jaxret.losses.inputs import batch_key
from jaxret.losses.inputs import check_labels
from jaxret.losses.inputs import hinge
from jaxret.losses.inputs import pick
from jaxret.losses.registry import Loss
from jaxret.losses.registry import Option
from jaxret.losses.triplet import batch_all_triplet_sums

QUADRUPLET_MINING = ("batch_hard", "batch_all")
CATEGORY_QUADRUPLET_MINING = ("batch_hard", "batch_all", "random")


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


def batch_all_negative_pair_sums(distances: jax.Array, labels: jax.Array,
                                 margin: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Sum and number of the positive losses max(d_ap - d_ij + margin, 0) of Chen et al.'s second term.

  Over every positive pair (a, p) (same label, p != a) and every unordered pair {i, j} whose labels differ
  from each other and from a's label c, without a `[B, B, B]` (let alone `[B]^4`) tensor. No pair of different
  labels has both ends of label c, so the admissible pairs are all pairs of different labels minus those
  with one end of label c. For t = d_ap + margin:
    sum over admissible d_ij < t of (t - d_ij) = G(t) - E_c(t),
  G(t) the same sum over all pairs of different labels (one sort of the pair distances, prefix sums and a
  binary search per threshold), E_c(t) over the ordered pairs (i, j) with labels[i] = c != labels[j] (each
  pair with an end of label c exactly once). E_c comes from one sort of all `[B, B]` entries by (row label,
  value): the thresholds sit at the positive entries, the pair distances at the negative ones, and the count
  and sum of pair distances below a threshold within its label's segment are prefix sums minus the prefix at
  the segment's start. O(B^2 log B) time, O(B^2) memory; the gradient is that of the explicit sum. The sums
  are differences of prefix sums over up to B^2 / 2 pairs, so their float32 rounding grows with B (the
  count and the gradient are exact; in float64 the value matches the loop to rounding).

  Args:
    distances: `[B, B]` distances.
    labels: `[B]` integer labels.
    margin: the margin.

  Returns:
    `(total, count)`: scalar sum of the losses and scalar (float) number of (a, p, {i, j}) with positive loss.
  """
  batch_size = distances.shape[0]
  positive, negative = miners.label_masks(labels)
  highest = jnp.finfo(distances.dtype).max
  # One value per unordered pair, d[min(i, j), max(i, j)], so that G and E_c see the same number for {i, j}.
  upper = jnp.triu(jnp.ones((batch_size, batch_size), bool), k=1)
  pair_distances = jnp.where(upper, distances, distances.T)
  # Everything relative to the nearest pair of different labels (a constant for the gradient), so that
  # count * t - prefix sum subtracts numbers of the size of the distances' spread (as in batch-all triplets).
  shift = jax.lax.stop_gradient(reductions.masked_min(pair_distances.ravel(), negative.ravel()))
  thresholds = (distances + margin - shift).ravel()
  values = (pair_distances - shift).ravel()

  # G(t): all unordered pairs of different labels.
  is_pair = (negative & upper).ravel()
  order = jnp.argsort(jnp.where(is_pair, jax.lax.stop_gradient(values), highest))
  sorted_is_pair = is_pair[order]
  sorted_keys = jnp.where(sorted_is_pair, jax.lax.stop_gradient(values)[order], highest)
  prefix = jnp.concatenate([jnp.zeros(1, values.dtype), jnp.cumsum(jnp.where(sorted_is_pair, values[order], 0.0))])
  counts_all = jnp.searchsorted(sorted_keys, jax.lax.stop_gradient(thresholds), side="left").astype(jnp.int32)
  sums_all = counts_all * thresholds - prefix[counts_all]

  # E_c(t): entries sorted by (row label, value, kind); kind 0 (thresholds) before 1 (pair distances) at
  # equal values, so that only pair distances strictly below a threshold count, as in G.
  kind = jnp.where(positive, 0, jnp.where(negative, 1, 2)).ravel()
  sort_value = jnp.where(kind == 0, thresholds, jnp.where(kind == 1, values, highest))
  row_labels = jnp.broadcast_to(labels[:, None], (batch_size, batch_size)).ravel()
  sorted_labels, _, sorted_kind, perm = jax.lax.sort(
      (row_labels, jax.lax.stop_gradient(sort_value), kind, jnp.arange(batch_size * batch_size)), num_keys=3)
  is_threshold, is_value = sorted_kind == 0, sorted_kind == 1
  cumulative_count = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(is_value, dtype=jnp.int32)])
  cumulative_sum = jnp.concatenate([jnp.zeros(1, values.dtype), jnp.cumsum(jnp.where(is_value, values[perm], 0.0))])
  segment_start = jnp.searchsorted(sorted_labels, sorted_labels, side="left")
  position = jnp.arange(1, batch_size * batch_size + 1)
  counts_own = cumulative_count[position] - cumulative_count[segment_start]
  sums_own = counts_own * thresholds[perm] - (cumulative_sum[position] - cumulative_sum[segment_start])

  # Per threshold, G - E_c: the count is exact; the sum is a difference of rounded sums, so it is set to 0
  # where no admissible pair is below the threshold and never allowed below 0 (a sum of positive losses).
  counts = jnp.where(is_threshold, counts_all[perm] - counts_own, 0)
  sums = jnp.where(counts > 0, jnp.maximum(sums_all[perm] - sums_own, 0.0), 0.0)
  return jnp.sum(sums), jnp.sum(counts).astype(distances.dtype)


def quadruplet_loss(embeddings: jax.typing.ArrayLike,
                    labels: jax.typing.ArrayLike,
                    *,
                    margin1: jax.typing.ArrayLike,
                    margin2: jax.typing.ArrayLike,
                    mining: str = "batch_hard",
                    squared: bool = False,
                    adaptive_margin: bool = False,
                    metric: str = "euclidean") -> jax.Array:
  """Quadruplet loss (Chen et al. 2017) with batch-hard or batch-all mining.

  Terms (a = anchor, p = positive, n = negative, {i, j} = a pair whose labels differ from each other and
  from a's label):
    term1 = max(d_ap - d_an + margin1, 0);  term2 = max(d_ap - d_ij + margin2, 0).
  Mining:
    * "batch_hard": for every valid anchor (at least one positive and one negative), d_ap = max over
      positives, d_an = min over negatives, d_ij = min over admissible pairs (term2 = 0 when there is no such
      pair, i.e. fewer than three labels in the batch: no quadruplet for a, and no spurious pull on d_ap);
      the loss is the mean of term1 + term2 over valid anchors. d_ij is found without a `[B, B, B]` tensor,
      see `miners.nearest_other_pair`.
    * "batch_all": every tuple; term1 averaged over the triplets (a, p, n) with positive loss, term2 over
      the (a, p, {i, j}) with positive loss (each 0 if there is none), and the loss is their sum. Term2's
      second distance is not anchored at a, so it is not a triplet: `batch_all_negative_pair_sums` counts
      the admissible pairs below each threshold as all pairs minus those touching a's label.

  Args:
    embeddings: `[B, D]` embeddings.
    labels: `[B]` integer labels.
    margin1: margin of the triplet term (ignored when `adaptive_margin`).
    margin2: margin of the pair-of-negatives term (ignored when `adaptive_margin`).
    mining: "batch_hard" or "batch_all".
    squared: use squared distances.
    adaptive_margin: replace both margins by `adaptive_margins(...)` of this batch (w = 1 and 0.5).
    metric: "euclidean" or "cosine", see `pairwise_distances`.

  Returns:
    Scalar loss.

  References:
    Chen, Chen, Zhang & Huang, "Beyond triplet loss: a deep quadruplet network for person
    re-identification", CVPR 2017.
  """
  if mining not in QUADRUPLET_MINING:
    raise ValueError(f"Unknown quadruplet mining {mining!r}; use one of {QUADRUPLET_MINING}.")
  distances = batch_distances(embeddings, squared=squared, metric=metric)
  labels = check_labels(labels, distances.shape[0], "labels")
  positive, negative = miners.label_masks(labels)
  if adaptive_margin:
    margin1, margin2 = adaptive_margins(distances, positive, negative)
  if mining == "batch_all":
    total1, count1 = batch_all_triplet_sums(distances, positive, negative, margin1)
    total2, count2 = batch_all_negative_pair_sums(distances, labels, margin2)
    return (total1 / jnp.maximum(count1, 1.0) + total2 / jnp.maximum(count2, 1.0)).astype(distances.dtype)
  hardest_positive, hardest_negative, valid = miners.batch_hard(distances, positive, negative)
  nearest_pair, has_pair = miners.nearest_other_pair(distances, labels)
  term1 = hinge(hardest_positive - hardest_negative + margin1)
  term2 = jnp.where(has_pair, hinge(hardest_positive - nearest_pair + margin2), 0.0)
  return reductions.masked_mean(term1 + term2, valid).astype(distances.dtype)


def category_quadruplet_terms(embeddings: jax.typing.ArrayLike,
                              item_labels: jax.typing.ArrayLike,
                              category_labels: jax.typing.ArrayLike,
                              *,
                              margin1: jax.typing.ArrayLike = 0.1,
                              margin2: jax.typing.ArrayLike = 1.0,
                              mining: str = "batch_hard",
                              squared: bool = True,
                              metric: str = "euclidean",
                              key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The two unweighted terms of `category_quadruplet_loss` (same arguments, less the weights).

  Returns:
    `(same_category_term, other_category_term)` scalars.
  """
  if mining not in CATEGORY_QUADRUPLET_MINING:
    raise ValueError(f"Unknown category_quadruplet mining {mining!r}; use one of {CATEGORY_QUADRUPLET_MINING}.")
  if mining == "random" and key is None:
    raise ValueError("mining='random' draws tuples at random: pass key=jax.random.key(...).")
  distances = batch_distances(embeddings, squared=squared, metric=metric)
  item_labels = check_labels(item_labels, distances.shape[0], "item_labels")
  category_labels = check_labels(category_labels, distances.shape[0], "category_labels")
  positive, other_item = miners.label_masks(item_labels)
  same_category, other_category = miners.label_masks(category_labels)
  same_category_negative = same_category & other_item

  if mining == "batch_all":
    # Both terms are triplets anchored at a: (a, p, n1) and (a, n1, n2), n1 in the role of the positive.
    total1, count1 = batch_all_triplet_sums(distances, positive, same_category_negative, margin1)
    total2, count2 = batch_all_triplet_sums(distances, same_category_negative, other_category, margin2)
    term1, term2 = total1 / jnp.maximum(count1, 1.0), total2 / jnp.maximum(count2, 1.0)
  elif mining == "random":
    keys = jax.random.split(key, 3)
    chosen_positive, has_positive = miners.random_choice(positive, keys[0])
    chosen_negative1, has_negative1 = miners.random_choice(same_category_negative, keys[1])
    chosen_negative2, has_negative2 = miners.random_choice(other_category, keys[2])
    # One quadruplet (a, p, n1, n2) per anchor: the same n1 in both terms.
    d_negative1 = pick(distances, chosen_negative1)
    term1 = reductions.masked_mean(hinge(pick(distances, chosen_positive) - d_negative1 + margin1),
                                   has_positive & has_negative1)
    term2 = reductions.masked_mean(hinge(d_negative1 - pick(distances, chosen_negative2) + margin2),
                                   has_negative1 & has_negative2)
  else:
    hardest_positive, hardest_negative1, valid1 = miners.batch_hard(distances, positive, same_category_negative)
    farthest_negative1 = reductions.masked_max(distances, same_category_negative)
    hardest_negative2 = reductions.masked_min(distances, other_category)
    valid2 = jnp.any(same_category_negative, axis=1) & jnp.any(other_category, axis=1)
    term1 = reductions.masked_mean(hinge(hardest_positive - hardest_negative1 + margin1), valid1)
    term2 = reductions.masked_mean(hinge(farthest_negative1 - hardest_negative2 + margin2), valid2)
  return term1.astype(distances.dtype), term2.astype(distances.dtype)


def category_quadruplet_loss(embeddings: jax.typing.ArrayLike,
                             item_labels: jax.typing.ArrayLike,
                             category_labels: jax.typing.ArrayLike,
                             *,
                             margin1: jax.typing.ArrayLike = 0.1,
                             margin2: jax.typing.ArrayLike = 1.0,
                             weight1: jax.typing.ArrayLike = 0.1,
                             weight2: jax.typing.ArrayLike = 0.9,
                             mining: str = "batch_hard",
                             squared: bool = True,
                             metric: str = "euclidean",
                             key: jax.Array | None = None) -> jax.Array:
  """Category-aware quadruplet loss of QRCCapsNet (Khatami & Fadaeieslam 2022, Eq. 1).

  With p = same item (p != a), n1 = same category but another item, n2 = another category, the terms are
    term1 = max(d(a, p) - d(a, n1) + margin1, 0)   (separates items within a category),
    term2 = max(d(a, n1) - d(a, n2) + margin2, 0)  (keeps categories apart),
  and loss = weight1 * term1 + weight2 * term2, each term reduced over its own tuples (0 if there is none).
  Mining:
    * "batch_hard": term1 per anchor with a p and an n1, with the farthest p and the nearest n1; term2 per
      anchor with an n1 and an n2, with the farthest n1 and the nearest n2; each averaged over its anchors.
    * "batch_all": every (a, p, n1) for term1 and every (a, n1, n2) for term2 (both are triplets anchored at
      a over masks, so `batch_all_triplet_sums` computes them without a `[B, B, B]` tensor); each term
      averaged over its tuples with positive loss.
    * "random" (the published code's random quadruplets): per anchor one p, one n1 and one n2 drawn
      uniformly from the batch with `key` (the same n1 in both terms); each term averaged over the anchors
      that have its tuple.

  Args:
    embeddings: `[B, D]` embeddings.
    item_labels: `[B]` integer item (product) ids.
    category_labels: `[B]` integer category ids.
    margin1, margin2: margins of the two terms.
    weight1, weight2: weights of the two terms.
    mining: "batch_hard", "batch_all" or "random".
    squared: use squared distances (the paper's choice, hence the default).
    metric: "euclidean" or "cosine", see `pairwise_distances`.
    key: PRNG key of the "random" mining (unused by the others).

  Returns:
    Scalar loss.

  References:
    Khatami & Fadaeieslam, "Fashion Image Retrieval With Quadruplet Capsule Networks" (QRCCapsNet), First
    Conference on Artificial Intelligence and Smart Computing, 2022, Eq. 1.
  """
  term1, term2 = category_quadruplet_terms(embeddings, item_labels, category_labels, margin1=margin1,
                                           margin2=margin2, mining=mining, squared=squared, metric=metric,
                                           key=key)
  return weight1 * term1 + weight2 * term2


def _category_quadruplet_apply(params, outputs, batch, *, weight1, weight2, **options):
  term1, term2 = category_quadruplet_terms(outputs["embedding"], batch["item_id"], batch["category"],
                                           key=batch_key(batch), **options)
  return weight1 * term1 + weight2 * term2, {"same_category": term1, "other_category": term2}


QUADRUPLET = Loss(
    name="quadruplet",
    apply=lambda params, outputs, batch, **options: quadruplet_loss(outputs["embedding"], batch["item_id"],
                                                                    **options),
    options={
        "margin1": Option(0.2, "Margin of the triplet term."),
        "margin2": Option(0.1, "Margin of the pair-of-negatives term."),
        "mining": Option("batch_hard", "Which tuples: " + ", ".join(QUADRUPLET_MINING) + ".",
                         choices=QUADRUPLET_MINING),
        "squared": Option(False, "Use squared distances."),
        "adaptive_margin": Option(False, "Margins from the batch's mean distances (Chen et al. Sec. 3.3)."),
        "metric": Option("euclidean", "Distance: euclidean or cosine.", choices=METRICS),
    },
    reference="Chen, Chen, Zhang & Huang, CVPR 2017")

CATEGORY_QUADRUPLET = Loss(
    name="category_quadruplet",
    apply=_category_quadruplet_apply,
    options={
        "margin1": Option(0.1, "Margin of the same-category term (paper: 0.1)."),
        "margin2": Option(1.0, "Margin of the other-category term (paper: 1.0)."),
        "weight1": Option(0.1, "Weight of the same-category term (paper: 0.1).", minimum=0.0),
        "weight2": Option(0.9, "Weight of the other-category term (paper: 0.9).", minimum=0.0),
        "mining": Option("batch_hard", "Which tuples: " + ", ".join(CATEGORY_QUADRUPLET_MINING)
                         + " (random: the published code's).", choices=CATEGORY_QUADRUPLET_MINING),
        "squared": Option(True, "Use squared distances (the paper's choice)."),
        "metric": Option("euclidean", "Distance: euclidean or cosine.", choices=METRICS),
    },
    reference="Khatami & Fadaeieslam 2022 (QRCCapsNet), Eq. 1")
