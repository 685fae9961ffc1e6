"""pairwise_distances against float64 NumPy, and its gradient at and away from zero distance."""

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret.distances import pairwise_distances
from jaxret.distances import safe_sqrt


def distances_oracle(x, y, squared, metric):
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if metric == "cosine":
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    d = 1.0 - xn @ yn.T
    return d**2 if squared else d
  d2 = np.sum((x[:, None, :] - y[None, :, :])**2, axis=-1)
  return d2 if squared else np.sqrt(d2)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("squared", [False, True])
def test_matches_numpy(squared, metric):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 5)).astype(np.float32)
  y = rng.normal(size=(4, 5)).astype(np.float32)
  fn = jax.jit(lambda a, b: pairwise_distances(a, b, squared=squared, metric=metric))
  got = fn(x, y)
  assert got.shape == (7, 4) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, distances_oracle(x, y, squared, metric), rtol=1e-5, atol=1e-5)
  within = pairwise_distances(x, squared=squared, metric=metric)
  np.testing.assert_array_equal(np.diag(within), 0.0)
  np.testing.assert_allclose(within, distances_oracle(x, x, squared, metric), rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_give_float32():
  x = jnp.ones((3, 4), jnp.bfloat16)
  assert pairwise_distances(x).dtype == jnp.float32


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("squared", [False, True])
def test_gradient_finite_for_duplicates_and_zero_vectors(squared, metric):
  x = jnp.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])

  def total(v):
    return jnp.sum(pairwise_distances(v, squared=squared, metric=metric))

  grad = jax.grad(total)(x)
  assert np.all(np.isfinite(grad))
  grad_xy = jax.grad(lambda v: jnp.sum(pairwise_distances(v, v, squared=squared, metric=metric)))(x)
  assert np.all(np.isfinite(grad_xy))


def test_sqrt_gradient_is_zero_at_zero_distance():
  x = jnp.array([[1.0, 2.0], [1.0, 2.0]])
  # Only the duplicate pair contributes: its distance has a kink at 0, where we define the gradient as 0.
  grad = jax.grad(lambda v: pairwise_distances(v, v)[0, 1])(x)
  np.testing.assert_array_equal(grad, 0.0)
  np.testing.assert_array_equal(jax.grad(safe_sqrt)(0.0), 0.0)
  np.testing.assert_allclose(jax.grad(safe_sqrt)(4.0), 0.25)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("squared", [False, True])
def test_check_grads(squared, metric):
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 3)))
    y = jnp.asarray(rng.normal(size=(5, 3)))
    fn = jax.jit(lambda a, b: pairwise_distances(a, b, squared=squared, metric=metric))
    jtu.check_grads(fn, (x, y), order=1)


def test_errors():
  with pytest.raises(ValueError, match="Unknown metric"):
    pairwise_distances(jnp.ones((2, 3)), metric="manhattan")
  with pytest.raises(ValueError, match="same embedding size"):
    pairwise_distances(jnp.ones((2, 3)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"\[num_points, dim\]"):
    pairwise_distances(jnp.ones((2, 3, 4)))


def test_squared_distances_accurate_far_from_the_origin():
  """Capsule embeddings: norm sqrt(23), neighbours 1e-3 apart; float32 |x|^2+|y|^2-2xy alone loses them."""
  rng = np.random.default_rng(7)
  base = rng.normal(size=368)
  base *= np.sqrt(23) / np.linalg.norm(base)
  x = base + 1e-3 * rng.normal(size=(16, 368))
  got = np.asarray(pairwise_distances(x.astype(np.float32), squared=True))
  want = np.sum((x[:, None] - x[None]) ** 2, axis=-1)
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-9)
