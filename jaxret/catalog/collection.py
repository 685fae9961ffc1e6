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

In a program of several processes (`jax.distributed`), every process makes the same `Catalog`: process 0
opens (and checks, drops with `overwrite`, creates) the collection first, then the others. Each process
embeds its share of the images; with a Milvus server each upserts its own rows, while a Milvus Lite
database, which one process may open, is opened by process 0 alone, which receives every row and upserts them.
"""

from collections.abc import Sequence
import dataclasses
import hashlib
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image
from tqdm import auto as tqdm

from jaxret import embedding
from jaxret import input_pipeline
from jaxret import metrics
from jaxret import preclassify
from jaxret.catalog import files
from jaxret.catalog import milvus
from jaxret.catalog.errors import CatalogError
from jaxret.catalog.errors import IncompatibleCollectionError

DEFAULT_URI = "catalog.db"
DEFAULT_COLLECTION = "jaxret_catalog"
FILE_SOURCE = "file"  # The `source` of rows indexed from image files (the others name a dataset split).
_MAX_IMAGE_CHARS = 4096
_PROPERTY_PREFIX = "jaxret."
_UPSERT_ROWS = 1000
# Queries per search request: Milvus Lite's exact search builds a [queries, rows, dim] float32 difference
# array, so a request is kept to about this many floats.
_SEARCH_FLOATS = 1 << 25
_COUNT_SECONDS = 30.0  # How old the row count that sizes Milvus Lite search requests may be.


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
    return files.category_name(self.category)


def image_key_id(source: str, image: str) -> int:
  """The primary key of an image: the first 63 bits of SHA-256 of `source` and `image` (Milvus INT64 > 0).

  Stable across runs and machines, so re-indexing an image replaces its row. Two of N images collide with
  probability about N^2 / 2^64 (1e-5 at N = 10 million).
  """
  digest = hashlib.sha256(f"{source}\n{image}".encode()).digest()
  return int.from_bytes(digest[:8], "big") >> 1


def _sum_over_processes(count: int) -> int:
  """The sum of `count` over the processes (every process calls it: a barrier too)."""
  if jax.process_count() == 1:
    return count
  return int(np.asarray(multihost_utils.process_allgather(np.int32(count))).sum())


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
               data_dir: str | None = None, embedder: embedding.Embedder | None = None):
    if index_type is not None and index_type not in milvus.INDEX_BUILD_PARAMS:
      raise CatalogError(f"Unknown index type {index_type!r}; use one of {list(milvus.INDEX_BUILD_PARAMS)}.")
    self.embedder = embedder or embedding.Embedder(workdir)
    self.collection = collection
    self.data_dir = data_dir
    self._requested_index = index_type
    self._index_params = index_params
    self._search_params = search_params
    self._index_type = None  # Cached: describing the index is a round trip (and slow on Milvus Lite).
    self._sources = {}
    self.rows_written = 0  # Rows this process has upserted through this Catalog.
    self._count_cache = None  # (time.monotonic(), count()) for `_recent_count`.
    self.client, self.uri = None, uri
    if jax.process_count() == 1:
      self._open(uri, overwrite=overwrite, create=create)
      return
    # Process 0 first, alone: it drops (overwrite) and creates the collection, so the others find it made,
    # and its verdict (e.g. "another model's collection") stops every process, not only itself.
    failure = None
    if jax.process_index() == 0:
      try:
        self._open(uri, overwrite=overwrite, create=create)
        if create and not self.exists():
          self._create()
      except BaseException as e:  # Re-raised below, after telling the others.
        failure = e
    opened = bool(multihost_utils.broadcast_one_to_all(np.int32(failure is None)))
    if failure is not None:
      raise failure
    if not opened:
      raise CatalogError(f"Process 0 could not open the catalogue {uri}; its error says why.")
    if jax.process_index() != 0 and not milvus.is_lite(uri):
      self._open(uri, overwrite=False, create=False)

  def _open(self, uri: str, *, overwrite: bool, create: bool) -> None:
    self.client, self.uri = milvus.connect(uri, create=create)
    try:
      if overwrite and self.client.has_collection(self.collection):
        self.client.drop_collection(self.collection)
      if self.exists():
        self._check_compatible()
        self.client.load_collection(self.collection)  # Searches and queries need it loaded (a no-op if it is).
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
      milvus.disconnect(self.client, self.uri)
      self.client = None

  # The collection and its metadata.
  def exists(self) -> bool:
    return self._connected().has_collection(self.collection)

  def _connected(self):
    """The Milvus client; an error in the processes that hold none (Milvus Lite, process 1 and up)."""
    if self.client is None:
      raise CatalogError(f"This process (index {jax.process_index()}) has no connection to {self.uri}: a "
                         "Milvus Lite database is opened by process 0 only, and a closed Catalog by none.")
    return self.client

  @property
  def metric_type(self) -> str:
    return milvus.METRIC_TYPES[self.embedder.metric]

  def metadata(self) -> dict[str, str]:
    """What the collection records about the model that made its vectors (Milvus collection properties)."""
    e = self.embedder
    return {"dim": str(e.dim), "metric": e.metric, "fingerprint": e.fingerprint, "model": e.config.model.name,
            "step": str(e.step), "workdir": e.workdir, "dataset": e.config.input.dataset,
            "image_size": str(e.config.input.image_size)}

  def stored_metadata(self) -> dict[str, str]:
    """The metadata recorded in the existing collection (empty when it was not made by jaxret)."""
    properties = self._connected().describe_collection(self.collection).get("properties", {})
    return {k[len(_PROPERTY_PREFIX):]: v for k, v in properties.items() if k.startswith(_PROPERTY_PREFIX)}

  def index_type(self) -> str:
    """The vector index of the existing collection ("FLAT", "HNSW", ...)."""
    if self._index_type is None:
      self._index_type = self._connected().describe_index(self.collection, "vector")["index_type"]
    return self._index_type

  def _check_compatible(self) -> None:
    stored = self.stored_metadata()
    where = f"Collection {self.collection!r} in {self.uri}"
    fix = ("Index into another collection (--collection NAME), or replace this one (python -m jaxret.index "
           "--overwrite).")

    def refuse(message: str):
      return IncompatibleCollectionError(f"{where} {message} {fix}", made_by_workdir=stored.get("workdir"))

    if "fingerprint" not in stored:
      raise refuse("was not made by jaxret.index (it records no model).")
    ours = self.metadata()
    made_by = (f"model {stored.get('model')} at step {stored.get('step')} of {stored.get('workdir')} "
               f"(fingerprint {stored['fingerprint']})")
    if stored.get("dim") != ours["dim"]:
      raise refuse(f"holds {stored.get('dim')}-dimensional vectors made by {made_by}, but the checkpoint of "
                   f"{self.embedder.workdir} makes {ours['dim']}-dimensional ones.")
    if stored.get("metric") != ours["metric"]:
      raise refuse(f"ranks by the {stored.get('metric')} metric, but the run in {self.embedder.workdir} is "
                   f"evaluated with {ours['metric']}.")
    if stored["fingerprint"] != ours["fingerprint"]:
      raise refuse(f"holds vectors made by {made_by}, not by the model at step {ours['step']} of "
                   f"{ours['workdir']} (fingerprint {ours['fingerprint']}); distances between two models' "
                   "embeddings mean nothing.")
    if self._requested_index is not None and self.index_type() != self._requested_index:
      raise IncompatibleCollectionError(
          f"{where} has a {self.index_type()} index, not {self._requested_index}. Rebuild it with --overwrite, "
          "or index into another collection (--collection NAME).", made_by_workdir=stored.get("workdir"))

  def _create(self) -> None:
    milvus.create_collection(
        self.client, self.collection, dim=self.embedder.dim, metric_type=self.metric_type,
        index_type=self._requested_index or "FLAT", index_params=self._index_params,
        properties={_PROPERTY_PREFIX + k: v for k, v in self.metadata().items()},
        max_image_chars=_MAX_IMAGE_CHARS)

  def _require_collection(self) -> None:
    if not self.exists():
      raise CatalogError(f"No collection {self.collection!r} in {self.uri}. Index images first, e.g.\n"
                         f"  python -m jaxret.index --workdir {self.embedder.workdir} --uri {self.uri} "
                         f"--collection {self.collection}")

  def count(self, filter: str = "") -> int:  # pylint: disable=redefined-builtin
    """Rows in the collection (0 when it does not exist); with `filter` (a Milvus boolean expression, e.g.
    "category < 0") the rows that match it."""
    if not self.exists():
      return 0
    return int(self._connected().query(self.collection, filter=filter, output_fields=["count(*)"])[0]["count(*)"])

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
      self._connected().upsert(self.collection, rows[start:start + _UPSERT_ROWS])
    # Sealing the new rows lets Milvus build the vector index on them (they are brute-forced until then).
    self._connected().flush(self.collection)
    self.rows_written += len(rows)
    self._count_cache = None
    return len(rows)

  def _each_process_writes(self) -> bool:
    """Whether each process upserts the rows it embedded (one process, or a Milvus server) rather than
    handing them to process 0 (Milvus Lite with several processes: only process 0 has the database open)."""
    return jax.process_count() == 1 or not milvus.is_lite(self.uri)

  def add_split(self, split: str = "gallery") -> int:
    """Embeds and upserts every image of a split of the run's dataset; returns the number of images.

    With several processes each embeds its share; the return value counts the images of all of them.
    """
    source = f"{self.embedder.config.input.dataset}:{split}"
    if self._each_process_writes():
      records, embeddings, index = self.embedder.embed_split_local(split, self.data_dir)
      written = self.upsert(embeddings, index.item_ids[records], index.categories[records],
                            [str(n) for n in index.image_names[records]], source)
      return _sum_over_processes(written)
    embeddings, index, _ = self.embedder.embed_split(split, self.data_dir)  # Every row, on every process.
    written = 0
    if jax.process_index() == 0:
      written = self.upsert(embeddings, index.item_ids, index.categories, [str(n) for n in index.image_names],
                            source)
    return _sum_over_processes(written)

  def add_images(self, paths) -> tuple[int, list[str]]:
    """Embeds and upserts image files (a folder, searched recursively, or a list of files and folders).

    The product and category come from `files.labels_from_path` (-1 when the path does not tell them).

    Returns:
      `(number of images written, paths of files that could not be read as images)`, over all processes.
    """
    found = files.list_images(paths)
    if not found:
      raise CatalogError(f"No image files ({', '.join(files.IMAGE_EXTENSIONS)}) in {paths}.")
    if self._each_process_writes():
      positions, embeddings, readable = self.embedder.embed_files_local(found)
      unreadable = np.zeros(len(found), bool)
      unreadable[positions[~readable]] = True
      if jax.process_count() > 1:
        unreadable = np.asarray(multihost_utils.process_allgather(unreadable)).any(axis=0)
    else:
      embeddings, readable = self.embedder.embed_files(found)  # Every row, on every process.
      positions = np.arange(len(found))
      unreadable = ~readable
      if jax.process_index() != 0:
        readable = np.zeros_like(readable)
    keep = np.flatnonzero(readable)
    written = 0
    if len(keep):
      labels = [files.labels_from_path(found[positions[i]]) for i in keep]
      written = self.upsert(embeddings[keep], [l[0] for l in labels], [l[1] for l in labels],
                            [found[positions[i]] for i in keep], FILE_SOURCE)
    return _sum_over_processes(written), [found[i] for i in np.flatnonzero(unreadable)]

  # Searching.
  def default_search_params(self, k: int) -> dict:
    """Search parameters of the collection's index: HNSW ef = max(64, k), IVF nprobe = 32, FLAT none."""
    index_type = self.index_type()
    if index_type.startswith("HNSW"):
      return {"ef": max(64, k)}
    if index_type.startswith("IVF"):
      return {"nprobe": 32}
    return {}

  def search_embeddings(self, embeddings: np.ndarray, k: int = 10, *, category: int | None = None,
                        categories: np.ndarray | None = None) -> list[list[Hit]]:
    """The k nearest catalogue images of each of `[Q, D]` query embeddings, nearest first.

    With `category` (a label, an index into `CATEGORY_NAMES`) only images of that category are searched; with
    `categories` (`[Q, n]` labels, e.g. each query's top-n predicted categories, `preclassify.top_categories`)
    each query searches only the images of its own n categories (pre-classification; images of unknown
    category, -1, are then never found).
    """
    self._require_collection()
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != self.embedder.dim:
      raise CatalogError(f"Expected [Q, {self.embedder.dim}] query embeddings, got {embeddings.shape}.")
    if k < 1:
      raise CatalogError(f"k must be at least 1, got {k}.")
    if categories is None:
      return self._search_filtered(embeddings, k, "" if category is None else f"category == {int(category)}")
    if category is not None:
      raise CatalogError("Give either category (one for all queries) or categories (one set per query).")
    categories = np.asarray(categories)
    if categories.ndim != 2 or len(categories) != len(embeddings) or \
        not np.issubdtype(categories.dtype, np.integer):
      raise CatalogError(f"Expected [{len(embeddings)}, n] integer categories, one row per query, got "
                         f"{categories.dtype} {categories.shape}.")
    # The queries that share a set of categories go in one filtered search; answers go back in query order.
    groups = {}
    for query, row in enumerate(categories):
      groups.setdefault(tuple(sorted({int(c) for c in row})), []).append(query)
    results = [None] * len(embeddings)
    for allowed, queries in groups.items():
      for query, hits in zip(queries, self._search_filtered(embeddings[queries], k,
                                                             f"category in {list(allowed)}")):
        results[query] = hits
    return results

  def _search_filtered(self, embeddings: np.ndarray, k: int, filter_expression: str) -> list[list[Hit]]:
    """The k nearest rows that match a Milvus filter expression ("" for all) of each `[Q, D]` embedding."""
    search_params = self._search_params
    if search_params is None:
      search_params = self.default_search_params(k)
    params = {"metric_type": self.metric_type, "params": search_params}
    per_request = self._queries_per_request(k, len(embeddings))
    results = []
    for start in range(0, len(embeddings), per_request):
      chunk = embeddings[start:start + per_request]
      answer = self._connected().search(self.collection, data=chunk, limit=min(k, 16384), filter=filter_expression,
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
    if num_queries > 1 and milvus.is_lite(self.uri) and self.index_type() == "FLAT":
      per_request = min(per_request, max(1, _SEARCH_FLOATS // (max(1, self._recent_count()) * self.embedder.dim)))
    return per_request

  def _recent_count(self) -> int:
    """`count()` read at most every `_COUNT_SECONDS`: it only bounds the memory of a search request, and on
    Milvus Lite it costs a pass over every row (as much as a small search)."""
    now = time.monotonic()
    if self._count_cache is None or now - self._count_cache[0] > _COUNT_SECONDS:
      self._count_cache = (now, self.count())
    return self._count_cache[1]

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

  def search_many(self, images: Sequence, k: int = 10, *, categories: np.ndarray | None = None
                  ) -> list[list[Hit]]:
    """`search` for several photos at once (one embedding call); with `categories` (`[N, n]`, e.g.
    `predicted_categories`) each photo searches only the catalogue images of its own categories."""
    self._require_collection()
    batch = np.stack([files.preprocess(image, self.embedder.input_size) for image in images])
    return self.search_embeddings(self.embedder.embed_images(batch), k, categories=categories)

  def predicted_categories(self, images: Sequence, n: int) -> np.ndarray:
    """`[N, n]` the n most likely categories of each photo, most likely first, as the run's model predicts them
    (its category head, or its class capsules): the categories that pre-classification searches.

    Raises:
      CatalogError: the model predicts no category, or fewer than n.
    """
    batch = np.stack([files.preprocess(image, self.embedder.input_size) for image in images])
    return self._top_categories(lambda: self.embedder.category_scores_images(batch), n)

  def _top_categories(self, scores, n: int) -> np.ndarray:
    """`preclassify.top_categories` of `scores()` `[N, C]`, a model without categories as a CatalogError."""
    try:
      scores = scores()
    except preclassify.NoCategoryScoresError as e:
      raise CatalogError(f"The run in {self.embedder.workdir} cannot pre-classify: {e}") from e
    if not 1 <= n <= scores.shape[1]:
      raise CatalogError(f"Pre-classification over the top {n} categories: the model of {self.embedder.workdir} "
                         f"predicts {scores.shape[1]}; give between 1 and {scores.shape[1]}.")
    return np.asarray(preclassify.top_categories(scores, n))

  def recall(self, split: str = "query", ks: Sequence[int] | None = None, *,
             preclassify_top_k: int = 0) -> dict[int, float]:
    """Recall@K of a split of the run's dataset searched against the collection (`metrics.recall_at_k`).

    A query is a hit at K when one of its K nearest catalogue images shows its product. With a FLAT index
    and the split's gallery as the collection, this is the trainer's evaluation. With `preclassify_top_k` n > 0
    each query searches only the images of its n most likely categories (the evaluation's
    `preclassify/recall@K` with `config.evals.preclassify_top_k = n`).
    """
    self._require_collection()
    ks = tuple(int(k) for k in (ks or self.embedder.config.evals.ks))
    embeddings, index, _ = self.embedder.embed_split(split, self.data_dir)
    categories = None
    if preclassify_top_k:
      categories = self._top_categories(lambda: self.embedder.category_scores_split(split, self.data_dir),
                                        preclassify_top_k)
    results = self.search_embeddings(embeddings, max(ks), categories=categories)
    ranks = np.asarray([next((hit.rank - 1 for hit in hits if hit.item_id == item_id), np.iinfo(np.int32).max)
                        for hits, item_id in zip(results, index.item_ids)])
    return metrics.recall_from_ranks(ranks, ks)

  # Pictures of results.
  def row(self, row_id: int) -> Hit | None:
    """The catalogue image with primary key `row_id` as a Hit (rank 0, distance 0), or None if there is none."""
    self._require_collection()
    rows = self._connected().query(self.collection, filter=f"id == {int(row_id)}",
                                   output_fields=["item_id", "category", "image", "source"])
    if not rows:
      return None
    row = rows[0]
    return Hit(rank=0, distance=0.0, id=int(row["id"]), item_id=int(row["item_id"]),
               category=int(row["category"]), image=row["image"], source=row["source"])

  def thumbnail(self, hit: Hit, size: int = 128) -> np.ndarray:
    """`[size, size, 3]` uint8 picture of a result (from its file, or from its dataset split)."""
    if hit.source == FILE_SOURCE:
      return np.asarray(Image.fromarray(files.load_image(hit.image)).resize((size, size), Image.BILINEAR))
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
