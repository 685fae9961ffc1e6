"""Flax layers of the capsule networks: conv and residual blocks, primary capsules, routed capsules.

The layers only hold parameters and call the pure functions of `routing.py`. Defaults follow the published
Keras code of RCCapsNet (Kinli et al. 2019): Keras initialisers (Glorot-uniform kernels, zero biases),
Keras BatchNormalization constants (epsilon 1e-3, momentum 0.99) and Keras' LeakyReLU slope 0.3.

Images and feature maps are NHWC. `dtype` is the computation dtype, parameters are kept in `param_dtype`.

References:
  S. Sabour, N. Frosst, G. E. Hinton. Dynamic Routing Between Capsules. NeurIPS 2017.
  F. Kinli, B. Ozcan, F. Kirac. Fashion Image Retrieval with Capsule Networks. ICCV Workshops 2019.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxret.models import routing

Dtype = Any

# Keras' defaults, kept so that a model trained here is set up like the published one.
KERAS_BN_EPSILON = 1e-3
KERAS_LEAKY_RELU_SLOPE = 0.3
glorot_uniform = nn.initializers.xavier_uniform()

PRIMARY_CAPSULE_BLOCKS = ("conv", "residual")


def _conv(features: int, kernel_size: int, strides: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Conv:
  """Square conv with SAME padding and Keras' Glorot-uniform kernel, as every conv of these models."""
  return nn.Conv(features, (kernel_size, kernel_size), strides=strides, padding="SAME",
                 kernel_init=glorot_uniform, dtype=dtype, param_dtype=param_dtype, name=name)


def _batch_norm(train: bool, momentum: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=KERAS_BN_EPSILON,
                      dtype=dtype, param_dtype=param_dtype, name=name)


class ConvBlock(nn.Module):
  """Conv (SAME padding) -> BatchNorm -> ReLU -> spatial dropout (whole channels dropped).

  `[B, H, W, C]` -> `[B, ceil(H / strides), ceil(W / strides), features]`.
  """
  features: int
  kernel_size: int = 7
  strides: int = 2
  dropout_rate: float = 0.3
  batch_norm_momentum: float = 0.99
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = _conv(self.features, self.kernel_size, self.strides, self.dtype, self.param_dtype, "conv")(x)
    x = _batch_norm(train, self.batch_norm_momentum, self.dtype, self.param_dtype, "bn")(x)
    x = nn.relu(x)
    # Spatial dropout (Keras SpatialDropout2D): one mask per example and channel, shared over H and W.
    return nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(x)


class ResidualBlock(nn.Module):
  """Downsampling residual block of RCCapsNet (He et al. 2016 style, LeakyReLU activations).

  main path: 3x3/`strides` conv -> BN -> LeakyReLU -> 3x3 conv -> BN;
  shortcut: 1x1/`strides` projection conv -> BN; output: LeakyReLU(main + shortcut).
  `[B, H, W, C]` -> `[B, ceil(H / strides), ceil(W / strides), features]`.
  """
  features: int
  strides: int = 2
  leaky_relu_slope: float = KERAS_LEAKY_RELU_SLOPE
  batch_norm_momentum: float = 0.99
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    def conv(features, kernel_size, strides, name):
      return _conv(features, kernel_size, strides, self.dtype, self.param_dtype, name)

    def bn(name):
      return _batch_norm(train, self.batch_norm_momentum, self.dtype, self.param_dtype, name)

    y = conv(self.features, 3, self.strides, "conv1")(x)
    y = nn.leaky_relu(bn("bn1")(y), self.leaky_relu_slope)
    y = bn("bn2")(conv(self.features, 3, 1, "conv2")(y))
    shortcut = bn("shortcut_bn")(conv(self.features, 1, self.strides, "shortcut_conv")(x))
    return nn.leaky_relu(y + shortcut, self.leaky_relu_slope)


