"""VGG-16 backbones as torchvision defines them (`torchvision.models.vgg`): `features` only.

torchvision's `features` is a list of 3x3 convs (padding 1, with bias), each followed by ReLU (and, in the
`_bn` variants, BatchNorm before the ReLU), and 2x2/2 max pools ("M" in the layer list). VGG-16 ("D"):
64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M -> `[B, H/32, W/32, 512]`.

torchvision's `avgpool` and `classifier` (fc6, fc7, fc8; 89% of VGG-16's 138M parameters) are not part of
the backbone: they need a 224x224 input, and retrieval heads pool the conv features instead. Their tensors
in a checkpoint are dropped by `import_weights` with a note.

Flax module names are the indices into torchvision's `features` (`features_28` is `features.28`).

References:
  K. Simonyan, A. Zisserman. Very Deep Convolutional Networks for Large-Scale Image Recognition. ICLR 2015.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxret.models import cnn_layers

Dtype = Any

VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
  """VGG backbone: `[B, H, W, 3]` -> `{"feature_map": [B, h, w, F], "stages": {...}}`.

  Stage maps: "conv{b}_{n}", the ReLU output of the last conv of every block b (VGG-16: "conv1_2",
  "conv2_2", "conv3_3", "conv4_3", "conv5_3", at strides 1, 2, 4, 8, 16), the layers FashionNet and
  others tap. "feature_map" is torchvision's `features(x)`, i.e. conv5_3 after the last max pool (stride
  32), or conv5_3 itself with `pool5=False`.
  """
  layers: Sequence[int | str] = VGG16_LAYERS  # conv widths and "M" (2x2/2 max pool), torchvision's cfg.
  batch_norm: bool = False  # BatchNorm after every conv (torchvision's vgg16_bn).
  pool5: bool = True  # keep the last max pool (torchvision's `features` ends with it).
  freeze_batch_norm: bool = False  # BatchNorm uses its running statistics even when training.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_features(self) -> int:
    return [v for v in self.layers if v != "M"][-1]

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
    use_running_average = not train or self.freeze_batch_norm
    x = images
    stages = {}
    index = 0  # position in torchvision's `features`
    block, conv_in_block = 1, 0
    last = len(self.layers) - 1
    for position, value in enumerate(self.layers):
      if value == "M":
        stages[f"conv{block}_{conv_in_block}"] = x
        block, conv_in_block = block + 1, 0
        if position != last or self.pool5:
          x = cnn_layers.max_pool(x, 2, 2)
        index += 1
        continue
      x = cnn_layers.conv(value, 3, padding=1, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=f"features_{index}")(x)
      if self.batch_norm:
        x = cnn_layers.batch_norm(use_running_average=use_running_average, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=f"features_{index + 1}")(x)
      x = nn.relu(x)
      index += 3 if self.batch_norm else 2
      conv_in_block += 1
    if conv_in_block:  # a layer list that does not end with "M"
      stages[f"conv{block}_{conv_in_block}"] = x
    return {"feature_map": x, "stages": stages}
