"""Decoded splits: every image of a split decoded once into a memory-mappable uint8 array beside the dataset.

  split = decoded_cache.open_split(builder, "train", size=256)   # decodes on first use, in worker processes
  split.images    # [N, 256, 256, 3] uint8, a read-only np.memmap in record order
  split.index     # SplitIndex: item_ids, categories, image_names and every other feature (e.g. bbox)

`open_split(builder, split)` without a size gives the labels only (for `config.input.cache="stream"`, which
decodes JPEGs while training): either way the start of a run no longer reads every record of the split.

On disk, under `<prepared dataset>/decoded/` (or `cache_dir/<dataset>/<config>/<version>/`):

  train-256px/     images.npy (uint8 [N, 256, 256, 3], NumPy .npy), labels.npz, meta.json
  train-labels/    labels.npz, meta.json

A folder is written under a temporary name (`<name>.tmp-<host>-<pid>`) and renamed when complete, so a build
that is killed leaves no folder that could be read (its temporary folder is deleted by the next build on the
same host). `meta.json` records what the folder was made from (dataset name and version, split, number of
records, size, and the name, length and modification time of every data file of the split); a folder whose
record differs is stale and rebuilt.

Images are decoded by `decode_pixels`: JPEG -> RGB -> resized to the square `size` (PIL bilinear), the same
function that decodes the catalogue's image files and the `stream` mode's batches, so every path gives the
same pixels. This module imports no JAX and no TFDS at load time: its worker processes start from it.
"""

from collections.abc import Callable, Mapping
import dataclasses
import io
import json
import os
import pickle
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
from PIL import Image
from tqdm import auto as tqdm

FORMAT_VERSION = 1  # Bump when the files' layout or decode_pixels changes: every existing folder goes stale.
_IMAGES = "images.npy"
_LABELS = "labels.npz"
_META = "meta.json"
_DEFAULT_CHUNK = 256  # Records per task of a worker process.


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
                     f"{MAX_IMAGE_PIXELS:,} (decoded_cache.MAX_IMAGE_PIXELS); it is not decoded, to keep "
                     "memory safe")
  return image

def decode_pixels(jpeg: bytes, size: int) -> np.ndarray:
  """An encoded image as `[size, size, 3]` uint8 RGB (resized with PIL's bilinear filter unless it has that size).

  Raises:
    ValueError: the bytes are not an image PIL can read, or it declares more than `MAX_IMAGE_PIXELS` pixels.
  """
  image = open_image(jpeg)
  try:
    # Let libjpeg decode at a reduced scale when the image is much larger than needed (DCT scaling).
    image.draft("RGB", (size, size))
    image = image.convert("RGB")
  except (OSError, ValueError) as e:
    raise ValueError(f"Could not decode an image: {e}") from e
  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image, np.uint8)


@dataclasses.dataclass(frozen=True)
class SplitIndex:
  """Labels of every record of a split, so that sampling and evaluation never touch images.

  Attributes:
    item_ids: `[N]` int64 product ids, by record index.
    categories: `[N]` int32 category labels, by record index.
    image_names: `[N]` names of the images (for pictures and the index).
    features: every feature of the records but the image, by its TFDS name (`item_id`, `category`,
      `image_name`, and e.g. `bbox` `[N, 4]` where the dataset has it).
  """
  item_ids: np.ndarray
  categories: np.ndarray
  image_names: np.ndarray
  features: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def __len__(self):
    return len(self.item_ids)


def index_from_labels(labels: Mapping[str, np.ndarray]) -> SplitIndex:
  """A SplitIndex from the stacked features of a split (`item_id`, `category`, `image_name`, ...)."""
  features = dict(labels)
  return SplitIndex(np.asarray(features["item_id"], np.int64), np.asarray(features["category"], np.int32),
                    np.asarray(features["image_name"]).astype(str), features)


def stack_labels(records) -> dict[str, np.ndarray]:
  """Every feature but the image of a list of records, stacked (`image_name` bytes as str).

  Features whose shape varies between records (e.g. DeepFashion2's `landmarks`, `[n, 3]` with n by category)
  cannot be one array and are left out.
  """
  labels = {}
  for key in records[0]:
    if key == "image":
      continue
    values = [record[key] for record in records]
    if key == "image_name":
      values = [v.decode() if isinstance(v, bytes) else str(v) for v in values]
    if len({np.shape(v) for v in values}) > 1:
      continue
    labels[key] = np.asarray(values)
  return labels


