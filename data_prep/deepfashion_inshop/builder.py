"""`deepfashion_inshop`: the DeepFashion In-shop release, from the manual download to ArrayRecord shards.

  python -m data_prep.deepfashion_inshop --manual_dir DIR [--data_dir DIR] [--config all|women|men]

Read it with `tfds.data_source("deepfashion_inshop/all", data_dir=..., split="query")` after
`import data_prep.deepfashion_inshop`. Records are in the order of `Eval/list_eval_partition.txt`.

This is a `tfds.core.ShardBasedBuilder`, not a `GeneratorBasedBuilder`: the latter passes every example
through TFDS's shuffler, which keeps up to 1 GB in memory and spills to disk with `tf.io.gfile`, so it
needs TensorFlow once a split outgrows that buffer. Writing shards straight from our generators keeps memory
at about one shard (`_MAX_IMAGES_PER_SHARD` images), keeps the release's order, and needs no TensorFlow.
"""

import dataclasses
import functools
import math
import os
import pathlib

from absl import logging
import numpy as np
import tensorflow_datasets as tfds
from tqdm import auto as tqdm

from data_prep import inshop_features
from data_prep import jpeg_check
from data_prep.deepfashion_inshop import release

# TFDS's ShardWriter keeps the examples of the shard being written in memory (it counts them with
# itertools.tee after writing), so this bounds peak memory: 2000 release images are about 50 MB.
_MAX_IMAGES_PER_SHARD = 2000

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
DeepFashion In-shop sits behind an agreement, so it is downloaded by hand. From the DeepFashion page
(https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html), open the Google Drive folder of the
"In-shop Clothes Retrieval Benchmark" and download into one folder (the manual dir), keeping the layout:

  <manual_dir>/Img/img.zip                   (do not extract it; an extracted Img/img/ or img/ also works)
  <manual_dir>/Eval/list_eval_partition.txt
  <manual_dir>/Anno/list_bbox_inshop.txt       (optional: fills bbox, clothes_type and pose_type)
  <manual_dir>/Anno/list_landmarks_inshop.txt  (optional: fills landmarks)
  <manual_dir>/Anno/list_attr_cloth.txt        (optional, with the next: fills attributes)
  <manual_dir>/Anno/list_attr_items.txt

