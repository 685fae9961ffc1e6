"""`deepfashion2`: DeepFashion2's consumer-to-shop retrieval data, from the manual download to ArrayRecord shards.

  python -m data_prep.deepfashion2 --manual_dir DIR [--data_dir D] [--password P]

Read it with `tfds.data_source("deepfashion2", data_dir=..., split="query")` after `import data_prep.deepfashion2`.
One record per garment (item) of the release: `train` holds every item of the training images, `query` the items
of validation's user images, `gallery` the items of validation's shop images; records follow image ids, then
item numbers.

A `tfds.core.ShardBasedBuilder`, like `deepfashion_inshop` (see there): shards are written straight from our
generators, so memory stays at about one shard and no TensorFlow is needed.
"""

import functools
import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tqdm import auto as tqdm

from data_prep import inshop_features
from data_prep import jpeg_check
from data_prep.deepfashion2 import release

# TFDS's ShardWriter holds the examples of the shard being written; DeepFashion2's photos are ~50-150 KB, and
# an image's bytes are stored once per garment, so 1000 garments are up to ~150 MB.
_MAX_ITEMS_PER_SHARD = 1000

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
DeepFashion2 is downloaded by hand: fill in the form linked from https://github.com/switchablenorms/DeepFashion2
to receive the password of the zips, download train.zip and validation.zip from its Google Drive folder into one
folder (the manual dir), and leave them zipped (or extract them there, as train/ and validation/):

  <manual_dir>/train.zip        train/image/NNNNNN.jpg, train/annos/NNNNNN.json
  <manual_dir>/validation.zip   validation/image/NNNNNN.jpg, validation/annos/NNNNNN.json