def concatenate_labels(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """`stack_labels` of consecutive chunks of a split, joined; a feature left out of a chunk, or of another
  shape in another chunk (a varying shape that happened to agree within a chunk), is left out of the split."""
  if not chunks:
    return {}
  keys = [key for key in chunks[0]
          if all(key in chunk and chunk[key].shape[1:] == chunks[0][key].shape[1:] for chunk in chunks)]
  return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in keys}


@dataclasses.dataclass(frozen=True)
class DecodedSplit:
  """A split's labels and, when decoded at a size, its pixels.

  Attributes:
    path: the folder it was read from.
    index: the labels of every record.
    images: `[N, S, S, 3]` uint8 read-only memory map in record order, or None (labels only).
  """
  path: str
  index: SplitIndex
  images: np.ndarray | None

  def __len__(self):
    return len(self.index)

  @property
  def size(self) -> int | None:
    return None if self.images is None else self.images.shape[1]


def cache_root(builder, cache_dir: str | None = None) -> str:
  """Where the decoded splits of a prepared TFDS dataset live: beside it, or under `cache_dir`."""
  if cache_dir:
    return os.path.join(os.path.expanduser(cache_dir), builder.info.full_name)
  return os.path.join(os.fspath(builder.data_dir), "decoded")


def folder_name(split: str, size: int | None) -> str:
  return f"{split}-labels" if size is None else f"{split}-{size}px"


def split_files(builder, split: str) -> list[str]:
  """The data files of a split (TFDS names them `<name>-<split>.<format>-XXXXX-of-YYYYY`)."""
  prefix = f"{builder.info.name}-{split}."
  data_dir = os.fspath(builder.data_dir)
  return sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.startswith(prefix))


def expected_meta(builder, split: str, size: int | None) -> dict:
  """What a decoded split must have been made from to be current (compared with its `meta.json`)."""
  files = []
  for path in split_files(builder, split):
    stat = os.stat(path)
    files.append([os.path.basename(path), stat.st_size, stat.st_mtime_ns])
  return {"format": FORMAT_VERSION, "dataset": builder.info.full_name, "split": split,
          "num_records": int(builder.info.splits[split].num_examples), "size": size, "files": files}


def _read(path: str, meta: dict) -> DecodedSplit | str:
  """The decoded split in `path` if it is complete and current, else why not (a sentence)."""
  try:
    with open(os.path.join(path, _META)) as f:
      stored = json.load(f)
  except FileNotFoundError:
    return "absent"
  except (OSError, ValueError) as e:
    return f"unreadable meta.json ({e})"
  if stored != meta:
    changed = sorted(k for k in meta if stored.get(k) != meta[k])
    return f"stale (changed: {', '.join(changed)})"
  num, size = meta["num_records"], meta["size"]
  try:
    with np.load(os.path.join(path, _LABELS), allow_pickle=False) as data:
      labels = {key: data[key] for key in data.files}
    images = None
    if size is not None:
      images = np.load(os.path.join(path, _IMAGES), mmap_mode="r", allow_pickle=False)
  except (OSError, ValueError, KeyError) as e:
    return f"unreadable ({e})"
  if any(len(v) != num for v in labels.values()) or {"item_id", "category", "image_name"} - set(labels):
    return "labels do not match the split"
  if images is not None and (images.shape != (num, size, size, 3) or images.dtype != np.uint8):
    return f"images have shape {images.shape}, not {(num, size, size, 3)}"
  return DecodedSplit(path, index_from_labels(labels), images)


