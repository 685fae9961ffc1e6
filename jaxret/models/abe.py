"""ABE-M's model (Kim et al., ECCV 2018): M attention masks over shared early features, one learner each.

  S: the backbone up to `split_stage` (GoogLeNet: inception3b, as the paper; ResNet: layer2)
     images `[B, H, W, 3]` -> shared map s `[B, h, w, C]`
  A_m: M attention modules -> sigmoid masks a_m `[B, h, w, C]` (a shared 3x3 conv trunk with ReLU, then one
     1x1 conv + sigmoid per learner, computed as one conv to M * C channels)
  G: the rest of the backbone, shared by the learners, run on the M masked maps a_m * s as one batch of M * B
  learner m: global average pool -> its own linear projection to D / M -> L2 normalisation
  embedding: the M learners side by side, `[B, D]` (norm sqrt(M)),

which is what `jaxret.losses.abe` reads (M equal consecutive blocks). No official code exists; what is our
reading: the paper's attention modules are deeper (an unofficial Keras reading uses a copy of inception
4a-4e as their shared trunk, then the per-learner 1x1 conv + sigmoid); ours is one 3x3 conv
(`attention_features` channels) before the per-learner 1x1 convs, on S's map. G's BatchNorm sees the M masked
copies as one batch of M * B (G is one shared network).

References:
  W. Kim, B. Goyal, K. Chawla, J. Lee, K. Kwon. Attention-based Ensemble for Deep Metric Learning.
  ECCV 2018.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxret.models import heads

Dtype = Any

# Where S ends and G begins.
GOOGLENET_SPLIT = "inception3b"
RESNET_SPLIT = "layer2"


def attend(shared_map: jax.typing.ArrayLike, masks: jax.typing.ArrayLike) -> jax.Array:
  """The M masked copies of the shared map, as one batch: `[B, h, w, C]`, `[M, B, h, w, C]` -> `[M * B, h, w, C]`.

  Row m * B + b is mask m times image b's map (learner-major, so that `.reshape(M, B, ...)` undoes it).
  """
  shared_map, masks = jnp.asarray(shared_map), jnp.asarray(masks)
  if masks.ndim != 5 or masks.shape[1:] != shared_map.shape:
    raise ValueError(f"masks must be [num_learners, *shared_map.shape] = [M, {', '.join(map(str, shared_map.shape))}]"
                     f"; got {masks.shape}.")
  return (masks * shared_map[None]).reshape(-1, *shared_map.shape[1:])


class AttentionModules(nn.Module):
  """`[B, h, w, C]` -> M sigmoid masks `[M, B, h, w, C]`: a shared 3x3 conv + ReLU, then per learner 1x1 + sigmoid."""
  num_learners: int
  attention_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, shared_map: jax.Array) -> jax.Array:
    channels = shared_map.shape[-1]
    x = nn.relu(nn.Conv(self.attention_features, (3, 3), padding=1, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="trunk")(shared_map))
    # One 1x1 conv to M * C channels is the M learners' 1x1 convs side by side.
    logits = nn.Conv(self.num_learners * channels, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="masks")(x)
    masks = jax.nn.sigmoid(logits.reshape(*logits.shape[:-1], self.num_learners, channels))
    return jnp.moveaxis(masks, -2, 0)


class LearnerProjections(nn.Module):
  """M linear maps, one per learner: `[B, M, F]` -> `[B, M, d]` float32, each row L2-normalised."""
  num_learners: int
  learner_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=1, out_axis=2, batch_axis=(0,)),
                        (self.num_learners, features.shape[-1], self.learner_dim), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.num_learners, self.learner_dim), self.param_dtype)
    x = jnp.einsum("bmf,mfd->bmd", features.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)
    return heads.l2_normalize(x.astype(jnp.float32))


class AttentionEnsembleHead(nn.Module):
  """ABE-M's new layers: the attention modules (`masks`) and the learners' projections (`__call__`).

  The backbone runs between the two, so `AttentionEnsembleEmbedder` calls `head.masks(shared_map)` before
  it and `head(learner_features)` after it; both live under `params["head"]`.
  """
  num_learners: int = 8  # M (ABE-8).
  embedding_dim: int = 512  # D, the whole embedding; each learner has D / M.
  split_stage: str = GOOGLENET_SPLIT  # the backbone stage after which S ends and G begins.
  attention_features: int = 512  # channels of the attention modules' shared 3x3 conv.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.num_learners < 1 or self.embedding_dim < 1 or self.embedding_dim % self.num_learners:
      raise ValueError(f"embedding_dim={self.embedding_dim} must be a positive multiple of num_learners="
                       f"{self.num_learners} (each learner has embedding_dim / num_learners dimensions).")
    if self.attention_features < 1:
      raise ValueError(f"attention_features must be >= 1; got {self.attention_features}.")
    super().__post_init__()

  def setup(self):
    self.attention = AttentionModules(self.num_learners, self.attention_features, dtype=self.dtype,
                                      param_dtype=self.param_dtype)
    self.projection = LearnerProjections(self.num_learners, self.embedding_dim // self.num_learners,
                                         dtype=self.dtype, param_dtype=self.param_dtype)

  def masks(self, shared_map: jax.Array) -> jax.Array:
    """`[B, h, w, C]` -> `[M, B, h, w, C]` attention masks in (0, 1)."""
    return self.attention(shared_map)

  def __call__(self, learner_features: jax.Array) -> jax.Array:
    """`[B, M, F]` pooled learner features -> `[B, D]` embedding (M L2-normalised blocks side by side)."""
    embeddings = self.projection(learner_features)
    return embeddings.reshape(embeddings.shape[0], -1)


class AttentionEnsembleEmbedder(nn.Module):
  """A backbone split at `head.split_stage` with ABE-M's attention ensemble (module docstring).

  Model contract of `heads.BackboneEmbedder`: returns `embedding` `[B, D]` float32 and `aux` with
  "learner_features" `[B, M, F]` (each learner's pooled G map), "features" `[B, F]` (their mean over the
  learners), "attention_masks" `[B, M, h, w, C]` and "stages" (S's maps). Parameters: `params["backbone"]`
  (the plain backbone's, importable weights; S and G are its two halves) and `params["head"]`.
  """
  backbone: nn.Module
  head: AttentionEnsembleHead

  @property
  def embedding_dim(self) -> int:
    return self.head.embedding_dim

  @nn.compact
  def __call__(self, images: jax.typing.ArrayLike, train: bool = False,
               category: jax.typing.ArrayLike | None = None) -> tuple[jax.Array, dict[str, Any]]:
    del category  # Part of the model contract; unused.
    images = heads.rgb_batch(images)
    batch_size, num_learners = images.shape[0], self.head.num_learners
    shared = self.backbone(images, train=train, stop=self.head.split_stage)
    masks = self.head.masks(shared["feature_map"])
    upper = self.backbone(attend(shared["feature_map"], masks.astype(shared["feature_map"].dtype)), train=train,
                          start=self.head.split_stage)
    pooled = heads.average_pool(upper["feature_map"].astype(jnp.float32))
    learner_features = jnp.swapaxes(pooled.reshape(num_learners, batch_size, -1), 0, 1)
    embedding = self.head(learner_features)
    return embedding, {"features": jnp.mean(learner_features, axis=1), "learner_features": learner_features,
                       "attention_masks": jnp.moveaxis(masks, 0, 1), "stages": shared["stages"]}
