"""Capsule math as pure functions: squash, capsule length and dynamic routing by agreement.

Everything here works on arrays and holds no parameters; the Flax layers in `capsule_layers.py` call it.
`dynamic_routing` works on any leading batch dimensions at once (`[..., in_caps, out_caps, out_dim]`) with
batched einsums over the `[..., out_caps, in_caps, out_dim]` order; the routing iterations are an unrolled
Python loop over a static count, so the whole routing is one XLA computation under `jax.jit`. (Batched
einsums rather than a `jax.vmap` of a one-example function, and this order rather than the argument's: both
remove transposed copies of the prediction tensor; see docs/benchmarks.md.)

Precision: for half-precision inputs (bfloat16, float16) the routing logits, the softmax, the squash and the
outputs are float32; the products with the big prediction tensor are taken in the input dtype and summed in
float32 (`preferred_element_type`), so no float32 copy of `u_hat` is made. For float32 and float64 inputs
everything is in the input dtype.

References:
  S. Sabour, N. Frosst, G. E. Hinton. Dynamic Routing Between Capsules. NeurIPS 2017.
  https://arxiv.org/abs/1710.09829 (Procedure 1 and Eq. 1).
"""

import jax
from jax import lax
import jax.numpy as jnp

LOGIT_UPDATES = ("accumulate", "replace")

# Keras' K.epsilon(), used by the published CapsNet code inside the square root of the squash.
SQUASH_EPS = 1e-7


def _routing_dtype(dtype) -> jnp.dtype:
  """float32 for half-precision inputs, else the input dtype (float32 or float64)."""
  return jnp.promote_types(dtype, jnp.float32)


def squash(s: jax.typing.ArrayLike, axis: int = -1, eps: float = SQUASH_EPS) -> jax.Array:
  """Capsule non-linearity v = |s|^2 / (1 + |s|^2) * s / |s| (Sabour et al. 2017, Eq. 1).

  The norm is taken as sqrt(|s|^2 + eps), so the value and its gradient are finite (zero) at s = 0. The
  relative change this makes is about eps / (2 |s|^2): below 1e-4 for |s|^2 >= 1e-3 at the default eps.

  Args:
    s: `[..., dim, ...]` capsule input vectors along `axis`.
    axis: the capsule-vector axis.
    eps: added to |s|^2 under the square root.

  Returns:
    Array of the shape of `s` with every vector's length in [0, 1); float32 for half-precision inputs.

  Example:
    >>> import jax.numpy as jnp
    >>> v = squash(jnp.array([3.0, 4.0]))  # |s| = 5, so |v| = 25 / 26
    >>> bool(jnp.allclose(jnp.linalg.norm(v), 25 / 26))
    True
  """
  s = jnp.asarray(s)
  s = s.astype(_routing_dtype(s.dtype))
  squared_norm = jnp.sum(jnp.square(s), axis=axis, keepdims=True)
  scale = squared_norm / (1.0 + squared_norm) * lax.rsqrt(squared_norm + eps)
  return scale * s


def capsule_length(v: jax.typing.ArrayLike, axis: int = -1, eps: float = 1e-20) -> jax.Array:
  """Length |v| of capsule vectors, with a finite gradient at v = 0.

  Args:
    v: `[..., dim]` capsule vectors (the vector along `axis`).
    axis: the capsule-vector axis.
    eps: added to |v|^2 under the square root; changes lengths above 1e-8 by less than 1e-4 relative
      (class capsules of an untrained model can be as short as 1e-4, so it must be this small).

  Returns:
    `v.shape` without `axis`; float32 for half-precision inputs.
  """
  v = jnp.asarray(v)
  v = v.astype(_routing_dtype(v.dtype))
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axis) + eps)


