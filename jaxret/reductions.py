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


def masked_logsumexp(values: jax.typing.ArrayLike, mask: jax.typing.ArrayLike, axis: int = -1) -> jax.Array:
  """log(sum of exp(values) where `mask` is True) along `axis`; 0 where the mask selects nothing.

  Args:
    values: float array, e.g. `[B, B]` scaled similarities.
    mask: boolean array of the same shape.
    axis: axis to reduce.

  Returns:
    `values` with `axis` removed. Stable for any magnitude (shifted by the masked maximum); masked-out
    entries get zero gradient even when they are huge, inf or NaN.
  """
  values = jnp.asarray(values)
  mask = jnp.broadcast_to(mask, values.shape)
  has_any = jnp.any(mask, axis=axis, keepdims=True)
  peak = jnp.max(jnp.where(mask, values, jnp.finfo(values.dtype).min), axis=axis, keepdims=True)
  # The shift cancels in value and gradient; stopping its gradient avoids splitting it across ties.
  peak = jax.lax.stop_gradient(jnp.where(has_any, peak, 0.0))
  # Inner where: exp of a masked-out entry is never formed, so its gradient is 0 rather than 0 * inf.
  terms = jnp.where(mask, jnp.exp(jnp.where(mask, values - peak, 0.0)), 0.0)
  total = jnp.sum(terms, axis=axis, keepdims=True)
  result = jnp.log(jnp.where(has_any, total, 1.0)) + peak
  return jnp.squeeze(jnp.where(has_any, result, 0.0), axis=axis)


def masked_log1p_sum_exp(values: jax.typing.ArrayLike, mask: jax.typing.ArrayLike,
                         axis: int = -1) -> jax.Array:
  """log(1 + sum of exp(values) where `mask` is True) along `axis`: 0 for an empty mask.

  The soft-plus of a masked log-sum-exp, the form of the Multi-Similarity, Proxy-Anchor and binomial
  terms; computed as a log-sum-exp that includes an extra 0, so it never overflows.

  Args:
    values: float array.
    mask: boolean array of the same shape.
    axis: axis to reduce.

  Returns:
    `values` with `axis` removed, >= 0. Masked-out entries get zero gradient.
  """
  values = jnp.asarray(values)
  mask = jnp.broadcast_to(mask, values.shape)
  peak = jnp.max(jnp.where(mask, values, jnp.finfo(values.dtype).min), axis=axis, keepdims=True)
  peak = jax.lax.stop_gradient(jnp.maximum(peak, 0.0))
  terms = jnp.where(mask, jnp.exp(jnp.where(mask, values - peak, 0.0)), 0.0)
  total = jnp.exp(-peak) + jnp.sum(terms, axis=axis, keepdims=True)
  return jnp.squeeze(jnp.log(total) + peak, axis=axis)
