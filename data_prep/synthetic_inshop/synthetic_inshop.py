"""TFDS builder `synthetic_inshop`: a DeepFashion In-shop look-alike that jaxret generates itself.

Same features (`inshop_features.core_features()` and `annotation_features()`) and splits (`train`, `query`,
`gallery`) as the real In-shop builder, so the trainer reads either the same way. Products are procedural
garments (`garments.py`) shown in several views; train and test products are disjoint and every test product
has images in both query and gallery. Nothing is downloaded: `download_and_prepare()` renders the images into
the TFDS data dir. The annotations are what the renderer knows: the garment's true box, its landmarks, clothes
and pose types, and the product's attributes (pattern, sleeve length, neckline, colour family).

The consumer-to-shop configs (`c2s_small`, `c2s_tiny`) photograph query images like street photos (the
garment small, off-centre, on clutter, often partly occluded) and gallery images like shop photos (clean,
centred, studio background); train images are a mix of both.

  from data_prep import synthetic_inshop
  builder = synthetic_inshop.SyntheticInshop(config="small", data_dir=data_dir)
  builder.download_and_prepare()  # seconds for `small`; a no-op once prepared
  gallery = tfds.data_source("synthetic_inshop/small", data_dir=data_dir, split="gallery")

Every image is seeded from (config seed, item id, view index), so a rebuild (with the same NumPy and Pillow)
writes the same JPEG bytes, names and labels in the same record order, whatever the number of worker processes.
"""

import collections
from collections.abc import Iterator
from concurrent import futures
import dataclasses
import io
import json
import multiprocessing
import os

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from data_prep import inshop_features
from data_prep.synthetic_inshop import garments

# Items rendered per worker task: large enough to amortise inter-process traffic, small enough to stream.
_ITEMS_PER_TASK = 16
# Tags that keep the random streams of the split layout, the products, the views and the consumer photos apart.
_LAYOUT_STREAM, _PRODUCT_STREAM, _VIEW_STREAM, _CONSUMER_STREAM = 1, 2, 3, 4


@dataclasses.dataclass(eq=False)
class SyntheticInshopConfig(tfds.core.BuilderConfig):
  """Size, look and difficulty of one synthetic In-shop variant.

  Changing a field changes the data: give a changed config a new `name` (or delete its folder), because a
  prepared folder is reused by name; `download_and_prepare` refuses a folder written with other settings.
  """
  seed: int = 0  # everything is a function of this seed
  image_size: int = 64  # side of the square images
  supersample: int = 2  # garments are drawn at this multiple of image_size and averaged down (anti-aliasing)
  jpeg_quality: int = 90
  num_train_items: int = 360
  num_test_items: int = 120
  num_train_images: int = 2520  # spread over the train items as evenly as possible (each gets >= 1)
  num_query_images: int = 240  # spread over the test items, each gets >= 1
  num_gallery_images: int = 360  # spread over the test items, each gets >= 1
  num_workers: int = 0  # processes that render images; 0 renders in the calling process, -1 uses all cores
  difficulty: garments.Difficulty = dataclasses.field(default_factory=garments.Difficulty)
  # None: In-shop-like photos in every split. Else query photos are consumer (street) photos, gallery photos
  # shop photos, and train photos a mix (the consumer-to-shop variant).
  consumer_photos: garments.ConsumerPhotos | None = None

  def __post_init__(self):
    for split, images, items in (("train", self.num_train_images, self.num_train_items),
                                 ("query", self.num_query_images, self.num_test_items),
                                 ("gallery", self.num_gallery_images, self.num_test_items)):
      if items < 1 or images < items:
        raise ValueError(f"SyntheticInshopConfig {self.name!r}: the {split} split needs at least one item and "
                         f"at least one image per item, got {images} images for {items} items.")
    if self.image_size < 8 or self.supersample < 1 or not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f"SyntheticInshopConfig {self.name!r}: need image_size >= 8, supersample >= 1 and "
                       f"jpeg_quality in [1, 100], got {self.image_size}, {self.supersample}, "
                       f"{self.jpeg_quality}.")

  def settings(self) -> dict:
    """What determines the data: the fields (not `num_workers`) and the renderer version, JSON-able."""
    inherited = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name not in inherited and f.name != "num_workers"}
    fields["difficulty"] = dataclasses.asdict(self.difficulty)
    fields["consumer_photos"] = (None if self.consumer_photos is None
                                 else dataclasses.asdict(self.consumer_photos))
    fields["renderer_version"] = garments.RENDERER_VERSION
    return json.loads(json.dumps(fields))