then run: python -m data_prep.deepfashion2 --manual_dir <manual_dir> [--data_dir DIR] [--password P]
"""

_CITATION = """\
@inproceedings{ge2019deepfashion2,
  author = {Ge, Yuying and Zhang, Ruimao and Wang, Xiaogang and Tang, Xiaoou and Luo, Ping},
  title = {DeepFashion2: A Versatile Benchmark for Detection, Pose Estimation, Segmentation and Re-Identification
           of Clothing Images},
  booktitle = {Proceedings of IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year = {2019}
}"""


def features() -> dict:
  """The features of one garment.

  Returns:
    A dict for `tfds.features.FeaturesDict`:
      `image`: the whole photo, the release's JPEG bytes (decoded to `[H, W, 3]` uint8 on read).
      `image_name`: its path in the release, e.g. `validation/image/000001.jpg`.
      `image_id`: int64, the photo's number (1 for `000001.jpg`), as DeepFashion2's evaluation names it.
      `item_number`: int64, n of the garment's key `item<n>` in the annotation.
      `item_id`: int64 retrieval label: user and shop garments match exactly when they share it (same pair
        and style > 0); every garment of style 0 has its own (negative) id. See `release.item_id`.
      `category`: class label over the 13 `release.CATEGORY_NAMES` (`category_id` - 1).
      `style`: int64, 0 = matches nothing.
      `pair_id`: int64, the photo's pair.
      `source`: class label, `user` (consumer photo) or `shop`.
      `bbox`: `[4]` float32 `[ymin, xmin, ymax, xmax]` in [0, 1], clipped to the image.
      `landmarks`: `[n, 3]` float32 rows `(visibility, x, y)` for the category's n landmarks in the release's
        order; x and y in image units (not clipped), visibility recoded to the In-shop codes (0 visible,
        1 occluded; an unlabelled landmark is `(-1, 0, 0)`).
  """
  return {
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
      "image_name": tfds.features.Text(),
      "image_id": np.int64,
      "item_number": np.int64,
      "item_id": np.int64,
      "category": tfds.features.ClassLabel(names=list(release.CATEGORY_NAMES)),
      "style": np.int64,
      "pair_id": np.int64,
      "source": tfds.features.ClassLabel(names=list(release.SOURCES)),
      "bbox": tfds.features.BBoxFeature(),
      "landmarks": tfds.features.Tensor(shape=(None, 3), dtype=np.float32),
  }


# DeepFashion2's landmark visibility (2 visible, 1 occluded, 0 not labelled) -> In-shop's codes.
_VISIBILITY = {2: inshop_features.VISIBLE, 1: inshop_features.OCCLUDED, 0: inshop_features.LANDMARK_ABSENT}


def item_example(split: str, image_id: int, annotation: release.Annotation, item: release.Item, jpeg: bytes,
                 height: int, width: int) -> dict:
  """The record of one garment (see `features`)."""
  x1, y1, x2, y2 = item.bbox
  clip = lambda v: min(max(v, 0.0), 1.0)
  landmarks = np.array([(_VISIBILITY[v], x / width, y / height) if v else (inshop_features.LANDMARK_ABSENT, 0, 0)
                        for x, y, v in item.landmarks], np.float32).reshape(-1, 3)
  return {
      "image": jpeg,  # The original bytes: tfds.features.Image stores bytes as given.
      "image_name": release.image_name(split, image_id),
      "image_id": image_id,
      "item_number": item.number,
      "item_id": release.item_id(split, image_id, annotation.pair_id, item),
      "category": item.category_id - 1,
      "style": item.style,
      "pair_id": annotation.pair_id,
      "source": annotation.source,
      "bbox": tfds.features.BBox(ymin=clip(y1 / height), xmin=clip(x1 / width), ymax=clip(y2 / height),
                                 xmax=clip(x2 / width)),
      "landmarks": landmarks,
  }


def shard_bounds(images: tuple[release.ImagePlan, ...], max_items: int) -> list[tuple[int, int]]:
  """`[start, stop)` image ranges of about `max_items` garments each (an image is never split)."""
  bounds, start, items = [], 0, 0
  for i, plan in enumerate(images):
    items += plan.num_items
    if items >= max_items:
      bounds.append((start, i + 1))
      start, items = i + 1, 0
  if start < len(images) or not bounds:
    bounds.append((start, len(images)))
  return bounds


class Deepfashion2(tfds.core.ShardBasedBuilder):
  """DeepFashion2 consumer-to-shop retrieval, read from the manual download; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: one record per garment; train, query (validation user), gallery "
                            "(validation shop)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, file_format: str | None = "array_record", data_dir: str | None = None,
               password: str | None = None, plan: tuple[dict, release.BuildPlan] | None = None, **kwargs):
    """See `tfds.core.ShardBasedBuilder`.

    Args:
      file_format: ArrayRecord (what grain reads; TFRecord would need TensorFlow).
      data_dir: the TFDS data dir ("~" expanded).
      password: of the encrypted zips; kept in memory only (never in the dataset's files or messages).
      plan: `release.validate_release(...)`'s result when the caller has already checked the download (saves a
        second pass over 390k annotations); the builder closes its sources.
      **kwargs: passed to `tfds.core.ShardBasedBuilder`.
    """
    data_dir = os.path.expanduser(data_dir) if isinstance(data_dir, str) else data_dir
    super().__init__(file_format=file_format, data_dir=data_dir, **kwargs)
    self._password = password
    self._validated = plan
    self._sources: dict[str, release.SplitSource] = {}
    self._unreadable_images: list[str] = []

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="DeepFashion2 consumer-to-shop clothes retrieval: one record per garment, with its box, "
                    "category, style, pair and landmarks; queries are validation's consumer photos, the "
                    "gallery its shop photos.",
        features=tfds.features.FeaturesDict(features()),
        homepage="https://github.com/switchablenorms/DeepFashion2",
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def download_and_prepare(self, *, download_config: tfds.download.DownloadConfig | None = None, **kwargs):
    """See `tfds.core.DatasetBuilder.download_and_prepare`; without a manual dir, only checks it is prepared."""
    if (download_config is None or not download_config.manual_dir) and not self.is_prepared():
      raise release.DeepFashion2Error(self._not_prepared_message())
    try:
      return super().download_and_prepare(download_config=download_config, **kwargs)
    finally:
      self._close_sources()

  def as_data_source(self, split=None, **kwargs):
    """See `tfds.core.DatasetBuilder.as_data_source`; refuses a dataset that is not prepared, saying how."""
    if not self.is_prepared():
      raise release.DeepFashion2Error(self._not_prepared_message())
    return super().as_data_source(split=split, **kwargs)

  def _not_prepared_message(self) -> str:
    return (f"{self.name} {self.version} is not prepared in {self.data_dir_root}. Build it with:\n"
            f"  python -m data_prep.deepfashion2 --manual_dir DIR --data_dir {self.data_dir_root} [--password P]\n"
            "where DIR holds DeepFashion2's train.zip and validation.zip (see docs/deepfashion.md).")

  def _close_sources(self):
    for source in self._sources.values():
      source.close()
    self._sources = {}
    if self._validated is not None:
      for source in self._validated[0].values():
        source.close()
      self._validated = None

  def _shard_iterators_per_split(self, dl_manager):
    if self._validated is not None:
      sources, plan = self._validated
    else:
      sources, plan = release.validate_release(dl_manager.manual_dir, password=self._password)
    self._sources = sources
    for warning in plan.warnings:
      logging.warning(warning)
    self.info.metadata["images_from"] = {split: s.label for split, s in sources.items()}
    self._unreadable_images = []
    shards = {}
    for split in release.SPLITS:
      images = plan.images[split]
      total = plan.num_items(split)
      release_split = "train" if split == "train" else "validation"
      bounds = shard_bounds(images, _MAX_ITEMS_PER_SHARD)
      first_items = np.cumsum([0] + [sum(p.num_items for p in images[a:b]) for a, b in bounds])
      shards[split] = [
          functools.partial(self._generate_shard, images[start:stop], release_split=release_split, split=split,
                            first=int(first), total=total, last=stop == len(images))
          for (start, stop), first in zip(bounds, first_items)]
    return shards

  def _generate_shard(self, images, *, release_split: str, split: str, first: int, total: int, last: bool):
    """Yields `(key, example)` per garment of one shard's images; unreadable images are noted, not written."""
    source = self._sources[release_split]
    with tqdm.tqdm(total=total, initial=first, desc=f"Writing {split}", unit=" items", leave=last,
                   mininterval=1.0) as progress:
      for plan in images:
        name = release.image_name(release_split, plan.image_id)
        try:
          jpeg = source.read(name)
          height, width = jpeg_check.check_jpeg(jpeg)
          problems = []
          annotation = release.parse_annotation(source.read(release.annotation_name(release_split, plan.image_id)),
                                                name, problems)
          if annotation is None:  # Changed since it was checked.
            raise ValueError(f"its annotation no longer parses: {problems[0]}")
        except (OSError, ValueError) as e:
          reason = str(e) if str(e).startswith(("is ", "cannot ", "its ")) else f"cannot be read ({e})"
          self._unreadable_images.append(f"{source.label}: {name} {reason}.")
          continue
        for item in annotation.items:
          progress.update()
          yield f"{name}#item{item.number}", item_example(release_split, plan.image_id, annotation, item, jpeg,
                                                          height, width)

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    if self._unreadable_images:
      # Raised inside TFDS's incomplete dir, which is then deleted: no dataset is left that looks finished.
      raise release.DeepFashion2Error(release.format_problems(
          "The DeepFashion2 images", self._unreadable_images,
          "No dataset was written. Download the archive again (or replace these files), then run again."))
