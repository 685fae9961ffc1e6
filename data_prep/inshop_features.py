"""Features shared by the In-shop builders (`deepfashion_inshop`, `synthetic_inshop`).

Both builders write the same core features and the same three splits, so that the trainer reads either
without knowing which one it has.
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