# The real In-shop's test split: 3,985 items, 14,218 query and 12,612 gallery images; train: 3,997 items,
# 25,882 images.
BUILDER_CONFIGS = [
    SyntheticInshopConfig(
        name="small",
        description="64x64, 360 train / 120 test products; the demo's dataset (a few seconds to build).",
    ),
    SyntheticInshopConfig(
        name="tiny",
        description="64x64, 24 train / 12 test products; for tests (about a second to build).",
        num_train_items=24, num_test_items=12, num_train_images=96, num_query_images=24, num_gallery_images=24,
    ),
    SyntheticInshopConfig(
        name="inshop",
        description="256x256 with the real In-shop's sizes: 7,982 products, 52,712 images (minutes to build).",
        image_size=256, supersample=1, num_train_items=3997, num_test_items=3985, num_train_images=25882,
        num_query_images=14218, num_gallery_images=12612, num_workers=-1,
    ),
    SyntheticInshopConfig(
        name="c2s_small",
        description="Consumer-to-shop, 96x96, the sizes of `small`: street-photo queries, shop-photo gallery.",
        image_size=96, consumer_photos=garments.ConsumerPhotos(),
    ),
    SyntheticInshopConfig(
        name="c2s_tiny",
        description="Consumer-to-shop, 64x64, the sizes of `tiny`; for tests.",
        num_train_items=24, num_test_items=12, num_train_images=96, num_query_images=24, num_gallery_images=24,
        consumer_photos=garments.ConsumerPhotos(),
    ),
]


@dataclasses.dataclass(frozen=True)
class ItemLayout:
  """Where one product goes: its split's images are views `first_view .. first_view + num_views - 1`."""
  item_id: int
  category: int
  first_view: int
  num_views: int
  split: str = "train"


