"""Checks of the arrays every loss takes, and the distance matrix the losses start from."""

import jax
import jax.numpy as jnp

from jaxret.distances import pairwise_distances


def check_labels(labels: jax.typing.ArrayLike, batch_size: int, name: str) -> jax.Array:
  """`labels` as an array after checking it is `[batch_size]` integers; ValueError naming `name` if not."""
  labels = jnp.asarray(labels)
  if labels.shape != (batch_size,):
    raise ValueError(f"{name} must have shape [batch_size] = ({batch_size},) to match the embeddings; got "
                     f"{labels.shape}.")
  if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
    raise ValueError(f"{name} must be integer class ids; got dtype {labels.dtype}. Cast them with "
                     ".astype(jnp.int32).")
  return labels


def batch_distances(embeddings: jax.typing.ArrayLike, *, squared: bool, metric: str) -> jax.Array:
  """`[B, B]` distances of `[B, D]` embeddings (see `jaxret.distances.pairwise_distances`)."""
  embeddings = jnp.asarray(embeddings)
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must be [batch_size, dim]; got shape {embeddings.shape}.")
  return pairwise_distances(embeddings, squared=squared, metric=metric)


def hinge(x: jax.Array) -> jax.Array:
  """max(x, 0)."""
  return jnp.maximum(x, 0.0)
