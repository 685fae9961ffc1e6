"""Catalogue search: product images embedded by a trained checkpoint, indexed in Milvus, searched by photo.

`Catalog` is the Python API under `python -m jaxret.index` and `python -m jaxret.search`:

  with Catalog("/tmp/jaxret_demo", uri="catalog.db") as catalog:
    catalog.add_split("gallery")  # or catalog.add_images("shop_photos/")
    for hit in catalog.search("photo.jpg", k=5):
      print(hit.rank, hit.distance, hit.item_id, hit.category_name, hit.image)

The same code serves a laptop and a cluster through `pymilvus.MilvusClient(uri)`: a local path ending in
`.db` is a Milvus Lite database (a folder, one process at a time), `http://host:19530` a Milvus server.

One collection holds the embeddings of one model. Its properties record the vector dimension, the metric and
a fingerprint of the model (its config and weights); a checkpoint with another fingerprint is refused, since
distances between embeddings of two models mean nothing. Rows are keyed by a 63-bit hash of where the image
comes from (dataset split and image name, or file path), so indexing the same images again replaces them.
"""

from collections.abc import Iterable, Iterator, Sequence
import collections
import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import re
import threading

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
from tqdm import auto as tqdm

from data_prep import inshop_features
from jaxret import input_pipeline
from jaxret import train

