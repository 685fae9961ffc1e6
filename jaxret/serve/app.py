"""The HTTP API and the page over a `Catalog`: `create_app(catalog, settings)` returns a FastAPI app.

  POST /search              a photo (multipart `image`, or JSON base64) -> ranked hits, fingerprint, timings
  GET  /items/{id}/image    JPEG thumbnail of the catalogue image whose row id (a hit's `id`) is `id`
  GET  /healthz             model and collection loaded, row count (503 when the collection cannot be read)
  GET  /                    the search page (one HTML file, no external resources)

Photos are decoded on a small thread pool (`files.preprocess`, as when indexing), then batched on the device
(`batcher.Batcher`): one `Embedder.embed_images` call and one Milvus search per batch (one per category
filter when a batch mixes filters). The app holds no state that another replica lacks: row ids come from
Milvus, so any replica answers any URL (see docs/search.md).
"""

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import threading
import time

import fastapi
from fastapi import responses
import numpy as np
from PIL import Image
from starlette import concurrency

from jaxret.catalog import collection
from jaxret.catalog import errors
from jaxret.catalog import files
from jaxret.serve import batcher as batching
from jaxret.serve import page
from jaxret.serve import uploads

logger = logging.getLogger("jaxret.serve")


@dataclasses.dataclass(frozen=True)
class Settings:
  """How the server batches, decodes and caches; the request limits.

  Attributes:
    max_batch: most search requests embedded and searched together (1: no batching).
    max_wait_ms: longest a batch waits for requests still being decoded (a lone request does not wait).
    max_queue: most requests waiting for the device; more are answered 503 at once.
    decode_threads: threads decoding uploaded photos (each holds at most one photo's pixels).
    limits: bytes, pixels and k accepted per request.
    thumbnail_size: side of the square JPEG thumbnails, in pixels.
    thumbnail_cache: encoded thumbnails kept in memory (a few KB each; least recently used dropped).
  """
  max_batch: int = 32
  max_wait_ms: float = 5.0
  max_queue: int = 256
  decode_threads: int = 4
  limits: uploads.Limits = dataclasses.field(default_factory=uploads.Limits)
  thumbnail_size: int = 128
  thumbnail_cache: int = 2048


@dataclasses.dataclass(frozen=True)
class Query:
  """One search request on the device side: `[C, C, 3]` uint8 pixels (C = `Embedder.input_size`), results
  wanted, category filter."""
  image: np.ndarray
  k: int
  category: int | None


@dataclasses.dataclass(frozen=True)
class Answer:
  """The hits of one query and what its batch cost (shared by the batch's queries)."""
  hits: list[collection.Hit]
  embed_ms: float
  search_ms: float
  batch_size: int


class _LRU:
  """A bounded, thread-safe mapping that forgets the least recently used entries."""

  def __init__(self, maxsize: int):
    self._maxsize = maxsize
    self._items = collections.OrderedDict()
    self._lock = threading.Lock()

  def get(self, key):
    with self._lock:
      if key not in self._items:
        return None
      self._items.move_to_end(key)
      return self._items[key]

  def put(self, key, value) -> None:
    with self._lock:
      self._items[key] = value
      self._items.move_to_end(key)
      while len(self._items) > self._maxsize:
        self._items.popitem(last=False)


