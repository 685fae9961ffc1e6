"""FashionNet's landmark pooling: a feature map max-pooled in a window around each clothing landmark.

  pooled = landmark_pool(conv4, locations, visible, window=3)      # [B, h, w, C], [B, L, 2], [B, L] -> [B, L, C]

Landmark l of image b falls in the cell `(floor(y * h), floor(x * w))` of the `[h, w]` map (x, y fractions
of the image's width and height; a landmark outside the image is moved to the nearest border cell). Its
pooled feature is the channel-wise maximum over the `window x window` cells centred there, cells outside the
map left out, and zero where the landmark is not visible (the paper's gating: "the features of invisible
landmarks are set to zero").

References:
  Z. Liu, P. Luo, S. Qiu, X. Wang, X. Tang. DeepFashion: Powering Robust Clothes Recognition and Retrieval with
    Rich Annotations. CVPR 2016 (the `pool5_local` layer of FashionNet).
"""

import jax
from jax import lax
import jax.numpy as jnp


def landmark_cells(locations: jax.typing.ArrayLike, height: int, width: int) -> jax.Array:
  """`[B, L, 2]` int32 `(row, column)` of the map cell holding each landmark.

  Args:
    locations: `[B, L, 2]` `(x, y)` fractions of the image's width and height (any real values; those outside
      [0, 1) are moved to the nearest border cell).
    height: rows h of the feature map.
    width: columns w of the feature map.

  >>> import jax.numpy as jnp
  >>> landmark_cells(jnp.array([[[0.5, 0.0], [0.99, 1.2]]]), 4, 4).tolist()
  [[[0, 2], [3, 3]]]
  """
  locations = jnp.asarray(locations, jnp.float32)
  row = jnp.clip(jnp.floor(locations[..., 1] * height), 0, height - 1).astype(jnp.int32)
  column = jnp.clip(jnp.floor(locations[..., 0] * width), 0, width - 1).astype(jnp.int32)
  return jnp.stack([row, column], axis=-1)


def landmark_pool(feature_map: jax.typing.ArrayLike, locations: jax.typing.ArrayLike,
                  visible: jax.typing.ArrayLike, window: int = 3) -> jax.Array:
  """Max-pools `feature_map` in a `window x window` window around each landmark, zero where not visible.

  Args:
    feature_map: `[B, h, w, C]` (FashionNet: VGG-16's conv4_3, stride 8).
    locations: `[B, L, 2]` `(x, y)` fractions of the image's width and height (see `landmark_cells`). They
      choose cells, so no gradient flows to them.
    visible: `[B, L]` bool; False zeroes the landmark's pooled feature (and its gradient).
    window: odd side of the window in cells; 1 takes the landmark's cell alone.

  Returns:
    `[B, L, C]` in the dtype of `feature_map`.

  Raises:
    ValueError: for an even or non-positive window, or shapes that do not match.

  >>> import jax.numpy as jnp
  >>> fmap = jnp.arange(16.0).reshape(1, 4, 4, 1)        # value = 4 * row + column
  >>> landmark_pool(fmap, jnp.array([[[0.1, 0.1], [0.6, 0.9]]]), jnp.array([[True, False]]), 3)[..., 0].tolist()
  [[5.0, 0.0]]
  """
  feature_map = jnp.asarray(feature_map)
  locations = jnp.asarray(locations)
  visible = jnp.asarray(visible, bool)
  if window < 1 or window % 2 == 0:
    raise ValueError(f"The landmark pooling window must be an odd number of cells >= 1; got {window}.")
  if feature_map.ndim != 4:
    raise ValueError(f"feature_map must be [batch, height, width, channels]; got shape {feature_map.shape}.")
  batch, height, width, channels = feature_map.shape
  if locations.ndim != 3 or locations.shape[0] != batch or locations.shape[2] != 2:
    raise ValueError(f"locations must be [batch={batch}, landmarks, 2] (x, y); got shape {locations.shape}.")
  if visible.shape != locations.shape[:2]:
    raise ValueError(f"visible must be [batch, landmarks] = {locations.shape[:2]}; got shape {visible.shape}.")
  radius = window // 2
  cells = landmark_cells(lax.stop_gradient(locations), height, width)
  # Padding with the lowest value keeps cells outside the map out of the maximum; the centre cell is always
  # inside, so no window is all padding.
  lowest = jnp.finfo(feature_map.dtype).min if jnp.issubdtype(feature_map.dtype, jnp.floating) else \
      jnp.iinfo(feature_map.dtype).min
  padded = jnp.pad(feature_map, ((0, 0), (radius, radius), (radius, radius), (0, 0)), constant_values=lowest)

  def pool_one(image_map, cell):
    # Cell (r, c) of the map is (r + radius, c + radius) of the padded map: its window starts at (r, c).
    patch = lax.dynamic_slice(image_map, (cell[0], cell[1], 0), (window, window, channels))
    return jnp.max(patch, axis=(0, 1))

  pooled = jax.vmap(jax.vmap(pool_one, in_axes=(None, 0)), in_axes=(0, 0))(padded, cells)
  return jnp.where(visible[..., None], pooled, jnp.zeros((), feature_map.dtype))
