"""Convolution, BatchNorm and max pooling set up as torchvision's CNNs define them.

The backbones of `resnet.py`, `densenet.py`, `googlenet.py` and `vgg.py` compute what torchvision's models
compute, so that weights trained there give the same features here. What has to agree:

  * padding: PyTorch pads symmetrically by an explicit amount (`padding=p`), Flax's "SAME" does not when the
    stride is 2 and the size is even, so every conv and pool here takes explicit `((p, p), (p, p))`;
  * BatchNorm: PyTorch's `eps` (1e-5; GoogLeNet 1e-3) and `momentum=0.1`, which is Flax's `momentum=0.9`
    (PyTorch weighs the new batch by `momentum`, Flax the running average);
  * max pooling with `ceil_mode=True` (GoogLeNet), where the output grows by one when the windows do not
    tile the input.

Images and feature maps are NHWC (`[B, H, W, C]`); PyTorch's are NCHW, which `import_weights` translates.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision's initialisers of conv kernels: `kaiming_normal_(mode="fan_out", nonlinearity="relu")` in
# ResNet and VGG, `kaiming_normal_()` (fan_in) in DenseNet.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

TORCH_BATCH_NORM_MOMENTUM = 0.9  # PyTorch's momentum=0.1, in Flax's convention.


def conv(features: int, kernel_size: int, *, strides: int = 1, padding: int = 0, use_bias: bool = False,
         kernel_init=kaiming_normal_fan_out, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         name: str | None = None) -> nn.Conv:
  """`torch.nn.Conv2d(in, features, kernel_size, stride=strides, padding=padding, bias=use_bias)`."""
  return nn.Conv(features, (kernel_size, kernel_size), strides=strides, padding=((padding, padding),) * 2,
                 use_bias=use_bias, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, name=name)


def batch_norm(*, use_running_average: bool, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.BatchNorm:
  """`torch.nn.BatchNorm2d(features, eps=epsilon)`: statistics in the "batch_stats" collection."""
  return nn.BatchNorm(use_running_average=use_running_average, momentum=TORCH_BATCH_NORM_MOMENTUM,
                      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)


def pooled_size(size: int, window: int, stride: int, padding: int = 0, ceil_mode: bool = False) -> int:
  """Output length of PyTorch's `max_pool2d` along one axis (the formula of `torch.nn.MaxPool2d`'s docs).

  With `ceil_mode`, the division rounds up, but a window that would start in the right padding is dropped.
  """
  span = size + 2 * padding - window
  if span < 0:
    raise ValueError(f"A pooling window of {window} (padding {padding}) does not fit an input of {size}; "
                     "use larger images.")
  out = (-(-span // stride) if ceil_mode else span // stride) + 1
  if ceil_mode and (out - 1) * stride >= size + padding:
    out -= 1
  return out


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0, ceil_mode: bool = False) -> jax.Array:
  """`torch.nn.functional.max_pool2d(x, window, stride, padding, ceil_mode=ceil_mode)` on NHWC maps.

  Args:
    x: `[B, H, W, C]`.
    window, stride, padding: square window, its stride and the symmetric padding (padded values never win:
      the padding is -inf, as in PyTorch).
    ceil_mode: round the output size up (see `pooled_size`).

  Returns:
    `[B, H', W', C]` with H' = `pooled_size(H, window, stride, padding, ceil_mode)`, W' likewise.
  """
  pads = []
  for axis in (1, 2):
    size = x.shape[axis]
    out = pooled_size(size, window, stride, padding, ceil_mode)
    # Right padding that makes exactly `out` windows; negative means the last rows are in no window.
    right = (out - 1) * stride + window - size - padding
    if right < 0:
      x = jax.lax.slice_in_dim(x, 0, size + right, axis=axis)
      right = 0
    pads.append((padding, right))
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=tuple(pads))


def stage_range(stage_names: tuple[str, ...], start: str | None, stop: str | None) -> tuple[int, int]:
  """`(first, end)`: the slice of `stage_names` a backbone call runs, after `start` up to `stop` included.

  Raises:
    ValueError: naming the stages, for an unknown name or a `stop` not after `start`.
  """
  for name in (start, stop):
    if name is not None and name not in stage_names:
      raise ValueError(f"{name!r} is not a stage of this backbone; its stages are {list(stage_names)}.")
  first = 0 if start is None else stage_names.index(start) + 1
  end = len(stage_names) if stop is None else stage_names.index(stop) + 1
  if end <= first:
    raise ValueError(f"stop={stop!r} must be a stage after start={start!r} (stages: {list(stage_names)}).")
  return first, end