def _spread(total: int, bins: int, rng: np.random.Generator) -> np.ndarray:
  """`bins` counts summing to `total`, as even as possible, the larger ones at random bins."""
  counts = np.full(bins, total // bins, np.int64)
  counts[rng.permutation(bins)[:total % bins]] += 1
  return counts


def split_layout(config: SyntheticInshopConfig) -> dict[str, list[ItemLayout]]:
  """Which products, and which of their views, each split holds.

  Item ids run from 1 to num_train_items + num_test_items; a seeded draw picks the test items (so, as in
  In-shop, train and test ids interleave) and balances categories over all items. A test item's first views
  are its query images and the rest its gallery images.

  Returns:
    {"train": [...], "query": [...], "gallery": [...]}, each sorted by item id.
  """
  rng = np.random.default_rng([config.seed, _LAYOUT_STREAM])
  num_items = config.num_train_items + config.num_test_items
  num_categories = len(inshop_features.CATEGORY_NAMES)
  categories = rng.permutation(np.arange(num_items) % num_categories)
  is_test = np.zeros(num_items, bool)
  is_test[rng.choice(num_items, config.num_test_items, replace=False)] = True
  train_ids, test_ids = np.flatnonzero(~is_test) + 1, np.flatnonzero(is_test) + 1
  train_views = _spread(config.num_train_images, len(train_ids), rng)
  query_views = _spread(config.num_query_images, len(test_ids), rng)
  gallery_views = _spread(config.num_gallery_images, len(test_ids), rng)
  layout = lambda i, first, n, split: ItemLayout(
      int(i), int(categories[i - 1]), int(first), int(n), split)
  return {
      "train": [layout(i, 0, n, "train") for i, n in zip(train_ids, train_views)],
      "query": [layout(i, 0, n, "query") for i, n in zip(test_ids, query_views)],
      "gallery": [layout(i, q, n, "gallery") for i, q, n in zip(test_ids, query_views, gallery_views)],
  }


def product_and_views(config: SyntheticInshopConfig, item: ItemLayout
                      ) -> tuple[garments.Product, list[tuple[int, garments.View]]]:
  """The product of an item and its (view index, view) pairs, from their own seeds.

  With `config.consumer_photos`, query views become consumer photos, gallery views shop photos, and train
  views either (a draw per view); the base view is drawn the same way in every config.
  """
  product = garments.sample_product(np.random.default_rng([config.seed, _PRODUCT_STREAM, item.item_id]),
                                    item.category, config.difficulty)
  views = []
  photos = config.consumer_photos
  for index in range(item.first_view, item.first_view + item.num_views):
    rng = np.random.default_rng([config.seed, _VIEW_STREAM, item.item_id, index])
    view = garments.sample_view(rng, product, config.difficulty)
    if photos is not None:
      consumer_rng = np.random.default_rng([config.seed, _CONSUMER_STREAM, item.item_id, index])
      consumer = item.split == "query" or (
          item.split == "train" and consumer_rng.random() < photos.train_consumer_fraction)
      view = garments.consumer_view(consumer_rng, view, photos) if consumer else garments.shop_view(view)
    views.append((index, view))
  return product, views


def image_name(item: ItemLayout, view_index: int, view_type: str) -> str:
  """The In-shop style path, e.g. `img/WOMEN/Dresses/id_00000002/02_1_front.jpg`."""
  category = inshop_features.CATEGORY_NAMES[item.category]
  number = garments.VIEW_NUMBERS[view_type]
  return f"img/{category}/id_{item.item_id:08d}/{view_index + 1:02d}_{number}_{view_type}.jpg"


def annotation_example(annotations: garments.Annotations, attributes: np.ndarray, image_size: int) -> dict:
  """The annotation features (`inshop_features.annotation_features`) of one rendered photo, all present."""
  x1, y1, x2, y2 = (v / image_size for v in annotations.bbox)
  landmarks = annotations.landmarks.copy()
  present = landmarks[:, 0] != inshop_features.LANDMARK_ABSENT
  landmarks[present, 1:] /= image_size
  return {
      "bbox": tfds.features.BBox(ymin=y1, xmin=x1, ymax=y2, xmax=x2),
      "has_bbox": True,
      "clothes_type": annotations.clothes_type,
      "pose_type": annotations.pose_type,
      "landmarks": landmarks,
      "has_landmarks": True,
      "attributes": attributes,
      "has_attributes": True,
  }


def render_item(config: SyntheticInshopConfig, item: ItemLayout) -> list[tuple[str, dict]]:
  """All (key, example) pairs of one item in one split; JPEG-encoded, ready for TFDS."""
  product, views = product_and_views(config, item)
  attributes = garments.product_attributes(product)
  examples = []
  for index, view in views:
    pixels = garments.render(product, view, config.image_size, config.supersample)
    annotations = garments.annotate(product, view, config.image_size, config.supersample)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=config.jpeg_quality)
    name = image_name(item, index, view.view_type)
    examples.append((name, {"image": buffer.getvalue(), "image_name": name, "item_id": item.item_id,
                            "category": item.category,
                            **annotation_example(annotations, attributes, config.image_size)}))
  return examples


def render_items(config: SyntheticInshopConfig, items: list[ItemLayout]) -> list[tuple[str, dict]]:
  """`render_item` over several items (one task of a worker process)."""
  return [example for item in items for example in render_item(config, item)]


