"""Reductions over fixed-shape boolean masks, defined (as 0) when the mask selects nothing.

Under `jax.jit` the losses cannot gather the variable-length set of valid anchors or pairs; they keep
every row and reduce with a mask instead. The fill values are finite (not +-inf) so that no inf ever
appears in the forward pass, which keeps `jax_debug_infs` usable in training.
"""

import jax
import jax.numpy as jnp


def masked_mean(values: jax.typing.ArrayLike, mask: jax.typing.ArrayLike) -> jax.Array:
  """Mean of `values` where `mask` is True, over all axes; 0 when the mask is empty.

  Args:
    values: array, any shape.
    mask: boolean array broadcastable to `values`.

  Returns:
    Scalar. Masked-out entries get zero gradient, even when they are inf or NaN.
  """
  values = jnp.asarray(values)
  mask = jnp.broadcast_to(mask, values.shape)
  total = jnp.sum(jnp.where(mask, values, 0.0))
  count = jnp.sum(mask, dtype=values.dtype)
  return total / jnp.maximum(count, 1.0)


def masked_max(values: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, axis: int = -1) -> jax.Array:
  """Maximum of `values` where `mask` is True along `axis`; 0 where the mask selects nothing.

  Args:
    values: float array, e.g. `[B, B]` distances.
    mask: boolean array of the same shape.
    axis: axis to reduce.

  Returns:
    `values` with `axis` removed. The gradient goes to the maximal selected entry (split evenly on ties).
  """
  values = jnp.asarray(values)
  lowest = jnp.finfo(values.dtype).min
  result = jnp.max(jnp.where(mask, values, lowest), axis=axis)
  return jnp.where(jnp.any(mask, axis=axis), result, 0.0)


def masked_min(values: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, axis: int = -1) -> jax.Array:
  """Minimum of `values` where `mask` is True along `axis`; 0 where the mask selects nothing.

  Args:
    values: float array, e.g. `[B, B]` distances.
    mask: boolean array of the same shape.
    axis: axis to reduce.

  Returns:
    `values` with `axis` removed. The gradient goes to the minimal selected entry (split evenly on ties).
  """
  values = jnp.asarray(values)
  highest = jnp.finfo(values.dtype).max
  result = jnp.min(jnp.where(mask, values, highest), axis=axis)
  return jnp.where(jnp.any(mask, axis=axis), result, 0.0)
