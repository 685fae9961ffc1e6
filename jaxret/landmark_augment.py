"""Ground-truth landmarks through the training augmentation: the same crop and flip as the pixels.

The trainer crops and flips every training image on the device (`augment.train_images`, image b with key b of
`augment.image_keys`). Landmarks are annotated on the whole image, so a model that pools at them (FashionNet)
and the landmark loss must see them where the augmented image has them:

  keys = augment.image_keys(seed, step, batch_size)
  images = augment.train_images(pixels, keys, augmentation)
  landmarks = augmented_landmarks(batch["landmarks"], keys, augmentation, height, width)

`augmented_landmarks` redraws each image's crop box and flip from its key (`augment.draw`; the draws are a pure
function of the key, so they are the pixels' ones) and maps every landmark `(visibility, x, y)`:
  x' = (x W - left) / crop_width,  y' = (y H - top) / crop_height      (fractions of the crop)
  flipped: x' -> 1 - x', and the left and right slots swap (`IN_SHOP_FLIP_PERMUTATION`): the mirror image of a
    left collar is where a right collar would be, and the landmark regressor learns one place for each slot.
  a visible or occluded landmark that leaves the crop becomes truncated (2), DeepFashion's code for a landmark
    outside the image; absent slots (-1) stay absent.

Colour jitter and normalisation move nothing. Evaluation images are resized whole (or cropped to the box) and
never flipped; models predict their landmarks there, so evaluation needs no mapping.
"""

import jax
import jax.numpy as jnp

from jaxret import augment

# DeepFashion's landmark codes (`data_prep.inshop_features`).
VISIBLE, OCCLUDED, TRUNCATED, ABSENT = 0, 1, 2, -1
# Slot k of a flipped image holds the landmark of slot IN_SHOP_FLIP_PERMUTATION[k] of the original: the In-shop
# slots are (left, right) pairs of collar, sleeve, waistline and hem (`inshop_features.LANDMARK_NAMES`).
IN_SHOP_FLIP_PERMUTATION = (1, 0, 3, 2, 5, 4, 7, 6)


def landmarks_in_crop(landmarks: jax.typing.ArrayLike, box: jax.typing.ArrayLike, flip: jax.typing.ArrayLike,
                      height: int, width: int,
                      flip_permutation: tuple[int, ...] = IN_SHOP_FLIP_PERMUTATION) -> jax.Array:
  """One image's landmarks as fractions of its crop `box`, mirrored when `flip`.

  Args:
    landmarks: `[L, 3]` rows `(visibility, x, y)`, x and y fractions of the whole `height x width` image.
    box: `[4]` `(top, left, crop_height, crop_width)` in pixels (`augment.crop_box`, `augment.crop_in_region`).
    flip: scalar bool, the image was flipped left to right after the crop.
    height: H of the image the box is in.
    width: W.
    flip_permutation: `[L]` slot of the original that each slot of a flipped image takes.

  Returns:
    `[L, 3]` float32 rows `(visibility, x', y')`.

  >>> import jax.numpy as jnp
  >>> rows = jnp.array([[0.0, 0.5, 0.5], [0.0, 0.1, 0.5]])       # a visible landmark at the centre, one left
  >>> mapped = landmarks_in_crop(rows, jnp.array([0, 20, 100, 50]), False, 100, 100, (1, 0))
  >>> [[round(float(v), 4) for v in row] for row in mapped]            # the second left the crop: truncated
  [[0.0, 0.6, 0.5], [2.0, -0.2, 0.5]]
  """
  landmarks = jnp.asarray(landmarks, jnp.float32)
  if landmarks.ndim != 2 or landmarks.shape[1] != 3:
    raise ValueError(f"landmarks must be [landmarks, 3] rows (visibility, x, y); got shape {landmarks.shape}.")
  if len(flip_permutation) != landmarks.shape[0]:
    raise ValueError(f"flip_permutation has {len(flip_permutation)} slots for {landmarks.shape[0]} landmarks; give "
                     "one slot per landmark.")
  box = jnp.asarray(box, jnp.float32)
  code = jnp.round(landmarks[:, 0])
  x = (landmarks[:, 1] * width - box[1]) / box[3]
  y = (landmarks[:, 2] * height - box[0]) / box[2]
  outside = (x < 0) | (x > 1) | (y < 0) | (y > 1)
  code = jnp.where(((code == VISIBLE) | (code == OCCLUDED)) & outside, float(TRUNCATED), code)
  mapped = jnp.stack([code, x, y], axis=-1)
  mirrored = jnp.stack([code, 1.0 - x, y], axis=-1)[jnp.asarray(flip_permutation)]
  return jnp.where(flip, mirrored, mapped)


def augmented_landmarks(landmarks: jax.typing.ArrayLike, keys: jax.Array, augmentation: augment.Augmentation,
                        height: int, width: int, bbox: jax.typing.ArrayLike | None = None,
                        has_bbox: jax.typing.ArrayLike | None = None,
                        flip_permutation: tuple[int, ...] = IN_SHOP_FLIP_PERMUTATION) -> jax.Array:
  """`[B, L, 3]` landmarks where `augment.train_images(images, keys, augmentation, bbox, has_bbox)` puts them.

  Args:
    landmarks: `[B, L, 3]` rows `(visibility, x, y)` of the whole images.
    keys: `[B]` the images' keys (`augment.image_keys`), the ones their pixels were augmented with.
    augmentation: the pixels' augmentation.
    height: H of the (decoded) images the pixels were cropped from.
    width: W.
    bbox: `[B, 4]` and `has_bbox` `[B]`: the records' boxes, needed with `augmentation.crop_to_box`.
    flip_permutation: see `landmarks_in_crop`.

  Returns:
    `[B, L, 3]` float32 rows `(visibility, x, y)` in fractions of the augmented images.
  """
  def one(rows, key, box_of_record, has_box):
    draws = augment.draw(key, augmentation)
    if augmentation.crop_to_box:
      region = augment.box_region(box_of_record, has_box, augmentation.box_margin, height, width)
      box = augment.crop_in_region(draws, region)
    else:
      box = augment.crop_box(draws, height, width)
    return landmarks_in_crop(rows, box, draws.flip, height, width, flip_permutation)

  landmarks = jnp.asarray(landmarks, jnp.float32)
  if augmentation.crop_to_box:
    if bbox is None or has_bbox is None:
      raise ValueError("crop_to_box needs each record's bbox and has_bbox.")
    return jax.vmap(one)(landmarks, keys, jnp.asarray(bbox), jnp.asarray(has_bbox))
  return jax.vmap(lambda rows, key: one(rows, key, None, None))(landmarks, keys)
