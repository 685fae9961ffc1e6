"""Triplet loss with online mining over the whole batch: batch-hard, batch-all and semi-hard.

Like every loss here, it runs under `jax.jit` on a (sharded) global batch with no Python loop over the batch
and no dynamic shape, uses O(B^2) memory (never a `[B, B, B]` tuple tensor), returns 0 and finite gradients
when the batch has no valid tuple, and returns float32 for float32 or bfloat16 embeddings (float64 for
float64). An anchor is *valid* for a term when the tuples of that term exist for it; means are over valid
anchors (or pairs, or triplets) and a mean over nothing is 0.

>>> import jax.numpy as jnp
>>> embeddings = jnp.array([[0., 0.], [0., 1.], [3., 0.], [3., 1.]])
>>> labels = jnp.array([7, 7, 42, 42])
>>> float(triplet_loss(embeddings, labels, margin=0.5))  # every anchor: max(1 - 3 + 0.5, 0)
0.0
>>> float(triplet_loss(embeddings, labels, margin=2.5))  # every anchor: 1 - 3 + 2.5
0.5
"""

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

TRIPLET_MINING = ("batch_hard", "batch_all", "semi_hard", "random")


def batch_all_triplet_sums(distances: jax.Array, positive_mask: jax.Array, negative_mask: jax.Array,
                            margin: jax.typing.ArrayLike,
                            negative_distances: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Sum and number of the positive triplet losses max(d_ap - d_an + margin, 0), without a B^3 tensor.

  For a fixed (a, p) with t = d_ap + margin, the negatives with positive loss are those with d_an < t, a
  prefix of a's sorted negatives; their loss sums to k * t - (sum of the k smallest d_an), with k found by
  binary search. O(B^2 log B) time and O(B^2) memory; the gradient is the same as the B^3 sum's.

  Args:
    distances: `[B, B]` distances; `distances[a, p]` is the positive side of the triplets.
    positive_mask, negative_mask: `[B, B]` booleans of the anchors' positives and negatives.
    margin: scalar margin.
    negative_distances: `[B, B]` values used instead of `distances[a, n]` on the negative side. A margin
      that depends on (a, n), as HTL's, goes here: max(d_ap - d_an + m_an, 0) is
      max(d_ap - (d_an - m_an) + 0, 0).

  Returns:
    `(total, count)`: scalar sum of the losses and scalar (float) number of triplets with positive loss.
  """
  batch_size = distances.shape[0]
  negatives = distances if negative_distances is None else negative_distances
  sorted_negatives, num_negatives = miners.sorted_negative_distances(negatives, negative_mask)
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
                 metric: str = "euclidean",
                 key: jax.Array | None = None) -> jax.Array:
  """Triplet loss max(d_ap - d_an + margin, 0) with online mining over the whole batch.

  Mining (a = anchor, p = positive: same label and p != a, n = negative: other label):
    * "batch_hard" (Hermans et al. 2017): per valid anchor (>= 1 positive and >= 1 negative),
      max(max_p d_ap - min_n d_an + margin, 0); mean over valid anchors.
    * "batch_all": every triplet (a, p, n); mean over the triplets whose loss is > 0 (0 if there is none).
    * "semi_hard" (Schroff et al. 2015, as in TF-Addons): per positive pair (a, p) whose anchor has a
      negative, n is the closest negative with d_an > d_ap, or a's farthest negative if there is none;
      max(d_ap - d_an + margin, 0) averaged over those pairs.
    * "random" (the published RCCapsNet training): per valid anchor one positive and one negative drawn
      uniformly at random from the batch (`miners.random_choice` with `key`); mean over valid anchors.

  Args:
    embeddings: `[B, D]` embeddings.
    labels: `[B]` integer labels.
    margin: the margin (a float, or a scalar array e.g. from a schedule).
    mining: "batch_hard", "batch_all" or "semi_hard".
    squared: use squared distances.
    metric: "euclidean" or "cosine", see `pairwise_distances`.
    key: PRNG key of the "random" mining (unused by the others).

  Returns:
    Scalar loss.

  Raises:
    ValueError: for an unknown mining or metric, badly shaped inputs, or "random" without a key.

  References:
    Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person Re-Identification", arXiv 2017.
    Schroff, Kalenichenko & Philbin, "FaceNet: A Unified Embedding for Face Recognition and Clustering",
    CVPR 2015.
  """
  if mining not in TRIPLET_MINING:
    raise ValueError(f"Unknown triplet mining {mining!r}; use one of {TRIPLET_MINING}.")
  if mining == "random" and key is None:
    raise ValueError("mining='random' draws tuples at random: pass key=jax.random.key(...).")
  distances = batch_distances(embeddings, squared=squared, metric=metric)
  labels = check_labels(labels, distances.shape[0], "labels")
  positive, negative = miners.label_masks(labels)
  if mining == "batch_hard":
    hardest_positive, hardest_negative, valid = miners.batch_hard(distances, positive, negative)
    loss = reductions.masked_mean(hinge(hardest_positive - hardest_negative + margin), valid)
  elif mining == "random":
    positive_key, negative_key = jax.random.split(key)
    chosen_positive, has_positive = miners.random_choice(positive, positive_key)
    chosen_negative, has_negative = miners.random_choice(negative, negative_key)
    loss = reductions.masked_mean(
        hinge(pick(distances, chosen_positive) - pick(distances, chosen_negative) + margin),
        has_positive & has_negative)
  elif mining == "semi_hard":
    negative_distance, valid = miners.semi_hard_negatives(distances, positive, negative)
    loss = reductions.masked_mean(hinge(distances - negative_distance + margin), valid)
  else:
    total, count = batch_all_triplet_sums(distances, positive, negative, margin)
    loss = total / jnp.maximum(count, 1.0)
  return loss.astype(distances.dtype)


LOSS = Loss(
    name="triplet",
    apply=lambda params, outputs, batch, **options: triplet_loss(outputs["embedding"], batch["item_id"],
                                                                 key=batch_key(batch), **options),
    options={
        "margin": Option(0.2, "Margin between the positive and the negative distance."),
        "mining": Option("batch_hard", "Which triplets: " + ", ".join(TRIPLET_MINING) + ".",
                         choices=TRIPLET_MINING),
        "squared": Option(False, "Use squared distances."),
        "metric": Option("euclidean", "Distance: euclidean or cosine.", choices=METRICS),
    },
    reference="Hermans, Beyer & Leibe 2017; Schroff et al. 2015 (semi-hard)")
