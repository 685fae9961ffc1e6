"""Squash and dynamic routing against float64 NumPy versions of Sabour et al. 2017, Procedure 1."""

import chex
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret.models import routing


def squash_oracle(s, axis=-1):
  """Eq. 1 exactly, in float64: |s|^2 / (1 + |s|^2) * s / |s|."""
  s = np.asarray(s, np.float64)
  norm = np.linalg.norm(s, axis=axis, keepdims=True)
  return norm**2 / (1 + norm**2) * s / norm


def routing_oracle(u_hat, num_iterations, logit_update="accumulate"):
  """Procedure 1 in float64 NumPy, one example at a time, the iterations as written in the paper.

  Args:
    u_hat: `[B, in_caps, out_caps, out_dim]`.

  Returns:
    v `[B, out_caps, out_dim]` and the last iteration's coupling c `[B, in_caps, out_caps]`.
  """
  u_hat = np.asarray(u_hat, np.float64)
  vs, cs = [], []
  for u in u_hat:
    b = np.zeros(u.shape[:2])  # b_ij <- 0 for every example
    for r in range(num_iterations):
      c = np.exp(b - b.max(axis=1, keepdims=True))
      c /= c.sum(axis=1, keepdims=True)  # softmax over the parents j
      s = np.sum(c[:, :, None] * u, axis=0)  # s_j = sum_i c_ij u_hat_{j|i}
      v = squash_oracle(s)
      if r < num_iterations - 1:
        agreement = np.sum(u * v[None], axis=-1)  # <u_hat_{j|i}, v_j>
        b = b + agreement if logit_update == "accumulate" else agreement
    vs.append(v)
    cs.append(c)
  return np.stack(vs), np.stack(cs)


def routing_oracle_loops(u, num_iterations):
  """Procedure 1 with every sum written as a Python loop, for one tiny example `[in, out, dim]`."""
  n_in, n_out, dim = u.shape
  b = [[0.0] * n_out for _ in range(n_in)]
  for r in range(num_iterations):
    c = []
    for i in range(n_in):
      exps = [np.exp(b[i][j]) for j in range(n_out)]
      c.append([e / sum(exps) for e in exps])
    v = []
    for j in range(n_out):
      s = [sum(c[i][j] * u[i, j, d] for i in range(n_in)) for d in range(dim)]
      sq = sum(x * x for x in s)
      v.append([sq / (1 + sq) * x / np.sqrt(sq) for x in s])
    if r < num_iterations - 1:
      for i in range(n_in):
        for j in range(n_out):
          b[i][j] += sum(u[i, j, d] * v[j][d] for d in range(dim))
  return np.array(v), np.array(c)


def random_u_hat(shape, scale=1.0, seed=0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def relative_error(actual, expected):
  return np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected)


def test_vectorised_oracle_matches_loop_oracle():
  u = random_u_hat((5, 3, 4), seed=1).astype(np.float64)
  v_loop, c_loop = routing_oracle_loops(u, 3)
  v_vec, c_vec = routing_oracle(u[None], 3)
  np.testing.assert_allclose(v_vec[0], v_loop, rtol=1e-12)
  np.testing.assert_allclose(c_vec[0], c_loop, rtol=1e-12)


@pytest.mark.parametrize("shape", [(7,), (3, 16), (2, 5, 8)])
def test_squash_matches_oracle(shape):
  s = random_u_hat(shape, scale=2.0)
  v = routing.squash(s)
  chex.assert_shape(v, shape)
  assert relative_error(v, squash_oracle(s)) < 1e-6
  v_axis0 = routing.squash(s, axis=0)
  assert relative_error(v_axis0, squash_oracle(s, axis=0)) < 1e-6


def test_squash_lengths_below_one_and_monotone():
  norms = np.array([1e-3, 0.04, 0.1, 0.5, 1.0, 3.0, 10.0, 100.0], np.float32)
  s = norms[:, None] * np.eye(1, 8, 2, dtype=np.float32)  # vectors along one axis
  lengths = np.linalg.norm(np.asarray(routing.squash(s)), axis=-1)
  assert np.all(lengths < 1.0)
  assert np.all(np.diff(lengths) > 0)
  # The eps under the square root changes |v| by about eps / (2 |s|^2) relative: 3e-5 at |s| = 0.04.
  np.testing.assert_allclose(lengths[1:], norms[1:]**2 / (1 + norms[1:]**2), rtol=1e-4)


def test_squash_at_zero_has_no_nan_in_value_or_gradient():
  zeros = jnp.zeros((3, 16))
  np.testing.assert_array_equal(routing.squash(zeros), 0.0)
  grad = jax.grad(lambda s: jnp.sum(routing.squash(s)))(zeros)
  assert np.all(np.isfinite(grad))
  jacobian = jax.jacfwd(routing.squash)(jnp.zeros(4))
  assert np.all(np.isfinite(jacobian))