DEFAULT_URI = "catalog.db"
DEFAULT_COLLECTION = "jaxret_catalog"
# Milvus metric for each `config.evals.metric`; both rank like `metrics.retrieval_distances`.
METRIC_TYPES = {"euclidean": "L2", "cosine": "COSINE"}
# Build parameters of the vector indexes offered; FLAT is exact, the others approximate (see docs/search.md).
INDEX_BUILD_PARAMS = {
    "FLAT": {},
    "HNSW": {"M": 16, "efConstruction": 200},
    "IVF_FLAT": {"nlist": 1024},
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FILE_SOURCE = "file"  # The `source` of rows indexed from image files (the others name a dataset split).
UNKNOWN = -1  # item_id / category of an image whose product or category is not known.
_MAX_IMAGE_CHARS = 4096
_PROPERTY_PREFIX = "jaxret."
_UPSERT_ROWS = 1000
# Queries per search request: Milvus Lite's exact search builds a [queries, rows, dim] float32 difference
# array, so a request is kept to about this many floats.
_SEARCH_FLOATS = 1 << 25


class CatalogError(ValueError):
  """A problem the user can fix (no checkpoint, no collection, another model's collection); says how."""


@dataclasses.dataclass(frozen=True)
class Hit:
  """One search result.

  Attributes:
    rank: 1 for the nearest image.
    distance: squared Euclidean distance (metric "euclidean", as Milvus reports L2) or 1 - cosine similarity
      (metric "cosine"); smaller is closer, as in `metrics.retrieval_distances`.
    id: the row's primary key (`image_key_id(source, image)`).
    item_id: the product, or -1 when unknown.
    category: the category label (an index into `CATEGORY_NAMES`), or -1 when unknown.
    image: the image's name in its dataset, or its file path.
    source: "DATASET:SPLIT" for dataset images, "file" for image files.
  """
  rank: int
  distance: float
  id: int
  item_id: int
  category: int
  image: str
  source: str

  @property
  def category_name(self) -> str:
    return category_name(self.category)


def category_name(category: int) -> str:
  """The In-shop `GENDER/Category` name of a category label, "-" when unknown."""
  names = inshop_features.CATEGORY_NAMES
  return names[category] if 0 <= category < len(names) else "-"


def image_key_id(source: str, image: str) -> int:
  """The primary key of an image: the first 63 bits of SHA-256 of `source` and `image` (Milvus INT64 > 0).

  Stable across runs and machines, so re-indexing an image replaces its row. Two of N images collide with
  probability about N^2 / 2^64 (1e-5 at N = 10 million).
  """
  digest = hashlib.sha256(f"{source}\n{image}".encode()).digest()
  return int.from_bytes(digest[:8], "big") >> 1


def labels_from_path(path: str) -> tuple[int, int]:
  """`(item_id, category)` read from an In-shop-like path `.../GENDER/Category/id_00000123/photo.jpg`.

  The parent folder gives the product when it is a number or `id_` and a number (one folder per product);
  the two folders above it give the category when they name an In-shop category. Unknown parts are -1.
  """
  parts = pathlib.PurePath(path).parts
  item_id, category = UNKNOWN, UNKNOWN
  if len(parts) >= 2:
    match = re.fullmatch(r"(?:id_)?(\d{1,18})", parts[-2])
    if match:
      item_id = int(match.group(1))
  if len(parts) >= 4:
    name = f"{parts[-4]}/{parts[-3]}"
    if name in inshop_features.CATEGORY_NAMES:
      category = inshop_features.CATEGORY_NAMES.index(name)
  return item_id, category


def list_images(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
  """Absolute paths of the image files in a folder (recursively, sorted) or in a list of files and folders."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  found = []
  for path in paths:
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
      for folder, subfolders, files in os.walk(path):
        subfolders.sort()
        found.extend(os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.isfile(path):
      found.append(path)
    else:
      raise CatalogError(f"No such image file or folder: {path}")
  return list(dict.fromkeys(found))  # Each file once, in order.


def file_batches(paths: Sequence[str], *, image_size: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1, num_threads: int = 4) -> Iterator[dict[str, np.ndarray]]:
  """Image files in order, padded to full global batches, as `input_pipeline.eval_batches` does for a split.

  Yields:
    `{"image": [B_local, S, S, 3] float32, "valid": [B_local] bool}`; `valid` is False on padding and on
    files that cannot be read as images (their image is zeros).
  """
  padding = {"image": np.zeros((image_size, image_size, 3), np.float32), "valid": np.bool_(False)}

  def load(index: int) -> dict[str, np.ndarray]:
    try:
      with open(paths[index], "rb") as f:
        return {"image": input_pipeline.decode_image(f.read(), image_size), "valid": np.bool_(True)}
    except (OSError, ValueError):
      return padding  # Reported by the caller, which sees valid == False.

  return input_pipeline.padded_batches(len(paths), load, padding, global_batch=global_batch,
                                       process_index=process_index, process_count=process_count,
                                       num_threads=num_threads)


def load_image(image) -> np.ndarray:
  """A photo as `[H, W, 3]` uint8: a file path, encoded bytes, a PIL image or an array."""
  if isinstance(image, (str, os.PathLike, bytes)):
    where = f" {os.fspath(image)}" if isinstance(image, (str, os.PathLike)) else ""
    try:
      return np.asarray(Image.open(io.BytesIO(_encoded(image))).convert("RGB"))
    except OSError as e:
      raise CatalogError(f"Could not decode the image{where}: {e}") from None
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"))
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
    raise CatalogError(f"Expected an [H, W, 3] uint8 image, got {array.dtype} {array.shape}.")
  return array


def _encoded(image) -> bytes:
  """The encoded bytes of a photo given as a file path or bytes; other forms are encoded as PNG (lossless)."""
  if isinstance(image, (str, os.PathLike)):
    path = os.path.expanduser(os.fspath(image))
    try:
      with open(path, "rb") as f:
        return f.read()
    except OSError as e:
      raise CatalogError(f"Could not read the image file {path}: {e}") from None
  if isinstance(image, bytes):
    return image
  encoded = io.BytesIO()
  Image.fromarray(load_image(image)).save(encoded, format="PNG")
  return encoded.getvalue()


def preprocess(image, image_size: int) -> np.ndarray:
  """A photo (see `load_image`) as the evaluation input `[S, S, 3]` float32.

  Files and bytes go to `input_pipeline.decode_image` as they are, so a catalogue image given as a file
  gets exactly the embedding it got when its dataset split was indexed.
  """
  try:
    return input_pipeline.decode_image(_encoded(image), image_size)
  except ValueError as e:
    where = f" {os.fspath(image)}" if isinstance(image, (str, os.PathLike)) else ""
    raise CatalogError(f"Could not decode the image{where}: {e}") from None


def _variables_fingerprint(config: ml_collections.ConfigDict, variables) -> str:
  """16 hex digits of SHA-256 over the model config, the input size, the metric and every weight."""
  digest = hashlib.sha256()
  digest.update(config.model.to_json(sort_keys=True).encode())
  digest.update(f"{config.input.image_size} {config.evals.metric}".encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    value = train.host_array(leaf)
    digest.update(f"{jax.tree_util.keystr(path)} {value.dtype} {value.shape}".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()[:16]


class Embedder:
  """The latest checkpoint of a training run as images -> embeddings, jitted over a Mesh of all devices.

  Attributes:
    workdir: the run's folder (absolute).
    config: its training config (`config.json`).
    step: the restored checkpoint's step.
    dim: embedding size D.
    fingerprint: identifies the model config, input size, metric and weights (see `_variables_fingerprint`).
  """

  def __init__(self, workdir: str):
    workdir = os.path.abspath(os.path.expanduser(workdir))
    config_path = os.path.join(workdir, "config.json")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    train_first = ("Train a model first, e.g.\n  python -m jaxret.train --config configs/demo.py "
                   f"--workdir {workdir}")
    if not os.path.isfile(config_path):
      raise CatalogError(f"{workdir} is not a training run (no config.json). {train_first}")
    if not os.path.isdir(checkpoint_dir):
      raise CatalogError(f"{workdir} has no checkpoints/ folder. {train_first}")
    with open(config_path) as f:
      self.config = ml_collections.ConfigDict(json.load(f))
    manager = ocp.CheckpointManager(checkpoint_dir, options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step()
    if step is None:
      raise CatalogError(f"{checkpoint_dir} holds no finished checkpoint. {train_first}")
    self.workdir = workdir
    self.step = int(step)
    self.metric = self.config.evals.metric
    if self.metric not in METRIC_TYPES:
      raise CatalogError(f"config.evals.metric={self.metric!r} in {config_path}; use one of "
                         f"{list(METRIC_TYPES)}.")
    self.model = train.model_from_config(self.config)
    size = self.config.input.image_size

    self.mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    self.data_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def init():
      key = jax.random.key(0)
      variables = self.model.init({"params": key, "dropout": key}, jnp.zeros((1, size, size, 3)),
                                  train=False)
      return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

    # Only params and batch_stats are read (partial restore): the optimizer state is not needed to embed.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                            jax.eval_shape(init))
    try:
      variables = manager.restore(self.step, args=ocp.args.PyTreeRestore(
          item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
          partial_restore=True))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CatalogError(f"Could not restore the checkpoint of step {self.step} in {checkpoint_dir} into "
                         f"the model of its config.json ({self.config.model.name}): {e}") from e
    self.state = train.TrainState(step=np.int32(self.step), params=variables["params"],
                                  batch_stats=variables["batch_stats"], opt_state=None)
    self.fingerprint = _variables_fingerprint(self.config, variables)
    self._embed = jax.jit(functools.partial(train.embed_step, model=self.model),
                          in_shardings=(replicated, self.data_sharding), out_shardings=self.data_sharding)
    sample = jax.ShapeDtypeStruct((self.num_devices, size, size, 3), np.float32)
    self.dim = int(jax.eval_shape(self._embed, self.state, sample).shape[1])

  @property
  def num_devices(self) -> int:
    return self.mesh.devices.size

  @property
  def batch_size(self) -> int:
    """Images per embedding step: `config.evals.batch_size` (as in evaluation), a multiple of the devices."""
    return -(-self.config.evals.batch_size // self.num_devices) * self.num_devices

  def embed_batches(self, batches: Iterable[dict[str, np.ndarray]], total: int, desc: str) -> np.ndarray:
    """`[total, D]` embeddings of process-local batches of a global stream (`eval_batches` order)."""
    outputs = []
    progress = tqdm.tqdm(batches, total=-(-total // self.batch_size), desc=desc, unit="batch", leave=False,
                         disable=jax.process_index() != 0 or total == 0)
    for batch in progress:
      images = jax.make_array_from_process_local_data(self.data_sharding, batch["image"])
      outputs.append(self._embed(self.state, images))
    if not outputs:
      return np.zeros((0, self.dim), np.float32)
    return np.concatenate([train.host_array(x) for x in outputs])[:total]

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    """`[N, S, S, 3]` preprocessed images to `[N, D]` float32 embeddings.

    Small N is padded to a power of two times the device count (a few compiled shapes, little wasted work).
    """
    images = np.asarray(images, np.float32)
    outputs = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      padded = self.num_devices
      while padded < len(chunk):
        padded *= 2
      padded = min(padded, self.batch_size)
      padded_chunk = np.concatenate([chunk, np.zeros((padded - len(chunk), *chunk.shape[1:]), np.float32)])
      embeddings = self._embed(self.state, jax.device_put(padded_chunk, self.data_sharding))
      outputs.append(train.host_array(embeddings)[:len(chunk)])
    if not outputs:
      return np.zeros((0, self.dim), np.float32)
    return np.concatenate(outputs)

  def embed_split(self, split: str, data_dir: str | None = None):
    """Embeds a split of the run's dataset, as the trainer's evaluation does.

    Returns:
      `(embeddings [N, D], SplitIndex, source)`, in record order.
    """
    builder = input_pipeline.get_builder(self.config.input.dataset, data_dir or self.config.data_dir)
    if split not in builder.info.splits:
      raise CatalogError(f"Dataset {self.config.input.dataset} has no split {split!r}; use one of "
                         f"{sorted(builder.info.splits)}.")
    source = input_pipeline.read_split(builder, split)
    index = input_pipeline.index_split(source, f"indexing {split}")
    batches = input_pipeline.eval_batches(
        source, index, image_size=self.config.input.image_size, global_batch=self.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
        num_threads=self.config.input.num_threads)
    return self.embed_batches(batches, len(index), f"embedding {split}"), index, source

  def embed_files(self, paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """`([N, D] embeddings, [N] bool readable)` of image files; unreadable files get a zero row."""
    batches = file_batches(paths, image_size=self.config.input.image_size, global_batch=self.batch_size,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           num_threads=self.config.input.num_threads)
    valid = []

    def keep_valid(stream):
      for batch in stream:
        valid.append(batch["valid"])
        yield batch

    embeddings = self.embed_batches(keep_valid(batches), len(paths), "embedding images")
    if jax.process_count() > 1:
      valid = [multihost_utils.process_allgather(v, tiled=True) for v in valid]
    readable = np.concatenate(valid)[:len(paths)] if valid else np.zeros((0,), bool)
    return embeddings, readable


# Milvus Lite keeps one in-process server per database folder, holding the folder's lock, until it is
# released; Catalogs on the same folder share it, and the last one to close releases it.
_LITE_USERS = collections.Counter()
_LITE_LOCK = threading.Lock()


def _is_lite(uri: str) -> bool:
  return uri.endswith(".db")


def _lite_folder_locked(path: str) -> bool:
  """Whether another process holds Milvus Lite's lock on the database folder `path`."""
  import fcntl  # pylint: disable=g-import-not-at-top  (Unix only; Milvus Lite's lock is a flock there)
  lock_path = os.path.join(path, "LOCK")
  if not os.path.exists(lock_path):
    return False
  fd = os.open(lock_path, os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
  except OSError:
    return True
  finally:
    os.close(fd)


def connect(uri: str, *, create: bool):
  """A `pymilvus.MilvusClient` for `uri` (a Milvus Lite `.db` path or a server URL), with clear errors."""
  from pymilvus import MilvusClient  # pylint: disable=g-import-not-at-top  (slow import, only when needed)
  from pymilvus import exceptions as milvus_exceptions  # pylint: disable=g-import-not-at-top
  locked = CatalogError(f"Another process has the Milvus Lite database {uri} open (Milvus Lite allows one "
                        "process at a time). Stop it and retry, or serve the catalogue from a Milvus server "
                        "(--uri http://host:19530).")
  if _is_lite(uri):
    uri = os.path.abspath(os.path.expanduser(uri))
    if not os.path.exists(uri):
      if not create:
        raise CatalogError(f"No catalogue at {uri}. Index one first, e.g.\n"
                           f"  python -m jaxret.index --workdir RUN --uri {uri}")
      os.makedirs(os.path.dirname(uri), exist_ok=True)
    elif not _LITE_USERS[uri] and _lite_folder_locked(uri):  # (Our own open database holds the lock too.)
      raise locked
  try:
    client = MilvusClient(uri)
  except milvus_exceptions.MilvusException as e:
    if _is_lite(uri) and _lite_folder_locked(uri):
      raise locked from None
    raise CatalogError(f"Could not connect to Milvus at {uri}: {e}") from None
  if _is_lite(uri):
    with _LITE_LOCK:
      _LITE_USERS[uri] += 1
  return client, uri


def disconnect(client, uri: str) -> None:
  """Closes a client from `connect`; the last one on a Milvus Lite folder releases its server and lock."""
  client.close()
  if _is_lite(uri):
    with _LITE_LOCK:
      _LITE_USERS[uri] -= 1
      last = _LITE_USERS[uri] <= 0
      if last:
        del _LITE_USERS[uri]
    if last:
      from milvus_lite.server_manager import server_manager_instance  # pylint: disable=g-import-not-at-top
      server_manager_instance.release_server(uri)


class Catalog:
  """A Milvus collection of catalogue images embedded by the latest checkpoint of a run; search it by photo.

  Args:
    workdir: the training run (its `config.json` and latest checkpoint make the embeddings).
    uri: a Milvus Lite database path ending in `.db` (made on first use) or a server URL.
    collection: the collection's name; one collection holds one model's embeddings.
    index_type: "FLAT" (exact), "HNSW" or "IVF_FLAT" for a new collection; None: FLAT, or whatever an
      existing collection has. Naming another index than an existing collection's is an error.
    index_params: build parameters overriding `INDEX_BUILD_PARAMS[index_type]`.
    search_params: Milvus search parameters (e.g. `{"ef": 128}` for HNSW, `{"nprobe": 64}` for IVF_FLAT);
      None uses `default_search_params`.
    overwrite: drop an existing collection of this name first.
    create: whether a missing Milvus Lite database and collection may be made (on the first upsert); when
      False (as for searching) a missing one is an error.
    data_dir: TFDS data dir of the run's dataset; None: `config.data_dir`, else `$TFDS_DATA_DIR`.
    embedder: an `Embedder` of `workdir` already loaded (to share one between catalogs).

  Raises:
    CatalogError: no checkpoint in `workdir`; the collection was made by another model, with another
      dimension or metric; or (with `create=False`) no database or collection.
  """

  def __init__(self, workdir: str, uri: str = DEFAULT_URI, collection: str = DEFAULT_COLLECTION, *,
               index_type: str | None = None, index_params: dict | None = None,
               search_params: dict | None = None, overwrite: bool = False, create: bool = True,
               data_dir: str | None = None, embedder: Embedder | None = None):
    if index_type is not None and index_type not in INDEX_BUILD_PARAMS:
      raise CatalogError(f"Unknown index type {index_type!r}; use one of {list(INDEX_BUILD_PARAMS)}.")
    self.embedder = embedder or Embedder(workdir)
    self.collection = collection
    self.data_dir = data_dir
    self._requested_index = index_type
    self._index_params = index_params
    self._search_params = search_params
    self._index_type = None  # Cached: describing the index is a round trip (and slow on Milvus Lite).
    self._sources = {}
    self.client, self.uri = connect(uri, create=create)
    try:
      if overwrite and self.client.has_collection(collection):
        self.client.drop_collection(collection)
      if self.exists():
        self._check_compatible()
        self.client.load_collection(collection)  # Searches and queries need it loaded (a no-op if it is).
      elif not create:
        self._require_collection()
    except BaseException:
      self.close()
      raise

  # Context manager and lifetime.
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    """Releases the connection (and Milvus Lite's lock on the database folder)."""
    if self.client is not None:
      disconnect(self.client, self.uri)
      self.client = None

  # The collection and its metadata.
  def exists(self) -> bool:
    return self.client.has_collection(self.collection)

  @property
  def metric_type(self) -> str:
    return METRIC_TYPES[self.embedder.metric]

  def metadata(self) -> dict[str, str]:
    """What the collection records about the model that made its vectors (Milvus collection properties)."""
    e = self.embedder
    return {"dim": str(e.dim), "metric": e.metric, "fingerprint": e.fingerprint, "model": e.config.model.name,
            "step": str(e.step), "workdir": e.workdir, "dataset": e.config.input.dataset,
            "image_size": str(e.config.input.image_size)}

  def stored_metadata(self) -> dict[str, str]:
    """The metadata recorded in the existing collection (empty when it was not made by jaxret)."""
    properties = self.client.describe_collection(self.collection).get("properties", {})
    return {k[len(_PROPERTY_PREFIX):]: v for k, v in properties.items() if k.startswith(_PROPERTY_PREFIX)}

  def index_type(self) -> str:
    """The vector index of the existing collection ("FLAT", "HNSW", ...)."""
    if self._index_type is None:
      self._index_type = self.client.describe_index(self.collection, "vector")["index_type"]
    return self._index_type

  def _check_compatible(self) -> None:
    stored = self.stored_metadata()
    where = f"Collection {self.collection!r} in {self.uri}"
    fix = ("Index into another collection (--collection NAME), or replace this one (python -m jaxret.index "
           "--overwrite).")
    if "fingerprint" not in stored:
      raise CatalogError(f"{where} was not made by jaxret.index (it records no model). {fix}")
    ours = self.metadata()
    made_by = (f"model {stored.get('model')} at step {stored.get('step')} of {stored.get('workdir')} "
               f"(fingerprint {stored['fingerprint']})")
    if stored.get("dim") != ours["dim"]:
      raise CatalogError(f"{where} holds {stored.get('dim')}-dimensional vectors made by {made_by}, but the "
                         f"checkpoint of {self.embedder.workdir} makes {ours['dim']}-dimensional ones. {fix}")
    if stored.get("metric") != ours["metric"]:
      raise CatalogError(f"{where} ranks by the {stored.get('metric')} metric, but the run in "
                         f"{self.embedder.workdir} is evaluated with {ours['metric']}. {fix}")
    if stored["fingerprint"] != ours["fingerprint"]:
      raise CatalogError(f"{where} holds vectors made by {made_by}, not by the model at step {ours['step']} "
                         f"of {ours['workdir']} (fingerprint {ours['fingerprint']}); distances between two "
                         f"models' embeddings mean nothing. {fix}")
    if self._requested_index is not None and self.index_type() != self._requested_index:
      raise CatalogError(f"{where} has a {self.index_type()} index, not {self._requested_index}. Rebuild it "
                         "with --overwrite, or index into another collection (--collection NAME).")

  def _create(self) -> None:
    from pymilvus import DataType, MilvusClient  # pylint: disable=g-import-not-at-top
    index_type = self._requested_index or "FLAT"
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.embedder.dim)
    schema.add_field("item_id", DataType.INT64)
    schema.add_field("category", DataType.INT32)
    schema.add_field("image", DataType.VARCHAR, max_length=_MAX_IMAGE_CHARS)
    schema.add_field("source", DataType.VARCHAR, max_length=512)
    index_params = self.client.prepare_index_params()
    index_params.add_index(field_name="vector", index_type=index_type, metric_type=self.metric_type,
                           params={**INDEX_BUILD_PARAMS[index_type], **(self._index_params or {})})
    self.client.create_collection(self.collection, schema=schema,
                                  properties={_PROPERTY_PREFIX + k: v for k, v in self.metadata().items()})
    # sync=False: waiting for the index calls an RPC that Milvus Lite lacks; loading waits for it anyway.
    self.client.create_index(self.collection, index_params, sync=False)
    self.client.load_collection(self.collection)

  def _require_collection(self) -> None:
    if not self.exists():
      raise CatalogError(f"No collection {self.collection!r} in {self.uri}. Index images first, e.g.\n"
                         f"  python -m jaxret.index --workdir {self.embedder.workdir} --uri {self.uri} "
                         f"--collection {self.collection}")

  def count(self) -> int:
    """Rows in the collection (0 when it does not exist)."""
    if not self.exists():
      return 0
    return int(self.client.query(self.collection, filter="", output_fields=["count(*)"])[0]["count(*)"])

  # Adding images.
  def upsert(self, embeddings: np.ndarray, item_ids: Sequence[int], categories: Sequence[int],
             images: Sequence[str], source: str) -> int:
    """Inserts or replaces rows (keyed by `image_key_id(source, image)`); creates the collection if needed.

    Args:
      embeddings: `[N, D]` vectors of this catalog's model.
      item_ids, categories: `[N]` labels (-1 when unknown).
      images: `[N]` image names or paths.
      source: where the images come from ("DATASET:SPLIT" or "file").

    Returns:
      The number of distinct images written.
    """
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != self.embedder.dim:
      raise CatalogError(f"Expected [N, {self.embedder.dim}] embeddings, got {embeddings.shape}.")
    if not len(embeddings) == len(item_ids) == len(categories) == len(images):
      raise CatalogError(f"Expected one item_id, category and image per embedding, got {len(embeddings)}, "
                         f"{len(item_ids)}, {len(categories)} and {len(images)}.")
    too_long = [name for name in images if len(name) > _MAX_IMAGE_CHARS]
    if too_long:
      raise CatalogError(f"Image names must have at most {_MAX_IMAGE_CHARS} characters: "
                         f"{too_long[0][:80]}...")
    if not self.exists():
      self._create()
    rows = {}  # By key: the same image given twice is written once, the last one kept.
    for vector, item_id, category, image in zip(embeddings, item_ids, categories, images):
      key = image_key_id(source, str(image))
      rows[key] = {"id": key, "vector": vector, "item_id": int(item_id), "category": int(category),
                   "image": str(image), "source": source}
    rows = list(rows.values())
    for start in tqdm.trange(0, len(rows), _UPSERT_ROWS, desc="upserting", unit="chunk", leave=False,
                             disable=len(rows) <= _UPSERT_ROWS):
      self.client.upsert(self.collection, rows[start:start + _UPSERT_ROWS])
    # Sealing the new rows lets Milvus build the vector index on them (they are brute-forced until then).
    self.client.flush(self.collection)
    return len(rows)

  def add_split(self, split: str = "gallery") -> int:
    """Embeds and upserts every image of a split of the run's dataset; returns the number of images."""
    embeddings, index, _ = self.embedder.embed_split(split, self.data_dir)
    if jax.process_index() != 0:
      return len(index)
    return self.upsert(embeddings, index.item_ids, index.categories, [str(n) for n in index.image_names],
                       f"{self.embedder.config.input.dataset}:{split}")

  def add_images(self, paths) -> tuple[int, list[str]]:
    """Embeds and upserts image files (a folder, searched recursively, or a list of files and folders).

    The product and category come from `labels_from_path` (-1 when the path does not tell them).

    Returns:
      `(number of images written, paths of files that could not be read as images)`.
    """
    files = list_images(paths)
    if not files:
      raise CatalogError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {paths}.")
    embeddings, readable = self.embedder.embed_files(files)
    unreadable = [f for f, ok in zip(files, readable) if not ok]
    keep = np.flatnonzero(readable)
    if jax.process_index() != 0 or not len(keep):
      return 0, unreadable
    labels = [labels_from_path(files[i]) for i in keep]
    written = self.upsert(embeddings[keep], [l[0] for l in labels], [l[1] for l in labels],
                          [files[i] for i in keep], FILE_SOURCE)
    return written, unreadable

  # Searching.
  def default_search_params(self, k: int) -> dict:
    """Search parameters of the collection's index: HNSW ef = max(64, k), IVF nprobe = 32, FLAT none."""
    index_type = self.index_type()
    if index_type.startswith("HNSW"):
      return {"ef": max(64, k)}
    if index_type.startswith("IVF"):
      return {"nprobe": 32}
    return {}

  def search_embeddings(self, embeddings: np.ndarray, k: int = 10) -> list[list[Hit]]:
    """The k nearest catalogue images of each of `[Q, D]` query embeddings, nearest first."""
    self._require_collection()
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != self.embedder.dim:
      raise CatalogError(f"Expected [Q, {self.embedder.dim}] query embeddings, got {embeddings.shape}.")
    if k < 1:
      raise CatalogError(f"k must be at least 1, got {k}.")
    search_params = self._search_params
    if search_params is None:
      search_params = self.default_search_params(k)
    params = {"metric_type": self.metric_type, "params": search_params}
    per_request = self._queries_per_request(k, len(embeddings))
    results = []
    for start in range(0, len(embeddings), per_request):
      chunk = embeddings[start:start + per_request]
      answer = self.client.search(self.collection, data=chunk, limit=min(k, 16384),
                                  output_fields=["item_id", "category", "image", "source"],
                                  search_params=params)
      results.extend([self._hit(rank, hit) for rank, hit in enumerate(hits, start=1)] for hits in answer)
    return results

  def _queries_per_request(self, k: int, num_queries: int) -> int:
    """Queries sent in one search request.

    At most 16384 results per request (a limit of Milvus servers). Milvus Lite's exact search builds a
    `[queries, rows, dim]` float32 difference array, so its FLAT requests hold about `_SEARCH_FLOATS` floats.
    """
    per_request = max(1, min(1024, 16384 // k))
    if num_queries > 1 and _is_lite(self.uri) and self.index_type() == "FLAT":
      per_request = min(per_request, max(1, _SEARCH_FLOATS // (max(1, self.count()) * self.embedder.dim)))
    return per_request

  def _hit(self, rank: int, hit) -> Hit:
    entity = hit["entity"]
    score = float(hit["distance"])
    # Milvus reports the cosine similarity for COSINE (larger is closer); jaxret ranks by 1 - similarity.
    distance = 1.0 - score if self.metric_type == "COSINE" else score
    return Hit(rank=rank, distance=distance, id=int(hit["id"]), item_id=int(entity["item_id"]),
               category=int(entity["category"]), image=entity["image"], source=entity["source"])

  def search(self, image, k: int = 10) -> list[Hit]:
    """The k nearest catalogue images of a photo (a path, encoded bytes, a PIL image or `[H, W, 3]` uint8)."""
    return self.search_many([image], k)[0]

  def search_many(self, images: Sequence, k: int = 10) -> list[list[Hit]]:
    """`search` for several photos at once (one embedding call)."""
    self._require_collection()
    size = self.embedder.config.input.image_size
    batch = np.stack([preprocess(image, size) for image in images])
    return self.search_embeddings(self.embedder.embed_images(batch), k)

  def recall(self, split: str = "query", ks: Sequence[int] | None = None) -> dict[int, float]:
    """Recall@K of a split of the run's dataset searched against the collection (`metrics.recall_at_k`).

    A query is a hit at K when one of its K nearest catalogue images shows its product. With a FLAT index
    and the split's gallery as the collection, this is the trainer's evaluation.
    """
    self._require_collection()
    ks = tuple(int(k) for k in (ks or self.embedder.config.evals.ks))
    embeddings, index, _ = self.embedder.embed_split(split, self.data_dir)
    results = self.search_embeddings(embeddings, max(ks))
    ranks = np.asarray([next((hit.rank - 1 for hit in hits if hit.item_id == item_id), np.iinfo(np.int32).max)
                        for hits, item_id in zip(results, index.item_ids)])
    return {k: float(np.mean(ranks < k)) for k in ks}

  # Pictures of results.
  def thumbnail(self, hit: Hit, size: int = 128) -> np.ndarray:
    """`[size, size, 3]` uint8 picture of a result (from its file, or from its dataset split)."""
    if hit.source == FILE_SOURCE:
      return np.asarray(Image.fromarray(load_image(hit.image)).resize((size, size), Image.BILINEAR))
    dataset, _, split = hit.source.rpartition(":")
    if hit.source not in self._sources:
      builder = input_pipeline.get_builder(dataset, self.data_dir or self.embedder.config.data_dir,
                                           prepare=False)
      source = input_pipeline.read_split(builder, split)
      names = input_pipeline.index_split(source, f"indexing {split}").image_names
      self._sources[hit.source] = (source, {str(name): i for i, name in enumerate(names)})
    source, record_by_name = self._sources[hit.source]
    if hit.image not in record_by_name:
      raise CatalogError(f"Image {hit.image} is not in {hit.source} any more; re-index the collection.")
    return input_pipeline.load_thumbnail(source, record_by_name[hit.image], size)
