"""Catalogue search: product images embedded by a trained run, kept in Milvus, searched by photo.

  files       image files outside a dataset, and the labels their paths give
  milvus      connections (Milvus Lite file or server), locking, the collection's schema
  collection  `Catalog`: upsert, search, Recall@K through the index, thumbnails
  report      results as a table, an HTML page and a PNG

See docs/search.md; the commands are `python -m jaxret.index` and `python -m jaxret.search`.
"""

from jaxret.catalog import collection
from jaxret.catalog import files
from jaxret.catalog import milvus
from jaxret.catalog import report
from jaxret.catalog.collection import DEFAULT_COLLECTION
from jaxret.catalog.collection import DEFAULT_URI
from jaxret.catalog.collection import FILE_SOURCE
from jaxret.catalog.collection import Catalog
from jaxret.catalog.collection import Hit
from jaxret.catalog.collection import image_key_id
from jaxret.catalog.errors import CatalogError
from jaxret.catalog.errors import IncompatibleCollectionError
from jaxret.catalog.files import UNKNOWN
from jaxret.catalog.files import category_name
from jaxret.catalog.files import labels_from_path
from jaxret.catalog.files import list_images
from jaxret.catalog.files import load_image
from jaxret.catalog.files import preprocess
from jaxret.embedding import Embedder

__all__ = [
    "DEFAULT_COLLECTION", "DEFAULT_URI", "FILE_SOURCE", "UNKNOWN", "Catalog", "CatalogError", "Embedder", "Hit",
    "IncompatibleCollectionError",
    "category_name", "collection", "files", "image_key_id", "labels_from_path", "list_images", "load_image",
    "milvus", "preprocess", "report",
]
