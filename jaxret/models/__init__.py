"""Capsule-network embedders, looked up by name with `get_model(name, **kwargs)`.

  model = get_model("rccapsnet", num_classes=23, embedding="all")
  variables = model.init({"params": key, "dropout": key}, images, train=False)
  embedding, aux = model.apply(variables, images, train=False)

The "_tiny" variants have the same layers with a few channels only; they exist to keep tests and the
CPU demo fast. See docs/models.md.
"""

import functools

import flax.linen as nn

from jaxret.models.capsnets import CapsNetEmbedder
from jaxret.models.capsnets import EMBEDDINGS
from jaxret.models.capsnets import QRCCapsNet
from jaxret.models.capsnets import RCCapsNet
from jaxret.models.capsnets import SCCapsNet
from jaxret.models.capsnets import capsule_embedding

# Small widths, same structure; momentum 0.9 so that BatchNorm statistics settle within a short demo run.
_TINY = dict(primary_capsule_types=8, primary_capsule_dim=8, batch_norm_momentum=0.9)

_MODELS = {
    "sccapsnet": SCCapsNet,
    "rccapsnet": RCCapsNet,
    "qrccapsnet": QRCCapsNet,
    "sccapsnet_tiny": functools.partial(SCCapsNet, stem_features=16, conv_features=(16, 16), **_TINY),
    "rccapsnet_tiny": functools.partial(RCCapsNet, stem_features=16, residual_features=(16, 32), **_TINY),
    "qrccapsnet_tiny": functools.partial(QRCCapsNet, stem_features=16, residual_features=(16, 32), **_TINY),
}
MODEL_NAMES = tuple(_MODELS)


def get_model(name: str, **kwargs) -> nn.Module:
  """Returns the model called `name`, built with `kwargs` (which override the variant's defaults).

  Args:
    name: one of `MODEL_NAMES`.
    **kwargs: fields of the model class, e.g. `num_classes`, `capsule_dim`, `embedding`, `dtype`.

  Raises:
    ValueError: for an unknown name or a bad option value; TypeError for an unknown keyword argument.
  """
  if name not in _MODELS:
    raise ValueError(f"Unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}.")
  return _MODELS[name](**kwargs)


__all__ = ["MODEL_NAMES", "EMBEDDINGS", "get_model", "CapsNetEmbedder", "SCCapsNet", "RCCapsNet",
           "QRCCapsNet", "capsule_embedding"]