def open_split(builder, split: str, size: int | None = None, *, cache_dir: str | None = None,
               num_workers: int | None = None, chunk_size: int = _DEFAULT_CHUNK,
               progress: bool = True) -> DecodedSplit:
  """A split of a prepared dataset decoded at `size` (labels only when None), built on first use.

  Args:
    builder: a prepared TFDS builder (ArrayRecord files).
    split: "train", "query", "gallery", ...
    size: side of the decoded square images, or None for the labels only.
    cache_dir: a folder for decoded splits; None: `decoded/` beside the prepared dataset.
    num_workers: processes decoding when it must be built (None: one per CPU core; 0 or 1: this process).
    chunk_size: records per worker task.
    progress: show a progress bar with images/s while building.

  Returns:
    The decoded split.

  Raises:
    ValueError: an image of the split cannot be decoded (nothing is left behind).
    PermissionError: the cache folder cannot be written; the message says how to put it elsewhere.
  """
  path = os.path.join(cache_root(builder, cache_dir), folder_name(split, size))
  meta = expected_meta(builder, split, size)
  found = _read(path, meta)
  if isinstance(found, DecodedSplit):
    return found
  if found != "absent":
    print(f"Decoded cache {path} is {found}; rebuilding it.", flush=True)
  _build(builder, split, size, path, meta, num_workers=num_workers, chunk_size=chunk_size, progress=progress)
  found = _read(path, meta)
  if not isinstance(found, DecodedSplit):
    raise RuntimeError(f"The decoded cache {path} just built does not read back: {found}.")
  return found


# Worker processes: each reads its chunks of records from the data source itself (parsing a record costs about
# as much as decoding its image, so the parent would be the bottleneck) and writes the pixels into the shared
# output file. They are `python -m jaxret.decoded_cache` fed over pipes rather than a multiprocessing pool:
# a pool's workers import the parent's main module (`jaxret.train` and all of JAX, seconds each), these import
# only NumPy, PIL and TFDS.
_worker_source = None
_worker_images = None


def _start_worker(source, images_path: str | None) -> None:
  global _worker_source, _worker_images
  _worker_source = source
  _worker_images = None if images_path is None else np.load(images_path, mmap_mode="r+")


def _decode_chunk(start: int, stop: int) -> tuple[int, dict[str, np.ndarray]]:
  """Decodes records `start .. stop - 1` into the output file; returns their labels."""
  records = _worker_source.__getitems__(list(range(start, stop)))
  if _worker_images is not None:
    size = _worker_images.shape[1]
    for offset, record in enumerate(records):
      try:
        _worker_images[start + offset] = decode_pixels(record["image"], size)
      except ValueError as e:
        name = record.get("image_name", b"?")
        name = name.decode() if isinstance(name, bytes) else name
        raise ValueError(f"Record {start + offset} ({name}) of the split: {e}") from None
    _worker_images.flush()
  return start, stack_labels(records)


def default_num_workers() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _worker_main() -> None:
  """A worker process: `(source, images path)`, then `(start, stop)` chunks on stdin; results on stdout."""
  channel_in, channel_out = sys.stdin.buffer, sys.stdout.buffer
  sys.stdout = sys.stderr  # Stray prints must not corrupt the channel.
  _start_worker(*pickle.load(channel_in))
  while True:
    try:
      task = pickle.load(channel_in)
    except EOFError:  # The parent is done (or gone).
      return
    try:
      result = ("ok", _decode_chunk(*task))
    except Exception as e:  # pylint: disable=broad-except  # Raised again in the parent, with its message.
      result = ("error", f"{type(e).__name__}: {e}")
    pickle.dump(result, channel_out)
    channel_out.flush()


