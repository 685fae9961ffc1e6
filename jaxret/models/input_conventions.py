"""How images must be normalised for the weights a backbone is loaded with.

Weights remember the normalisation they were trained with: torchvision's ImageNet models and DINO take RGB
in [0, 1] minus the ImageNet mean over its std; timm's "augreg" ViTs take `(x - 0.5) / 0.5`; Caffe-era
models (BN-Inception, Caffe VGG) take BGR on the 0..255 scale minus a mean, unscaled. Feeding the wrong one
costs accuracy silently, so every model declares its convention (`jaxret.models.INPUT_CONVENTIONS`) and the
input pipeline applies it.
"""

import dataclasses

import numpy as np

CHANNEL_ORDERS = ("RGB", "BGR")


@dataclasses.dataclass(frozen=True)
class InputConvention:
  """`(pixels[..., channels] - mean) / std`, for pixels on the 0..1 scale.

  Attributes:
    mean, std: per channel, in the order of `channels`, on the 0..1 scale (a Caffe mean of 104 on the
      0..255 scale is 104 / 255 here, and Caffe's unscaled input is std = 1 / 255).
    channels: "RGB", or "BGR" for Caffe-converted weights.
  """
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  channels: str = "RGB"

  def __post_init__(self):
    if self.channels not in CHANNEL_ORDERS:
      raise ValueError(f"Unknown channel order {self.channels!r}; use one of {CHANNEL_ORDERS}.")
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f"mean and std need 3 values each, std > 0; got {self.mean}, {self.std}.")

  def normalize(self, pixels: np.ndarray) -> np.ndarray:
    """RGB pixels `[..., 3]` in [0, 1] -> the model's input `[..., 3]` float32."""
    pixels = np.asarray(pixels, np.float32)
    if self.channels == "BGR":
      pixels = pixels[..., ::-1]
    return (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


# torchvision's ImageNet weights, timm's IMAGENET_DEFAULT_MEAN/STD, DINO.
IMAGENET = InputConvention(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# timm's IMAGENET_INCEPTION_MEAN/STD: (x - 0.5) / 0.5, e.g. the augreg ViTs converted from big_vision.
INCEPTION = InputConvention(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

NAMED_CONVENTIONS = {"imagenet": IMAGENET, "inception": INCEPTION}
