"""FashionNet (Liu et al., CVPR 2016): a VGG-16 with a global, a landmark and a local branch.

  backbone (VGG-16)  images [B, H, W, 3] -> conv4_3 [B, H/8, W/8, 512], conv5_3 + pool5 [B, H/32, W/32, 512]
  global branch      conv5 -> max-pooled [B, 512] -> fc (global_features) -> ReLU
  landmark branch    conv5 flattened -> fc (pose_features) -> ReLU -> locations [B, L, 2] (x, y fractions)
                                                                     -> visibility logits [B, L, V]
  local branch       conv4_3 max-pooled around each landmark, zero where invisible (`landmark_pooling`)
                     [B, L, 512] -> flattened -> fc (local_features) -> ReLU
  fusion             [global, local] -> fc (fusion_features) -> ReLU = "features" (category, attributes)
                     -> projection (embedding_dim) -> L2 normalisation = the embedding

The local branch pools at the ground-truth landmarks, gated by their visibility, when the trainer passes them
(`landmarks`, `has_landmarks`: the model's `batch_inputs`, in training only), and at its own predicted ones,
gated by its predicted visibility, otherwise (evaluation, the catalogue). Images without landmark annotations
(`has_landmarks` False) use the predicted ones in training too.

Parameters: `params["backbone"]` is torchvision's VGG-16 `features` (so `config.model.pretrained` takes
`vgg16-397923af.pth`), `params["head"]` the three branches and the fusion (trained from scratch, in the
optimizer's head group), `params["tasks"]` the category and attribute classifiers (`TaskHeads`, on the fused
features). What the paper leaves open and what we chose: docs/models.md, "FashionNet".

References:
  Z. Liu, P. Luo, S. Qiu, X. Wang, X. Tang. DeepFashion: Powering Robust Clothes Recognition and Retrieval with
    Rich Annotations. CVPR 2016.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from jaxret.models import vgg
from jaxret.models.heads import TaskHeads
from jaxret.models.heads import l2_normalize
from jaxret.models.heads import max_pool
from jaxret.models.heads import rgb_batch
from jaxret.models.landmark_pooling import landmark_pool

Dtype = Any

VISIBLE = 0  # DeepFashion's code of a visible landmark; also the index of the "visible" visibility class.


class FashionNetHead(nn.Module):
  """FashionNet's global, landmark and local branches and their fusion (everything but the VGG).

  Call as `embedding, aux = head(conv5, conv4, landmarks, has_landmarks)`:
    conv5: `[B, h5, w5, C5]` the backbone's last map (after pool5).
    conv4: `[B, h4, w4, C4]` the map the local branch pools (conv4_3).
    landmarks: `[B, L, 3]` ground-truth rows `(visibility, x, y)`, or None to pool at the predicted ones.
    has_landmarks: `[B]` bool, which rows of `landmarks` are annotated (None: all).
    Returns the L2-normalised embedding `[B, embedding_dim]` float32 and aux with "features" `[B, F]` (the
    fused features), "landmark_locations" `[B, L, 2]`, "visibility_logits" `[B, L, V]`, "pooled_landmarks"
    `[B, L, 2]` and "pooled_visible" `[B, L]` (where the local branch pooled, and which it kept).
  """
  embedding_dim: int = 512
  global_features: int = 1024
  pose_features: int = 1024
  local_features: int = 1024
  fusion_features: int = 1024
  num_landmarks: int = 8
  num_visibility_states: int = 3
  landmark_window: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _dense(self, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, conv5: jax.Array, conv4: jax.Array, landmarks: jax.Array | None = None,
               has_landmarks: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    batch = conv5.shape[0]
    pooled5 = max_pool(conv5.astype(jnp.float32))
    global_features = nn.relu(self._dense(self.global_features, "global_fc")(pooled5))

    # Where the landmarks are is in the map's layout, which pooling would discard: the pose branch reads conv5
    # flattened (as VGG's fc6 reads pool5), so its size fixes the input size (the config's image_size).
    pose = nn.relu(self._dense(self.pose_features, "pose_fc")(conv5.reshape(batch, -1).astype(jnp.float32)))
    # Offsets from the image centre, so that a fresh branch predicts landmarks inside the image.
    locations = 0.5 + self._dense(self.num_landmarks * 2, "location")(pose).astype(jnp.float32)
    locations = locations.reshape(batch, self.num_landmarks, 2)
    visibility_logits = self._dense(self.num_landmarks * self.num_visibility_states, "visibility")(pose)
    visibility_logits = visibility_logits.astype(jnp.float32).reshape(batch, self.num_landmarks,
                                                                      self.num_visibility_states)

    pool_at = lax.stop_gradient(locations)
    pool_visible = jnp.argmax(visibility_logits, axis=-1) == VISIBLE
    if landmarks is not None:
      landmarks = jnp.asarray(landmarks, jnp.float32)
      if landmarks.shape != (batch, self.num_landmarks, 3):
        raise ValueError(f"landmarks must be [batch, {self.num_landmarks}, 3] rows (visibility, x, y); got shape "
                         f"{landmarks.shape}. Set config.model.num_landmarks to the dataset's landmark slots.")
      annotated = jnp.ones((batch,), bool) if has_landmarks is None else jnp.asarray(has_landmarks, bool)
      pool_at = jnp.where(annotated[:, None, None], landmarks[..., 1:], pool_at)
      true_visible = jnp.round(landmarks[..., 0]) == VISIBLE
      pool_visible = jnp.where(annotated[:, None], true_visible, pool_visible)
    local = landmark_pool(conv4, pool_at, pool_visible, self.landmark_window)
    local = local.reshape(batch, -1)
    local_features = nn.relu(self._dense(self.local_features, "local_fc")(local))

    fused = jnp.concatenate([global_features, local_features], axis=-1)
    features = nn.relu(self._dense(self.fusion_features, "fusion_fc")(fused)).astype(jnp.float32)
    embedding = self._dense(self.embedding_dim, "projection")(features).astype(jnp.float32)
    aux = {"features": features, "landmark_locations": locations, "visibility_logits": visibility_logits,
           "pooled_landmarks": pool_at, "pooled_visible": pool_visible}
    return l2_normalize(embedding), aux


class FashionNet(nn.Module):
  """FashionNet with the model contract of jaxret's embedders (see the module docstring).

  `(embedding, aux) = model.apply(variables, images, train=False)`, or in training
  `model.apply(variables, images, train=True, category=..., landmarks=..., has_landmarks=..., mutable=...)`.

  Returns the embedding `[B, embedding_dim]` float32 and aux: "features" (fused, `[B, fusion_features]`),
  "feature_map" (conv5), "stages" (VGG's), "landmark_locations" `[B, L, 2]`, "visibility_logits" `[B, L, V]`,
  "pooled_landmarks", "pooled_visible", and with `tasks` "category_logits" / "attribute_logits".
  """
  # Dataset features the trainer passes as keyword arguments in training (`trainer.model_batch_inputs`).
  batch_inputs = ("landmarks", "has_landmarks")

  layers: Sequence[int | str] = vgg.VGG16_LAYERS  # the VGG backbone's layer list (torchvision's cfg "D").
  local_stage: str = "conv4_3"  # the VGG stage map the local branch pools.
  embedding_dim: int = 512
  global_features: int = 1024
  pose_features: int = 1024
  local_features: int = 1024
  fusion_features: int = 1024
  num_landmarks: int = 8  # landmark slots of the dataset (In-shop: 8).
  num_visibility_states: int = 3  # visible, occluded, truncated; 2: visible or not.
  landmark_window: int = 3  # side, in conv4 cells, of the window pooled around each landmark (odd).
  tasks: TaskHeads | None = None  # category and attribute classifiers on the fused features.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    for field in ("embedding_dim", "global_features", "pose_features", "local_features", "fusion_features",
                  "num_landmarks"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field} must be >= 1; got {getattr(self, field)}.")
    if self.num_visibility_states < 2:
      raise ValueError(f"num_visibility_states must be >= 2 (visible and not); got {self.num_visibility_states}.")
    if self.landmark_window < 1 or self.landmark_window % 2 == 0:
      raise ValueError(f"landmark_window must be an odd number of cells >= 1; got {self.landmark_window}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.typing.ArrayLike, train: bool = False, category: jax.typing.ArrayLike | None = None,
               landmarks: jax.typing.ArrayLike | None = None, has_landmarks: jax.typing.ArrayLike | None = None
               ) -> tuple[jax.Array, dict[str, Any]]:
    del category  # Part of the model contract; only the capsule networks use it.
    images = rgb_batch(images)
    outputs = vgg.VGG(layers=self.layers, dtype=self.dtype, param_dtype=self.param_dtype, name="backbone")(
        images, train=train)
    if self.local_stage not in outputs["stages"]:
      raise ValueError(f"local_stage={self.local_stage!r} is not a stage of the VGG; use one of "
                       f"{sorted(outputs['stages'])}.")
    head = FashionNetHead(
        embedding_dim=self.embedding_dim, global_features=self.global_features, pose_features=self.pose_features,
        local_features=self.local_features, fusion_features=self.fusion_features, num_landmarks=self.num_landmarks,
        num_visibility_states=self.num_visibility_states, landmark_window=self.landmark_window, dtype=self.dtype,
        param_dtype=self.param_dtype, name="head")
    embedding, aux = head(outputs["feature_map"], outputs["stages"][self.local_stage], landmarks, has_landmarks)
    aux.update(feature_map=outputs["feature_map"], stages=outputs["stages"])
    if self.tasks is not None:
      aux.update(self.tasks(aux["features"], outputs["feature_map"], train=train))
    return embedding, aux
