"""Input pipeline: prepared TFDS splits, their decoded caches, and the batches the trainer and evaluation read.

The host never augments: it hands the devices uint8 pixels at the decoded cache's resolution, and the jitted
step crops, flips, jitters and normalises them (`jaxret.augment`). Where the training images live while
training is `config.input.cache` (`choose_cache`):

  device   the whole uint8 split replicated on every device; each step gathers its batch there by index
  host     the memory-mapped cache (`jaxret.decoded_cache`), gathered on the host in one copy per step and
           put on the devices by a background thread, `config.input.prefetch` steps ahead
  stream   the JPEGs decoded while training by grain worker processes (`config.input.num_workers`), for
           splits larger than the RAM; same prefetch
  auto     device if the split fits `config.input.cache_memory_fraction` of a device's memory, else host if it
           fits that fraction of the RAM, else stream

Everything is a function of the config, the seed and the step, never of the mode or of how many processes or
devices read it: the global batch of step s is `sampler.batch_records(s)`, each process provides its
contiguous block of it, and every path decodes with the same `decode_pixels`, so the three modes give the same
batches. A resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import importlib
import io
import os
import queue
import sys
import threading
import time
from typing import Any

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tqdm import auto as tqdm

from jaxret import decoded_cache
from jaxret import run_config
from jaxret import samplers
from jaxret import sharding

_INSHOP_PREPARE_HELP = (
    "DeepFashion In-shop must be downloaded by hand (it sits behind an agreement) and converted once:\n"
    "  python -m data_prep.deepfashion_inshop --manual_dir DIR --data_dir {data_dir}\n"
    "where DIR holds Img/img.zip and Eval/list_eval_partition.txt; see docs/deepfashion.md. "
    "To try jaxret without it, use configs/demo.py (a synthetic dataset made on first use).")
_DEEPFASHION2_PREPARE_HELP = (
    "DeepFashion2 must be downloaded by hand (its zips are password-protected; the password comes with the "
    "agreement) and converted once:\n"
    "  python -m data_prep.deepfashion2 --manual_dir DIR --data_dir {data_dir} [--password P]\n"
    "where DIR holds train.zip and validation.zip (or their extracted folders); see docs/deepfashion.md.")
# Datasets that must be downloaded by hand: what to tell a user whose data dir does not hold them.
_PREPARE_BY_HAND = {"deepfashion_inshop": _INSHOP_PREPARE_HELP, "deepfashion2": _DEEPFASHION2_PREPARE_HELP}


class DatasetNotPreparedError(FileNotFoundError):
  """A dataset that must be prepared by hand is not in the data dir; the message says how."""


def default_data_dir() -> str:
  """`$TFDS_DATA_DIR`, else TFDS's default (`~/tensorflow_datasets`)."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def get_builder(name: str, data_dir: str | None = None, *, prepare: bool = True) -> tfds.core.DatasetBuilder:
  """The TFDS builder of a retrieval dataset, prepared on first use when it can be generated here.

  Args:
    name: "synthetic_inshop/<config>" (generated here on first use), "deepfashion_inshop/<config>" or
      "deepfashion2" (must have been prepared with `python -m data_prep.deepfashion_inshop` /
      `python -m data_prep.deepfashion2`).
    data_dir: TFDS data dir; None means `default_data_dir()`.
    prepare: whether a synthetic dataset may be generated now (False on processes that wait for another
      one to generate it).

  Returns:
    A prepared builder.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared and cannot be generated here, with what to do.
    ConfigError: an unknown dataset name.
  """
  # Importing the packages registers their builders with TFDS (here, so that importing jaxret stays light).
  for package in ("data_prep.deepfashion_inshop", "data_prep.deepfashion2", "data_prep.synthetic_inshop"):
    importlib.import_module(package)

  data_dir = os.path.expanduser(data_dir or default_data_dir())  # TFDS would make a folder named "~".
  family = name.split("/")[0].split(":")[0]
  if family not in ("synthetic_inshop", "deepfashion_inshop", "deepfashion2"):
    raise run_config.ConfigError(f"config.input.dataset={name!r} is not a dataset jaxret reads; use "
                                 "'synthetic_inshop/<config>', 'deepfashion_inshop/<config>' or 'deepfashion2'.")
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except (ValueError, tfds.core.registered.DatasetNotFoundError) as e:
    raise run_config.ConfigError(f"config.input.dataset={name!r}: {e}") from e
  if builder.is_prepared():
    return builder
  if family in _PREPARE_BY_HAND:
    raise DatasetNotPreparedError(f"Dataset {name} is not prepared in {data_dir}.\n"
                                  + _PREPARE_BY_HAND[family].format(data_dir=data_dir))
  if prepare:
    logging.info("Generating %s into %s (first use only).", name, data_dir)
    builder.download_and_prepare()
  return builder