class Searcher:
  """Batches of queries -> one embedding call and one Milvus search per distinct category filter."""

  def __init__(self, shop: collection.Catalog, settings: Settings):
    self.shop = shop
    self.settings = settings
    self._thumbnails = _LRU(settings.thumbnail_cache)
    self._rows = _LRU(16 * settings.thumbnail_cache)  # row id -> Hit, from recent results (saves a query).
    self._thumbnail_lock = threading.Lock()  # Catalog.thumbnail caches dataset sources: one caller at a time.

  def search_batch(self, queries: list[Query]) -> list[Answer]:
    start = time.perf_counter()
    embeddings = self.shop.embedder.embed_images(np.stack([q.image for q in queries]))
    embedded = time.perf_counter()
    by_category = collections.defaultdict(list)
    for i, query in enumerate(queries):
      by_category[query.category].append(i)
    hits = [None] * len(queries)
    for category, members in by_category.items():
      k = max(queries[i].k for i in members)
      found = self.shop.search_embeddings(embeddings[members], k, category=category)
      for i, results in zip(members, found):
        hits[i] = results[:queries[i].k]
    searched = time.perf_counter()
    for results in hits:
      for hit in results:
        self._rows.put(hit.id, hit)
    return [Answer(h, 1e3 * (embedded - start), 1e3 * (searched - embedded), len(queries)) for h in hits]

  def warm_up(self) -> None:
    """Compiles the embedding for every batch shape a batch of up to `max_batch` queries uses, and searches once.

    `Embedder.embed_images` pads a batch to a power of two times the devices, so batches of 1, 2, 4, ... and
    `max_batch` queries reach every shape.
    """
    size = self.shop.embedder.input_size
    lengths = sorted({min(2**i, self.settings.max_batch) for i in range(self.settings.max_batch.bit_length() + 1)})
    for length in lengths:
      self.shop.embedder.embed_images(np.zeros((length, size, size, 3), np.uint8))
    self.shop.search_embeddings(np.zeros((1, self.shop.embedder.dim), np.float32), 1)

  def thumbnail_jpeg(self, row_id: int) -> bytes | None:
    """The JPEG thumbnail of a catalogue row, None when the collection has no such row."""
    jpeg = self._thumbnails.get(row_id)
    if jpeg is not None:
      return jpeg
    hit = self._rows.get(row_id) or self.shop.row(row_id)
    if hit is None:
      return None
    with self._thumbnail_lock:
      pixels = self.shop.thumbnail(hit, self.settings.thumbnail_size)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="JPEG", quality=85)
    jpeg = encoded.getvalue()
    self._thumbnails.put(row_id, jpeg)
    return jpeg


def _hit_json(hit: collection.Hit) -> dict:
  return {
      "rank": hit.rank,
      "id": str(hit.id),  # A string: 63-bit keys do not fit a JavaScript number.
      "item_id": hit.item_id,
      "category": hit.category,
      "category_name": hit.category_name,
      "image": hit.image,
      "distance": hit.distance,
      "thumbnail_url": f"/items/{hit.id}/image",
  }


