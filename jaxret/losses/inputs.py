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


def float_embeddings(embeddings: jax.typing.ArrayLike, name: str = "embeddings") -> jax.Array:
  """`[B, D]` embeddings in at least float32 (bfloat16 in, float32 math and loss out)."""
  embeddings = jnp.asarray(embeddings)
  if embeddings.ndim != 2:
    raise ValueError(f"{name} must be [batch_size, dim]; got shape {embeddings.shape}.")
  return embeddings.astype(jnp.promote_types(embeddings.dtype, jnp.float32))


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Rows of `[B, D]` `x` divided by max(|x|, eps): exact for non-zero rows, finite gradient at zero."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def cosine_similarities(normalized: jax.Array, others: jax.Array | None = None) -> jax.Array:
  """`[B, M]` dot products of L2-normalised rows (`others` defaults to `normalized`), at full precision."""
  others = normalized if others is None else others
  return jnp.matmul(normalized, others.T, precision=jax.lax.Precision.HIGHEST)


def embedding_slices(embeddings: jax.Array, sizes, option: str) -> list[jax.Array]:
  """`[B, D]` split into consecutive `[B, size]` blocks (learners, levels) whose sizes sum to D.

  Args:
    embeddings: `[B, D]`.
    sizes: the block sizes, positive integers.
    option: the config option that holds `sizes`, named in the error.

  Raises:
    ValueError: when a size is not a positive integer or the sizes do not add up to D.
  """
  sizes = tuple(sizes)
  if not sizes or any(isinstance(s, bool) or not float(s).is_integer() or s < 1 for s in sizes):
    raise ValueError(f"{option} must be a tuple of positive integers; got {sizes!r}.")
  sizes = tuple(int(s) for s in sizes)
  if sum(sizes) != embeddings.shape[-1]:
    raise ValueError(f"{option}={sizes} adds up to {sum(sizes)}, but the embedding has "
                     f"{embeddings.shape[-1]} dimensions; make the model's embedding size the sum, or "
                     f"change {option}.")
  starts = [sum(sizes[:i]) for i in range(len(sizes))]
  return [embeddings[:, start:start + size] for start, size in zip(starts, sizes)]


def batch_key(batch) -> jax.Array | None:
  """The PRNG key of a loss in this step: `batch["rng"]` (key data the trainer derives from the seed and the
  step), or None when the batch has none (outside the trainer)."""
  data = batch.get("rng")
  return None if data is None else jax.random.wrap_key_data(data)


def pick(distances: jax.Array, index: jax.Array) -> jax.Array:
  """`distances[a, index[a]]` for every row a: `[B, N]`, `[B]` ints -> `[B]`."""
  return jnp.take_along_axis(distances, index[:, None], axis=1)[:, 0]
