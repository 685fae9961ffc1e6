"""Input pipeline: TFDS ArrayRecord splits read with grain into P x K training batches and padded eval batches.

Everything here is a function of the config, the seed and the step, never of how many processes or devices
read it: the global batch of step s is `sampler.batch_records(s)`, each process decodes its contiguous block of
that batch, and the random augmentation of an image is seeded by (seed, step, position in the global batch).
A resumed run therefore sees exactly the batches an uninterrupted run would have seen.
"""

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import functools
import io
import os
import warnings

from absl import logging
import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tqdm import auto as tqdm

from jaxret import run_config
from jaxret import samplers

# ImageNet statistics: the published models start from them, and synthetic data does not care.
MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32)
STDDEV_RGB = np.array([0.229, 0.224, 0.225], np.float32)

_INSHOP_PREPARE_HELP = (
    "DeepFashion In-shop must be downloaded by hand (it sits behind an agreement) and converted once:\n"
    "  python -m data_prep.deepfashion_inshop --manual_dir DIR --data_dir {data_dir}\n"
    "where DIR holds Img/img.zip and Eval/list_eval_partition.txt; see docs/deepfashion.md. "
    "To try jaxret without it, use configs/demo.py (a synthetic dataset made on first use).")


# Images with more pixels than this are refused before they are decoded: a small file can declare a huge image
# (a "decompression bomb") that would take gigabytes to decode. 50 megapixels is a 8660 x 5770 photo.
MAX_IMAGE_PIXELS = 50_000_000


def open_image(encoded: bytes) -> Image.Image:
  """A lazily decoded PIL image of `encoded` bytes, after checking its declared size.

  Raises:
    ValueError: the bytes are not an image, or it declares more than `MAX_IMAGE_PIXELS` pixels.
  """
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(encoded))
  except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ValueError(f"not a readable image: {e}") from None
  width, height = image.size
  if width * height > MAX_IMAGE_PIXELS:
    raise ValueError(f"the image declares {width} x {height} pixels, more than the limit of "
                     f"{MAX_IMAGE_PIXELS:,} (input_pipeline.MAX_IMAGE_PIXELS); it is not decoded, to keep "
                     "memory safe")
  return image


class DatasetNotPreparedError(FileNotFoundError):
  """A dataset that must be prepared by hand is not in the data dir; the message says how."""


