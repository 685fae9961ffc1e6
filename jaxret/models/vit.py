"""ViT-S/16 backbone as timm defines it (`timm.models.vision_transformer`, `vit_small_patch16_224`).

16x16/16 patch embedding (conv, with bias) -> class token prepended -> learned position embeddings added
-> 12 pre-norm blocks (LayerNorm eps 1e-6 -> 6-head self-attention with a fused qkv projection -> residual;
LayerNorm -> MLP 384-1536-384 with exact GELU -> residual) -> final LayerNorm. The features are the class
token after the final LayerNorm (timm's `global_pool="token"`), 384-D. timm's `head` is replaced by the
embedding head.

Position embeddings are stored for a `pos_embed_grid` x `pos_embed_grid` patch grid (14 x 14, 224x224
images, as every ViT-S/16 checkpoint). For other image sizes they are resampled bicubically to the input's
grid inside the model, exactly as timm does with `dynamic_img_size=True` (`resample_abs_pos_embed`: bicubic,
antialiased), so the same weights work at 256x256 or in a 32x32 smoke test. Sides that are not a multiple
of 16 lose their last pixels, as in timm.

Module names are timm's (`blocks_3/attn/qkv` is `blocks.3.attn.qkv`).

References:
  A. Dosovitskiy et al. An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale. ICLR 2021.
  A. Steiner et al. How to train your ViT? Data, Augmentation, and Regularization in Vision Transformers.
    TMLR 2022. (The augreg weights.)
  M. Caron et al. Emerging Properties in Self-Supervised Vision Transformers. ICCV 2021. (DINO.)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

LAYER_NORM_EPSILON = 1e-6  # timm's ViT (partial(nn.LayerNorm, eps=1e-6))
_trunc_normal = nn.initializers.truncated_normal(0.02)  # timm's trunc_normal_(std=.02) of Linear layers


def resample_position_embedding(pos_embed: jax.typing.ArrayLike, grid: tuple[int, int],
                                num_prefix_tokens: int = 1) -> jax.Array:
  """Resamples learned position embeddings to another patch grid, as timm's `resample_abs_pos_embed`.

  The class token's embedding is kept; the grid's embeddings are resized bicubically with antialiasing
  (Keys' cubic, a = -0.5, which is PyTorch's `interpolate(mode="bicubic", antialias=True)`), in float32.

  Args:
    pos_embed: `[1, num_prefix_tokens + g * g, D]` for a square g x g grid.
    grid: (rows, columns) of the new grid.
    num_prefix_tokens: leading tokens (the class token) that have no position.

  Returns:
    `[1, num_prefix_tokens + rows * columns, D]`, in the dtype of `pos_embed`.
  """
  pos_embed = jnp.asarray(pos_embed)
  prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  side = int(round(patches.shape[1] ** 0.5))
  if side * side != patches.shape[1]:
    raise ValueError(f"Position embeddings for {patches.shape[1]} patches are not a square grid.")
  if (side, side) == tuple(grid):
    return pos_embed
  dim = patches.shape[-1]
  patches = patches.reshape(1, side, side, dim).astype(jnp.float32)
  patches = jax.image.resize(patches, (1, *grid, dim), method="cubic", antialias=True)
  patches = patches.reshape(1, grid[0] * grid[1], dim).astype(pos_embed.dtype)
  return jnp.concatenate([prefix, patches], axis=1)


class PatchEmbed(nn.Module):
  """Non-overlapping patches to tokens: `[B, H, W, 3]` -> `[B, H // p, W // p, D]` (timm's `proj` conv)."""
  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    return nn.Conv(self.embed_dim, (self.patch_size, self.patch_size), strides=self.patch_size,
                   padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(images)


class Attention(nn.Module):
  """Multi-head self-attention with timm's fused `qkv` Dense: `[B, T, D]` -> `[B, T, D]`."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    qkv = nn.Dense(3 * dim, kernel_init=_trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="qkv")(x)
    # timm's layout of the fused output: [3, heads, head_dim] per token.
    q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, self.num_heads, head_dim), 2, 0)
    x = jax.nn.dot_product_attention(q, k, v).reshape(batch, tokens, dim)
    return nn.Dense(dim, kernel_init=_trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="proj")(x)


class Mlp(nn.Module):
  hidden_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    x = nn.Dense(self.hidden_features, kernel_init=_trunc_normal, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(dim, kernel_init=_trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="fc2")(x)


class Block(nn.Module):
  """Pre-norm transformer block; `drop_path_rate` drops each example's residual branches (stochastic
  depth, "dropout" rng)."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def norm(name):
      return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    # One keep/drop decision per example, shared by all tokens and channels, scaled by 1 / (1 - rate).
    drop_path = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2), deterministic=self.deterministic)
    y = Attention(self.num_heads, self.dtype, self.param_dtype, name="attn")(norm("norm1")(x))
    x = x + drop_path(y)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, self.param_dtype, name="mlp")(norm("norm2")(x))
    return x + drop_path(y)


class VisionTransformer(nn.Module):
  """ViT backbone: `[B, H, W, 3]` -> `{"feature_map", "class_token", "stages"}`.

  "class_token": `[B, D]`, the class token after the final LayerNorm (the features of `pooling="token"`);
  "feature_map": `[B, H/16, W/16, D]`, the patch tokens after the final LayerNorm, as a grid (for
  `pooling="avg"`); "stages": {"tokens": `[B, 1 + (H/16)(W/16), D]`}, all final tokens.
  """
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  pos_embed_grid: int = 14  # side of the patch grid the position embeddings are stored for (224 / 16).
  drop_path_rate: float = 0.0  # stochastic depth of the last block; linearly less before, as timm.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}.")
    super().__post_init__()

  @property
  def num_features(self) -> int:
    return self.embed_dim

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
    batch, height, width, _ = images.shape
    if height < self.patch_size or width < self.patch_size:
      raise ValueError(f"Images of {height}x{width} are smaller than one {self.patch_size}x{self.patch_size} "
                       "patch; use larger images.")
    x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, self.param_dtype, name="patch_embed")(images)
    grid = x.shape[1:3]
    x = x.reshape(batch, grid[0] * grid[1], self.embed_dim)
    cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.embed_dim), self.param_dtype)
    pos_embed = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                           (1, 1 + self.pos_embed_grid**2, self.embed_dim), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, self.embed_dim)).astype(x.dtype), x], axis=1)
    x = x + resample_position_embedding(pos_embed, grid).astype(x.dtype)
    for index in range(self.depth):
      rate = self.drop_path_rate * index / max(self.depth - 1, 1)
      x = Block(self.num_heads, self.mlp_ratio, rate, not train, self.dtype, self.param_dtype,
                name=f"blocks_{index}")(x)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    feature_map = x[:, 1:].reshape(batch, *grid, self.embed_dim)
    return {"feature_map": feature_map, "class_token": x[:, 0], "stages": {"tokens": x}}
