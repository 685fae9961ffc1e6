"""HDC's model (Yuan et al., ICCV 2017): embedding heads on three depths of a backbone, concatenated.

  backbone: images `[B, H, W, 3]` -> stage maps (GoogLeNet: inception4a, inception4d, inception5b;
            ResNet: layer2, layer3, layer4)
  level k < last: GoogLeNet's auxiliary classifier with a `level_dim` output, as the released Caffe model
            (HDC_deploy.prototxt, loss1/loss2): average pool to 4x4 -> 1x1 conv (128) + BN + ReLU
            -> fc (1024) + ReLU -> dropout 0.7 -> fc (level_dim) -> L2 normalisation
  last level: global average pool -> dropout 0.4 -> fc (level_dim) -> L2 normalisation (loss3)
  embedding: the levels concatenated, `[B, num_levels * level_dim]` (norm sqrt(num_levels)),

which is what `jaxret.losses.hdc` reads: consecutive blocks of `config.loss.hdc.level_dims`, here
(128, 128, 128). The released code initialises the two auxiliary heads from GoogLeNet's ImageNet auxiliary
classifiers; here they start fresh (they live under `params["head"]`, and `import_weights` drops torchvision's
`aux1.*` / `aux2.*`). On ResNet, layer2 and layer3 (strides 8 and 16, the depths of GoogLeNet's 4a and 4d)
take the auxiliary heads: our choice, the paper uses GoogLeNet only.

References:
  Y. Yuan, K. Yang, C. Zhang. Hard-Aware Deeply Cascaded Embedding. ICCV 2017.
  Code: https://github.com/PkuRainBow/Hard-Aware-Deeply-Cascaed-Embedding
    (model_train/Deep_Fashion/in_shop/HDC_deploy.prototxt).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxret.models import googlenet
from jaxret.models import heads

Dtype = Any

# The stages each backbone's levels read, shallow to deep (the and the paper's choice for GoogLeNet).
GOOGLENET_LEVELS = ("inception4a", "inception4d", "inception5b")
RESNET_LEVELS = ("layer2", "layer3", "layer4")


def adaptive_average_pool(feature_map: jax.typing.ArrayLike, output_size: int) -> jax.Array:
  """PyTorch's `adaptive_avg_pool2d`: `[B, H, W, C]` -> `[B, s, s, C]`, s = `output_size`.

  Output cell i along an axis of length n averages the input rows floor(i n / s) .. ceil((i + 1) n / s) - 1
  (bins overlap when s does not divide n; a map smaller than s repeats rows).

  >>> import jax.numpy as jnp
  >>> x = jnp.arange(5.0).reshape(1, 5, 1, 1)
  >>> adaptive_average_pool(jnp.tile(x, (1, 1, 5, 1)), 2)[0, :, 0, 0].tolist()
  [1.0, 3.0]
  """
  x = jnp.asarray(feature_map)
  if x.ndim != 4:
    raise ValueError(f"feature_map must be [batch, height, width, channels]; got shape {x.shape}.")

  def bins(n):
    return [(i * n // output_size, -(-(i + 1) * n // output_size)) for i in range(output_size)]

  rows = jnp.stack([jnp.mean(x[:, a:b], axis=1) for a, b in bins(x.shape[1])], axis=1)
  return jnp.stack([jnp.mean(rows[:, :, a:b], axis=2) for a, b in bins(x.shape[2])], axis=2)


class AuxiliaryLevel(nn.Module):
  """GoogLeNet's auxiliary classifier (torchvision's `InceptionAux`) ending in an L2-normalised embedding.

  `[B, h, w, C]` -> `[B, embedding_dim]` float32.
  """
  embedding_dim: int = 128
  pool_size: int = 4
  conv_features: int = 128
  hidden: int = 1024
  dropout_rate: float = 0.7
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feature_map: jax.Array, train: bool = False) -> jax.Array:
    x = adaptive_average_pool(feature_map, self.pool_size)
    x = googlenet.BasicConv2d(self.conv_features, 1, use_running_average=not train, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="conv")(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.embedding_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)
    return heads.l2_normalize(x.astype(jnp.float32))


class FinalLevel(nn.Module):
  """The last level: global average pool -> dropout -> fc -> L2 normalisation, `[B, h, w, C]` -> `[B, D]`."""
  embedding_dim: int = 128
  dropout_rate: float = 0.4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feature_map: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    features = heads.average_pool(feature_map.astype(jnp.float32))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    x = nn.Dense(self.embedding_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="projection")(x)
    return heads.l2_normalize(x.astype(jnp.float32)), features


class HDCHead(nn.Module):
  """One embedding head per level stage (module docstring), their outputs concatenated.

  Call as `embedding, features = head(stages, train=False)` with `stages` the backbone's named maps;
  `embedding` is `[B, len(level_stages) * level_dim]` float32, `features` the last level's pooled map
  `[B, F]` float32.
  """
  level_stages: Sequence[str] = GOOGLENET_LEVELS  # backbone stages, shallow to deep; the last is pooled.
  level_dim: int = 128  # each level's embedding size (the paper's 128).
  aux_hidden: int = 1024  # hidden units of the auxiliary levels' first fc (GoogLeNet's 1024).
  aux_dropout: float = 0.7  # dropout of the auxiliary levels (GoogLeNet's 0.7).
  final_dropout: float = 0.4  # dropout before the last level's fc (GoogLeNet's pool5 dropout, 0.4).
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if isinstance(self.level_stages, str) or not self.level_stages or not all(
        isinstance(s, str) for s in self.level_stages):
      raise ValueError(f"level_stages must be a tuple of backbone stage names, shallow to deep; got "
                       f"{self.level_stages!r}.")
    if self.level_dim < 1:
      raise ValueError(f"level_dim must be >= 1; got {self.level_dim}.")
    super().__post_init__()

  @property
  def embedding_dim(self) -> int:
    return len(self.level_stages) * self.level_dim

  @nn.compact
  def __call__(self, stages: dict[str, jax.Array], train: bool = False) -> tuple[jax.Array, jax.Array]:
    missing = [s for s in self.level_stages if s not in stages]
    if missing:
      raise ValueError(f"level_stages {missing} are not stages of this backbone; its stages are "
                       f"{sorted(stages)}.")
    *auxiliary, last = self.level_stages
    levels = [AuxiliaryLevel(self.level_dim, hidden=self.aux_hidden, dropout_rate=self.aux_dropout,
                             dtype=self.dtype, param_dtype=self.param_dtype, name=f"level{k}")(stages[s], train)
              for k, s in enumerate(auxiliary)]
    embedding, features = FinalLevel(self.level_dim, dropout_rate=self.final_dropout, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=f"level{len(auxiliary)}")(
                                         stages[last], train)
    return jnp.concatenate([*levels, embedding], axis=-1), features


class HDCEmbedder(nn.Module):
  """A backbone with `HDCHead`, under the model contract of `heads.BackboneEmbedder`.

  Returns `embedding` `[B, num_levels * level_dim]` float32 (the L2-normalised levels side by side), and
  `aux` with "features" (the last level's pooled map `[B, F]`), "feature_map" and "stages" (the backbone's).
  Parameters: `params["backbone"]` (importable weights) and `params["head"]` (the levels, fresh).
  """
  backbone: nn.Module
  head: HDCHead

  @property
  def embedding_dim(self) -> int:
    return self.head.embedding_dim

  @nn.compact
  def __call__(self, images: jax.typing.ArrayLike, train: bool = False,
               category: jax.typing.ArrayLike | None = None) -> tuple[jax.Array, dict[str, Any]]:
    del category  # Part of the model contract; unused.
    images = heads.rgb_batch(images)
    outputs = self.backbone(images, train=train)
    embedding, features = self.head(outputs["stages"], train=train)
    return embedding, {"features": features, "feature_map": outputs["feature_map"], "stages": outputs["stages"]}