def read_split(builder: tfds.core.DatasetBuilder, split: str):
  """Random-access source of one split; images stay JPEG bytes (decoded in our own transform)."""
  return builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})


SplitIndex = decoded_cache.SplitIndex
decode_pixels = decoded_cache.decode_pixels

CACHE_MODES = run_config.CACHE_MODES


def index_split(source, desc: str = "indexing") -> SplitIndex:
  """Reads the labels of every record of `source` (a TFDS data source); the decoded cache keeps them instead."""
  chunks = []
  chunk = 1024
  for start in tqdm.trange(0, len(source), chunk, desc=desc, leave=False, disable=len(source) < 20_000):
    chunks.append(decoded_cache.stack_labels(source.__getitems__(list(range(start, min(start + chunk, len(source)))))))
  return decoded_cache.index_from_labels(decoded_cache.concatenate_labels(chunks))


def cache_size(config: ml_collections.ConfigDict) -> int:
  """Side of the decoded images: `config.input.cache_size`, else `config.input.image_size` (also for the
  `config.json` of runs made before the field existed)."""
  return config.input.get("cache_size") or config.input.image_size


def open_decoded_split(config: ml_collections.ConfigDict, builder, split: str, *, pixels: bool = True,
                       progress: bool = True) -> decoded_cache.DecodedSplit:
  """A split of the config's dataset decoded at `cache_size(config)` (labels only unless `pixels`)."""
  return decoded_cache.open_split(builder, split, cache_size(config) if pixels else None,
                                  cache_dir=config.input.get("cache_dir"),
                                  num_workers=config.input.get("num_workers"), progress=progress)


def device_memory_bytes(devices: Sequence[jax.Device]) -> int:
  """Memory of the smallest of `devices`; CPU devices (no memory statistics) share the host's RAM."""
  limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
  if all(limits):
    return int(min(limits))
  return host_memory_bytes() // max(1, len(devices))


def host_memory_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_cache(requested: str, *, num_records: int, size: int, memory_fraction: float,
                 devices: Sequence[jax.Device]) -> tuple[str, str]:
  """Where the decoded training images live: `requested`, or for "auto" the fastest place they fit.

  "device" when the uint8 split takes at most `memory_fraction` of one device's memory (it is replicated on
  every device), else "host" (a memory map, gathered on the host) when it takes at most that fraction of the
  RAM, else "stream" (JPEGs decoded while training).

  Returns:
    `(mode, why)`, the reason as a sentence for the log.
  """
  split_bytes = num_records * size * size * 3
  described = f"the {num_records:,} training images at {size}x{size} take {split_bytes / 2**30:.2f} GiB"
  if requested != "auto":
    return requested, f"config.input.cache={requested!r}; {described}"
  device_bytes = device_memory_bytes(devices)
  if split_bytes <= memory_fraction * device_bytes:
    return "device", (f"{described}, at most config.input.cache_memory_fraction={memory_fraction} of one "
                      f"device's {device_bytes / 2**30:.1f} GiB")
  ram = host_memory_bytes()
  if split_bytes <= memory_fraction * ram:
    return "host", (f"{described}: more than {memory_fraction} of one device's {device_bytes / 2**30:.1f} GiB, "
                    f"at most {memory_fraction} of the host's {ram / 2**30:.1f} GiB of RAM")
  return "stream", (f"{described}: more than config.input.cache_memory_fraction={memory_fraction} of the "
                    f"host's {ram / 2**30:.1f} GiB of RAM")


# The features a batch needs for box crops (`config.input.crop_to_box`).
BOX_FEATURES = ("bbox", "has_bbox")


