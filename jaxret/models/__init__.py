"""Embedders, looked up by name with `get_model(name, **kwargs)`: capsule networks and pretrained backbones.

  model = get_model("rccapsnet", num_classes=23, embedding="all")
  model = get_model("resnet50", embedding_dim=512, pooling="gem")
  variables = model.init({"params": key, "dropout": key}, images, train=False)
  embedding, aux = model.apply(variables, images, train=False)

The "_tiny" variants have the same layers with a few channels only; they exist to keep tests and the
CPU demo fast. See docs/models.md.
"""

from collections.abc import Mapping
import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxret.models import abe
from jaxret.models import bier
from jaxret.models import densenet
from jaxret.models import fashionnet
from jaxret.models import googlenet
from jaxret.models import hdc
from jaxret.models import input_conventions
from jaxret.models import resnet
from jaxret.models import vgg
from jaxret.models import vit
from jaxret.models.capsnets import EMBEDDINGS
from jaxret.models.capsnets import CapsNetEmbedder
from jaxret.models.capsnets import QRCCapsNet
from jaxret.models.capsnets import RCCapsNet
from jaxret.models.capsnets import SCCapsNet
from jaxret.models.capsnets import capsule_embedding
from jaxret.models.heads import BackboneEmbedder
from jaxret.models.heads import EmbeddingHead
from jaxret.models.heads import TaskHeads

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

# --- Backbones with the shared embedding head (issue 15) ---------------------------------------------------
# Keyword arguments are split between the backbone (architecture, `freeze_batch_norm`) and the head
# (`embedding_dim`, `pooling`, ...); `dtype` and `param_dtype` go to both.

def _module_fields(cls) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name"))


HEAD_FIELDS = _module_fields(EmbeddingHead)
# Options of the multi-task heads that any model may carry (`TaskHeads`; `param_dtype` is the model's).
TASK_FIELDS = tuple(f for f in _module_fields(TaskHeads) if f != "param_dtype")


def _backbone_embedder(backbone, head_defaults=None, head_cls=EmbeddingHead, embedder_cls=BackboneEmbedder,
                       **kwargs) -> nn.Module:
  head_fields = _module_fields(head_cls)
  head_kwargs = dict(head_defaults or {})
  head_kwargs.update({k: v for k, v in kwargs.items() if k in head_fields})
  backbone_kwargs = {k: v for k, v in kwargs.items() if k not in head_fields or k in ("dtype", "param_dtype")}
  return embedder_cls(backbone=backbone(**backbone_kwargs), head=head_cls(**head_kwargs))


def _backbone(cls, head_defaults=None, **architecture):
  return functools.partial(_backbone_embedder, functools.partial(cls, **architecture), head_defaults)


