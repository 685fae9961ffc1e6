"""GoogLeNet (Inception v1) backbone exactly as torchvision defines it (`torchvision.models.googlenet`).

torchvision's GoogLeNet differs from the Caffe model of Szegedy et al. in ways that matter for its weights:
every conv is followed by BatchNorm (eps 1e-3) and has no bias, the "5x5" branch is a 3x3 conv (a known
torchvision quirk that its weights were trained with), and max pools round their output size up
(`ceil_mode=True`). With `transform_input=True` (what torchvision sets when it loads its ImageNet weights)
the model takes images normalised with the ImageNet mean and std and converts them to the
`(x - 0.5) / 0.5` scale the weights were trained on, so the input pipeline's usual normalisation is right.

conv1 7x7/2 (64) -> max pool 3/2 -> conv2 1x1 (64) -> conv3 3x3 (192) -> max pool 3/2 -> inception3a, 3b
-> max pool 3/2 -> inception4a..4e -> max pool 2/2 -> inception5a, 5b -> `[B, ~H/32, ~W/32, 1024]`.
The auxiliary classifiers and `fc` are replaced by the embedding head (their tensors in a checkpoint are
dropped by `import_weights`).

Module names follow torchvision's (`inception3a/branch2_0/conv` is `inception3a.branch2.0.conv`).

References:
  C. Szegedy et al. Going Deeper with Convolutions. CVPR 2015.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxret.models import cnn_layers

Dtype = Any

# (in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) of each inception block, torchvision's.
INCEPTION_CHANNELS = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}

# The max pools (window, stride) between the inception groups: before 4a and before 5a.
_POOL_BEFORE = {"inception4a": (3, 2), "inception5a": (2, 2)}

# ImageNet mean and std that `transform_input` undoes (torchvision's constants).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's `trunc_normal_(std=0.01, a=-2, b=2)`: the bounds are absolute, 200 standard deviations.
_trunc_normal = nn.initializers.truncated_normal(0.01, lower=-200.0, upper=200.0)


def transform_input(images: jax.typing.ArrayLike) -> jax.Array:
  """ImageNet-normalised images to the `(x - 0.5) / 0.5` scale: `x * std / 0.5 + (mean - 0.5) / 0.5`.

  `[B, H, W, 3]` -> `[B, H, W, 3]`, per RGB channel, as torchvision's `GoogLeNet._transform_input`.
  """
  images = jnp.asarray(images)
  std = jnp.asarray(_IMAGENET_STD, images.dtype)
  mean = jnp.asarray(_IMAGENET_MEAN, images.dtype)
  return images * (std / 0.5) + (mean - 0.5) / 0.5


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  use_running_average: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = cnn_layers.conv(self.features, self.kernel_size, strides=self.strides, padding=self.padding,
                        kernel_init=_trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="conv")(x)
    x = cnn_layers.batch_norm(use_running_average=self.use_running_average, epsilon=1e-3, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="bn")(x)
    return nn.relu(x)


class Inception(nn.Module):
  """Four branches concatenated: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | max pool 3/1 -> 1x1."""
  ch1x1: int
  ch3x3red: int
  ch3x3: int
  ch5x5red: int
  ch5x5: int  # torchvision's "5x5" branch is a 3x3 conv, kept for its weights.
  pool_proj: int
  use_running_average: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(features, kernel_size, padding, name):
      return BasicConv2d(features, kernel_size, padding=padding, use_running_average=self.use_running_average,
                         dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    branch1 = conv(self.ch1x1, 1, 0, "branch1")(x)
    branch2 = conv(self.ch3x3, 3, 1, "branch2_1")(conv(self.ch3x3red, 1, 0, "branch2_0")(x))
    branch3 = conv(self.ch5x5, 3, 1, "branch3_1")(conv(self.ch5x5red, 1, 0, "branch3_0")(x))
    branch4 = conv(self.pool_proj, 1, 0, "branch4_1")(cnn_layers.max_pool(x, 3, 1, padding=1, ceil_mode=True))
    return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


class GoogLeNet(nn.Module):
  """GoogLeNet backbone: `[B, H, W, 3]` -> `{"feature_map": [B, h, w, 1024], "stages": {...}}`.

  Stage maps: the output of every inception block, "inception3a" .. "inception5b" (HDC taps 4a, 4d and
  5b, `jaxret.models.hdc`), strides 8, 16 and 32. "feature_map" is "inception5b". At 224x224 the maps are 28x28,
  14x14 and 7x7.
  """
  channel_divisor: int = 1  # every width divided by this (8 in the tiny variant); 1 is torchvision's.
  transform_input: bool = True  # see the module docstring; False for weights trained on (x - 0.5) / 0.5.
  freeze_batch_norm: bool = False  # BatchNorm uses its running statistics even when training.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    for name, channels in INCEPTION_CHANNELS.items():
      if any(c % self.channel_divisor for c in channels):
        raise ValueError(f"channel_divisor={self.channel_divisor} does not divide the widths {channels} of "
                         f"{name}; use 1, 2, 4 or 8.")
    super().__post_init__()

  @property
  def num_features(self) -> int:
    _, ch1x1, _, ch3x3, _, ch5x5, pool_proj = INCEPTION_CHANNELS["inception5b"]
    return (ch1x1 + ch3x3 + ch5x5 + pool_proj) // self.channel_divisor

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, start: str | None = None,
               stop: str | None = None) -> dict[str, Any]:
    """Runs the stages after `start` up to and including `stop` (default: all).

    With `start`, `images` is that stage's map (e.g. a masked copy of it, as ABE-M runs the upper half per
    attention mask); `stop` ends early. `backbone(x, stop=s)` then `backbone(map, start=s)` is the whole
    network, with the same parameters. "stages" holds the maps computed in this call; "feature_map" the last.
    """
    use_running_average = not train or self.freeze_batch_norm
    divisor = self.channel_divisor
    first, last = cnn_layers.stage_range(tuple(INCEPTION_CHANNELS), start, stop)

    def conv(features, kernel_size, strides, padding, name):
      return BasicConv2d(features // divisor, kernel_size, strides=strides, padding=padding,
                         use_running_average=use_running_average, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)

    stages = {}
    if start is None:
      x = transform_input(images) if self.transform_input else images
      x = conv(64, 7, 2, 3, "conv1")(x)
      x = cnn_layers.max_pool(x, 3, 2, ceil_mode=True)
      x = conv(64, 1, 1, 0, "conv2")(x)
      x = conv(192, 3, 1, 1, "conv3")(x)
      x = cnn_layers.max_pool(x, 3, 2, ceil_mode=True)
    else:
      x = images
    for name in tuple(INCEPTION_CHANNELS)[first:last]:
      if name in _POOL_BEFORE:
        x = cnn_layers.max_pool(x, *_POOL_BEFORE[name], ceil_mode=True)
      _, *widths = INCEPTION_CHANNELS[name]
      x = Inception(*(w // divisor for w in widths), use_running_average=use_running_average,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
      stages[name] = x
    return {"feature_map": x, "stages": stages}
