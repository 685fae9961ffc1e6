"""Checks of the arrays every loss takes, the distance matrix the losses start from, and the step's key."""

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


def batch_key(batch) -> jax.Array | None:
  """The PRNG key of a loss in this step: `batch["rng"]` (key data the trainer derives from the seed and the
  step), or None when the batch has none (outside the trainer)."""
  data = batch.get("rng")
  return None if data is None else jax.random.wrap_key_data(data)


def pick(distances: jax.Array, index: jax.Array) -> jax.Array:
  """`distances[a, index[a]]` for every row a: `[B, N]`, `[B]` ints -> `[B]`."""
  return jnp.take_along_axis(distances, index[:, None], axis=1)[:, 0]
