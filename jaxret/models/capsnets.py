"""Capsule-network embedders for fashion image retrieval: SCCapsNet, RCCapsNet and QRCCapsNet.

Each model maps normalised images `[B, H, W, C]` to class capsules `[B, num_classes, capsule_dim]` and an
embedding for retrieval. At the defaults (256x256 input, 23 classes) the layers are those of the published
Keras code of Kinli et al. (2019), which Khatami & Fadaeieslam (2022) reuse:

  RCCapsNet: conv 7x7/2 (64) + BN + ReLU + spatial dropout -> residual block (128) + dropout
    -> residual block (256) + dropout -> primary capsules from a residual block (512 = 32 types x 16-D,
    16x16 grid, 8192 capsules) -> 23 class capsules x 16-D, 3 routing iterations.
  SCCapsNet: the same with stacked 7x7/2 conv blocks (64 -> 128 -> 64) and a 7x7/2 conv for the primary
    capsules.

Every block halves the resolution (SAME padding), so any input size works: 64x64 gives a 4x4 grid.

Embedding modes (`embedding=`), all `[B, num_classes * capsule_dim]` float32:
  "all": every class capsule L2-normalised, concatenated.
  "predicted": the same with every block but the longest capsule's set to zero.
  "label": training: every block but the ground-truth category's set to zero (needs `category`);
    evaluation: as "predicted".
  "label_leaky_eval": the ground-truth category also at evaluation, as the published code does. The
    category of a query is not known at retrieval time, so this leaks labels and inflates Recall@K; it
    exists only to reproduce published numbers.

References:
  S. Sabour, N. Frosst, G. E. Hinton. Dynamic Routing Between Capsules. NeurIPS 2017.
  F. Kinli, B. Ozcan, F. Kirac. Fashion Image Retrieval with Capsule Networks. ICCV Workshops 2019.
    Code: https://github.com/birdortyedi/image-retrieval-with-capsules
  M. Khatami, M. J. Fadaeieslam. Fashion Image Retrieval With Quadruplet Capsule Networks. First Conference
    on Artificial Intelligence and Smart Computing, Semnan, 2022.
    Code: https://github.com/MahdiyeKhatami/QRCCapsNet
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from jaxret.models import capsule_layers
from jaxret.models import routing

Dtype = Any

EMBEDDINGS = ("all", "predicted", "label", "label_leaky_eval")


def capsule_embedding(class_capsules: jax.typing.ArrayLike, mask: jax.typing.ArrayLike | None = None,
                      eps: float = 1e-24) -> jax.Array:
  """L2-normalises every class capsule, optionally masks whole capsules, and concatenates them.

  Args:
    class_capsules: `[B, K, D]` class capsules.
    mask: optional `[B, K]` weights per capsule (a one-hot row keeps one capsule).
    eps: lower bound on |v|^2 when normalising, so zero capsules stay zero with a finite gradient (tiny,
      because class capsules of an untrained model can be as short as 1e-4).

  Returns:
    `[B, K * D]` float32 (float64 for float64 input).
  """
  v = jnp.asarray(class_capsules)
  v = v.astype(jnp.promote_types(v.dtype, jnp.float32))
  v = v * lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(v), axis=-1, keepdims=True), eps))
  if mask is not None:
    v = v * jnp.asarray(mask, v.dtype)[..., None]
  return v.reshape(v.shape[0], -1)


class CapsNetEmbedder(nn.Module):
  """Shared head of the capsule embedders: primary capsules -> routed class capsules -> embedding.

  Subclasses only define `primary_capsules`. Call as
  `(embedding, aux) = model.apply(variables, images, train=False)`, or in training
  `(embedding, aux), updates = model.apply(variables, images, train=True, category=category,
  mutable=["batch_stats"], rngs={"dropout": key})`.

  Args of `__call__`:
    images: `[B, H, W, C]` float images, already normalised by the input pipeline.
    train: dropout on and BatchNorm on batch statistics (updating "batch_stats") when True.
    category: `[B]` int class ids; needed for `embedding="label"` when training and for
      `"label_leaky_eval"` always; ignored otherwise.

  Returns:
    `embedding`: `[B, num_classes * capsule_dim]` float32 (see the module docstring for the modes), and
    `aux`: dict with "class_capsules" `[B, num_classes, capsule_dim]` float32, "capsule_lengths"
    `[B, num_classes]` float32 in [0, 1) (class scores for a margin loss) and "predicted_class" `[B]` int32;
    with `tasks`, the predictions of `heads.TaskHeads` on the embedding ("category_logits", ...).
    The last iteration's coupling coefficients `[B, in_caps, num_classes]` are sown: with
    `mutable=["intermediates"]` they come back as `state["intermediates"]["coupling"][0]`.
  """
  num_classes: int = 23
  capsule_dim: int = 16  # size of each class capsule
  primary_capsule_types: int = 32
  primary_capsule_dim: int = 16
  routing_iterations: int = 3
  logit_update: str = "accumulate"  # "replace" is what the published Keras code does
  share_weights: bool = True
  stop_gradient_inner: bool = False
  dropout_rate: float = 0.3  # spatial dropout after the first blocks
  embedding: str = "all"
  batch_norm_momentum: float = 0.99  # Keras' default, as in the published code
  dtype: Dtype = jnp.float32  # computation dtype of convs and predictions
  param_dtype: Dtype = jnp.float32
  tasks: Any = None  # heads.TaskHeads: classifiers on the embedding (parameters under "tasks").

  def __post_init__(self):
    if self.embedding not in EMBEDDINGS:
      raise ValueError(f"Unknown embedding {self.embedding!r}; use one of {EMBEDDINGS}.")
    if self.logit_update not in routing.LOGIT_UPDATES:
      raise ValueError(f"Unknown logit_update {self.logit_update!r}; use one of {routing.LOGIT_UPDATES}.")
    if self.routing_iterations < 1:
      raise ValueError(f"routing_iterations must be >= 1; got {self.routing_iterations}.")
    super().__post_init__()

  @property
  def embedding_dim(self) -> int:
    return self.num_classes * self.capsule_dim

  def primary_capsules(self, images: jax.Array, train: bool) -> jax.Array:
    """`[B, H, W, C]` -> primary capsules `[B, in_caps, primary_capsule_dim]`."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, images: jax.typing.ArrayLike, train: bool = False,
               category: jax.typing.ArrayLike | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    images = jnp.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"images must be [batch, height, width, channels]; got shape {images.shape}.")
    needs_category = self.embedding == "label_leaky_eval" or (self.embedding == "label" and train)
    if needs_category:
      if category is None:
        raise ValueError(f"embedding={self.embedding!r} masks with the ground-truth category: pass "
                         "category=[batch] int class ids to the model (or use embedding='all').")
      category = jnp.asarray(category)
      if category.shape != images.shape[:1]:
        raise ValueError(f"category must have shape [batch] = {images.shape[:1]}; got {category.shape}.")

    primary = self.primary_capsules(images, train)
    class_capsules, coupling = capsule_layers.RoutedCapsules(
        self.num_classes, self.capsule_dim, routing_iterations=self.routing_iterations,
        logit_update=self.logit_update, share_weights=self.share_weights,
        stop_gradient_inner=self.stop_gradient_inner, dtype=self.dtype, param_dtype=self.param_dtype,
        name="class_capsules")(primary)
    self.sow("intermediates", "coupling", coupling)
    class_capsules = class_capsules.astype(jnp.float32)
    lengths = routing.capsule_length(class_capsules)
    predicted_class = jnp.argmax(lengths, axis=-1).astype(jnp.int32)

    if self.embedding == "all":
      mask = None
    elif needs_category:
      mask = jax.nn.one_hot(category, self.num_classes, dtype=jnp.float32)
    else:  # "predicted", or "label" at evaluation
      mask = jax.nn.one_hot(predicted_class, self.num_classes, dtype=jnp.float32)
    embedding = capsule_embedding(class_capsules, mask)
    aux = {"class_capsules": class_capsules, "capsule_lengths": lengths, "predicted_class": predicted_class}
    if self.tasks is not None:
      aux.update(self.tasks(embedding, None, train=train))
    return embedding, aux


