"""Grid loss: our reading of the Grid Search Network's training objective (Chopra et al., CVPRW 2019).

The paper was not available to us and has no public code; this is what we implement. Every image q of a
P x K batch is a query. Its grid holds all its positives (the other K - 1 images of its product) and
G - |positives| negatives from the batch, chosen at random (`negatives="random"`) or the most similar ones
(`"hardest"`). With s the cosine similarity of the L2-normalised embeddings and tau a temperature:

  loss_q = -log( sum_{p in positives} exp(s_qp / tau) / sum_{c in grid} exp(s_qc / tau) ),

averaged over the queries that have a positive. A query with at least G positives gets no negative (loss 0).
Random choices come from `batch["rng"]`, a `[2]` uint32 key that the trainer derives from the step.
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

GRID_NEGATIVES = ("random", "hardest")


def grid_negatives(scores: jax.Array, negative_mask: jax.Array, num_slots: jax.Array) -> jax.Array:
  """Each row's `num_slots[row]` negatives of highest score, as a `[B, B]` mask (fixed shape).

  Args:
    scores: `[B, B]` float scores (similarities for the hardest negatives, uniform noise for random ones).
    negative_mask: `[B, B]` booleans, the row's negatives.
    num_slots: `[B]` ints, how many negatives each row takes (more than it has takes them all).

  Returns:
    `[B, B]` booleans, a subset of `negative_mask`.
  """
  key = jnp.where(negative_mask, -scores, jnp.finfo(scores.dtype).max)
  rank = jnp.argsort(jnp.argsort(key, axis=1, stable=True), axis=1, stable=True)
  return negative_mask & (rank < num_slots[:, None])


def grid_loss(embeddings: jax.typing.ArrayLike,
              labels: jax.typing.ArrayLike,
              *,
              grid_size: int = 16,
              temperature: float = 0.1,
              negatives: str = "random",
              rng: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Grid loss (module docstring): -log of the softmax mass on the positives of each query's grid.

  Args:
    embeddings: `[B, D]` embeddings (L2-normalised here).
    labels: `[B]` integer labels.
    grid_size: G, the candidates in a grid (our choice: 16, a 4 x 4 grid).
    temperature: tau (our choice: 0.1).
    negatives: "random" or "hardest".
    rng: a PRNG key (`[2]` uint32 or a typed key); required for "random".

  Returns:
    Scalar loss; 0 when no query has a positive.

  References:
    Chopra, Sinha, Gupta, Sarkar, Krishnamurthy & Balasubramanian, "Powering Robust Fashion Retrieval
    With Information Rich Feature Embeddings", CVPR Workshops 2019 (the Grid Search Network).
  """
  if negatives not in GRID_NEGATIVES:
    raise ValueError(f"Unknown grid negatives {negatives!r}; use one of {GRID_NEGATIVES}.")
  if negatives == "random" and rng is None:
    raise ValueError("The grid loss with negatives='random' needs a PRNG key: batch['rng'] (a [2] uint32 "
                     "key derived from the step), or use negatives='hardest'.")
  x = l2_normalize(float_embeddings(embeddings))
  batch_size = x.shape[0]
  labels = check_labels(labels, batch_size, "labels")
  similarities = cosine_similarities(x)
  same = labels[:, None] == labels[None, :]
  positive = same & ~jnp.eye(batch_size, dtype=bool)
  negative = ~same
  num_positives = jnp.sum(positive, axis=1)
  if negatives == "random":
    # float32 whatever the embeddings' dtype: the same key draws the same grid in float32 and float64.
    scores = jax.random.uniform(rng, (batch_size, batch_size), jnp.float32)
  else:
    scores = jax.lax.stop_gradient(similarities)
  in_grid = positive | grid_negatives(scores, negative, jnp.maximum(grid_size - num_positives, 0))
  logits = similarities / temperature
  per_query = reductions.masked_logsumexp(logits, in_grid) - reductions.masked_logsumexp(logits, positive)
  return reductions.masked_mean(per_query, num_positives > 0).astype(x.dtype)


def _apply(params, outputs, batch, **options):
  del params
  return grid_loss(outputs["embedding"], batch["item_id"], rng=batch.get("rng"), **options)


LOSS = Loss(
    name="grid",
    apply=_apply,
    options={
        "grid_size": Option(16, "G: candidates per query's grid, its positives included (our choice: 16).",
                            minimum=2),
        "temperature": Option(0.1, "tau of the softmax over the grid (our choice: 0.1).", minimum=0.0,
                              exclusive_minimum=True),
        "negatives": Option("random", "How the grid's negatives are chosen: random (from batch['rng']) or "
                            "hardest.", choices=GRID_NEGATIVES),
    },
    reference="Chopra et al., CVPRW 2019 (our reading; paper and code not available)")