then run: python -m data_prep.deepfashion_inshop --manual_dir <manual_dir> [--data_dir DIR]
"""

_CITATION = """\
@inproceedings{liu2016deepfashion,
  author = {Liu, Ziwei and Luo, Ping and Qiu, Shi and Wang, Xiaogang and Tang, Xiaoou},
  title = {DeepFashion: Powering Robust Clothes Recognition and Retrieval with Rich Annotations},
  booktitle = {Proceedings of IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year = {2016}
}"""


@dataclasses.dataclass
class InshopConfig(tfds.core.BuilderConfig):
  """Which genders to keep. Category labels are the same in every config (over all 23 categories)."""
  genders: tuple[str, ...] = ("WOMEN", "MEN")


def features() -> dict:
  """The core In-shop features plus the annotations, present or marked absent.

  Returns:
    `inshop_features.core_features()` and `inshop_features.annotation_features(463)`: `bbox`, `has_bbox`,
    `clothes_type` and `pose_type` (labels equal to the codes of `Anno/list_bbox_inshop.txt`, 0 = "unknown")
    from the bbox file; `landmarks`, `has_landmarks` from `Anno/list_landmarks_inshop.txt`; `attributes`,
    `has_attributes` from `Anno/list_attr_items.txt` (names in the metadata's `attribute_names`).
  """
  return {**inshop_features.core_features(), **inshop_features.annotation_features(release.NUM_ATTRIBUTES)}


def normalized_landmarks(slots: tuple[tuple[int, int, int] | None, ...] | None, height: int, width: int
                         ) -> np.ndarray:
  """The 8 slots of `(visibility, x, y)` pixels (None: absent) -> `[8, 3]` float32, x and y in image units."""
  landmarks = inshop_features.absent_landmarks()
  for slot, point in enumerate(slots or ()):
    if point is not None:
      visibility, x, y = point
      landmarks[slot] = (visibility, x / width, y / height)
  return landmarks


def prepared_versions(data_dir: str | os.PathLike, config: str) -> list[str]:
  """Versions of `deepfashion_inshop/<config>` that are fully prepared in `data_dir`, oldest first."""
  config_dir = pathlib.Path(os.path.expanduser(data_dir)) / DeepfashionInshop.name / config
  versions = [p.name for p in config_dir.glob("*.*.*") if (p / "dataset_info.json").is_file()]
  return sorted(versions, key=lambda v: tuple(int(n) if n.isdigit() else -1 for n in v.split(".")))


def rebuild_command(data_dir: str | os.PathLike, config: str) -> str:
  """The command that builds `deepfashion_inshop/<config>` into `data_dir` (DIR: the user's manual dir)."""
  return f"python -m data_prep.deepfashion_inshop --manual_dir DIR --data_dir {data_dir} --config {config}"


def normalized_bbox(bbox: tuple[int, int, int, int] | None, height: int, width: int) -> tfds.features.BBox:
  """`(x_1, y_1, x_2, y_2)` pixels -> TFDS's `[ymin, xmin, ymax, xmax]` in [0, 1], clipped to the image."""
  if bbox is None:
    return tfds.features.BBox(0.0, 0.0, 1.0, 1.0)
  x1, y1, x2, y2 = bbox
  clip = lambda v: min(max(v, 0.0), 1.0)
  return tfds.features.BBox(ymin=clip(y1 / height), xmin=clip(x1 / width), ymax=clip(y2 / height),
                            xmax=clip(x2 / width))


class DeepfashionInshop(tfds.core.ShardBasedBuilder):
  """DeepFashion In-shop Clothes Retrieval, read from the manual download; see the module docstring."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release: train/query/gallery, original JPEG bytes, bbox/clothes/pose.",
      "2.0.0": "Landmarks and attributes; has_bbox/has_landmarks/has_attributes masks; pose renamed pose_type.",
  }
  BUILDER_CONFIGS = [
      InshopConfig(name="all", description="WOMEN and MEN images.", genders=("WOMEN", "MEN")),
      InshopConfig(name="women", description="WOMEN images only (labels over all 23 categories).",
                   genders=("WOMEN",)),
      InshopConfig(name="men", description="MEN images only (labels over all 23 categories).",
                   genders=("MEN",)),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "all"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, file_format: str | None = "array_record", data_dir: str | None = None, **kwargs):
    # ArrayRecord by default: it is what grain reads, and TFRecord cannot be written without TensorFlow.
    # TFDS takes "~/x" literally (it would create a folder named "~"), so expand it here.
    data_dir = os.path.expanduser(data_dir) if isinstance(data_dir, str) else data_dir
    super().__init__(file_format=file_format, data_dir=data_dir, **kwargs)
    self._unreadable_images: list[str] = []
    self._files: release.ReleaseFiles | None = None
    self._plan: release.BuildPlan | None = None
    self._no_attributes = np.zeros(release.NUM_ATTRIBUTES, np.int8)  # what an item without attributes gets
    # Opened once per build: opening the zip parses its directory of 52k entries (about a second).
    self._archive: release.ImageArchive | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="DeepFashion In-shop Clothes Retrieval Benchmark: 52,712 images of 7,982 products in 23 "
                    "categories; retrieval of query images among gallery images of unseen products.",
        features=tfds.features.FeaturesDict(features()),
        homepage="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def download_and_prepare(self, *, download_config: tfds.download.DownloadConfig | None = None, **kwargs):
    """See `tfds.core.DatasetBuilder.download_and_prepare`; without a manual dir, only checks it is prepared.

    Raises:
      InshopDownloadError: not prepared (e.g. only an older version is there) and no manual dir to build from,
        with the command that builds it; or a problem with the download in the manual dir.
    """
    if (download_config is None or not download_config.manual_dir) and not self.is_prepared():
      raise release.InshopDownloadError(self._not_prepared_message())
    return super().download_and_prepare(download_config=download_config, **kwargs)

  def as_data_source(self, split=None, **kwargs):
    """See `tfds.core.DatasetBuilder.as_data_source`; refuses a dataset that is not prepared, saying how."""
    if not self.is_prepared():
      raise release.InshopDownloadError(self._not_prepared_message())
    return super().as_data_source(split=split, **kwargs)

  def _not_prepared_message(self) -> str:
    old = [v for v in prepared_versions(self.data_dir_root, self.builder_config.name) if v != str(self.version)]
    why = (f"only version {', '.join(old)} is there, written by an older jaxret (the features have changed)"
           if old else "it is not there")
    return (f"{self.name}/{self.builder_config.name} {self.version} is not prepared in {self.data_dir_root}: "
            f"{why}. Build it with:\n  {rebuild_command(self.data_dir_root, self.builder_config.name)}\n"
            "where DIR holds the DeepFashion In-shop download (see docs/deepfashion.md).")

  def _shard_iterators_per_split(self, dl_manager):
    files, plan = release.validate_release(dl_manager.manual_dir)
    for warning in plan.warnings:
      logging.warning(warning)
    self.info.metadata["images_from"] = files.images_label
    self.info.metadata["bbox_from"] = files.label(files.bbox) if files.bbox else None
    self.info.metadata["landmarks_from"] = files.label(files.landmarks) if files.landmarks else None
    self.info.metadata["attributes_from"] = (
        [files.label(files.attr_cloth), files.label(files.attr_items)] if plan.has_attributes else None)
    self.info.metadata["attribute_names"] = list(plan.attribute_names)
    self._plan = plan
    self._unreadable_images, self._files = [], files
    self._archive = release.ImageArchive(files)
    shards = {}
    for split, records in plan.select(self.builder_config.genders).items():
      num_shards = math.ceil(len(records) / _MAX_IMAGES_PER_SHARD)
      bounds = [len(records) * i // num_shards for i in range(num_shards + 1)]
      shards[split] = [
          functools.partial(self._generate_shard, records[start:stop], split=split,
                            first=start, total=len(records), last=stop == len(records))
          for start, stop in zip(bounds[:-1], bounds[1:])]
    return shards

  def _generate_shard(self, records, *, split: str, first: int, total: int, last: bool):
    """Yields `(image_name, example)` for one shard; images that fail to decode are noted, not written."""
    # One bar per split: each shard's bar starts where the previous one stopped, only the last one stays.
    with tqdm.tqdm(total=total, initial=first, desc=f"Writing {split}", unit=" images", leave=last,
                   mininterval=1.0) as progress:
      for record in records:
        try:
          jpeg = self._archive.read(record.image_name)
          height, width = jpeg_check.check_jpeg(jpeg)
        except (OSError, ValueError) as e:
          reason = str(e) if str(e).startswith(("is ", "cannot ")) else f"cannot be read ({e})"
          partition = self._files.label(self._files.partition)
          self._unreadable_images.append(f"{record.image_name} ({partition} line {record.line}) {reason}.")
          continue
        progress.update()
        attributes = self._plan.item_attributes.get(record.item_id)
        yield record.image_name, {
            "image": jpeg,  # The original bytes: tfds.features.Image stores bytes as given.
            "image_name": record.image_name,
            "item_id": record.item_id,
            "category": record.category,
            "bbox": normalized_bbox(record.bbox, height, width),
            "has_bbox": record.bbox is not None,
            "clothes_type": record.clothes_type,
            "pose_type": record.pose_type,
            "landmarks": normalized_landmarks(record.landmarks, height, width),
            "has_landmarks": record.landmarks is not None,
            "attributes": self._no_attributes if attributes is None else attributes,
            "has_attributes": attributes is not None,
        }

  def _download_and_prepare(self, dl_manager, download_config=None):
    try:
      super()._download_and_prepare(dl_manager, download_config)
    finally:
      if self._archive is not None:
        self._archive.close()
        self._archive = None
    if self._unreadable_images:
      # Raised inside TFDS's incomplete dir, which is then deleted: no dataset is left that looks finished.
      raise release.InshopDownloadError(release.format_problems(
          f"{self._files.images_label} in {dl_manager.manual_dir}", self._unreadable_images,
          "No dataset was written. Download the image archive again (or replace these files), then run "
          "again."))