class SCCapsNet(CapsNetEmbedder):
  """Stacked-convolutional capsule network (Kinli, Ozcan & Kirac 2019).

  conv blocks 7x7/2 (`stem_features`, then each of `conv_features`; conv + BN + ReLU + spatial dropout)
  -> 7x7/2 conv to `primary_capsule_types * primary_capsule_dim` channels -> primary capsules -> routing.
  At 256x256, 23 classes, shared weights: 2,425,024 parameters + 512 BatchNorm statistics.
  """
  stem_features: int = 64
  conv_features: Sequence[int] = (128, 64)
  kernel_size: int = 7

  def primary_capsules(self, images: jax.Array, train: bool) -> jax.Array:
    x = images
    for index, features in enumerate((self.stem_features, *self.conv_features)):
      x = capsule_layers.ConvBlock(features, kernel_size=self.kernel_size, strides=2,
                                   dropout_rate=self.dropout_rate,
                                   batch_norm_momentum=self.batch_norm_momentum, dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=f"conv_block_{index}")(x, train=train)
    return capsule_layers.PrimaryCapsules(
        self.primary_capsule_types, self.primary_capsule_dim, block="conv", kernel_size=self.kernel_size,
        strides=2, dtype=self.dtype, param_dtype=self.param_dtype, name="primary_capsules")(x, train=train)


