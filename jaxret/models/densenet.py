"""DenseNet-121 backbone as torchvision defines it (`torchvision.models.densenet`).

conv0 7x7/2 (64, no bias) -> norm0 -> ReLU -> max pool 3x3/2 -> denseblock1 (6 layers) -> transition1
-> denseblock2 (12) -> transition2 -> denseblock3 (24) -> transition3 -> denseblock4 (16) -> norm5 -> ReLU
-> `[B, H/32, W/32, 1024]`. A dense layer is BN -> ReLU -> 1x1 conv (bn_size * growth_rate) -> BN -> ReLU
-> 3x3 conv (growth_rate), its output concatenated after its input; a transition is BN -> ReLU -> 1x1 conv
(half the channels) -> 2x2/2 average pool. torchvision's classifier is replaced by the embedding head.

Module names are torchvision's without its `features.` prefix (`denseblock1/denselayer1/norm1` is
`features.denseblock1.denselayer1.norm1`); `import_weights` adds it.

References:
  G. Huang, Z. Liu, L. van der Maaten, K. Q. Weinberger. Densely Connected Convolutional Networks. CVPR 2017.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxret.models import cnn_layers

Dtype = Any


class DenseLayer(nn.Module):
  """`[B, h, w, C]` -> `[B, h, w, C + growth_rate]`: the input followed by the layer's new channels."""
  growth_rate: int
  bn_size: int
  drop_rate: float = 0.0
  use_running_average: bool = True
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def bn(name):
      return cnn_layers.batch_norm(use_running_average=self.use_running_average, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)

    y = nn.relu(bn("norm1")(x))
    y = cnn_layers.conv(self.bn_size * self.growth_rate, 1, kernel_init=cnn_layers.kaiming_normal_fan_in,
                        dtype=self.dtype, param_dtype=self.param_dtype, name="conv1")(y)
    y = nn.relu(bn("norm2")(y))
    y = cnn_layers.conv(self.growth_rate, 3, padding=1, kernel_init=cnn_layers.kaiming_normal_fan_in,
                        dtype=self.dtype, param_dtype=self.param_dtype, name="conv2")(y)
    y = nn.Dropout(self.drop_rate, deterministic=self.deterministic)(y)
    return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nn.Module):
  num_layers: int
  growth_rate: int
  bn_size: int
  drop_rate: float = 0.0
  use_running_average: bool = True
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for index in range(self.num_layers):
      x = DenseLayer(self.growth_rate, self.bn_size, self.drop_rate, self.use_running_average,
                     self.deterministic, self.dtype, self.param_dtype, name=f"denselayer{index + 1}")(x)
    return x


class Transition(nn.Module):
  """BN -> ReLU -> 1x1 conv to `features` -> 2x2/2 average pool (sizes round down, as PyTorch's)."""
  features: int
  use_running_average: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(cnn_layers.batch_norm(use_running_average=self.use_running_average, dtype=self.dtype,
                                      param_dtype=self.param_dtype, name="norm")(x))
    x = cnn_layers.conv(self.features, 1, kernel_init=cnn_layers.kaiming_normal_fan_in, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="conv")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """DenseNet backbone: `[B, H, W, 3]` -> `{"feature_map": [B, h, w, F], "stages": {...}}`.

  Stage maps: "denseblock1".."denseblock4", each dense block's output before its transition (strides 4, 8,
  16, 32; 256, 512, 1024, 1024 channels for DenseNet-121), the form Park et al. and HDC-style methods tap.
  "feature_map" is ReLU(norm5(denseblock4)), F = 1024 for DenseNet-121.
  """
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)  # dense layers per block.
  num_init_features: int = 64
  bn_size: int = 4  # bottleneck width of a dense layer, in multiples of growth_rate.
  drop_rate: float = 0.0  # dropout after each dense layer (torchvision's drop_rate; "dropout" rng).
  freeze_batch_norm: bool = False  # BatchNorm uses its running statistics even when training.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_features(self) -> int:
    features = self.num_init_features
    for index, num_layers in enumerate(self.block_config):
      features += num_layers * self.growth_rate
      if index != len(self.block_config) - 1:
        features //= 2
    return features

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
    use_running_average = not train or self.freeze_batch_norm
    x = cnn_layers.conv(self.num_init_features, 7, strides=2, padding=3,
                        kernel_init=cnn_layers.kaiming_normal_fan_in, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="conv0")(images)
    x = cnn_layers.batch_norm(use_running_average=use_running_average, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="norm0")(x)
    x = cnn_layers.max_pool(nn.relu(x), 3, 2, padding=1)
    stages = {}
    for index, num_layers in enumerate(self.block_config):
      x = DenseBlock(num_layers, self.growth_rate, self.bn_size, self.drop_rate, use_running_average,
                     not train, self.dtype, self.param_dtype, name=f"denseblock{index + 1}")(x)
      stages[f"denseblock{index + 1}"] = x
      if index != len(self.block_config) - 1:
        x = Transition(x.shape[-1] // 2, use_running_average, self.dtype, self.param_dtype,
                       name=f"transition{index + 1}")(x)
    x = cnn_layers.batch_norm(use_running_average=use_running_average, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="norm5")(x)
    return {"feature_map": nn.relu(x), "stages": stages}