class MissingFeatureError(ValueError):
  """The run needs a dataset feature (e.g. `bbox` for box crops) that the dataset does not have."""


def feature_columns(index: SplitIndex, names: Sequence[str], needed_by: str = "this run") -> dict[str, np.ndarray]:
  """`{name: [N, ...] array}` of dataset features of every record, in the dtypes the device step takes.

  A mask feature `has_<x>` that the dataset lacks while it has `<x>` (DeepFashion2 has a box for every
  garment, no `has_bbox`) is all True. Floats become float32, integers int32 (int8 stays int8: attribute
  vectors are long), booleans stay bool.

  Raises:
    MissingFeatureError: a feature the split does not have, named with what needs it and what the split has.
  """
  columns = {}
  for name in names:
    if name in index.features:
      value = np.asarray(index.features[name])
    elif name.startswith("has_") and name[len("has_"):] in index.features:
      value = np.ones(len(index), bool)
    else:
      raise MissingFeatureError(
          f"{needed_by} needs the dataset feature {name!r}, which this dataset's records do not have (they "
          f"have {sorted(index.features)}). Use a dataset with it (the In-shop builders from version 2.0.0, "
          "deepfashion2 for bbox), or turn off what needs it.")
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float32)
    elif np.issubdtype(value.dtype, np.integer) and value.dtype != np.int8:
      value = value.astype(np.int32)
    columns[name] = value
  return columns


def batch_labels(index: SplitIndex, sampler: samplers.PKSampler,
                 features: Sequence[str] = ()) -> dict[str, np.ndarray]:
  """The labels of every training record that go into a batch: `[N]` int32 `item_id`, `category`,
  `class_index` (ids as jax's default integer), and the dataset `features` the run needs (`feature_columns`)."""
  return {"item_id": index.item_ids.astype(np.int32), "category": index.categories.astype(np.int32),
          "class_index": sampler.class_indices, **feature_columns(index, features)}


class TrainBatches(Iterator[dict[str, jax.Array]]):
  """Global training batches on the devices, step after step: `next()` gives the batch of the next step.

  Every batch is `{"image": [B, C, C, 3] uint8, "item_id", "category", "class_index": [B] int32}` split over
  the mesh (C: the cache size; the step crops, flips, jitters and normalises on the device). Batch s holds the
  records `sampler.batch_records(s)` in order, whichever mode made it.
  """

  mode: str

  def cpu_seconds(self) -> float:
    """CPU time used so far by the input's own threads in this process (0 if it has none)."""
    return 0.0

  def close(self) -> None:
    """Stops background work (threads, worker processes)."""


class DeviceBatches(TrainBatches):
  """`cache="device"`: the uint8 split sits replicated on every device; a step's batch is gathered there.

  Replicated rather than split over the devices: each device then gathers its share of the batch from its own
  copy with no communication, which matters more than memory while the split fits (auto checks that).
  """

  mode = "device"

  def __init__(self, split: decoded_cache.DecodedSplit, sampler: samplers.PKSampler, mesh: jax.sharding.Mesh, *,
               first_step: int, num_steps: int, process_index: int = 0, process_count: int = 1,
               features: Sequence[str] = ()):
    replicated = sharding.replicated(mesh)
    self._images = sharding.global_from_host(split.images, replicated)
    self._labels = {k: sharding.global_from_host(v, replicated)
                    for k, v in batch_labels(split.index, sampler, features).items()}
    self._gather = jax.jit(_gather_batch, out_shardings=sharding.data_sharding(mesh))
    self._sampler = sampler
    self._block = _process_block(sampler.batch_size, process_index, process_count)
    self._mesh = mesh
    self._step, self._num_steps = first_step, num_steps

  def __next__(self) -> dict[str, jax.Array]:
    if self._step >= self._num_steps:
      raise StopIteration
    records = self._sampler.batch_records(self._step)[self._block].astype(np.int32)
    self._step += 1
    return self._gather(self._images, self._labels, sharding.global_batch({"records": records}, self._mesh))


def _gather_batch(images: jax.Array, labels: dict[str, jax.Array], batch: dict[str, jax.Array]):
  records = batch["records"]
  return {"image": images[records], **{key: value[records] for key, value in labels.items()}}


