"""`routing.dynamic_routing_shared` is `dynamic_routing` of the einsum's predictions, without building them."""

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from jaxret.models import routing


def predictions(u, kernel):
  return jnp.einsum("...id,djk->...ijk", u, kernel)


def inputs(shape=(3, 40, 8), out_caps=5, out_dim=6, dtype=jnp.float64):
  u = jax.random.normal(jax.random.key(0), shape, dtype) * 0.4
  kernel = jax.random.normal(jax.random.key(1), (shape[-1], out_caps, out_dim), dtype) * 0.4
  return u, kernel


@pytest.mark.parametrize("num_iterations", [1, 2, 3])
@pytest.mark.parametrize("logit_update", ["accumulate", "replace"])
def test_equals_routing_of_the_predictions_float64(num_iterations, logit_update):
  with jax.enable_x64(True):
    u, kernel = inputs()
    expected_v, expected_c = routing.dynamic_routing(predictions(u, kernel), num_iterations,
                                                     logit_update=logit_update, return_coupling=True)
    v, c = routing.dynamic_routing_shared(u, kernel, num_iterations, logit_update=logit_update,
                                          return_coupling=True)
    assert v.dtype == jnp.float64 and c.shape == expected_c.shape
    np.testing.assert_allclose(v, expected_v, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(c, expected_c, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("stop_gradient_inner", [False, True])
def test_gradients_equal_those_through_the_predictions(stop_gradient_inner):
  with jax.enable_x64(True):
    u, kernel = inputs(shape=(2, 3, 30, 4))  # Two leading batch dimensions.
    cotangent = jax.random.normal(jax.random.key(2), (2, 3, 5, 6), jnp.float64)

    def through_predictions(u, kernel):
      v = routing.dynamic_routing(predictions(u, kernel), 3, stop_gradient_inner=stop_gradient_inner)
      return jnp.sum(v * cotangent)

    def shared(u, kernel):
      return jnp.sum(routing.dynamic_routing_shared(u, kernel, 3, stop_gradient_inner=stop_gradient_inner)
                     * cotangent)

    expected = jax.grad(through_predictions, argnums=(0, 1))(u, kernel)
    grads = jax.jit(jax.grad(shared, argnums=(0, 1)))(u, kernel)
    for got, want in zip(grads, expected):
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    if not stop_gradient_inner:  # With it, the gradient is by design not the derivative.
      jtu.check_grads(shared, (u, kernel), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_float32_and_bfloat16_near_float64():
  u, kernel = inputs(shape=(4, 512, 16), out_caps=23, out_dim=16, dtype=jnp.float32)
  with jax.enable_x64(True):
    exact = np.asarray(
        routing.dynamic_routing(predictions(u.astype(jnp.float64), kernel.astype(jnp.float64)), 3))
  v32 = routing.dynamic_routing_shared(u, kernel, 3)
  v16 = routing.dynamic_routing_shared(u.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), 3)
  assert v32.dtype == v16.dtype == jnp.float32
  scale = np.max(np.abs(exact))
  np.testing.assert_allclose(v32, exact, atol=1e-5 * scale)
  np.testing.assert_allclose(v16, exact, atol=3e-2 * scale)


def test_rejects_bad_shapes_and_options():
  u, kernel = inputs(dtype=jnp.float32)
  with pytest.raises(ValueError, match="same in_dim"):
    routing.dynamic_routing_shared(u, kernel[:4])
  with pytest.raises(ValueError, match="num_iterations"):
    routing.dynamic_routing_shared(u, kernel, 0)
  with pytest.raises(ValueError, match="logit_update"):
    routing.dynamic_routing_shared(u, kernel, logit_update="sum")