class PrimaryCapsules(nn.Module):
  """Feature map -> block -> reshape to capsules -> squash.

  The block has `num_types * capsule_dim` output channels: a plain conv (`block="conv"`, SCCapsNet) or a
  `ResidualBlock` (`block="residual"`, RCCapsNet). Each group of `capsule_dim` consecutive channels at each
  grid position is one capsule, in the order a row-major reshape gives (as the published Keras code).

  `[B, H, W, C]` -> `[B, H' * W' * num_types, capsule_dim]` with H' = ceil(H / strides), W' likewise; always
  float32 (the squash runs in float32 for half-precision `dtype`).
  """
  num_types: int = 32
  capsule_dim: int = 16
  block: str = "conv"
  kernel_size: int = 7  # of the "conv" block; the residual block is 3x3 by construction.
  strides: int = 2
  leaky_relu_slope: float = KERAS_LEAKY_RELU_SLOPE
  batch_norm_momentum: float = 0.99
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    features = self.num_types * self.capsule_dim
    if self.block == "conv":
      x = _conv(features, self.kernel_size, self.strides, self.dtype, self.param_dtype, "conv")(x)
    elif self.block == "residual":
      x = ResidualBlock(features, strides=self.strides, leaky_relu_slope=self.leaky_relu_slope,
                        batch_norm_momentum=self.batch_norm_momentum, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="residual_block")(x, train=train)
    else:
      raise ValueError(f"Unknown primary capsule block {self.block!r}; use one of {PRIMARY_CAPSULE_BLOCKS}.")
    batch = x.shape[0]
    return routing.squash(x.reshape(batch, -1, self.capsule_dim))


class RoutedCapsules(nn.Module):
  """Capsule layer with dynamic routing: `[B, in_caps, in_dim]` -> `[B, num_capsules, capsule_dim]`.

  Prediction vectors u_hat_{j|i} = W_ij u_i come from one einsum, with either
    * `share_weights=True`: one matrix `kernel` of shape `[in_dim, num_capsules * capsule_dim]` shared by
      all input capsules (QRCCapsNet and the final RCCapsNet Keras code; independent of the input size), or
    * `share_weights=False`: one matrix per (i, j), `kernel` of shape
      `[in_caps, in_dim, num_capsules * capsule_dim]` (Sabour et al. 2017; ties the model to one input size).
  They are routed with `routing.dynamic_routing`; with shared weights by `routing.dynamic_routing_shared`, the
  same function computed without the `[B, in_caps, num_capsules, capsule_dim]` tensor u_hat. There are no
  biases, as in the published code.

  Returns `(v, coupling)`: class capsules `[B, num_capsules, capsule_dim]` and the last iteration's coupling
  coefficients `[B, in_caps, num_capsules]`, both float32 (unless `dtype` is float64). The predictions are
  computed in `dtype`; see `routing` for the precision of the routing itself.
  """
  num_capsules: int
  capsule_dim: int = 16
  routing_iterations: int = 3
  logit_update: str = "accumulate"
  share_weights: bool = True
  stop_gradient_inner: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    if u.ndim != 3:
      raise ValueError(f"RoutedCapsules expects capsules of shape [batch, in_caps, in_dim]; got {u.shape}.")
    _, in_caps, in_dim = u.shape
    outputs = self.num_capsules * self.capsule_dim
    if self.share_weights:
      kernel = self.param("kernel", glorot_uniform, (in_dim, outputs), self.param_dtype)
      kernel = kernel.reshape(in_dim, self.num_capsules, self.capsule_dim)
      # Same function as routing u_hat = einsum("bid,djk->bijk", u, kernel), without building it.
      return routing.dynamic_routing_shared(u.astype(self.dtype), kernel.astype(self.dtype),
                                            self.routing_iterations, logit_update=self.logit_update,
                                            stop_gradient_inner=self.stop_gradient_inner, return_coupling=True)
    # Glorot fans per (i, j) matrix: fan_in = in_dim, fan_out = num_capsules * capsule_dim.
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=-2, out_axis=-1, batch_axis=(0,))
    kernel = self.param("kernel", init, (in_caps, in_dim, outputs), self.param_dtype)
    kernel = kernel.reshape(in_caps, in_dim, self.num_capsules, self.capsule_dim)
    u_hat = jnp.einsum("bid,idjk->bijk", u.astype(self.dtype), kernel.astype(self.dtype))  # [B, in, out, dim]
    return routing.dynamic_routing(u_hat, self.routing_iterations, logit_update=self.logit_update,
                                   stop_gradient_inner=self.stop_gradient_inner, return_coupling=True)