def test_squash_half_precision_computes_in_float32():
  s = random_u_hat((4, 16))
  v = routing.squash(jnp.asarray(s, jnp.bfloat16))
  assert v.dtype == jnp.float32
  assert relative_error(v, squash_oracle(s)) < 1e-2


def test_capsule_length():
  v = random_u_hat((3, 5, 16), scale=0.2)
  np.testing.assert_allclose(routing.capsule_length(v), np.linalg.norm(v, axis=-1), rtol=1e-5)
  grad = jax.grad(lambda x: jnp.sum(routing.capsule_length(x)))(jnp.zeros((2, 4)))
  assert np.all(np.isfinite(grad))


# (batch, in_caps, out_caps, out_dim, scale): scale sets whether the squash saturates (|s| >> 1) or not.
ROUTING_SHAPES = [
    (1, 1, 1, 1, 1.0),
    (3, 6, 4, 5, 1.0),
    (2, 32, 10, 16, 0.3),
    (4, 100, 23, 16, 0.05),
    (2, 8192, 23, 16, 1.0),
    (2, 8192, 23, 16, 0.02),
]


@pytest.mark.parametrize("batch,in_caps,out_caps,out_dim,scale", ROUTING_SHAPES)
@pytest.mark.parametrize("logit_update", ["accumulate", "replace"])
def test_dynamic_routing_matches_float64_oracle(batch, in_caps, out_caps, out_dim, scale, logit_update):
  u_hat = random_u_hat((batch, in_caps, out_caps, out_dim), scale=scale, seed=in_caps)
  route = jax.jit(lambda u: routing.dynamic_routing(u, 3, logit_update=logit_update, return_coupling=True))
  v, c = route(u_hat)
  chex.assert_shape(v, (batch, out_caps, out_dim))
  chex.assert_shape(c, (batch, in_caps, out_caps))
  v_ref, c_ref = routing_oracle(u_hat, 3, logit_update)
  for k in range(batch):
    assert relative_error(v[k], v_ref[k]) < 1e-4
    assert relative_error(c[k], c_ref[k]) < 1e-4


@pytest.mark.parametrize("num_iterations", [1, 2, 5])
def test_dynamic_routing_iteration_counts(num_iterations):
  u_hat = random_u_hat((2, 20, 6, 8), scale=0.5)
  v, c = routing.dynamic_routing(u_hat, num_iterations, return_coupling=True)
  v_ref, c_ref = routing_oracle(u_hat, num_iterations)
  assert relative_error(v, v_ref) < 1e-4
  assert relative_error(c, c_ref) < 1e-4
  if num_iterations == 1:
    np.testing.assert_allclose(c, 1 / 6, rtol=1e-6)  # b = 0: uniform coupling


def test_replace_and_accumulate_differ_only_from_the_third_iteration():
  u_hat = random_u_hat((2, 20, 6, 8), scale=0.5)
  for r in (1, 2):
    chex.assert_trees_all_close(routing.dynamic_routing(u_hat, r, logit_update="replace"),
                                routing.dynamic_routing(u_hat, r, logit_update="accumulate"))
  diff = np.abs(routing.dynamic_routing(u_hat, 3, logit_update="replace") -
                routing.dynamic_routing(u_hat, 3, logit_update="accumulate"))
  assert diff.max() > 1e-4


def test_coupling_sums_to_one_over_parents_and_output_shorter_than_one():
  u_hat = random_u_hat((3, 50, 7, 8), scale=2.0)  # in_caps != out_caps, so a wrong axis cannot pass
  v, c = routing.dynamic_routing(u_hat, 3, return_coupling=True)
  assert np.all(np.asarray(c) >= 0)
  np.testing.assert_allclose(np.sum(c, axis=-1), 1.0, rtol=1e-5)  # over out_caps (parents)
  assert np.abs(np.sum(c, axis=-2) - 1.0).max() > 0.1  # not normalised over the children
  assert np.all(np.linalg.norm(v, axis=-1) < 1.0)


def test_softmax_axis_routes_each_child_to_the_parent_it_agrees_with():
  # Children 0..3 predict the same vector for parent 0 and random small vectors for parent 1, so routing
  # must move each child's coupling towards parent 0. With a softmax over the children instead, the
  # coupling of child i to parent 0 would stay about 1 / in_caps.
  rng = np.random.default_rng(0)
  u_hat = np.zeros((4, 2, 8), np.float32)
  u_hat[:, 0] = 1.0
  u_hat[:, 1] = rng.normal(size=(4, 8)) * 0.1
  _, c = routing.dynamic_routing(u_hat, 3, return_coupling=True)
  assert np.all(np.asarray(c)[:, 0] > 0.9)