class RCCapsNet(CapsNetEmbedder):
  """Residual-convolutional capsule network (Kinli, Ozcan & Kirac 2019).

  conv block 7x7/2 (`stem_features`; conv + BN + ReLU + spatial dropout) -> residual blocks (each of
  `residual_features`, 3x3/2, LeakyReLU, 1x1/2 projection shortcut) each followed by spatial dropout
  -> residual block to `primary_capsule_types * primary_capsule_dim` channels -> primary capsules -> routing.
  At 256x256, 23 classes, shared weights: 4,840,448 parameters + 5,504 BatchNorm statistics.
  """
  stem_features: int = 64
  residual_features: Sequence[int] = (128, 256)
  stem_kernel_size: int = 7
  leaky_relu_slope: float = capsule_layers.KERAS_LEAKY_RELU_SLOPE

  def primary_capsules(self, images: jax.Array, train: bool) -> jax.Array:
    x = capsule_layers.ConvBlock(self.stem_features, kernel_size=self.stem_kernel_size, strides=2,
                                 dropout_rate=self.dropout_rate, batch_norm_momentum=self.batch_norm_momentum,
                                 dtype=self.dtype, param_dtype=self.param_dtype, name="stem")(
                                     images, train=train)
    for index, features in enumerate(self.residual_features):
      x = capsule_layers.ResidualBlock(features, strides=2, leaky_relu_slope=self.leaky_relu_slope,
                                       batch_norm_momentum=self.batch_norm_momentum, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=f"residual_block_{index}")(
                                           x, train=train)
      x = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(x)
    return capsule_layers.PrimaryCapsules(
        self.primary_capsule_types, self.primary_capsule_dim, block="residual", strides=2,
        leaky_relu_slope=self.leaky_relu_slope, batch_norm_momentum=self.batch_norm_momentum,
        dtype=self.dtype, param_dtype=self.param_dtype, name="primary_capsules")(x, train=train)


class QRCCapsNet(RCCapsNet):
  """QRCCapsNet (Khatami & Fadaeieslam 2022): the RCCapsNet architecture, trained with the category-aware
  quadruplet loss instead of the triplet loss (the loss lives in `jaxret.losses`, not in the model)."""