def _process_block(global_batch: int, process_index: int, process_count: int) -> slice:
  """This process's positions in every global batch (contiguous blocks in process order)."""
  if global_batch % process_count:
    raise ValueError(f"The global batch size {global_batch} is not divisible by the {process_count} processes.")
  local = global_batch // process_count
  return slice(process_index * local, (process_index + 1) * local)


class PrefetchedBatches(TrainBatches):
  """Process-local batches (NumPy) made by a background thread, put on the devices `prefetch` steps ahead.

  The thread makes the local block of step s + 1 and copies it to the devices while the step s runs.
  """

  def __init__(self, mode: str, local_batches: Iterator[dict[str, np.ndarray]], mesh: jax.sharding.Mesh,
               prefetch: int, on_close=None):
    self.mode = mode
    self._queue = queue.Queue(maxsize=max(1, prefetch))
    self._stop = threading.Event()
    self._cpu = 0.0
    self._on_close = on_close
    self._thread = threading.Thread(target=self._run, args=(local_batches, mesh), daemon=True,
                                    name=f"jaxret-{mode}-batches")
    self._thread.start()

  def _run(self, local_batches, mesh) -> None:
    start = time.thread_time()
    try:
      while (local := next(local_batches, None)) is not None:
        batch = sharding.global_batch(local, mesh)
        del local  # Only the batch may keep the host buffer (see HostBuffers).
        jax.block_until_ready(batch)
        self._cpu = time.thread_time() - start
        if not self._put(batch):
          return
      self._put(StopIteration())
    except BaseException as e:  # pylint: disable=broad-except  # Re-raised in the consumer's thread.
      self._put(e)

  def _put(self, item) -> bool:
    """Waits for room in the queue (without polling, which would cost CPU while long steps run)."""
    if self._stop.is_set():
      return False
    self._queue.put(item)
    return not self._stop.is_set()

  def __next__(self) -> dict[str, jax.Array]:
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._queue.put(item)  # Every later call ends the same way.
      raise item
    return item

  def cpu_seconds(self) -> float:
    return self._cpu

  def close(self) -> None:
    self._stop.set()
    deadline = time.monotonic() + 10
    while self._thread.is_alive() and time.monotonic() < deadline:
      try:  # Makes room for a blocked put, so that the thread sees the stop.
        while True:
          self._queue.get_nowait()
      except queue.Empty:
        pass
      self._thread.join(timeout=0.05)
    if self._on_close is not None:
      self._on_close()


class HostBuffers:
  """Host buffers of one shape for batches: reused once nothing refers to them any more, 64-byte aligned.

  Aligned so that JAX's CPU backend takes them without a copy (it keeps the array and reads it in place);
  other backends copy them to device memory. Either way the runtime holds a reference while it needs the
  memory, and so does every batch made from it, so a buffer is reused only when its reference count says
  that nothing else holds it: batches already handed out never change, and in the steady state the same
  few buffers (no fresh pages to fault in) serve every step.
  """

  _ALIGNMENT = 64

  def __init__(self, shape: tuple[int, ...], limit: int = 8):
    self.shape = shape
    self._limit = limit
    self._owners = []  # 1-D uint8 arrays owning the memory; views of them are handed out.

  def get(self) -> np.ndarray:
    """A free `shape` uint8 buffer (contents undefined)."""
    for owner in self._owners:
      # References: this list, the loop variable and getrefcount's argument. Any view, and so any batch
      # or runtime buffer made from one, refers to the owner through its `base`.
      if sys.getrefcount(owner) <= 3:
        return self._view(owner)
    owner = np.empty(int(np.prod(self.shape)) + self._ALIGNMENT, np.uint8)
    if len(self._owners) < self._limit:
      self._owners.append(owner)
    return self._view(owner)

  def _view(self, owner: np.ndarray) -> np.ndarray:
    offset = -owner.ctypes.data % self._ALIGNMENT
    return owner[offset:offset + int(np.prod(self.shape))].reshape(self.shape)


