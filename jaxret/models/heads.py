"""The embedding head shared by all backbones, and `BackboneEmbedder`, the model that joins the two.

  backbone: images `[B, H, W, 3]` -> final feature map `[B, h, w, F]` (+ named intermediate maps)
  head:     pooling (avg, max, GeM, or the class token of a ViT) -> `[B, F]` features
            -> optional BatchNorm neck -> optional linear projection to `embedding_dim`
            -> optional L2 normalisation -> embedding `[B, D]` float32

Parameters and statistics are split by owner: `variables["params"]["backbone"]` holds what pretrained
weights replace (`import_weights`), `variables["params"]["head"]` what is always trained from scratch.

References:
  F. Radenović, G. Tolias, O. Chum. Fine-tuning CNN Image Retrieval with No Human Annotation. TPAMI 2018.
    (GeM pooling.)
  H. Luo, Y. Gu, X. Liao, S. Lai, W. Jiang. Bag of Tricks and A Strong Baseline for Deep Person
    Re-identification. CVPR Workshops 2019. (BatchNorm neck.)
"""

from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Dtype = Any

POOLINGS = ("avg", "max", "gem", "token")


def average_pool(feature_map: jax.typing.ArrayLike) -> jax.Array:
  """Mean over the spatial positions: `[B, H, W, C]` -> `[B, C]`."""
  return jnp.mean(jnp.asarray(feature_map), axis=(1, 2))


def max_pool(feature_map: jax.typing.ArrayLike) -> jax.Array:
  """Maximum over the spatial positions: `[B, H, W, C]` -> `[B, C]`."""
  return jnp.max(jnp.asarray(feature_map), axis=(1, 2))


def gem_pool(feature_map: jax.typing.ArrayLike, p: jax.typing.ArrayLike, eps: float = 1e-6) -> jax.Array:
  """Generalised-mean (GeM) pooling: `(mean_{h,w} max(x, eps)^p)^(1/p)` per channel.

  p = 1 is average pooling, p -> inf max pooling. The clamp at `eps` keeps `x^p` and its gradient with
  respect to p (`x^p log x`) finite; feature maps after a ReLU are >= 0 anyway.

  Args:
    feature_map: `[B, H, W, C]`.
    p: scalar exponent (a learnable parameter of `EmbeddingHead`), > 0.
    eps: lower clamp of the activations.

  Returns:
    `[B, C]`, in the dtype of `feature_map` promoted with `p`.

  >>> import jax.numpy as jnp
  >>> x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1)
  >>> round(float(gem_pool(x, 1.0)[0, 0]), 4), round(float(gem_pool(x, 3.0)[0, 0]), 4)
  (2.5, 2.924)

  References:
    F. Radenović, G. Tolias, O. Chum. Fine-tuning CNN Image Retrieval with No Human Annotation. TPAMI 2018.
  """
  x = jnp.maximum(jnp.asarray(feature_map), eps)
  p = jnp.asarray(p)
  # Divided by the channel's maximum m, x^p cannot overflow for any p (x^8 already overflows bfloat16-sized
  # activations, x^100 float32). For a constant m, m * mean((x / m)^p)^(1/p) is the same function of x and
  # p, so m needs no gradient.
  m = lax.stop_gradient(jnp.max(x, axis=(1, 2), keepdims=True))
  return m[:, 0, 0] * jnp.mean((x / m) ** p, axis=(1, 2)) ** (1.0 / p)


def l2_normalize(x: jax.typing.ArrayLike, eps: float = 1e-12) -> jax.Array:
  """`x / max(|x|, eps)` along the last axis: `[B, D]` -> `[B, D]` (a zero row stays zero)."""
  x = jnp.asarray(x)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))


def rgb_batch(images: jax.typing.ArrayLike) -> jax.Array:
  """`images` as an array after checking it is `[batch, height, width, 3]`; ValueError saying the shape if not."""
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be [batch, height, width, 3]; got shape {images.shape}.")
  return images