def _decode_in_workers(num_workers: int, source, images_path: str | None, chunks: list[tuple[int, int]],
                       done: Callable[[int, dict[str, np.ndarray]], None]) -> None:
  """Runs `_decode_chunk` on every chunk in `num_workers` worker processes; `done(stop - start, labels)`."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
  processes = [subprocess.Popen([sys.executable, "-m", "jaxret.decoded_cache"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, env=env) for _ in range(num_workers)]
  tasks = queue.Queue()
  for chunk in chunks:
    tasks.put(chunk)
  results = queue.Queue()

  def feed(process) -> None:
    try:
      pickle.dump((source, images_path), process.stdin)
      process.stdin.flush()
      while True:
        try:
          start, stop = tasks.get_nowait()
        except queue.Empty:
          return
        pickle.dump((start, stop), process.stdin)
        process.stdin.flush()
        status, value = pickle.load(process.stdout)
        results.put((status, stop - start, value))
        if status != "ok":
          return
    except (EOFError, OSError, pickle.UnpicklingError) as e:
      results.put(("error", 0, f"a decoding worker process died ({type(e).__name__}: {e})"))

  threads = [threading.Thread(target=feed, args=(p,), daemon=True) for p in processes]
  for thread in threads:
    thread.start()
  try:
    finished = 0
    while finished < len(chunks):
      status, count, value = results.get()
      if status != "ok":
        raise ValueError(f"Decoding failed: {value}")
      done(count, value)
      finished += 1
  finally:
    for process in processes:
      process.stdin.close()
    for process in processes:
      try:
        process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _remove_orphans(path: str) -> None:
  """Deletes temporary folders of `path` left by killed builds of this host (their process is gone)."""
  parent, name = os.path.split(path)
  host = socket.gethostname()
  for entry in os.listdir(parent):
    if not entry.startswith((f"{name}.tmp-{host}-", f"{name}.stale-{host}-")):
      continue
    pid = entry.rsplit("-", 1)[-1]
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    except (ValueError, PermissionError):
      pass  # Not our naming, or a live process of another user.


def _fsync(path: str) -> None:
  with open(path, "rb") as f:
    os.fsync(f.fileno())


def _build(builder, split: str, size: int | None, path: str, meta: dict, *, num_workers: int | None,
           chunk_size: int, progress: bool) -> None:
  """Decodes a split into a temporary folder beside `path` and renames it to `path` when complete."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # Not at load: workers import us.

  num_records = meta["num_records"]
  if num_records < 1:
    raise ValueError(f"Split {split!r} of {meta['dataset']} has no records.")
  parent = os.path.dirname(path)
  try:
    os.makedirs(parent, exist_ok=True)
    _remove_orphans(path)
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  except PermissionError as e:
    raise PermissionError(f"Cannot write the decoded cache under {parent}: {e}. Set config.input.cache_dir "
                          "(or cache_dir=) to a writable folder.") from e
  try:
    images_path = None
    if size is not None:
      images_path = os.path.join(tmp, _IMAGES)
      np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(num_records, size, size, 3)).flush()
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    chunks = [(start, min(start + chunk_size, num_records)) for start in range(0, num_records, chunk_size)]
    workers = min(default_num_workers() if num_workers is None else num_workers, len(chunks))
    what = "labels" if size is None else f"{size}x{size} pixels"
    bar = tqdm.tqdm(total=num_records, desc=f"decoding {split} to {what}", unit="img", disable=not progress,
                    dynamic_ncols=True)
    labels_by_start = {}

    def done(count: int, result: tuple[int, dict[str, np.ndarray]]) -> None:
      labels_by_start[result[0]] = result[1]
      bar.update(count)

    start_time = time.perf_counter()
    if workers <= 1:
      _start_worker(source, images_path)
      try:
        for start, stop in chunks:
          done(stop - start, _decode_chunk(start, stop))
      finally:
        _start_worker(None, None)
    else:
      _decode_in_workers(workers, source, images_path, chunks, done)
    bar.close()
    labels = concatenate_labels([labels_by_start[s] for s in sorted(labels_by_start)])
    np.savez(os.path.join(tmp, _LABELS), **labels)
    with open(os.path.join(tmp, _META), "w") as f:
      json.dump(meta, f, indent=1)
    for name in os.listdir(tmp):
      _fsync(os.path.join(tmp, name))
    _publish(tmp, path, meta)
    if progress:
      elapsed = time.perf_counter() - start_time
      print(f"Decoded {meta['dataset']} {split} ({num_records:,} images, {what}) into {path} in {elapsed:.1f} s "
            f"({num_records / max(elapsed, 1e-9):,.0f} images/s).", flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: str, path: str, meta: dict) -> None:
  """Renames the complete folder `tmp` to `path`, replacing a stale one; keeps a current one made meanwhile."""
  if os.path.exists(path):
    if isinstance(_read(path, meta), DecodedSplit):
      return  # Another process finished the same build first.
    stale = f"{path}.stale-{socket.gethostname()}-{os.getpid()}"
    os.rename(path, stale)
    shutil.rmtree(stale, ignore_errors=True)
  try:
    os.rename(tmp, path)
  except OSError:
    if not isinstance(_read(path, meta), DecodedSplit):  # Lost a race to another builder: theirs is as good.
      raise


if __name__ == "__main__":
  _worker_main()