def create_app(shop: collection.Catalog, settings: Settings = Settings()) -> fastapi.FastAPI:
  """The API and page over an open catalogue (the caller keeps it open while the app runs, and closes it).

  The embedding is compiled for every batch shape when the app starts (its lifespan), before it answers.
  """
  uploads.set_pixel_limit(settings.limits.max_pixels)
  embedder = shop.embedder
  limits = settings.limits
  searcher = Searcher(shop, settings)
  batcher = batching.Batcher(searcher.search_batch, max_batch=settings.max_batch,
                             max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue)
  decoders = concurrent.futures.ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
  model = {"name": embedder.config.model.name, "step": embedder.step, "fingerprint": embedder.fingerprint,
           "workdir": embedder.workdir, "dim": embedder.dim, "metric": embedder.metric,
           "image_size": embedder.config.input.image_size}

  @contextlib.asynccontextmanager
  async def lifespan(_):
    await concurrency.run_in_threadpool(searcher.warm_up)
    await batcher.start()
    try:
      yield
    finally:
      await batcher.stop()
      decoders.shutdown(wait=True)

  # No /docs or /redoc: FastAPI serves their scripts from a CDN, and this server works offline.
  app = fastapi.FastAPI(title="jaxret visual search", lifespan=lifespan, docs_url=None, redoc_url=None)

  @app.exception_handler(uploads.UploadError)
  async def refuse(_, error: uploads.UploadError):
    return responses.JSONResponse({"detail": error.message}, status_code=error.status)

  @app.exception_handler(Exception)
  async def internal_error(_, error: Exception):
    logger.exception("Request failed", exc_info=error)
    return responses.JSONResponse({"detail": f"Internal error: {type(error).__name__}: {error}"},
                                  status_code=500)

  @app.post("/search")
  async def search(request: fastapi.Request):
    received = time.perf_counter()
    upload = await uploads.read_search_request(request, limits)
    k = uploads.parse_k(upload.k, limits)
    category = uploads.parse_category(upload.category)
    started = time.perf_counter()
    batcher.announce()  # The batch now forming may wait (up to max_wait_ms) for this photo's decoding.
    try:
      image = await asyncio.get_running_loop().run_in_executor(decoders, uploads.decode, upload.image,
                                                               embedder.input_size, limits)
    except BaseException:
      batcher.withdraw()
      raise
    decoded = time.perf_counter()
    try:
      answer = await batcher.submit(Query(image, k, category), announced=True)
    except batching.QueueFull as e:
      return responses.JSONResponse({"detail": f"The server is busy: {e} Retry in a moment."}, status_code=503,
                                    headers={"Retry-After": "1"})
    except errors.CatalogError as e:
      return responses.JSONResponse({"detail": f"The catalogue cannot be searched: {e}"}, status_code=503)
    done = time.perf_counter()
    device_ms = answer.embed_ms + answer.search_ms
    return {
        "hits": [_hit_json(hit) for hit in answer.hits],
        "k": k,
        "category": None if category is None else files.category_name(category),
        "model": model,
        "fingerprint": embedder.fingerprint,
        "batch_size": answer.batch_size,
        "timings_ms": {"read": 1e3 * (started - received), "decode": 1e3 * (decoded - started),
                       "queue": max(0.0, 1e3 * (done - decoded) - device_ms), "embed": answer.embed_ms,
                       "search": answer.search_ms, "total": 1e3 * (done - received)},
    }

  @app.get("/items/{row_id}/image")
  async def item_image(row_id: str):
    if not row_id.isdigit() or int(row_id) >= 2**63:
      raise uploads.UploadError(400, f"Item ids are the `id` of search hits (integers from 0 to 2^63 - 1), "
                                     f"got {row_id!r}.")
    try:
      jpeg = await concurrency.run_in_threadpool(searcher.thumbnail_jpeg, int(row_id))
    except (errors.CatalogError, OSError) as e:  # A moved file, a dataset not found (DatasetNotPreparedError).
      return responses.JSONResponse({"detail": f"Item {row_id}'s image cannot be read: {e}"}, status_code=404)
    if jpeg is None:
      return responses.JSONResponse({"detail": f"No item {row_id} in collection {shop.collection!r}."},
                                    status_code=404)
    return fastapi.Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})

  @app.get("/healthz")
  async def healthz():
    try:
      rows = await concurrency.run_in_threadpool(shop.count)
    except Exception as e:  # pylint: disable=broad-except  (reported to the load balancer, not raised)
      return responses.JSONResponse({"status": "unavailable", "detail": f"The collection cannot be read: {e}"},
                                    status_code=503)
    stats = batcher.stats
    return {
        "status": "ok",
        "model": model,
        "collection": {"name": shop.collection, "uri": shop.uri, "rows": rows, "index": shop.index_type(),
                       "metric": shop.metric_type},
        "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                     "max_queue": settings.max_queue, "batches": stats.batches, "requests": stats.requests,
                     "mean_batch_size": stats.mean_batch_size, "largest_batch": stats.largest},
        "limits": {"max_bytes": limits.max_bytes, "max_pixels": limits.max_pixels, "max_k": limits.max_k,
                   "default_k": limits.default_k},
    }

  index_page = page.render(limits)

  @app.get("/", response_class=responses.HTMLResponse)
  async def home():
    return index_page

  return app
