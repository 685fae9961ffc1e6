"""Pairwise distances between embeddings, safe to differentiate at zero distance.

All metric-learning losses in `jaxret.losses` start from the `[B, B]` matrix built here.

>>> import jax.numpy as jnp
>>> x = jnp.array([[0., 0.], [3., 4.]])
>>> pairwise_distances(x).tolist()
[[0.0, 5.0], [5.0, 0.0]]
"""

import jax
import jax.numpy as jnp

METRICS = ("euclidean", "cosine")

# Squared distances at or below this are treated as zero by `safe_sqrt`: its value there is 0 and so is its
# gradient, instead of the 1 / (2 sqrt(d2)) that is infinite at d2 = 0 (duplicate embeddings).
_SQRT_EPS = 1e-12


def safe_sqrt(x: jax.typing.ArrayLike, eps: float = _SQRT_EPS) -> jax.Array:
  """Elementwise sqrt that is 0, with gradient 0, where `x <= eps`.

  The inner `where` keeps the untaken branch away from sqrt(0): a single `where` around `sqrt(x)` would still
  send 0 * inf = NaN into the gradient.

  Args:
    x: non-negative array, any shape.
    eps: values at or below it count as zero.

  Returns:
    Array of x's shape.
  """
  x = jnp.asarray(x)
  is_positive = x > eps
  return jnp.where(is_positive, jnp.sqrt(jnp.where(is_positive, x, 1.0)), 0.0)


def _as_float(x: jax.typing.ArrayLike, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a [num_points, dim] array of embeddings; got shape {x.shape}. "
                     "Flatten or stack the embeddings first.")
  # Distances are computed in at least float32 even for bfloat16 embeddings: |x|^2 + |y|^2 - 2 x.y
  # cancels badly in low precision.
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _pair(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike | None) -> tuple[jax.Array, jax.Array, bool]:
  """`x`, `y` (x itself when None) as float arrays of one dtype, and whether y is x."""
  x = _as_float(x, "x")
  same = y is None
  y = x if same else _as_float(y, "y")
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"x and y must have the same embedding size; got x {x.shape} and y {y.shape}.")
  dtype = jnp.promote_types(x.dtype, y.dtype)
  return x.astype(dtype), y.astype(dtype), same


def pairwise_sq_euclidean_distances(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike | None = None, *,
                                    centre: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Squared Euclidean distances with one matmul: |x|^2 + |y|^2 - 2 x y^T, clamped at 0.

  Args:
    x: `[N, D]` embeddings.
    y: `[M, D]` embeddings, or None for `y = x`, in which case the diagonal is exactly 0.
    centre: `[D]`, a point near the embeddings that both sides are measured from (default: the mean of x).
      Pass one explicitly to get bit-identical distances for the same pair in different calls (blocks of a
      sharded gallery); a data point keeps exact ties of grid data exact.

  Returns:
    `[N, M]` array of squared distances (float32, or float64 for float64 inputs).
  """
  x, y, same = _pair(x, y)
  # Distances do not depend on the origin: measuring from a point among the embeddings keeps
  # |x|^2 + |y|^2 - 2 x.y accurate when they sit far from the origin (every capsule L2-normalised: norms of
  # sqrt(23) with neighbours 1e-3 apart). The centre carries no gradient because the distances do not
  # depend on it.
  centre = jnp.mean(x, axis=0) if centre is None else jnp.asarray(centre, x.dtype)
  centre = jax.lax.stop_gradient(centre)
  x, y = x - centre, y - centre
  # HIGHEST precision: on TPU/GPU the default matmul rounds inputs to bfloat16/tf32, which the cancellation
  # in |x|^2 + |y|^2 - 2 x.y turns into large errors for nearby points.
  dots = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1)[None, :] - 2.0 * dots
  sq = jnp.maximum(sq, 0.0)
  if same:
    sq = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, sq)
  return sq


def pairwise_cosine_distances(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Cosine distances 1 - cos(x_i, y_j), in [0, 2]; a zero vector is at distance 1 from everything else.

  Args:
    x: `[N, D]` embeddings.
    y: `[M, D]` embeddings, or None for `y = x`, in which case the diagonal is exactly 0.

  Returns:
    `[N, M]` array of cosine distances.
  """
  x, y, same = _pair(x, y)

  def normalize(v):
    # max() instead of adding eps: exact for every non-zero vector, finite gradient for the zero vector.
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=1, keepdims=True), _SQRT_EPS))

  cos = jnp.matmul(normalize(x), normalize(y).T, precision=jax.lax.Precision.HIGHEST)
  dist = jnp.clip(1.0 - cos, 0.0, 2.0)
  if same:
    dist = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, dist)
  return dist


def pairwise_distances(x: jax.typing.ArrayLike,
                       y: jax.typing.ArrayLike | None = None,
                       *,
                       squared: bool = False,
                       metric: str = "euclidean",
                       centre: jax.typing.ArrayLike | None = None) -> jax.Array:
  """All distances between the rows of `x` and the rows of `y`.

  Args:
    x: `[N, D]` embeddings.
    y: `[M, D]` embeddings, or None for the distances within `x` (exactly 0 on the diagonal).
    squared: return the square of the distance (for "euclidean" this skips the sqrt entirely).
    metric: "euclidean" (|x - y|) or "cosine" (1 - cos(x, y), in [0, 2]).
    centre: for "euclidean", see `pairwise_sq_euclidean_distances`.

  Returns:
    `[N, M]` array of non-negative distances, float32 (float64 for float64 inputs). Value and gradient are
    finite everywhere, including at zero distance (duplicate embeddings), where the gradient of the
    non-squared Euclidean distance is 0.

  Raises:
    ValueError: for an unknown metric or inputs that are not `[N, D]` arrays of one embedding size.
  """
  if metric == "euclidean":
    sq = pairwise_sq_euclidean_distances(x, y, centre=centre)
    return sq if squared else safe_sqrt(sq)
  if metric == "cosine":
    dist = pairwise_cosine_distances(x, y)
    return jnp.square(dist) if squared else dist
  raise ValueError(f"Unknown metric {metric!r}; use one of {METRICS}.")