class EmbeddingHead(nn.Module):
  """Pooling -> optional BatchNorm neck -> optional projection -> optional L2 normalisation.

  Call as `embedding, features = head(feature_map, class_token=None, train=False)`:
    feature_map: `[B, h, w, F]`, the backbone's last feature map.
    class_token: `[B, F]`, a ViT's class token; needed for `pooling="token"`.
    Returns `embedding` `[B, embedding_dim]` (`[B, F]` when `embedding_dim=0`) float32, and the pooled
    `features` `[B, F]` float32 (before the neck).
  """
  embedding_dim: int = 512  # 0: no projection, the embedding is the pooled (and necked) features.
  pooling: str = "avg"  # avg, max, gem (learnable p), or token (the ViT class token).
  gem_p: float = 3.0  # initial GeM exponent.
  gem_learnable_p: bool = True  # GeM's p is a parameter ("gem_p") trained with the rest.
  bn_neck: bool = False  # BatchNorm (scale and bias) on the pooled features before the projection.
  l2_normalize: bool = True
  dtype: Dtype = jnp.float32  # of the projection; pooling, neck and normalisation run in float32.
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"Unknown pooling {self.pooling!r}; use one of {POOLINGS}.")
    if self.embedding_dim < 0:
      raise ValueError(f"embedding_dim must be >= 0 (0: no projection); got {self.embedding_dim}.")
    if self.pooling == "gem" and self.gem_p <= 0:
      raise ValueError(f"gem_p must be positive; got {self.gem_p}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, feature_map: jax.Array, class_token: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = feature_map.astype(jnp.float32)
    if self.pooling == "avg":
      features = average_pool(x)
    elif self.pooling == "max":
      features = max_pool(x)
    elif self.pooling == "gem":
      if self.gem_learnable_p:
        p = self.param("gem_p", nn.initializers.constant(self.gem_p), (), self.param_dtype)
      else:
        p = self.gem_p
      features = gem_pool(x, jnp.asarray(p, jnp.float32))
    else:
      if class_token is None:
        raise ValueError("pooling='token' needs a backbone with a class token (a ViT); use avg, max or gem.")
      features = class_token.astype(jnp.float32)

    x = features
    if self.bn_neck:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32,
                       param_dtype=self.param_dtype, name="bn_neck")(x)
    if self.embedding_dim:
      x = nn.Dense(self.embedding_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="projection")(x)
      x = x.astype(jnp.float32)
    if self.l2_normalize:
      x = l2_normalize(x)
    return x, features