def _route(u_hat: jax.Array, num_iterations: int, logit_update: str,
           stop_gradient_inner: bool) -> tuple[jax.Array, jax.Array]:
  """Procedure 1: `[..., in_caps, out_caps, out_dim]` -> (`[..., out_caps, out_dim]`, coupling)."""
  dtype = _routing_dtype(u_hat.dtype)
  # Routed as `[..., out_caps, in_caps, out_dim]`: every product below is then a batched matrix-vector product
  # over contiguous `[in_caps, out_dim]` blocks, with the batch dimensions (..., out_caps) leading, so XLA
  # needs no transposed copy of the prediction tensor (the einsum that makes u_hat writes it in this order).
  u_hat = jnp.swapaxes(u_hat, -3, -2)
  num_out = u_hat.shape[-3]
  u_hat_inner = lax.stop_gradient(u_hat) if stop_gradient_inner else u_hat
  # b_ij starts at zero for every example, so the first coupling is uniform, 1 / out_caps: it is not built
  # (a constant of the batch's shape that XLA would fold at compile time), the first s is a plain sum.
  logits = None  # b, transposed: [..., out_caps, in_caps]
  for iteration in range(num_iterations):
    is_last = iteration == num_iterations - 1
    u = u_hat if is_last else u_hat_inner
    if logits is None:
      coupling = jnp.full(u_hat.shape[:-1], 1.0 / num_out, dtype)
      s = jnp.sum(u, axis=-2, dtype=dtype) / num_out
    else:
      # c_i = softmax(b_i) over the parents j (out_caps): each input capsule spreads a unit of vote over the
      # output capsules. A softmax over in_caps would be a different (wrong) algorithm.
      coupling = jax.nn.softmax(logits, axis=-2)
      s = jnp.einsum("...ji,...jid->...jd", coupling.astype(u.dtype), u, preferred_element_type=dtype)
    v = squash(s)  # [..., out_caps, out_dim]
    if not is_last:
      agreement = jnp.einsum("...jid,...jd->...ji", u, v.astype(u.dtype), preferred_element_type=dtype)
      logits = agreement if logits is None or logit_update == "replace" else logits + agreement
  return v, jnp.swapaxes(coupling, -2, -1)


def dynamic_routing(u_hat: jax.typing.ArrayLike, num_iterations: int = 3, *, logit_update: str = "accumulate",
                    stop_gradient_inner: bool = False,
                    return_coupling: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Routing by agreement (Sabour, Frosst & Hinton 2017, Procedure 1).

  For each example: b = 0; repeat `num_iterations` times: c_i = softmax(b_i) over the parents j;
  s_j = sum_i c_ij u_hat_{j|i}; v_j = squash(s_j); then, except after the last iteration,
  b_ij += <u_hat_{j|i}, v_j> ("accumulate", the paper) or b_ij = <u_hat_{j|i}, v_j> ("replace", what the
  published RCCapsNet and QRCCapsNet Keras code does). With 1 iteration every c_ij = 1 / out_caps.

  Args:
    u_hat: `[..., in_caps, out_caps, out_dim]` prediction vectors u_hat_{j|i}; leading dims are batch.
    num_iterations: number of routing iterations r >= 1 (a static Python int).
    logit_update: "accumulate" or "replace", see above.
    stop_gradient_inner: if True, the iterations before the last see `stop_gradient(u_hat)`, so gradients
      reach `u_hat` only through the final weighted sum and the coupling coefficients act as constants
      (a common trick to make routing cheaper and more stable to train).
    return_coupling: if True, also return the coupling coefficients c of the last iteration.

  Returns:
    `v`: `[..., out_caps, out_dim]` output capsules, every vector shorter than 1. If `return_coupling`, the
    pair `(v, c)` with `c`: `[..., in_caps, out_caps]`, non-negative and summing to 1 over `out_caps`.
    float32 for half-precision `u_hat`, else `u_hat.dtype`.

  Raises:
    ValueError: for `u_hat` of rank < 3, `num_iterations` < 1 or an unknown `logit_update`.

  Example:
    >>> import jax
    >>> u_hat = jax.random.normal(jax.random.key(0), (2, 32, 10, 16))  # batch 2, 32 -> 10 capsules of 16-D
    >>> v, c = dynamic_routing(u_hat, 3, return_coupling=True)
    >>> v.shape, c.shape
    ((2, 10, 16), (2, 32, 10))
  """
  u_hat = jnp.asarray(u_hat)
  if u_hat.ndim < 3:
    raise ValueError(f"u_hat must have shape [..., in_caps, out_caps, out_dim]; got shape {u_hat.shape}.")
  if not isinstance(num_iterations, int) or num_iterations < 1:
    raise ValueError(f"num_iterations must be a Python int >= 1; got {num_iterations!r}.")
  if logit_update not in LOGIT_UPDATES:
    raise ValueError(f"Unknown logit_update {logit_update!r}; use one of {LOGIT_UPDATES}.")
  v, coupling = _route(u_hat, num_iterations, logit_update, stop_gradient_inner)
  return (v, coupling) if return_coupling else v
