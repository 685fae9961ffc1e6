"""HDC, hard-aware deeply cascaded embedding (Yuan et al., ICCV 2017): a contrastive loss per level.

The model puts an embedding head on several depths of the backbone (GoogLeNet: inception_4a, inception_4d,
pool5), each 128-D; `outputs["embedding"]` is their concatenation, read here as consecutive blocks of
`level_dims`, each L2-normalised here. At level k, over the unordered pairs i < j of the batch with d the
squared Euclidean distance:

  all positive pairs, term d_ij;
  the hardest floor(f_k * #negative pairs) negative pairs (smallest d), term [margin - d_ij]+;
  loss_k = (sum of those terms) / (#positive pairs + #kept negatives with a non-zero term);
  loss = sum_k loss_k,

with f = (1, 0.5, 0.2) and margin 1, as the PairFastLoss layers of the released Caffe code. The released
code mines every level independently among all pairs of the batch (`cascade=False`); with `cascade=True`
level k only chooses among the negative pairs level k - 1 kept, the paper's hand-off of hard samples.
"""

import jax
import jax.numpy as jnp

from jaxret.distances import pairwise_distances
from jaxret.losses.inputs import check_labels
from jaxret.losses.inputs import embedding_slices
from jaxret.losses.inputs import float_embeddings
from jaxret.losses.inputs import hinge
from jaxret.losses.inputs import l2_normalize
from jaxret.losses.registry import Loss
from jaxret.losses.registry import Option


def hardest_pairs(squared_distances: jax.Array, candidates: jax.Array, num_kept: jax.Array) -> jax.Array:
  """The `num_kept` candidate pairs with the smallest distance, as a `[B, B]` mask (fixed shape).

  Args:
    squared_distances: `[B, B]` distances.
    candidates: `[B, B]` booleans, the pairs to choose from.
    num_kept: int scalar (may be traced); more than the candidates keeps them all.

  Returns:
    `[B, B]` booleans, a subset of `candidates`. Exact ties are broken by position.
  """
  key = jnp.where(candidates, squared_distances, jnp.finfo(squared_distances.dtype).max).reshape(-1)
  order = jnp.argsort(key, stable=True)
  rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  return candidates & (rank.reshape(candidates.shape) < num_kept)


def hard_contrastive_level(embeddings: jax.Array, labels: jax.Array, negative_candidates: jax.Array, *,
                           num_kept: jax.Array, margin: float) -> tuple[jax.Array, jax.Array]:
  """One HDC level: all positive pairs and the `num_kept` hardest of `negative_candidates`.

  Args:
    embeddings: `[B, d]` L2-normalised level embedding.
    labels: `[B]` labels.
    negative_candidates: `[B, B]` booleans, unordered negative pairs (i < j) this level may choose from.
    num_kept: how many negative pairs to keep.
    margin: contrastive margin on the squared distance.

  Returns:
    `(loss, kept_negatives)`: the scalar level loss and the `[B, B]` mask of the negative pairs it kept.
  """
  squared = pairwise_distances(embeddings, squared=True)
  batch_size = labels.shape[0]
  upper = jnp.triu(jnp.ones((batch_size, batch_size), dtype=bool), k=1)
  positive = upper & (labels[:, None] == labels[None, :])
  kept_negatives = hardest_pairs(squared, negative_candidates, num_kept)
  negative_terms = hinge(margin - squared)
  total = jnp.sum(jnp.where(positive, squared, 0.0)) + jnp.sum(jnp.where(kept_negatives, negative_terms, 0.0))
  count = jnp.sum(positive) + jnp.sum(kept_negatives & (negative_terms > 0))
  return total / jnp.maximum(count, 1).astype(squared.dtype), kept_negatives


def hdc_loss(embeddings: jax.typing.ArrayLike,
             labels: jax.typing.ArrayLike,
             *,
             level_dims=(128, 128, 128),
             negative_fractions=(1.0, 0.5, 0.2),
             margin: float = 1.0,
             cascade: bool = False) -> tuple[jax.Array, list[jax.Array]]:
  """HDC's loss over the levels of a concatenated `[B, sum(level_dims)]` embedding (module docstring).

  Args:
    embeddings: `[B, D]` concatenated level embeddings (each block L2-normalised here).
    labels: `[B]` integer labels.
    level_dims: the size of each level's block (128, 128, 128).
    negative_fractions: the fraction of the batch's negative pairs each level keeps, hardest first
      (1, 0.5, 0.2); one per level, in (0, 1].
    margin: contrastive margin on the squared distance (1).
    cascade: level k chooses among the negatives level k - 1 kept (the paper), instead of among all (the
      released code).

  Returns:
    `(loss, level_losses)`: the scalar sum and each level's loss.

  References:
    Yuan, Yang & Zhang, "Hard-Aware Deeply Cascaded Embedding", ICCV 2017.
    Code: https://github.com/PkuRainBow/Hard-Aware-Deeply-Cascaed-Embedding (layers/pair_fast_loss_layer.cpp,
    model_train/Deep_Fashion/in_shop/HDC_deploy.prototxt).
  """
  x = float_embeddings(embeddings)
  labels = check_labels(labels, x.shape[0], "labels")
  blocks = embedding_slices(x, level_dims, "level_dims")
  fractions = tuple(negative_fractions)
  if len(fractions) != len(blocks) or not all(0.0 < f <= 1.0 for f in fractions):
    raise ValueError(f"negative_fractions must hold one fraction in (0, 1] per level ({len(blocks)} levels "
                     f"from level_dims); got {fractions!r}.")
  batch_size = labels.shape[0]
  upper = jnp.triu(jnp.ones((batch_size, batch_size), dtype=bool), k=1)
  all_negatives = upper & (labels[:, None] != labels[None, :])
  num_negatives = jnp.sum(all_negatives).astype(jnp.float32)
  candidates = all_negatives
  level_losses = []
  for block, fraction in zip(blocks, fractions):
    # Rounded down as the Caffe layer's int conversion; the tolerance keeps e.g. 0.7 * 10 at 7.
    num_kept = jnp.floor(fraction * num_negatives + 1e-4).astype(jnp.int32)
    level_loss, kept = hard_contrastive_level(l2_normalize(block), labels, candidates, num_kept=num_kept,
                                              margin=margin)
    level_losses.append(level_loss)
    if cascade:
      candidates = kept
  return sum(level_losses), level_losses


def _apply(params, outputs, batch, **options):
  del params
  loss, level_losses = hdc_loss(outputs["embedding"], batch["item_id"], **options)
  return loss, {f"level_{k}": value for k, value in enumerate(level_losses)}


LOSS = Loss(
    name="hdc",
    apply=_apply,
    options={
        "level_dims": Option((128, 128, 128), "Size of each level's embedding, consecutive blocks of the "
                             "embedding (128, 128, 128)."),
        "negative_fractions": Option((1.0, 0.5, 0.2), "Fraction of the negative pairs each level keeps, "
                                     "hardest first (1, 0.5, 0.2)."),
        "margin": Option(1.0, "Contrastive margin on the squared distance (1).", minimum=0.0,
                         exclusive_minimum=True),
        "cascade": Option(False, "Level k mines among level k-1's kept negatives (paper) instead of all "
                          "(released code)."),
    },
    reference="Yuan, Yang & Zhang, ICCV 2017; PkuRainBow/Hard-Aware-Deeply-Cascaed-Embedding")