def host_local_batches(split: decoded_cache.DecodedSplit, sampler: samplers.PKSampler, *, first_step: int,
                       num_steps: int, process_index: int = 0, process_count: int = 1,
                       features: Sequence[str] = ()) -> Iterator[dict[str, np.ndarray]]:
  """`cache="host"`: this process's block of each step's batch gathered from the memory-mapped cache.

  One fancy-index copy per step (`np.take`) into a `HostBuffers` buffer, no per-image Python.
  """
  block = _process_block(sampler.batch_size, process_index, process_count)
  labels = batch_labels(split.index, sampler, features)
  buffers = HostBuffers((block.stop - block.start, *split.images.shape[1:]))
  for step in range(first_step, num_steps):
    records = sampler.batch_records(step)[block]
    image = np.take(split.images, records, axis=0, out=buffers.get(), mode="clip")  # "clip": no temporary.
    yield {"image": image, **{key: value[records] for key, value in labels.items()}}


@dataclasses.dataclass(frozen=True)
class DecodeStepBlock:
  """Grain map (step -> local block of its batch decoded from JPEG, uint8), run in worker processes."""
  source: Any
  sampler: samplers.PKSampler
  labels: dict[str, np.ndarray]
  block: slice
  size: int

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    records = self.sampler.batch_records(int(step))[self.block]
    pixels = []
    for record_index, record in zip(records, self.source.__getitems__(records.tolist())):
      try:
        pixels.append(decode_pixels(record["image"], self.size))
      except ValueError as e:
        raise ValueError(f"Training record {record_index}: {e}") from None
    return {"image": np.stack(pixels), **{key: value[records] for key, value in self.labels.items()}}


def stream_local_batches(source, index: SplitIndex, sampler: samplers.PKSampler, *, size: int, first_step: int,
                         num_steps: int, num_workers: int, prefetch: int = 2, process_index: int = 0,
                         process_count: int = 1, features: Sequence[str] = ()):
  """`cache="stream"`: this process's block of each step's batch decoded from the JPEGs by grain.

  With `num_workers` > 0, grain's worker processes (`mp_prefetch`) decode whole blocks, `prefetch` each ahead,
  and hand them over in shared memory; with 0 one thread of this process decodes.

  Returns:
    A grain iterator of `{"image": [B_local, size, size, 3] uint8, "item_id", "category", "class_index"}`.
  """
  decode = DecodeStepBlock(source, sampler, batch_labels(index, sampler, features),
                           _process_block(sampler.batch_size, process_index, process_count), size)
  dataset = grain.MapDataset.range(first_step, num_steps).map(decode)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(1, prefetch)))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags; outside an absl app, the defaults.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                               per_worker_buffer_size=max(1, prefetch)))
  return iter(dataset)


def train_batches(mode: str, split: decoded_cache.DecodedSplit, sampler: samplers.PKSampler,
                  mesh: jax.sharding.Mesh, *, first_step: int, num_steps: int, source=None, size: int | None = None,
                  num_workers: int | None = None, prefetch: int = 2, process_index: int = 0,
                  process_count: int = 1, features: Sequence[str] = ()) -> TrainBatches:
  """The global training batches of steps `first_step .. num_steps - 1`, made the way `mode` says.

  Args:
    mode: "device", "host" or "stream" (`choose_cache` resolves "auto").
    split: the decoded training split (its pixels for device and host, its labels for all).
    sampler: gives the global batch of every step.
    mesh: the data mesh.
    first_step, num_steps: the steps to produce.
    source: the training split's records (`read_split`), for "stream".
    size: side of the decoded images, for "stream" (the others take the cache's).
    num_workers: decoding processes for "stream" (None: one per core; 0: a thread of this process).
    prefetch: batches made ahead of the step ("host", "stream").
    process_index, process_count: this process's block of every global batch.
    features: dataset features that every batch carries besides the labels (`batch_labels`).

  Returns:
    A `TrainBatches` (close it when done).
  """
  block = dict(process_index=process_index, process_count=process_count, features=tuple(features))
  if mode == "device":
    return DeviceBatches(split, sampler, mesh, first_step=first_step, num_steps=num_steps, **block)
  if mode == "host":
    local = host_local_batches(split, sampler, first_step=first_step, num_steps=num_steps, **block)
    return PrefetchedBatches(mode, local, mesh, prefetch)
  if mode == "stream":
    if source is None or size is None:
      raise ValueError("cache='stream' decodes the split's JPEGs: pass its source and the size to decode to.")
    workers = decoded_cache.default_num_workers() if num_workers is None else num_workers
    local = stream_local_batches(source, split.index, sampler, size=size, first_step=first_step,
                                 num_steps=num_steps, num_workers=workers, prefetch=prefetch, **block)
    return PrefetchedBatches(mode, local, mesh, prefetch, on_close=getattr(local, "close", None))
  raise ValueError(f"Unknown cache mode {mode!r}; use one of {CACHE_MODES[:3]}.")