class TaskHeads(nn.Module):
  """Classifiers beside the embedding (multi-task heads): the garment's category and its attributes.

  Call as `predictions = tasks(features, feature_map, train)`:
    features: `[B, F]` pooled features (a backbone's, before the neck; a capsule network's embedding).
    feature_map: `[B, h, w, F']` the backbone's last map, read by the feature relaxation module; None for
      models without one (then `feature_relaxation` must be off).
    Returns `{"category_logits": [B, num_categories], "attribute_logits": [B, num_attributes]}` float32, each
    only when its head exists.

  `feature_relaxation` puts the module of Park et al. (2019) between the backbone's map and the category
  classifier: 1x1 conv -> ReLU -> dropout -> 1x1 conv, average-pooled, then the linear classifier, so that
  the classification loss ("OS") shapes those layers and not directly the features the embedding ("IS") is
  pooled from. The paper gives the order of the layers, not their sizes: we use `relaxation_features`
  channels (default 512) and 1x1 kernels (docs/models.md).

  References:
    S. Park, M. Shin, S. Ham, S. Choe, Y. Kang. Study on Fashion Image Retrieval Methods for Efficient Fashion
      Visual Search. CVPR Workshops 2019.
  """
  num_categories: int = 0  # 0: no category head.
  num_attributes: int = 0  # 0: no attribute head.
  feature_relaxation: bool = False
  relaxation_features: int = 512
  relaxation_dropout: float = 0.5
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    for field in ("num_categories", "num_attributes", "relaxation_features"):
      if getattr(self, field) < 0:
        raise ValueError(f"{field} must be >= 0; got {getattr(self, field)}.")
    if self.feature_relaxation and not self.num_categories:
      raise ValueError("feature_relaxation sits before the category classifier: set num_categories too.")
    if not 0 <= self.relaxation_dropout < 1:
      raise ValueError(f"relaxation_dropout must be in [0, 1); got {self.relaxation_dropout}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, features: jax.Array, feature_map: jax.Array | None = None,
               train: bool = False) -> dict[str, jax.Array]:
    features = features.astype(jnp.float32)
    predictions = {}
    if self.num_categories:
      x = features
      if self.feature_relaxation:
        if feature_map is None:
          raise ValueError("feature_relaxation needs a backbone feature map; this model has none.")
        x = nn.Conv(self.relaxation_features, (1, 1), param_dtype=self.param_dtype,
                    name="relaxation_conv1")(feature_map.astype(jnp.float32))
        x = nn.relu(x)
        x = nn.Dropout(self.relaxation_dropout, deterministic=not train)(x)
        x = nn.Conv(self.relaxation_features, (1, 1), param_dtype=self.param_dtype, name="relaxation_conv2")(x)
        x = average_pool(x)
      predictions["category_logits"] = nn.Dense(self.num_categories, param_dtype=self.param_dtype,
                                                name="category_classifier")(x)
    if self.num_attributes:
      predictions["attribute_logits"] = nn.Dense(self.num_attributes, param_dtype=self.param_dtype,
                                                 name="attribute_classifier")(features)
    return predictions


class BackboneEmbedder(nn.Module):
  """A backbone followed by an `EmbeddingHead`, with the capsule networks' model contract.

  `(embedding, aux) = model.apply(variables, images, train=False)`, or in training
  `(embedding, aux), updates = model.apply(variables, images, train=True, category=category,
  mutable=["batch_stats"], rngs={"dropout": key})`.

  Args of `__call__`:
    images: `[B, H, W, 3]` float32, normalised by the input pipeline as the weights expect
      (`jaxret.models.INPUT_CONVENTIONS`).
    train: BatchNorm on batch statistics (updating "batch_stats") and dropout on when True.
    category: accepted for the trainer's sake and ignored (these models use no labels).

  Returns:
    `embedding` `[B, D]` float32, and `aux`, a dict with
      "features": `[B, F]` float32, the pooled backbone features before the neck and projection (for
        classification or multi-task heads);
      "feature_map": `[B, h, w, F]`, the backbone's last map (in `dtype`);
      "stages": dict of named intermediate maps (`[B, h_i, w_i, C_i]`, in `dtype`), e.g. ResNet's
        layer1..layer4; see each backbone;
      and with `tasks`, its predictions ("category_logits", "attribute_logits", see `TaskHeads`).
  """
  backbone: nn.Module
  head: EmbeddingHead
  tasks: TaskHeads | None = None  # Classifiers beside the embedding (parameters under "tasks").

  @property
  def embedding_dim(self) -> int:
    return self.head.embedding_dim or self.backbone.num_features

  @nn.compact
  def __call__(self, images: jax.typing.ArrayLike, train: bool = False,
               category: jax.typing.ArrayLike | None = None) -> tuple[jax.Array, dict[str, Any]]:
    del category  # Part of the model contract; only the capsule networks use it.
    images = rgb_batch(images)
    outputs = self.backbone(images, train=train)
    embedding, features = self.head(outputs["feature_map"], class_token=outputs.get("class_token"),
                                    train=train)
    aux = {"features": features, "feature_map": outputs["feature_map"], "stages": outputs["stages"]}
    if self.tasks is not None:
      aux.update(self.tasks(features, outputs["feature_map"], train=train))
    return embedding, aux
