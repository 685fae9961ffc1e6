"""Catalogue images outside a dataset: finding image files, reading them, and the labels their paths give."""

from collections.abc import Iterable
import io
import os
import pathlib
import re

import numpy as np
from PIL import Image

from data_prep import inshop_features
from jaxret import decoded_cache
from jaxret.catalog.errors import CatalogError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
UNKNOWN = -1  # item_id / category of an image whose product or category is not known.


def category_name(category: int) -> str:
  """The In-shop `GENDER/Category` name of a category label, "-" when unknown."""
  names = inshop_features.CATEGORY_NAMES
  return names[category] if 0 <= category < len(names) else "-"


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

def load_image(image) -> np.ndarray:
  """A photo as `[H, W, 3]` uint8: a file path, encoded bytes, a PIL image or an array."""
  if isinstance(image, (str, os.PathLike, bytes)):
    where = f" {os.fspath(image)}" if isinstance(image, (str, os.PathLike)) else ""
    try:
      return np.asarray(decoded_cache.open_image(_encoded(image)).convert("RGB"))
    except (OSError, ValueError) as e:
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


def preprocess(image, size: int) -> np.ndarray:
  """A photo (see `load_image`) as the embedding step's input: `[size, size, 3]` uint8 pixels.

  Files and bytes go to `decoded_cache.decode_pixels` as they are, the function that fills the decoded cache
  of a dataset split, so a catalogue image given as a file gets exactly the embedding it got when its split
  was indexed (with `size` = `Embedder.input_size`).
  """
  try:
    return decoded_cache.decode_pixels(_encoded(image), size)
  except ValueError as e:
    where = f" {os.fspath(image)}" if isinstance(image, (str, os.PathLike)) else ""
    raise CatalogError(f"Could not decode the image{where}: {e}") from None