def test_routing_logits_reset_per_example():
  u_hat = random_u_hat((5, 40, 6, 8), scale=0.5)
  route = jax.jit(routing.dynamic_routing)
  batched = route(u_hat)
  for k in range(5):  # alone equals inside the batch: no state leaks between examples
    np.testing.assert_allclose(route(u_hat[k:k + 1])[0], batched[k], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(route(u_hat), batched)  # and no state leaks between calls
  permutation = np.array([3, 0, 4, 1, 2])
  np.testing.assert_allclose(route(u_hat[permutation]), batched[permutation], rtol=1e-5, atol=1e-7)


def test_jit_and_vmap_equal_the_per_example_function():
  u_hat = random_u_hat((2, 3, 30, 5, 8), scale=0.5)  # two leading batch dims
  per_example = np.stack([np.stack([routing.dynamic_routing(u_hat[a, b]) for b in range(3)])
                          for a in range(2)])
  chex.assert_shape(per_example, (2, 3, 5, 8))
  np.testing.assert_allclose(jax.jit(routing.dynamic_routing)(u_hat), per_example, rtol=1e-5, atol=1e-7)
  vmapped = jax.vmap(jax.vmap(routing.dynamic_routing))(u_hat)
  np.testing.assert_allclose(vmapped, per_example, rtol=1e-5, atol=1e-7)


def test_routing_compiles_once_per_shape():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def route(u):
    return routing.dynamic_routing(u, 3)

  for seed in range(3):
    route(random_u_hat((2, 10, 4, 8), seed=seed))


def test_gradients_finite_including_zero_predictions():
  grad_fn = jax.jit(jax.grad(lambda u: jnp.sum(routing.dynamic_routing(u, 3) ** 2)))
  grad_at_zero = grad_fn(np.zeros((2, 30, 5, 8), np.float32))  # s = 0 in every iteration
  assert np.all(np.isfinite(grad_at_zero))
  grad = grad_fn(random_u_hat((2, 30, 5, 8)))
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


@pytest.mark.parametrize("logit_update", ["accumulate", "replace"])
def test_check_grads_float64(logit_update):
  with jax.enable_x64(True):
    u_hat = jnp.asarray(random_u_hat((2, 6, 3, 4), scale=0.7), jnp.float64)
    weights = jnp.asarray(random_u_hat((2, 3, 4), seed=3), jnp.float64)

    def f(u):
      v = routing.dynamic_routing(u, 3, logit_update=logit_update)
      return jnp.sum(v * weights)

    assert f(u_hat).dtype == jnp.float64
    # Not for stop_gradient_inner=True: its gradient is by design not the derivative of the value.
    jtu.check_grads(f, (u_hat,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_stop_gradient_inner_treats_coupling_as_constant():
  u_hat = random_u_hat((2, 12, 4, 6), scale=0.5)
  weights = random_u_hat((2, 4, 6), seed=5)
  v_stop = routing.dynamic_routing(u_hat, 3, stop_gradient_inner=True)
  np.testing.assert_array_equal(v_stop, routing.dynamic_routing(u_hat, 3))  # same value

  def with_constant_coupling(u):
    _, c = routing.dynamic_routing(u, 3, return_coupling=True)
    c = jax.lax.stop_gradient(c)
    return jnp.sum(routing.squash(jnp.einsum("bij,bijd->bjd", c, u)) * weights)

  grad_stop = jax.jit(jax.grad(
      lambda u: jnp.sum(routing.dynamic_routing(u, 3, stop_gradient_inner=True) * weights)))(u_hat)
  grad_full = jax.jit(jax.grad(lambda u: jnp.sum(routing.dynamic_routing(u, 3) * weights)))(u_hat)
  grad_constant = jax.jit(jax.grad(with_constant_coupling))(u_hat)
  np.testing.assert_allclose(grad_stop, grad_constant, rtol=1e-5, atol=1e-7)
  assert np.abs(grad_stop - grad_full).max() > 1e-4


def test_bfloat16_predictions_route_in_float32():
  u_hat = random_u_hat((2, 64, 10, 16), scale=0.3)
  v, c = routing.dynamic_routing(jnp.asarray(u_hat, jnp.bfloat16), 3, return_coupling=True)
  assert v.dtype == jnp.float32 and c.dtype == jnp.float32
  v_ref, _ = routing_oracle(u_hat, 3)
  assert relative_error(v, v_ref) < 2e-2  # bf16 rounding of u_hat itself (8 bits of mantissa)
  np.testing.assert_allclose(np.sum(c, axis=-1), 1.0, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="in_caps, out_caps, out_dim"):
    routing.dynamic_routing(np.zeros((4, 8), np.float32))
  with pytest.raises(ValueError, match="num_iterations"):
    routing.dynamic_routing(np.zeros((4, 3, 8), np.float32), 0)
  with pytest.raises(ValueError, match="logit_update"):
    routing.dynamic_routing(np.zeros((4, 3, 8), np.float32), logit_update="sum")