class SyntheticInshop(tfds.core.GeneratorBasedBuilder):
  """Procedural In-shop: garments in several views, with the real In-shop's features and splits."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "2.0.0": "The In-shop annotation features (true box, landmarks, clothes/pose type, attributes); the "
               "consumer-to-shop configs. Images of the 1.0.0 configs are unchanged.",
  }
  BUILDER_CONFIGS = BUILDER_CONFIGS
  DEFAULT_CONFIG_NAME = "small"

  def __init__(self, *, file_format: str | None = None, num_workers: int | None = None, **kwargs):
    """See `tfds.core.GeneratorBasedBuilder`; `num_workers` overrides the config's (same data either way)."""
    # ArrayRecord by default: random access for grain, and no TensorFlow needed to write or read it.
    super().__init__(file_format=file_format or "array_record", **kwargs)
    num_workers = self.builder_config.num_workers if num_workers is None else num_workers
    self._num_workers = (os.cpu_count() or 1) if num_workers < 0 else num_workers
    self._pool = None  # worker processes, shared by the splits while download_and_prepare runs
    # Here, not only in download_and_prepare: readers that find the folder prepared never call that.
    self._check_settings()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Synthetic DeepFashion In-shop look-alike: procedurally generated garments (silhouette "
                     "per category, colour, pattern, details) in several views (pose, scale, crop, lighting, "
                     "background, occlusion). Generated locally, never downloaded."),
        features=tfds.features.FeaturesDict({
            **inshop_features.core_features(),
            **inshop_features.annotation_features(len(garments.ATTRIBUTE_NAMES))}),
        metadata=tfds.core.MetadataDict(settings=self.builder_config.settings(),
                                        attribute_names=list(garments.ATTRIBUTE_NAMES)),
    )

  def download_and_prepare(self, **kwargs):
    """Renders the dataset into `data_dir` unless it is there; see `tfds.core.DatasetBuilder`.

    Raises:
      ValueError: the folder holds this config's name but was written with other settings.
    """
    self._check_settings()
    try:
      super().download_and_prepare(**kwargs)
    finally:
      if self._pool is not None:
        self._pool.shutdown(cancel_futures=True)
        self._pool = None

  def _check_settings(self):
    """Refuses a prepared folder whose stored settings differ from the config's (stale data, same name)."""
    metadata_path = os.path.join(self.data_dir, "metadata.json")
    if not os.path.exists(metadata_path):
      return
    with open(metadata_path) as f:
      stored = json.load(f).get("settings")
    if stored != self.builder_config.settings():
      raise ValueError(
          f"{self.data_dir} holds synthetic_inshop/{self.builder_config.name} generated with other settings "
          f"({stored}) than the config now asks for ({self.builder_config.settings()}). Delete that folder to "
          f"regenerate it, or give the changed config a new name.")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    layout = split_layout(self.builder_config)
    if self._num_workers > 1 and self._pool is None:
      # Spawned, not forked: the caller may already run JAX threads, which fork does not copy safely.
      self._pool = futures.ProcessPoolExecutor(self._num_workers, mp_context=multiprocessing.get_context("spawn"))
    return {split: self._generate_examples(layout[split]) for split in inshop_features.SPLITS}

  def _generate_examples(self, items: list[ItemLayout]) -> Iterator[tuple[str, dict]]:
    config = self.builder_config
    if self._pool is None:
      for item in items:
        yield from render_item(config, item)
      return
    # At most 2 tasks per worker in flight, yielded in order: memory stays flat however large the split.
    pending = collections.deque()
    try:
      for start in range(0, len(items), _ITEMS_PER_TASK):
        pending.append(self._pool.submit(render_items, config, items[start:start + _ITEMS_PER_TASK]))
        if len(pending) >= 2 * self._num_workers:
          yield from pending.popleft().result()
      while pending:
        yield from pending.popleft().result()
    except futures.process.BrokenProcessPool as e:
      raise RuntimeError(
          "synthetic_inshop: a worker process died. If download_and_prepare() runs in a script, call it under "
          "`if __name__ == \"__main__\":` (worker processes re-import the main module), or pass num_workers=0 "
          "to the builder to render in this process.") from e
