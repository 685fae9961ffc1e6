"""Milvus connections: Milvus Lite files (one process at a time, locked) or servers, with clear errors."""

import collections
import os
import threading

from jaxret.catalog.errors import CatalogError

# Milvus metric for each `config.evals.metric`; both rank like `metrics.retrieval_distances`.
METRIC_TYPES = {"euclidean": "L2", "cosine": "COSINE"}
# Build parameters of the vector indexes offered; FLAT is exact, the others approximate (see docs/search.md).
INDEX_BUILD_PARAMS = {
    "FLAT": {},
    "HNSW": {"M": 16, "efConstruction": 200},
    "IVF_FLAT": {"nlist": 1024},
}

# Milvus Lite keeps one in-process server per database folder, holding the folder's lock, until it is
# released; Catalogs on the same folder share it, and the last one to close releases it.
_LITE_USERS = collections.Counter()
_LITE_LOCK = threading.Lock()


def is_lite(uri: str) -> bool:
  return uri.endswith(".db")


def lite_folder_locked(path: str) -> bool:
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
  if is_lite(uri):
    uri = os.path.abspath(os.path.expanduser(uri))
    if not os.path.exists(uri):
      if not create:
        raise CatalogError(f"No catalogue at {uri}. Index one first, e.g.\n"
                           f"  python -m jaxret.index --workdir RUN --uri {uri}")
      os.makedirs(os.path.dirname(uri), exist_ok=True)
    elif not _LITE_USERS[uri] and lite_folder_locked(uri):  # (Our own open database holds the lock too.)
      raise locked
  try:
    client = MilvusClient(uri)
  except milvus_exceptions.MilvusException as e:
    if is_lite(uri) and lite_folder_locked(uri):
      raise locked from None
    raise CatalogError(f"Could not connect to Milvus at {uri}: {e}") from None
  if is_lite(uri):
    with _LITE_LOCK:
      _LITE_USERS[uri] += 1
  return client, uri


def disconnect(client, uri: str) -> None:
  """Closes a client from `connect`; the last one on a Milvus Lite folder releases its server and lock."""
  client.close()
  if is_lite(uri):
    with _LITE_LOCK:
      _LITE_USERS[uri] -= 1
      last = _LITE_USERS[uri] <= 0
      if last:
        del _LITE_USERS[uri]
    if last:
      from milvus_lite.server_manager import server_manager_instance  # pylint: disable=g-import-not-at-top
      server_manager_instance.release_server(uri)


def create_collection(client, name: str, *, dim: int, metric_type: str, index_type: str,
                      index_params: dict | None, properties: dict[str, str], max_image_chars: int) -> None:
  """Makes and loads a catalogue collection: id, vector, item_id, category, image, source; one vector index."""
  from pymilvus import DataType  # pylint: disable=g-import-not-at-top
  from pymilvus import MilvusClient  # pylint: disable=g-import-not-at-top
  schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
  schema.add_field("id", DataType.INT64, is_primary=True)
  schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
  schema.add_field("item_id", DataType.INT64)
  schema.add_field("category", DataType.INT32)
  schema.add_field("image", DataType.VARCHAR, max_length=max_image_chars)
  schema.add_field("source", DataType.VARCHAR, max_length=512)
  params = client.prepare_index_params()
  params.add_index(field_name="vector", index_type=index_type, metric_type=metric_type,
                   params={**INDEX_BUILD_PARAMS[index_type], **(index_params or {})})
  client.create_collection(name, schema=schema, properties=properties)
  # sync=False: waiting for the index calls an RPC that Milvus Lite lacks; loading waits for it anyway.
  client.create_index(name, params, sync=False)
  client.load_collection(name)