_TINY_HEAD = dict(embedding_dim=64)
_VGG16_TINY_LAYERS = tuple(v if v == "M" else v // 16 for v in vgg.VGG16_LAYERS)
_BACKBONES = {
    "resnet18": _backbone(resnet.ResNet, stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet50": _backbone(resnet.ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "resnet101": _backbone(resnet.ResNet, stage_sizes=(3, 4, 23, 3), block="bottleneck"),
    "densenet121": _backbone(densenet.DenseNet),
    "googlenet": _backbone(googlenet.GoogLeNet),
    "vgg16": _backbone(vgg.VGG),
    "vgg16_bn": _backbone(vgg.VGG, batch_norm=True),
    "vit_s16": _backbone(vit.VisionTransformer, dict(pooling="token")),
    "resnet18_tiny": _backbone(resnet.ResNet, _TINY_HEAD, stage_sizes=(1, 1, 1, 1), block="basic", width=8),
    "resnet50_tiny": _backbone(resnet.ResNet, _TINY_HEAD, stage_sizes=(1, 2, 1, 1), block="bottleneck", width=8),
    "resnet101_tiny": _backbone(resnet.ResNet, _TINY_HEAD, stage_sizes=(1, 1, 3, 1), block="bottleneck",
                                width=8),
    "densenet121_tiny": _backbone(densenet.DenseNet, _TINY_HEAD, growth_rate=8, block_config=(2, 2, 2, 2),
                                  num_init_features=16, bn_size=2),
    "googlenet_tiny": _backbone(googlenet.GoogLeNet, _TINY_HEAD, channel_divisor=8),
    "vgg16_tiny": _backbone(vgg.VGG, _TINY_HEAD, layers=_VGG16_TINY_LAYERS),
    "vgg16_bn_tiny": _backbone(vgg.VGG, _TINY_HEAD, layers=_VGG16_TINY_LAYERS, batch_norm=True),
    "vit_s16_tiny": _backbone(vit.VisionTransformer, dict(_TINY_HEAD, pooling="token"), embed_dim=32, depth=2,
                              num_heads=2, pos_embed_grid=2),
}


# --- Backbones with the heads of issue 16's methods: HDC's levels, ABE-M's ensemble, BIER's learners ------
# Same backbones (params["backbone"], importable weights), another head (params["head"]); docs/models.md.
def _backbone_with(head_cls, embedder_cls, cls, head_defaults=None, **architecture):
  return functools.partial(_backbone_embedder, functools.partial(cls, **architecture), head_defaults, head_cls,
                           embedder_cls)


# Tiny levels keep 128 dimensions each, so that config.loss.hdc's default level_dims fit; the tiny ensembles
# keep 8 learners, config.loss.abe's default.
_HDC_TINY = dict(aux_hidden=64)
_ABE_TINY = dict(embedding_dim=64, attention_features=16)
_METHOD_BACKBONES = {
    "googlenet_hdc": _backbone_with(hdc.HDCHead, hdc.HDCEmbedder, googlenet.GoogLeNet,
                                    dict(level_stages=hdc.GOOGLENET_LEVELS)),
    "resnet50_hdc": _backbone_with(hdc.HDCHead, hdc.HDCEmbedder, resnet.ResNet,
                                   dict(level_stages=hdc.RESNET_LEVELS), stage_sizes=(3, 4, 6, 3),
                                   block="bottleneck"),
    "googlenet_hdc_tiny": _backbone_with(hdc.HDCHead, hdc.HDCEmbedder, googlenet.GoogLeNet,
                                         dict(_HDC_TINY, level_stages=hdc.GOOGLENET_LEVELS), channel_divisor=8),
    "resnet50_hdc_tiny": _backbone_with(hdc.HDCHead, hdc.HDCEmbedder, resnet.ResNet,
                                        dict(_HDC_TINY, level_stages=hdc.RESNET_LEVELS), stage_sizes=(1, 2, 1, 1),
                                        block="bottleneck", width=8),
    "googlenet_abe": _backbone_with(abe.AttentionEnsembleHead, abe.AttentionEnsembleEmbedder, googlenet.GoogLeNet,
                                    dict(split_stage=abe.GOOGLENET_SPLIT)),
    "resnet50_abe": _backbone_with(abe.AttentionEnsembleHead, abe.AttentionEnsembleEmbedder, resnet.ResNet,
                                   dict(split_stage=abe.RESNET_SPLIT), stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "googlenet_abe_tiny": _backbone_with(abe.AttentionEnsembleHead, abe.AttentionEnsembleEmbedder,
                                         googlenet.GoogLeNet, dict(_ABE_TINY, split_stage=abe.GOOGLENET_SPLIT),
                                         channel_divisor=8),
    "resnet50_abe_tiny": _backbone_with(abe.AttentionEnsembleHead, abe.AttentionEnsembleEmbedder, resnet.ResNet,
                                        dict(_ABE_TINY, split_stage=abe.RESNET_SPLIT), stage_sizes=(1, 2, 1, 1),
                                        block="bottleneck", width=8),
    "googlenet_bier": _backbone_with(bier.BIERHead, bier.BIEREmbedder, googlenet.GoogLeNet),
    "resnet50_bier": _backbone_with(bier.BIERHead, bier.BIEREmbedder, resnet.ResNet, stage_sizes=(3, 4, 6, 3),
                                    block="bottleneck"),
    "googlenet_bier_tiny": _backbone_with(bier.BIERHead, bier.BIEREmbedder, googlenet.GoogLeNet,
                                          channel_divisor=8),
    "resnet50_bier_tiny": _backbone_with(bier.BIERHead, bier.BIEREmbedder, resnet.ResNet, stage_sizes=(1, 2, 1, 1),
                                         block="bottleneck", width=8),
}
METHOD_BACKBONE_NAMES = tuple(_METHOD_BACKBONES)
_BACKBONES.update(_METHOD_BACKBONES)
# --- end of the issue 16 block --------------------------------------------------------------------------------
BACKBONE_NAMES = tuple(_BACKBONES)
_MODELS.update(_BACKBONES)

# How each model's images must be normalised: the convention of the weights docs/models.md recommends
# (DINO for vit_s16; timm's augreg ViT-S/16 weights take `input_conventions.INCEPTION` instead). The
# capsule networks train from scratch; they get what the input pipeline has always applied.
INPUT_CONVENTIONS = {name: input_conventions.IMAGENET for name in _MODELS}
# --- end of the backbones block ------------------------------------------------------------------------------

# --- FashionNet (issue 20): VGG-16 with landmark, local and global branches (jaxret/models/fashionnet.py) -----
_FASHIONNET = {
    "fashionnet": fashionnet.FashionNet,
    "fashionnet_tiny": functools.partial(fashionnet.FashionNet, layers=_VGG16_TINY_LAYERS, embedding_dim=64,
                                         global_features=32, pose_features=32, local_features=32,
                                         fusion_features=32),
}
_MODELS.update(_FASHIONNET)
INPUT_CONVENTIONS.update({name: input_conventions.IMAGENET for name in _FASHIONNET})
# Models built on a backbone whose pretrained weights they take (`params["backbone"]`, config.model.pretrained):
# model name -> the backbone's name in BACKBONE_NAMES (its checkpoint layout in `import_weights`).
WEIGHTS_BACKBONE = {"fashionnet": "vgg16", "fashionnet_tiny": "vgg16_tiny"}
# --- end of the FashionNet block -----------------------------------------------------------------------------

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
  task_options = {k: kwargs.pop(k) for k in TASK_FIELDS if k in kwargs}
  model = _MODELS[name](**kwargs)
  if task_options.get("num_categories") or task_options.get("num_attributes") or \
      task_options.get("feature_relaxation"):
    model = model.clone(tasks=TaskHeads(**task_options, param_dtype=kwargs.get("param_dtype", jnp.float32)))
  return model


# Fields of `config.model` that are not keyword arguments of the model: its name, and the pretrained weights
# file that the trainer reads into a fresh model (`import_weights.import_backbone`).
NOT_MODEL_FIELDS = ("name", "pretrained")


def model_fields(name: str) -> tuple[str, ...]:
  """The keyword options of the model `name`: the fields of its Flax module (for a backbone, those of the
  backbone and of the embedding head)."""
  factory = _MODELS[name]
  if isinstance(factory, functools.partial) and factory.func is _backbone_embedder:
    backbone = factory.args[0].func
    head_cls = factory.args[2] if len(factory.args) > 2 else EmbeddingHead
    fields = [f.name for f in dataclasses.fields(backbone)] + list(_module_fields(head_cls))
  else:
    module = factory.func if isinstance(factory, functools.partial) else factory
    fields = [f.name for f in dataclasses.fields(module)]
  return tuple(dict.fromkeys(f for f in [*fields, *TASK_FIELDS] if f not in ("parent", "name", "tasks")))


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
  options = {k: v for k, v in model_config.items() if k not in NOT_MODEL_FIELDS and v is not None}
  problems = [f"config.model.{k}={v!r} is not an option of model {name}; its options are {sorted(fields)}."
              for k, v in options.items() if k not in fields]
  if "dtype" in options:
    try:
      options["dtype"] = resolve_dtype(options["dtype"])
    except TypeError:
      problems.append(f"config.model.dtype={options['dtype']!r} is not a dtype; use float32, bfloat16 or auto.")
  pretrained = model_config.get("pretrained")
  if pretrained:
    if name not in BACKBONE_NAMES and name not in WEIGHTS_BACKBONE:
      problems.append(f"config.model.pretrained is set, but {name} is not a backbone with importable weights; "
                      f"use one of {sorted(n for n in BACKBONE_NAMES if not n.endswith('_tiny'))}.")
    elif not os.path.exists(os.path.expanduser(pretrained)):
      problems.append(f"config.model.pretrained={pretrained!r}: no such file or folder. jaxret never downloads "
                      "weights; put the file there (docs/models.md names the file for each backbone).")
  if not problems:
    try:
      get_model(name, **options)
    except (ValueError, TypeError) as e:
      problems.append(f"config.model ({name}): {e}")
  return problems


def loss_layout_problems(model_config: Mapping[str, Any], loss_config: Mapping[str, Any]) -> list[str]:
  """Where the blocks of a method model's embedding (HDC's levels, ABE-M's and BIER's learners) differ from the
  blocks its loss reads (`config.loss.hdc.level_dims`, `config.loss.abe.num_learners`,
  `config.loss.<bier|a_bier>.learner_sizes`), one line each; [] for other models or a model config with
  problems of its own (`config_problems` names those)."""
  name = model_config["name"]
  if name not in METHOD_BACKBONE_NAMES or config_problems(model_config):
    return []
  options = {k: v for k, v in model_config.items() if k not in NOT_MODEL_FIELDS and v is not None and k != "dtype"}
  head = get_model(name, **options).head
  terms = {term.strip() for term in str(loss_config["name"]).split("+")}
  problems = []
  if isinstance(head, hdc.HDCHead) and "hdc" in terms:
    levels = (head.level_dim,) * len(head.level_stages)
    if tuple(loss_config["hdc"]["level_dims"]) != levels:
      problems.append(f"config.loss.hdc.level_dims={tuple(loss_config['hdc']['level_dims'])} must be the levels "
                      f"of model {name}, {levels} (config.model.level_dim per config.model.level_stages).")
  abe_learners = loss_config["abe"]["num_learners"]
  if isinstance(head, abe.AttentionEnsembleHead) and "abe" in terms and abe_learners != head.num_learners:
    problems.append(f"config.loss.abe.num_learners={abe_learners} must be model {name}'s "
                    f"config.model.num_learners={head.num_learners}.")
  if isinstance(head, bier.BIERHead):
    for term in sorted(terms & {"bier", "a_bier"}):
      if tuple(loss_config[term]["learner_sizes"]) != tuple(head.learner_sizes):
        problems.append(f"config.loss.{term}.learner_sizes={tuple(loss_config[term]['learner_sizes'])} must be "
                        f"model {name}'s config.model.learner_sizes={tuple(head.learner_sizes)}.")
  return problems


__all__ = [
  "BACKBONE_NAMES",
  "EMBEDDINGS",
  "HEAD_FIELDS",
  "INPUT_CONVENTIONS",
  "METHOD_BACKBONE_NAMES",
  "MODEL_NAMES",
  "TASK_FIELDS",
  "WEIGHTS_BACKBONE",
  "BackboneEmbedder",
  "CapsNetEmbedder",
  "EmbeddingHead",
  "QRCCapsNet",
  "RCCapsNet",
  "SCCapsNet",
  "TaskHeads",
  "capsule_embedding",
  "config_problems",
  "get_model",
  "loss_layout_problems",
  "model_fields",
  "resolve_dtype",
]
