"""Capsule math as pure functions: squash, capsule length and dynamic routing by agreement.

Everything here works on arrays and holds no parameters; the Flax layers in `capsule_layers.py` call it.
`dynamic_routing` works on any leading batch dimensions at once (`[..., in_caps, out_caps, out_dim]`) with
batched einsums over the `[..., out_caps, in_caps, out_dim]` order; the routing iterations are an unrolled
Python loop over a static count, so the whole routing is one XLA computation under `jax.jit`. (Batched
einsums rather than a `jax.vmap` of a one-example function, and this order rather than the argument's: both
remove transposed copies of the prediction tensor; see docs/benchmarks.md.) `dynamic_routing_shared` computes
the same routing for shared prediction matrices from the input capsules, without building that tensor at all.

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


def dynamic_routing_shared(u: jax.typing.ArrayLike, kernel: jax.typing.ArrayLike, num_iterations: int = 3, *,
                           logit_update: str = "accumulate", stop_gradient_inner: bool = False,
                           return_coupling: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """`dynamic_routing` of the predictions u_hat_{j|i} = u_i W_j, without ever building u_hat.

  With one matrix W_j per output capsule, shared by all input capsules (`RoutedCapsules(share_weights=True)`),
  the predictions are linear in u_i with the same W_j for every i, so both products of the routing factor:

    s_j = sum_i c_ij u_hat_{j|i} = (sum_i c_ij u_i) W_j,   <u_hat_{j|i}, v_j> = <u_i, v_j W_j^T>.

  Every iteration then reads the input capsules `[..., in_caps, in_dim]` and the `[..., in_caps, out_caps]`
  logits, not the `[..., in_caps, out_caps, out_dim]` prediction tensor: at In-shop's 8,192 x 23 x 16 that is
  about `out_dim` times less memory to hold and to move, for the same FLOPs. The result equals
  `dynamic_routing(jnp.einsum("...id,djk->...ijk", u, kernel), ...)` up to float rounding (the sums are
  associated differently).

  Args:
    u: `[..., in_caps, in_dim]` input capsules; leading dims are batch.
    kernel: `[in_dim, out_caps, out_dim]`, the shared prediction matrices (W_j = `kernel[:, j, :]`).
    num_iterations, logit_update, stop_gradient_inner, return_coupling: as in `dynamic_routing`
      (`stop_gradient_inner` stops the gradient to `u` and `kernel` in the iterations before the last).

  Returns:
    As `dynamic_routing`: `v` `[..., out_caps, out_dim]`, and with `return_coupling` the coupling
    coefficients `[..., in_caps, out_caps]`. float32 for half-precision inputs, else their dtype.

  Raises:
    ValueError: for badly shaped inputs, `num_iterations` < 1 or an unknown `logit_update`.

  Example:
    >>> import jax
    >>> u = jax.random.normal(jax.random.key(0), (2, 32, 8))         # batch 2, 32 capsules of 8-D
    >>> kernel = jax.random.normal(jax.random.key(1), (8, 10, 16))   # -> 10 capsules of 16-D
    >>> v, c = dynamic_routing_shared(u, kernel, 3, return_coupling=True)
    >>> v.shape, c.shape
    ((2, 10, 16), (2, 32, 10))
  """
  u = jnp.asarray(u)
  kernel = jnp.asarray(kernel)
  if u.ndim < 2 or kernel.ndim != 3 or kernel.shape[0] != u.shape[-1]:
    raise ValueError(f"Expected u [..., in_caps, in_dim] and kernel [in_dim, out_caps, out_dim] with the same "
                     f"in_dim; got u {u.shape} and kernel {kernel.shape}.")
  if not isinstance(num_iterations, int) or num_iterations < 1:
    raise ValueError(f"num_iterations must be a Python int >= 1; got {num_iterations!r}.")
  if logit_update not in LOGIT_UPDATES:
    raise ValueError(f"Unknown logit_update {logit_update!r}; use one of {LOGIT_UPDATES}.")
  dtype = _routing_dtype(jnp.promote_types(u.dtype, kernel.dtype))
  u = u.astype(jnp.promote_types(u.dtype, kernel.dtype))
  num_out = kernel.shape[1]
  # The products with W are small ([..., out_caps, in_dim] x [in_dim, out_dim]); they run in the routing
  # dtype. The two products with u (its size times out_caps) run in u's dtype, summed in the routing dtype.
  kernel = kernel.astype(dtype)
  u_inner = lax.stop_gradient(u) if stop_gradient_inner else u
  kernel_inner = lax.stop_gradient(kernel) if stop_gradient_inner else kernel
  logits = None  # b: [..., in_caps, out_caps]
  for iteration in range(num_iterations):
    is_last = iteration == num_iterations - 1
    x, w = (u, kernel) if is_last else (u_inner, kernel_inner)
    if logits is None:  # b = 0: uniform coupling 1 / out_caps, the same weighted input for every j.
      coupling = jnp.full(u.shape[:-1] + (num_out,), 1.0 / num_out, dtype)
      s = jnp.einsum("...d,djk->...jk", jnp.sum(x, axis=-2, dtype=dtype) / num_out, w)
    else:
      coupling = jax.nn.softmax(logits, axis=-1)  # over the parents j, as in dynamic_routing
      weighted = jnp.einsum("...ij,...id->...jd", coupling.astype(x.dtype), x, preferred_element_type=dtype)
      s = jnp.einsum("...jd,djk->...jk", weighted, w)
    v = squash(s)  # [..., out_caps, out_dim]
    if not is_last:
      v_back = jnp.einsum("djk,...jk->...jd", w, v)  # v_j W_j^T: [..., out_caps, in_dim]
      agreement = jnp.einsum("...id,...jd->...ij", x, v_back.astype(x.dtype), preferred_element_type=dtype)
      logits = agreement if logits is None or logit_update == "replace" else logits + agreement
  return (v, coupling) if return_coupling else v
