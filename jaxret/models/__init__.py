"""Capsule-network embedders, looked up by name with `get_model(name, **kwargs)`.

  model = get_model("rccapsnet", num_classes=23, embedding="all")
  variables = model.init({"params": key, "dropout": key}, images, train=False)
  embedding, aux = model.apply(variables, images, train=False)

The "_tiny" variants have the same layers with a few channels only; they exist to keep tests and the
CPU demo fast. See docs/models.md.
"""

from collections.abc import Mapping
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def model_fields(name: str) -> tuple[str, ...]:
  """The keyword options of the model `name` (the fields of its Flax module)."""
  factory = _MODELS[name]
  module = factory.func if isinstance(factory, functools.partial) else factory
  return tuple(f.name for f in dataclasses.fields(module) if f.name not in ("parent", "name"))


def resolve_dtype(dtype: str) -> jnp.dtype:
  """A computation dtype by name; "auto" is bfloat16 on GPU and TPU, float32 on CPU (slow bf16 convolutions)."""
  if dtype == "auto":
    return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
  return jnp.dtype(dtype)


def config_problems(model_config: Mapping[str, Any]) -> list[str]:
  """What is wrong with `config.model` (unknown name, options or values), one line each naming the field."""
  name = model_config["name"]
  if name not in _MODELS:
    return [f"config.model.name={name!r} is not a known model; use one of {sorted(MODEL_NAMES)}."]
  fields = model_fields(name)
  options = {k: v for k, v in model_config.items() if k != "name" and v is not None}
  problems = [f"config.model.{k}={v!r} is not an option of model {name}; its options are {sorted(fields)}."
              for k, v in options.items() if k not in fields]
  if "dtype" in options:
    try:
      options["dtype"] = resolve_dtype(options["dtype"])
    except TypeError:
      problems.append(f"config.model.dtype={options['dtype']!r} is not a dtype; use float32, bfloat16 or auto.")
  if not problems:
    try:
      get_model(name, **options)
    except (ValueError, TypeError) as e:
      problems.append(f"config.model ({name}): {e}")
  return problems


__all__ = ["MODEL_NAMES", "EMBEDDINGS", "config_problems", "get_model", "model_fields", "resolve_dtype", "CapsNetEmbedder", "SCCapsNet", "RCCapsNet",
           "QRCCapsNet", "capsule_embedding"]
