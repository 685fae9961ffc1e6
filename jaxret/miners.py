"""Online tuple mining on a `[B, B]` distance matrix with fixed-shape masks.

Every miner returns full `[B]` or `[B, B]` arrays together with a boolean mask saying which entries are
real; nothing here has a data-dependent shape, so all of it runs under `jax.jit` on a sharded batch.
Memory is O(B^2): no miner builds a `[B, B, B]` triplet tensor.

Conventions: `distances[a, j]` is d(a, j); row `a` is the anchor. A positive of `a` is another sample
(j != a) with the same label, a negative is a sample with a different label.
"""

import functools

import jax
import jax.numpy as jnp

from jaxret import reductions


def label_masks(labels: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Positive and negative pair masks.

  Args:
    labels: `[B]` integer labels (any values, not necessarily 0..P-1).

  Returns:
    `(positive, negative)`, both `[B, B]` booleans: `positive[a, j]` is True when `labels[j] == labels[a]`
    and `j != a`; `negative[a, j]` is True when `labels[j] != labels[a]`.
  """
  labels = jnp.asarray(labels)
  same = labels[:, None] == labels[None, :]
  positive = same & ~jnp.eye(labels.shape[0], dtype=bool)
  return positive, ~same


def batch_hard(distances: jax.typing.ArrayLike, positive_mask: jax.typing.ArrayLike,
               negative_mask: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Hardest positive and hardest negative of every anchor (Hermans et al. 2017).

  Args:
    distances: `[B, B]` distances.
    positive_mask: `[B, B]` booleans, True at the anchor's positives.
    negative_mask: `[B, B]` booleans, True at the anchor's negatives.

  Returns:
    `(hardest_positive, hardest_negative, valid)`, each `[B]`: the largest positive distance, the smallest
    negative distance, and whether the anchor has at least one of each (the other two are 0 where not).

  References:
    Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person Re-Identification", 2017.
  """
  hardest_positive = reductions.masked_max(distances, positive_mask)
  hardest_negative = reductions.masked_min(distances, negative_mask)
  valid = jnp.any(positive_mask, axis=1) & jnp.any(negative_mask, axis=1)
  return hardest_positive, hardest_negative, valid


def sorted_negative_distances(distances: jax.typing.ArrayLike,
                              negative_mask: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """Each anchor's negative distances in ascending order, padded at the end.

  Args:
    distances: `[B, B]` distances.
    negative_mask: `[B, B]` booleans, True at the anchor's negatives.

  Returns:
    `(sorted_negatives, num_negatives)`: `[B, B]` where row `a` holds the `num_negatives[a]` negative
    distances of anchor `a` in ascending order followed by the largest finite float (padding that no
    search for a finite value lands before), and `[B]` int32 counts.
  """
  distances = jnp.asarray(distances)
  padding = jnp.finfo(distances.dtype).max
  sorted_negatives = jnp.sort(jnp.where(negative_mask, distances, padding), axis=1)
  num_negatives = jnp.sum(negative_mask, axis=1, dtype=jnp.int32)
  return sorted_negatives, num_negatives


def searchsorted_rows(sorted_rows: jax.Array, values: jax.Array, side: str) -> jax.Array:
  """Row-wise `jnp.searchsorted`: `[B, N]` sorted rows, `[B, M]` values -> `[B, M]` int32 indices.

  The default "scan" method is a binary search: O(B M log N) time and no `[B, M, N]` comparison tensor.
  """
  return jax.vmap(functools.partial(jnp.searchsorted, side=side))(sorted_rows, values).astype(jnp.int32)


def semi_hard_negatives(distances: jax.typing.ArrayLike, positive_mask: jax.typing.ArrayLike,
                        negative_mask: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """The semi-hard negative distance of every (anchor, positive) pair (FaceNet, as in TF-Addons).

  For the pair (a, p) this is the smallest d(a, n) over negatives n with d(a, n) > d(a, p) (strictly); when
  no negative is that far, it is the largest d(a, n) over all negatives of a.

  Args:
    distances: `[B, B]` distances.
    positive_mask: `[B, B]` booleans, True at the anchor's positives.
    negative_mask: `[B, B]` booleans, True at the anchor's negatives.

  Returns:
    `(negative_distance, valid)`, both `[B, B]`, indexed `[a, p]`: the chosen negative distance (0 where
    not valid) and whether (a, p) is a positive pair whose anchor has at least one negative.

  References:
    Schroff, Kalenichenko & Philbin, "FaceNet: A Unified Embedding for Face Recognition and Clustering",
    CVPR 2015.
  """
  distances = jnp.asarray(distances)
  sorted_negatives, num_negatives = sorted_negative_distances(distances, negative_mask)
  # Index of the first negative strictly farther than d(a, p); num_negatives[a] when there is none.
  first_farther = searchsorted_rows(sorted_negatives, distances, side="right")
  last_negative = (num_negatives - 1)[:, None]
  chosen = jnp.where(first_farther <= last_negative, first_farther, last_negative)
  negative_distance = jnp.take_along_axis(sorted_negatives, jnp.maximum(chosen, 0), axis=1)
  valid = positive_mask & (num_negatives > 0)[:, None]
  return jnp.where(valid, negative_distance, 0.0), valid


def nearest_other_pair(distances: jax.typing.ArrayLike,
                       labels: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  """For every anchor a, the smallest d(i, j) over pairs with labels[i] != labels[j], both != labels[a].

  This is the d_nn of the quadruplet loss (Chen et al. 2017). Taking it over all pairs would need a
  `[B, B, B]` tensor; instead, for every sample i keep two numbers:
    d1[i]: the distance to its nearest sample of another label (call that label l1[i]);
    d2[i]: the distance to its nearest sample whose label is neither labels[i] nor l1[i].
  For an anchor of label c and a sample i of another label, the nearest admissible partner of i (label
  neither labels[i] nor c) is at d2[i] if l1[i] == c, else at d1[i]. Exact ties are harmless: if two labels
  tie for i's nearest, d2[i] == d1[i]. So d_nn(a) = min over i with labels[i] != c of that, all in O(B^2).

  Args:
    distances: `[B, B]` symmetric distances.
    labels: `[B]` integer labels.

  Returns:
    `(d_nn, has_pair)`, both `[B]`: the distance (0 where there is no such pair) and whether at least two
    labels other than the anchor's occur in the batch.
  """
  distances = jnp.asarray(distances)
  labels = jnp.asarray(labels)
  different = labels[:, None] != labels[None, :]
  highest = jnp.finfo(distances.dtype).max
  nearest_other = jnp.argmin(jnp.where(different, distances, highest), axis=1)
  nearest_other_label = labels[nearest_other]
  nearest_d = reductions.masked_min(distances, different)
  has_other = jnp.any(different, axis=1)
  third_label = different & (labels[None, :] != nearest_other_label[:, None])
  second_d = reductions.masked_min(distances, third_label)
  has_third = jnp.any(third_label, axis=1)
  # [a, i]: does sample i's nearest other label coincide with the anchor's label?
  nearest_is_anchor_label = nearest_other_label[None, :] == labels[:, None]
  candidate = jnp.where(nearest_is_anchor_label, second_d[None, :], nearest_d[None, :])
  candidate_valid = different & jnp.where(nearest_is_anchor_label, has_third[None, :], has_other[None, :])
  return reductions.masked_min(candidate, candidate_valid), jnp.any(candidate_valid, axis=1)


def random_choice(mask: jax.typing.ArrayLike, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One column drawn uniformly at random among each row's True entries (random, not mined, tuples).

  The draw is the argmax of Gumbel noise over the row's True entries, which picks each of them with equal
  probability; no Python loop and no data-dependent shape.

  Args:
    mask: `[B, N]` booleans, e.g. the positives of every anchor.
    key: a JAX PRNG key.

  Returns:
    `(index, valid)`, both `[B]`: the chosen column (int32, 0 where the row has no True entry) and whether
    the row has one.
  """
  mask = jnp.asarray(mask)
  noise = jax.random.gumbel(key, mask.shape, jnp.float32)
  lowest = jnp.finfo(jnp.float32).min
  index = jnp.argmax(jnp.where(mask, noise, lowest), axis=1).astype(jnp.int32)
  valid = jnp.any(mask, axis=1)
  return jnp.where(valid, index, 0), valid
