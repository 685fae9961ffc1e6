"""Multi-Similarity loss and its pair miner (Wang et al., CVPR 2019), as the official code computes them.

Works on the cosine similarities S of the L2-normalised embeddings (the loss normalises them itself). For
every anchor a, with P = its positives and N = its negatives:

  miner:  keep n in N with S_an + margin > min_{p in P} S_ap,   keep p in P with S_ap - margin < max_{n in N} S_an;
  loss_a = 1/alpha log(1 + sum_{kept p} exp(-alpha (S_ap - lambda)))
         + 1/beta  log(1 + sum_{kept n} exp( beta  (S_an - lambda))),

and loss = sum_a loss_a / B. As in msight-tech/research-ms-loss, an anchor whose kept positives or kept
negatives are empty adds 0 but still counts in B, and a "positive" whose similarity to the anchor is at
least 1 - 1e-5 (the anchor itself, or an exact duplicate of it) is not a positive.
"""

import jax
import jax.numpy as jnp

from jaxret import reductions
from jaxret.losses.inputs import check_labels
from jaxret.losses.inputs import cosine_similarities
from jaxret.losses.inputs import float_embeddings
from jaxret.losses.inputs import l2_normalize
from jaxret.losses.registry import Loss
from jaxret.losses.registry import Option

# The official code drops "positives" this similar to the anchor: the anchor itself and exact duplicates.
SELF_SIMILARITY_EPSILON = 1e-5


def multi_similarity_pairs(similarities: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *,
                           margin: jax.typing.ArrayLike = 0.1) -> tuple[jax.Array, jax.Array]:
  """The pairs the Multi-Similarity miner keeps, as `[B, B]` masks indexed `[anchor, other]`.

  Positives of a: same label, not a, S_ap < 1 - 1e-5. Negatives: other label. A negative is kept when
  S_an + margin > the anchor's smallest positive similarity, a positive when S_ap - margin < the anchor's
  largest negative similarity (strict, as the official code). An anchor without positives (or without
  negatives) keeps no pair.

  Args:
    similarities: `[B, B]` cosine similarities.
    labels: `[B]` integer labels.
    margin: the miner's epsilon (0.1 in the paper and the official code).

  Returns:
    `(kept_positive, kept_negative)`, `[B, B]` booleans.

  References:
    Wang, Han, Huang, Dong & Scott, "Multi-Similarity Loss with General Pair Weighting for Deep Metric
    Learning", CVPR 2019, Sec. 4.1 (pair mining).
  """
  similarities = jnp.asarray(similarities)
  labels = jnp.asarray(labels)
  same = labels[:, None] == labels[None, :]
  positive = same & ~jnp.eye(labels.shape[0], dtype=bool) & (similarities < 1.0 - SELF_SIMILARITY_EPSILON)
  negative = ~same
  has_positive = jnp.any(positive, axis=1, keepdims=True)
  has_negative = jnp.any(negative, axis=1, keepdims=True)
  hardest_positive = reductions.masked_min(similarities, positive)[:, None]
  hardest_negative = reductions.masked_max(similarities, negative)[:, None]
  kept_negative = negative & has_positive & (similarities + margin > hardest_positive)
  kept_positive = positive & has_negative & (similarities - margin < hardest_negative)
  return kept_positive, kept_negative


def multi_similarity_loss(embeddings: jax.typing.ArrayLike,
                          labels: jax.typing.ArrayLike,
                          *,
                          alpha: jax.typing.ArrayLike = 2.0,
                          beta: jax.typing.ArrayLike = 40.0,
                          threshold: jax.typing.ArrayLike = 0.5,
                          mining_margin: jax.typing.ArrayLike = 0.1) -> jax.Array:
  """Multi-Similarity loss with its miner (see the module docstring for the equations).

  Args:
    embeddings: `[B, D]` embeddings (L2-normalised here).
    labels: `[B]` integer labels.
    alpha: scale of the positive term (official code and paper: 2).
    beta: scale of the negative term (official code: 40; the paper's In-shop setting: 50).
    threshold: lambda, the similarity the two terms are centred on (0.5).
    mining_margin: epsilon of the miner (0.1).

  Returns:
    Scalar loss: the sum over anchors divided by the batch size; 0 when no anchor keeps both a positive and
    a negative.

  References:
    Wang, Han, Huang, Dong & Scott, "Multi-Similarity Loss with General Pair Weighting for Deep Metric
    Learning", CVPR 2019. Code: https://github.com/msight-tech/research-ms-loss
    (ret_benchmark/losses/multi_similarity_loss.py).
  """
  x = l2_normalize(float_embeddings(embeddings))
  labels = check_labels(labels, x.shape[0], "labels")
  similarities = cosine_similarities(x)
  kept_positive, kept_negative = multi_similarity_pairs(similarities, labels, margin=mining_margin)
  positive_term = reductions.masked_log1p_sum_exp(-alpha * (similarities - threshold), kept_positive) / alpha
  negative_term = reductions.masked_log1p_sum_exp(beta * (similarities - threshold), kept_negative) / beta
  valid = jnp.any(kept_positive, axis=1) & jnp.any(kept_negative, axis=1)
  per_anchor = jnp.where(valid, positive_term + negative_term, 0.0)
  return (jnp.sum(per_anchor) / x.shape[0]).astype(x.dtype)


LOSS = Loss(
    name="multi_similarity",
    apply=lambda params, outputs, batch, **options: multi_similarity_loss(outputs["embedding"],
                                                                          batch["item_id"], **options),
    options={
        "alpha": Option(2.0, "Scale of the positive term (paper and official code: 2).", minimum=0.0,
                        exclusive_minimum=True),
        "beta": Option(40.0, "Scale of the negative term (official code: 40; paper: 50).", minimum=0.0,
                       exclusive_minimum=True),
        "threshold": Option(0.5, "lambda: the similarity both terms are centred on (0.5)."),
        "mining_margin": Option(0.1, "epsilon of the pair miner (0.1).", minimum=0.0),
    },
    reference="Wang et al., CVPR 2019; msight-tech/research-ms-loss")
