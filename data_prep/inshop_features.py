"""Features shared by the In-shop builders (`deepfashion_inshop`, `synthetic_inshop`).

Both builders write the same core features, the same annotation features and the same three splits, so that
the trainer reads either without knowing which one it has. Annotations that a build has no source for are
still written, marked absent (`has_bbox`, `has_landmarks`, `has_attributes` False; see
`annotation_features`), so that a config never has to ask which annotation files were present.
"""

import numpy as np
import tensorflow_datasets as tfds

# The 23 `GENDER/Category` folders of DeepFashion In-shop (`img/<GENDER>/<Category>/id_XXXXXXXX/...`),
# 14 WOMEN then 9 MEN, each block sorted as the release lists them. The index is the `category` label.
WOMEN_CATEGORIES = (
    "WOMEN/Blouses_Shirts",
    "WOMEN/Cardigans",
    "WOMEN/Denim",
    "WOMEN/Dresses",
    "WOMEN/Graphic_Tees",
    "WOMEN/Jackets_Coats",
    "WOMEN/Leggings",
    "WOMEN/Pants",
    "WOMEN/Rompers_Jumpsuits",
    "WOMEN/Shorts",
    "WOMEN/Skirts",
    "WOMEN/Sweaters",
    "WOMEN/Sweatshirts_Hoodies",
    "WOMEN/Tees_Tanks",
)
MEN_CATEGORIES = (
    "MEN/Denim",
    "MEN/Jackets_Vests",
    "MEN/Pants",
    "MEN/Shirts_Polos",
    "MEN/Shorts",
    "MEN/Suiting",
    "MEN/Sweaters",
    "MEN/Sweatshirts_Hoodies",
    "MEN/Tees_Tanks",
)
CATEGORY_NAMES = WOMEN_CATEGORIES + MEN_CATEGORIES

SPLITS = ("train", "query", "gallery")


def core_features() -> dict:
  """The features every In-shop builder writes.

  Returns:
    A dict for `tfds.features.FeaturesDict`: `image` (JPEG bytes, decoded to `[H, W, 3]` uint8 on read),
    `image_name` (the path inside the release, e.g. `img/WOMEN/Dresses/id_00000002/02_1_front.jpg`),
    `item_id` (int64, the product), `category` (class label over `CATEGORY_NAMES`).
  """
  return {
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "image_name": tfds.features.Text(),
      "item_id": np.int64,
      "category": tfds.features.ClassLabel(names=list(CATEGORY_NAMES)),
  }


# Codes of `Anno/list_bbox_inshop.txt` (and `clothes_type` of `Anno/list_landmarks_inshop.txt`); the index is
# the code in the file, 0 = no annotation.
CLOTHES_TYPE_NAMES = ("unknown", "upper", "lower", "full")
POSE_TYPE_NAMES = ("unknown", "frontal", "side", "back", "zoom_out", "zoom_in", "stand_alone")

# The 8 landmark slots of the `landmarks` feature: the full-body order of DeepFashion's landmark files. Upper-
# and lower-body garments have 6 and 4 of them (`LANDMARK_SLOTS`); the other slots are absent.
LANDMARK_NAMES = ("left_collar", "right_collar", "left_sleeve", "right_sleeve", "left_waistline",
                  "right_waistline", "left_hem", "right_hem")
# Clothes type code -> the slots its landmarks fill, in the order the landmark file lists them.
LANDMARK_SLOTS = {1: (0, 1, 2, 3, 6, 7), 2: (4, 5, 6, 7), 3: (0, 1, 2, 3, 4, 5, 6, 7)}
# Landmark visibility codes of DeepFashion, and the code of a slot that holds no landmark.
VISIBLE, OCCLUDED, TRUNCATED, LANDMARK_ABSENT = 0, 1, 2, -1


def annotation_features(num_attributes: int) -> dict:
  """The annotation features every In-shop builder writes, present or not.

  Args:
    num_attributes: length of the `attributes` vector (463 for DeepFashion In-shop; the names are in the
      dataset's metadata, `attribute_names`).

  Returns:
    A dict for `tfds.features.FeaturesDict`:
      `bbox`: `[4]` float32 `[ymin, xmin, ymax, xmax]` in [0, 1]; the whole image when `has_bbox` is False.
      `has_bbox`: bool.
      `clothes_type`: class label over `CLOTHES_TYPE_NAMES` (0 = unknown).
      `pose_type`: class label over `POSE_TYPE_NAMES` (0 = unknown).
      `landmarks`: `[8, 3]` float32 rows `(visibility, x, y)` in the slots of `LANDMARK_NAMES`; visibility
        is `VISIBLE`, `OCCLUDED` or `TRUNCATED`, x and y are fractions of the image width and height (not
        clipped: a truncated landmark may lie outside [0, 1]); a slot without a landmark is
        `(LANDMARK_ABSENT, 0, 0)`.
      `has_landmarks`: bool; False means every slot is absent.
      `attributes`: `[num_attributes]` int8, 1 (has it), -1 (has not), 0 (unknown); all 0 when
        `has_attributes` is False.
      `has_attributes`: bool.
  """
  return {
      "bbox": tfds.features.BBoxFeature(),
      "has_bbox": np.bool_,
      "clothes_type": tfds.features.ClassLabel(names=list(CLOTHES_TYPE_NAMES)),
      "pose_type": tfds.features.ClassLabel(names=list(POSE_TYPE_NAMES)),
      "landmarks": tfds.features.Tensor(shape=(len(LANDMARK_NAMES), 3), dtype=np.float32),
      "has_landmarks": np.bool_,
      "attributes": tfds.features.Tensor(shape=(num_attributes,), dtype=np.int8),
      "has_attributes": np.bool_,
  }


def absent_landmarks() -> np.ndarray:
  """`[8, 3]` float32: every slot absent."""
  landmarks = np.zeros((len(LANDMARK_NAMES), 3), np.float32)
  landmarks[:, 0] = LANDMARK_ABSENT
  return landmarks
