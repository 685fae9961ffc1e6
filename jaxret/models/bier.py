"""BIER's embedding layer (Opitz et al., ICCV 2017 / TPAMI 2018) with the outputs A-BIER's adversarial term reads.

As the released `train_bier.py` (`embedding_tower`): the pooled backbone features f `[B, F]` go through one
linear layer per learner (sizes `learner_sizes`, 96, 160, 256), here one kernel W `[F, D]` and bias b `[D]`
whose column blocks are the learners' layers, and

  raw        = f W + b                          (the learners side by side, not normalised)
  embedding  = each learner block of raw L2-normalised and scaled by size / D, concatenated
               (`jaxret.losses.bier.bier_test_embedding`, the released `evaluate`)
  aux["bier_regularizer"] = stop_gradient(f) W  (the released `fc_k_regularizer`: the same layer without bias
               on the features under stop-gradient, so the adversarial term trains the embedding layer only)
  aux["embedding_kernel"] = W                   (the released unit-row penalty's `embedding_weights`)

The model returns the scaled embedding in training too: the BIER losses normalise every learner block
themselves, which undoes the constant scale (its gradient is the raw embedding's), so training and
evaluation see one embedding.

References:
  M. Opitz, G. Waltner, H. Possegger, H. Bischof. BIER - Boosting Independent Embeddings Robustly. ICCV 2017;
  Deep Metric Learning with BIER: Boosting Independent Embeddings Robustly. TPAMI 2018.
  Code: https://github.com/mop/bier (train_bier.py `embedding_tower`, `evaluate`).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxret.losses.bier import bier_test_embedding
from jaxret.models import heads

Dtype = Any

POOLINGS = ("avg", "max", "gem")


class BIERHead(nn.Module):
  """Pooling -> the learners' linear layers -> (embedding, aux) as the module docstring says.

  Call as `embedding, aux = head(feature_map, train=False)` with `feature_map` `[B, h, w, F]`; `embedding` is
  `[B, sum(learner_sizes)]` float32, `aux` holds "features" `[B, F]`, "bier_regularizer" `[B, D]` and
  "embedding_kernel" `[F, D]`, all float32.
  """
  learner_sizes: Sequence[int] = (96, 160, 256)  # the released default; config.loss.<bier|a_bier> must match.
  pooling: str = "avg"  # avg (the released pool5), max, or gem (learnable p).
  gem_p: float = 3.0
  gem_learnable_p: bool = True
  dtype: Dtype = jnp.float32  # of the projection; pooling and normalisation run in float32.
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    sizes = tuple(self.learner_sizes) if not isinstance(self.learner_sizes, str) else ()
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
      raise ValueError(f"learner_sizes must be a tuple of positive integers (e.g. (96, 160, 256)); got "
                       f"{self.learner_sizes!r}.")
    if self.pooling not in POOLINGS:
      raise ValueError(f"Unknown pooling {self.pooling!r}; use one of {POOLINGS}.")
    super().__post_init__()

  @property
  def embedding_dim(self) -> int:
    return sum(self.learner_sizes)

  @nn.compact
  def __call__(self, feature_map: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    del train  # No layer of the head behaves differently in training.
    x = feature_map.astype(jnp.float32)
    if self.pooling == "avg":
      features = heads.average_pool(x)
    elif self.pooling == "max":
      features = heads.max_pool(x)
    else:
      p = (self.param("gem_p", nn.initializers.constant(self.gem_p), (), self.param_dtype)
           if self.gem_learnable_p else self.gem_p)
      features = heads.gem_pool(x, jnp.asarray(p, jnp.float32))
    # Glorot-uniform kernel and zero bias: tf.slim's fully_connected defaults, which the released code uses.
    kernel = self.param("kernel", nn.initializers.glorot_uniform(), (features.shape[-1], self.embedding_dim),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.embedding_dim,), self.param_dtype)

    def project(f):
      return jnp.matmul(f.astype(self.dtype), kernel.astype(self.dtype)).astype(jnp.float32)

    raw = project(features) + bias.astype(jnp.float32)
    embedding = bier_test_embedding(raw, tuple(self.learner_sizes))
    aux = {"features": features, "bier_regularizer": project(jax.lax.stop_gradient(features)),
           "embedding_kernel": kernel.astype(jnp.float32)}
    return embedding, aux


class BIEREmbedder(nn.Module):
  """A backbone with `BIERHead`, under the model contract of `heads.BackboneEmbedder`.

  Returns `embedding` `[B, D]` float32 and `aux` with the head's "features", "bier_regularizer" and
  "embedding_kernel", and the backbone's "feature_map" and "stages". Parameters: `params["backbone"]`
  (importable weights) and `params["head"]` ("kernel", "bias").
  """
  backbone: nn.Module
  head: BIERHead

  @property
  def embedding_dim(self) -> int:
    return self.head.embedding_dim

  @nn.compact
  def __call__(self, images: jax.typing.ArrayLike, train: bool = False,
               category: jax.typing.ArrayLike | None = None) -> tuple[jax.Array, dict[str, Any]]:
    del category  # Part of the model contract; unused.
    images = heads.rgb_batch(images)
    outputs = self.backbone(images, train=train)
    embedding, aux = self.head(outputs["feature_map"], train=train)
    return embedding, {**aux, "feature_map": outputs["feature_map"], "stages": outputs["stages"]}
