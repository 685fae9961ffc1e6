"""ResNet-18/50/101 backbones as torchvision defines them (`torchvision.models.resnet`).

conv1 7x7/2 (64, no bias) -> bn1 -> ReLU -> max pool 3x3/2 -> layer1..layer4 (BasicBlock for ResNet-18,
Bottleneck with the stride on the 3x3 conv, "ResNet v1.5", for 50 and 101) -> `[B, H/32, W/32, F]` with
F = 512 (BasicBlock) or 2048 (Bottleneck) at the default width. torchvision's average pool and `fc` are
replaced by the embedding head.

Module names follow torchvision's state-dict keys, with `_` before a block index (`layer1_0/downsample_0`
is `layer1.0.downsample.0`), so that `import_weights` maps every tensor by name.

References:
  K. He, X. Zhang, S. Ren, J. Sun. Deep Residual Learning for Image Recognition. CVPR 2016.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxret.models import cnn_layers

Dtype = Any

BLOCKS = ("basic", "bottleneck")
_EXPANSION = {"basic": 1, "bottleneck": 4}


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: 3x3/strides -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU."""
  planes: int
  strides: int = 1
  downsample: bool = False  # 1x1/strides conv + BN on the shortcut (when the shape changes).
  use_running_average: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(features, kernel_size, strides, padding, name):
      return cnn_layers.conv(features, kernel_size, strides=strides, padding=padding, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name)

    def bn(name):
      return cnn_layers.batch_norm(use_running_average=self.use_running_average, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)

    y = nn.relu(bn("bn1")(conv(self.planes, 3, self.strides, 1, "conv1")(x)))
    y = bn("bn2")(conv(self.planes, 3, 1, 1, "conv2")(y))
    if self.downsample:
      x = bn("downsample_1")(conv(self.planes, 1, self.strides, 0, "downsample_0")(x))
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck: 1x1 -> BN -> ReLU -> 3x3/strides -> BN -> ReLU -> 1x1 (4 planes) -> BN,
  + shortcut, ReLU."""
  planes: int
  strides: int = 1
  downsample: bool = False
  use_running_average: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def conv(features, kernel_size, strides, padding, name):
      return cnn_layers.conv(features, kernel_size, strides=strides, padding=padding, dtype=self.dtype,
                             param_dtype=self.param_dtype, name=name)

    def bn(name):
      return cnn_layers.batch_norm(use_running_average=self.use_running_average, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=name)

    out = self.planes * _EXPANSION["bottleneck"]
    y = nn.relu(bn("bn1")(conv(self.planes, 1, 1, 0, "conv1")(x)))
    y = nn.relu(bn("bn2")(conv(self.planes, 3, self.strides, 1, "conv2")(y)))
    y = bn("bn3")(conv(out, 1, 1, 0, "conv3")(y))
    if self.downsample:
      x = bn("downsample_1")(conv(out, 1, self.strides, 0, "downsample_0")(x))
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet backbone: `[B, H, W, 3]` -> `{"feature_map": [B, h, w, F], "stages": {"layer1".."layer4"}}`.

  Stage maps (after each residual stage, strides 4, 8, 16, 32): "layer1" `[B, H/4, W/4, width * e]` ...
  "layer4" `[B, H/32, W/32, 8 * width * e]`, with e = 1 (basic) or 4 (bottleneck); "feature_map" is
  "layer4". Sizes round as PyTorch's (floor((H + 1) / 2) per stride-2 step).
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)  # blocks per stage: (2, 2, 2, 2) ResNet-18, (3, 4, 23, 3) -101.
  block: str = "bottleneck"  # "basic" (ResNet-18/34) or "bottleneck" (50/101/152).
  width: int = 64  # planes of layer1 (torchvision: 64); each later stage doubles them.
  freeze_batch_norm: bool = False  # BatchNorm uses its running statistics even when training.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.block not in BLOCKS:
      raise ValueError(f"Unknown ResNet block {self.block!r}; use one of {BLOCKS}.")
    super().__post_init__()

  @property
  def num_features(self) -> int:
    return 8 * self.width * _EXPANSION[self.block]

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, start: str | None = None,
               stop: str | None = None) -> dict[str, Any]:
    """Runs the stages after `start` up to and including `stop` (default: all), as `GoogLeNet.__call__`:
    with `start` (e.g. "layer2"), `images` is that stage's map."""
    use_running_average = not train or self.freeze_batch_norm
    stage_names = tuple(f"layer{stage + 1}" for stage in range(len(self.stage_sizes)))
    first, end = cnn_layers.stage_range(stage_names, start, stop)
    if start is None:
      x = cnn_layers.conv(64, 7, strides=2, padding=3, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="conv1")(images)
      x = cnn_layers.batch_norm(use_running_average=use_running_average, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="bn1")(x)
      x = cnn_layers.max_pool(nn.relu(x), 3, 2, padding=1)
    else:
      x = images
    block_cls = BasicBlock if self.block == "basic" else Bottleneck
    expansion = _EXPANSION[self.block]
    stages = {}
    for stage in range(first, end):
      planes = self.width * 2**stage
      # What the stage's first block receives: the stem's 64 channels, or the previous stage's output.
      in_features = 64 if stage == 0 else self.width * 2**(stage - 1) * expansion
      for index in range(self.stage_sizes[stage]):
        strides = 2 if stage > 0 and index == 0 else 1
        downsample = index == 0 and (strides != 1 or in_features != planes * expansion)
        x = block_cls(planes, strides=strides, downsample=downsample, use_running_average=use_running_average,
                      dtype=self.dtype, param_dtype=self.param_dtype, name=f"layer{stage + 1}_{index}")(x)
        in_features = planes * expansion
      stages[f"layer{stage + 1}"] = x
    return {"feature_map": x, "stages": stages}