def train_batches_from_config(config: ml_collections.ConfigDict, mode: str, split: decoded_cache.DecodedSplit,
                              sampler: samplers.PKSampler, mesh: jax.sharding.Mesh, *, first_step: int,
                              source=None, features: Sequence[str] = ()) -> TrainBatches:
  """`train_batches` with the config's sizes, workers and prefetch, for this process, up to the last step."""
  return train_batches(mode, split, sampler, mesh, first_step=first_step, num_steps=config.total_steps,
                       source=source, size=cache_size(config), num_workers=config.input.num_workers,
                       prefetch=config.input.prefetch, process_index=jax.process_index(),
                       process_count=jax.process_count(), features=features)


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


def box_features(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The dataset features that every batch (training and evaluation) needs for `config.input.crop_to_box`."""
  return BOX_FEATURES if config.input.crop_to_box else ()


def eval_batches(split: decoded_cache.DecodedSplit, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1, features: Sequence[str] = ()) -> Iterator[dict[str, np.ndarray]]:
  """A decoded split in record order, padded to full global batches, this process's block of each batch.

  Args:
    split: the decoded split.
    global_batch, process_index, process_count: the global batch and this process's block of it.
    features: dataset features to add to every batch (`feature_columns`; zeros on padding), e.g. `bbox` and
      `has_bbox` for evaluation on box crops (`box_features`).

  Yields:
    `{"image": [B_local, C, C, 3] uint8, "item_id", "category": [B_local] int32, "valid": [B_local] bool, ...}`
    with `valid` False on padding; the global batch b holds records `b * global_batch ...`, so after
    concatenation the first `len(split)` rows are the split in order. Full blocks are views of the memory map
    (no copy).
  """
  local = _process_block(global_batch, process_index, process_count)
  local_batch = local.stop - local.start
  columns = {"item_id": split.index.item_ids.astype(np.int32), "category": split.index.categories.astype(np.int32),
             **feature_columns(split.index, features)}
  num = len(split)
  for first in range(0, num, global_batch):
    start, stop = min(first + local.start, num), min(first + local.stop, num)
    batch = {"image": split.images[start:stop], **{key: value[start:stop] for key, value in columns.items()},
             "valid": np.ones(stop - start, bool)}
    if stop - start < local_batch:
      pad = local_batch - (stop - start)
      fill = {key: np.zeros((pad, *value.shape[1:]), value.dtype) for key, value in batch.items()}
      fill.update(item_id=np.full(pad, -1, np.int32), category=np.full(pad, -1, np.int32))
      batch = {key: np.concatenate([value, fill[key]]) for key, value in batch.items()}
    yield batch


def file_batches(paths: Sequence[str], *, size: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1, num_threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Image files in order, decoded as the cache decodes a split (`decode_pixels`), padded to full global batches.

  Yields:
    `{"image": [B_local, size, size, 3] uint8, "valid": [B_local] bool}`; `valid` is False on padding and on
    files that cannot be read as images (their image is zeros).
  """
  padding = {"image": np.zeros((size, size, 3), np.uint8), "valid": np.bool_(False)}

  def load(index: int) -> dict[str, np.ndarray]:
    try:
      with open(paths[index], "rb") as f:
        return {"image": decode_pixels(f.read(), size), "valid": np.bool_(True)}
    except (OSError, ValueError):
      return padding  # Reported by the caller, which sees valid == False.

  return padded_batches(len(paths), load, padding, global_batch=global_batch, process_index=process_index,
                        process_count=process_count, num_threads=num_threads)


def load_thumbnail(source, record_index: int, size: int) -> np.ndarray:
  """`[size, size, 3]` uint8 picture of a record, for retrieval pictures."""
  image = Image.open(io.BytesIO(source[int(record_index)]["image"])).convert("RGB")
  return np.asarray(image.resize((size, size), Image.BILINEAR))