def default_data_dir() -> str:
  """`$TFDS_DATA_DIR`, else TFDS's default (`~/tensorflow_datasets`)."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def get_builder(name: str, data_dir: str | None = None, *, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """The TFDS builder of an In-shop dataset, prepared on first use when it can be generated here.

  Args:
    name: "synthetic_inshop/<config>" (generated here on first use) or "deepfashion_inshop/<config>" (must
      have been prepared with `python -m data_prep.deepfashion_inshop`).
    data_dir: TFDS data dir; None means `default_data_dir()`.
    prepare: whether a synthetic dataset may be generated now (False on processes that wait for another
      one to generate it).

  Returns:
    A prepared builder.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared and cannot be generated here, with what to do.
    ConfigError: an unknown dataset name.
  """
  # Importing the packages registers their builders with TFDS.
  import data_prep.deepfashion_inshop  # pylint: disable=g-import-not-at-top,unused-import
  import data_prep.synthetic_inshop  # pylint: disable=g-import-not-at-top,unused-import

  data_dir = os.path.expanduser(data_dir or default_data_dir())  # TFDS would make a folder named "~".
  family = name.split("/")[0].split(":")[0]
  if family not in ("synthetic_inshop", "deepfashion_inshop"):
    raise run_config.ConfigError(f"config.input.dataset={name!r} is not an In-shop dataset; use "
                     "'synthetic_inshop/<config>' or 'deepfashion_inshop/<config>'.")
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except (ValueError, tfds.core.registered.DatasetNotFoundError) as e:
    raise run_config.ConfigError(f"config.input.dataset={name!r}: {e}") from e
  if builder.is_prepared():
    return builder
  if family == "deepfashion_inshop":
    raise DatasetNotPreparedError(f"Dataset {name} is not prepared in {data_dir}.\n"
                            + _INSHOP_PREPARE_HELP.format(data_dir=data_dir))
  if prepare:
    logging.info("Generating %s into %s (first use only).", name, data_dir)
    builder.download_and_prepare()
  return builder


def read_split(builder: tfds.core.DatasetBuilder, split: str):
  """Random-access source of one split; images stay JPEG bytes (decoded in our own transform)."""
  return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


@dataclasses.dataclass(frozen=True)
class SplitIndex:
  """Labels of every record of a split, read once so that sampling never touches images.

  Attributes:
    item_ids: `[N]` int64 product ids, by record index.
    categories: `[N]` int32 category labels, by record index.
    image_names: `[N]` names of the images (for pictures and the index).
  """
  item_ids: np.ndarray
  categories: np.ndarray
  image_names: np.ndarray

  def __len__(self):
    return len(self.item_ids)


def index_split(source, desc: str = "indexing") -> SplitIndex:
  """Reads the labels of every record of `source` (a TFDS data source)."""
  item_ids, categories, names = [], [], []
  chunk = 1024
  for start in tqdm.trange(0, len(source), chunk, desc=desc, leave=False, disable=len(source) < 20_000):
    for record in source.__getitems__(list(range(start, min(start + chunk, len(source))))):
      item_ids.append(record["item_id"])
      categories.append(record["category"])
      name = record["image_name"]
      names.append(name.decode() if isinstance(name, bytes) else str(name))
  return SplitIndex(np.asarray(item_ids, np.int64), np.asarray(categories, np.int32), np.asarray(names))


def decode_image(jpeg: bytes, image_size: int, rng: np.random.Generator | None = None,
                 crop_scale: tuple[float, float] = (0.6, 1.0), color_jitter: float = 0.2) -> np.ndarray:
  """Decodes a JPEG to a normalised `[S, S, 3]` float32 image, with training augmentation when `rng` is given.

  Augmentation: random resized crop (area fraction in `crop_scale`, aspect ratio in [3/4, 4/3]), horizontal
  flip, brightness and contrast jitter of relative strength `color_jitter`.
  """
  try:
    image = open_image(jpeg)
    # Let libjpeg decode at a reduced scale when the image is much larger than needed (DCT scaling).
    image.draft("RGB", (image_size, image_size))
    image = image.convert("RGB")
  except (OSError, ValueError) as e:
    raise ValueError(f"Could not decode an image: {e}") from e
  width, height = image.size
  if rng is None:
    image = image.resize((image_size, image_size), Image.BILINEAR)
  else:
    area = width * height * rng.uniform(*crop_scale)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = int(round(min(width, np.sqrt(area * aspect))))
    crop_h = int(round(min(height, np.sqrt(area / aspect))))
    left = rng.integers(0, width - crop_w + 1)
    top = rng.integers(0, height - crop_h + 1)
    image = image.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
      image = image.transpose(Image.FLIP_LEFT_RIGHT)
  pixels = np.asarray(image, np.float32) / 255.0
  if rng is not None and color_jitter > 0:
    brightness = 1 + rng.uniform(-color_jitter, color_jitter)
    contrast = 1 + rng.uniform(-color_jitter, color_jitter)
    mean = pixels.mean()
    pixels = np.clip((pixels * brightness - mean) * contrast + mean, 0.0, 1.0)
  return (pixels - MEAN_RGB) / STDDEV_RGB


def train_batches(source, sampler: samplers.PKSampler, *, image_size: int, first_step: int, num_steps: int,
                  process_index: int = 0, process_count: int = 1, num_threads: int = 4,
                  prefetch: int = 2, augment: dict | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of the P x K training batches of steps `first_step .. num_steps - 1`.

  Args:
    source: the training split (`read_split`).
    sampler: gives the global batch of every step.
    image_size: output side length.
    first_step: the first step to produce (to resume).
    num_steps: one past the last step.
    process_index, process_count: this process's block of every global batch.
    num_threads: decoding threads.
    prefetch: batches decoded ahead.
    augment: keyword arguments of `decode_image` (crop_scale, color_jitter).

  Yields:
    `{"image": [B_local, S, S, 3] float32, "item_id": [B_local] int32, "category": [B_local] int32,
    "class_index": [B_local] int32}` (`class_index`: the product's index among the training products, see
    `PKSampler.class_indices`); the process-local blocks, concatenated in process order, form the global
    batch of the step.
  """
  global_batch = sampler.batch_size
  if global_batch % process_count:
    raise ValueError(f"The global batch size {global_batch} is not divisible by the {process_count} processes.")
  local_batch = global_batch // process_count
  augment = augment or {}
  # Item ids are kept as int32 on device (jax's default integer); In-shop ids have 8 digits.
  item_ids = sampler.item_ids.astype(np.int32)

  def element(local_index: int) -> dict[str, np.ndarray]:
    step, offset = divmod(local_index, local_batch)
    step += first_step
    position = process_index * local_batch + offset
    record_index = int(sampler.batch_records(step)[position])
    record = source[record_index]
    rng = np.random.default_rng([sampler.seed, 2, step, position])
    return {"image": decode_image(record["image"], image_size, rng, **augment),
            "item_id": item_ids[record_index],
            "category": np.int32(record["category"]),
            "class_index": sampler.class_indices[record_index]}

  dataset = grain.MapDataset.range((num_steps - first_step) * local_batch).map(element)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                      prefetch_buffer_size=prefetch * local_batch))
  return iter(dataset.batch(local_batch, drop_remainder=True))


