"""Contrastive loss over all pairs of the batch (see `jaxret.losses.triplet` for what every loss guarantees)."""

import jax
import jax.numpy as jnp

from jaxret import reductions
from jaxret.distances import METRICS
from jaxret.distances import safe_sqrt
from jaxret.losses.inputs import batch_distances
from jaxret.losses.inputs import check_labels
from jaxret.losses.inputs import hinge
from jaxret.losses.registry import Loss
from jaxret.losses.registry import Option


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
    squared_distances = batch_distances(embeddings, squared=True, metric=metric)
    distances = safe_sqrt(squared_distances)
  else:
    distances = batch_distances(embeddings, squared=False, metric=metric)
    squared_distances = jnp.square(distances)
  batch_size = distances.shape[0]
  labels = check_labels(labels, batch_size, "labels")
  same = labels[:, None] == labels[None, :]
  per_pair = jnp.where(same, squared_distances, jnp.square(hinge(margin - distances)))
  upper = jnp.triu(jnp.ones((batch_size, batch_size), dtype=bool), k=1)
  return reductions.masked_mean(per_pair, upper).astype(distances.dtype)



LOSS = Loss(
    name="contrastive",
    apply=lambda params, outputs, batch, **options: contrastive_loss(outputs["embedding"], batch["item_id"],
                                                                     **options),
    options={
        "margin": Option(1.0, "Distance beyond which negatives cost nothing."),
        "metric": Option("euclidean", "Distance: euclidean or cosine.", choices=METRICS),
    },
    reference="Hadsell, Chopra & LeCun, CVPR 2006")