def padded_batches(num_items: int, load: Callable[[int], dict[str, np.ndarray]], padding: dict[str, np.ndarray],
                   *, global_batch: int, process_index: int = 0, process_count: int = 1,
                   num_threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Items `0 .. num_items - 1` in order, padded to full global batches; this process's block of each batch.

  Args:
    num_items: how many items there are.
    load: item index -> element (a dict of arrays), run on `num_threads` threads.
    padding: the element that fills the last global batch.
    global_batch: items per global batch, divisible by `process_count`.
    process_index, process_count: this process's block of every global batch.
    num_threads: loading threads.

  Yields:
    Batched elements; global batch b holds items `b * global_batch ...`, so after concatenation over the
    processes the first `num_items` rows are the items in order.
  """
  if global_batch % process_count:
    raise ValueError(f"The eval batch size {global_batch} is not divisible by the {process_count} processes.")
  local_batch = global_batch // process_count
  num_batches = -(-num_items // global_batch)

  def element(local_index: int) -> dict[str, np.ndarray]:
    batch, offset = divmod(local_index, local_batch)
    index = batch * global_batch + process_index * local_batch + offset
    return load(index) if index < num_items else padding

  dataset = grain.MapDataset.range(num_batches * local_batch).map(element)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                      prefetch_buffer_size=2 * local_batch))
  return iter(dataset.batch(local_batch, drop_remainder=True))


def eval_batches(source, index: SplitIndex, *, image_size: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1, num_threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """A whole split in record order, padded to full global batches, this process's block of each batch.

  Yields:
    `{"image", "item_id", "category", "valid"}` with `valid` False on padding; the global batch b holds
    records `b * global_batch ...`, so after concatenation the first `len(index)` rows are the split in order.
  """
  item_ids = index.item_ids.astype(np.int32)

  def load(record_index: int) -> dict[str, np.ndarray]:
    record = source[record_index]
    return {"image": decode_image(record["image"], image_size), "item_id": item_ids[record_index],
            "category": np.int32(record["category"]), "valid": np.bool_(True)}

  padding = {"image": np.zeros((image_size, image_size, 3), np.float32), "item_id": np.int32(-1),
             "category": np.int32(-1), "valid": np.bool_(False)}
  return padded_batches(len(index), load, padding, global_batch=global_batch, process_index=process_index,
                        process_count=process_count, num_threads=num_threads)


def file_batches(paths: Sequence[str], *, image_size: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1, num_threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Image files in order, padded to full global batches, as `eval_batches` does for a split.

  Yields:
    `{"image": [B_local, S, S, 3] float32, "valid": [B_local] bool}`; `valid` is False on padding and on
    files that cannot be read as images (their image is zeros).
  """
  padding = {"image": np.zeros((image_size, image_size, 3), np.float32), "valid": np.bool_(False)}

  def load(index: int) -> dict[str, np.ndarray]:
    try:
      with open(paths[index], "rb") as f:
        return {"image": decode_image(f.read(), image_size), "valid": np.bool_(True)}
    except (OSError, ValueError):
      return padding  # Reported by the caller, which sees valid == False.

  return padded_batches(len(paths), load, padding, global_batch=global_batch,
                                       process_index=process_index, process_count=process_count,
                                       num_threads=num_threads)


def load_thumbnail(source, record_index: int, size: int) -> np.ndarray:
  """`[size, size, 3]` uint8 picture of a record, for retrieval pictures."""
  image = Image.open(io.BytesIO(source[int(record_index)]["image"])).convert("RGB")
  return np.asarray(image.resize((size, size), Image.BILINEAR))
