"""What a search request may carry, checked before the model sees it: the photo's bytes and pixels, k, category.

Every problem is an `UploadError` with the HTTP status and a message that says what is wrong and what is
allowed; nothing a client sends raises anything else. Decoding goes through the catalogue's
`files.preprocess`, so an uploaded photo gets exactly the embedding the same file gets when indexed.
"""

import base64
import binascii
import dataclasses
import io
import json

import numpy as np
from PIL import Image
from starlette import requests

from data_prep import inshop_features
from jaxret.catalog import errors
from jaxret.catalog import files

# Room for the multipart envelope or the JSON around the image, beyond the image's own bytes.
_ENVELOPE_BYTES = 64 * 1024


class UploadError(Exception):
  """A request the server refuses: `status` (400, 413, 415) and a message for the client."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one search request may ask for.

  Attributes:
    max_bytes: largest encoded photo accepted (before base64).
    max_pixels: largest photo accepted, width x height; PIL's decompression-bomb limit is set to it.
    max_k: most results per query.
    default_k: results when the request names no k.
  """
  max_bytes: int = 10 * 1024 * 1024
  max_pixels: int = 25_000_000
  max_k: int = 100
  default_k: int = 10

  @property
  def max_body_bytes(self) -> int:
    """Largest request body: the photo in base64 (4/3 of its bytes) and the envelope around it."""
    return -(-self.max_bytes // 3) * 4 + _ENVELOPE_BYTES


@dataclasses.dataclass(frozen=True)
class SearchRequest:
  """A search request as received: the photo's encoded bytes and the raw k and category (not yet checked)."""
  image: bytes
  k: object
  category: object


def set_pixel_limit(max_pixels: int) -> None:
  """Makes PIL refuse images above `max_pixels` (it raises above twice its limit and warns above it).

  PIL's limit is per process; the server owns its process, so it sets it once, before any request.
  """
  Image.MAX_IMAGE_PIXELS = max_pixels


async def read_search_request(request: requests.Request, limits: Limits) -> SearchRequest:
  """The photo, k and category of a `POST /search`: multipart (`image` file, `k`, `category` fields) or JSON.

  JSON: `{"image": BASE64, "k": 10, "category": "WOMEN/Dresses"}`; the base64 may be a data URL. The body is
  read only up to `limits.max_body_bytes`, so an oversized upload is refused without being stored.
  """
  declared = request.headers.get("content-length")
  if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
    raise UploadError(413, _too_many_bytes(int(declared), limits, "The request body"))
  bounded = requests.Request(request.scope, _bounded_receive(request, limits))
  content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
  if content_type == "multipart/form-data":
    return await _read_multipart(bounded, limits)
  if content_type == "application/json":
    return await _read_json(bounded, limits)
  raise UploadError(415, f"Send the photo as multipart/form-data (an `image` file; `k` and `category` fields) "
                         f"or as JSON {{\"image\": BASE64, \"k\": 10}}, not {content_type or 'no content type'}.")


def _bounded_receive(request: requests.Request, limits: Limits):
  """The request's ASGI `receive`, stopping with a 413 once the body passes `limits.max_body_bytes`."""
  received = 0

  async def receive():
    nonlocal received
    message = await request.receive()
    if message["type"] == "http.request":
      received += len(message.get("body", b""))
      if received > limits.max_body_bytes:
        raise UploadError(413, _too_many_bytes(received, limits, "The request body", at_least=True))
    return message

  return receive


async def _read_multipart(request: requests.Request, limits: Limits) -> SearchRequest:
  form = await request.form(max_files=1, max_fields=8, max_part_size=_ENVELOPE_BYTES)
  try:
    upload = form.get("image")
    if upload is None:
      raise UploadError(400, "No `image` in the form: send the photo as a file field named `image`.")
    if isinstance(upload, str):
      raise UploadError(400, "The `image` field must be a file (curl -F image=@photo.jpg), not text.")
    return SearchRequest(await upload.read(), form.get("k"), form.get("category"))
  finally:
    await form.close()


async def _read_json(request: requests.Request, limits: Limits) -> SearchRequest:
  try:
    payload = json.loads(await request.body())
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UploadError(400, f"The body is not valid JSON: {e}.") from None
  if not isinstance(payload, dict) or "image" not in payload:
    raise UploadError(400, "Expected a JSON object {\"image\": BASE64, \"k\": 10, \"category\": NAME}.")
  encoded = payload["image"]
  if not isinstance(encoded, str):
    raise UploadError(400, "`image` must be a base64 string (optionally a data: URL).")
  if encoded.startswith("data:"):
    encoded = encoded.partition(",")[2]
  try:
    image = base64.b64decode(encoded, validate=True)
  except (binascii.Error, ValueError) as e:
    raise UploadError(400, f"`image` is not valid base64: {e}.") from None
  return SearchRequest(image, payload.get("k"), payload.get("category"))


def _too_many_bytes(size: int, limits: Limits, what: str, at_least: bool = False) -> str:
  return (f"{what} has {'more than ' if at_least else ''}{size:,} bytes; photos up to {limits.max_bytes:,} "
          "bytes are accepted. Send a smaller photo (e.g. JPEG, at most a few thousand pixels wide).")


def parse_k(value, limits: Limits) -> int:
  """The number of results asked for: an integer in `[1, limits.max_k]`; `limits.default_k` when absent."""
  if value is None or value == "":
    return limits.default_k
  if isinstance(value, bool) or not isinstance(value, (int, str)):
    raise UploadError(400, f"k must be an integer from 1 to {limits.max_k}, got {value!r}.")
  try:
    k = int(value)
  except ValueError:
    raise UploadError(400, f"k must be an integer from 1 to {limits.max_k}, got {value!r}.") from None
  if not 1 <= k <= limits.max_k:
    raise UploadError(400, f"k must be an integer from 1 to {limits.max_k}, got {k}.")
  return k


def parse_category(value) -> int | None:
  """The category filter: None (all), an In-shop name (`WOMEN/Dresses`) or its label (an integer)."""
  if value is None or value in ("", "any"):
    return None
  names = list(inshop_features.CATEGORY_NAMES)
  if isinstance(value, str) and value in names:
    return names.index(value)
  if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
    return value
  if isinstance(value, str) and value.isdigit() and int(value) < len(names):
    return int(value)
  raise UploadError(400, f"Unknown category {value!r}; use one of {', '.join(names)} (or its index "
                         f"0-{len(names) - 1}), or leave it out to search every category.")


def decode(data: bytes, size: int, limits: Limits) -> np.ndarray:
  """An uploaded photo as the embedding step's input `[size, size, 3]` uint8 (`files.preprocess`, with size =
  `Embedder.input_size`), or an UploadError.

  The header is read first (no pixels decoded): empty, unreadable, too many bytes or too many pixels are
  refused before decoding, and PIL's own decompression-bomb checks stop anything that slips through.
  """
  if not data:
    raise UploadError(400, "The image is empty (0 bytes).")
  if len(data) > limits.max_bytes:
    raise UploadError(413, _too_many_bytes(len(data), limits, "The image"))
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise UploadError(413, _bomb(e, limits)) from None
  except Image.UnidentifiedImageError:
    raise UploadError(400, f"The upload is not an image: its {len(data):,} bytes are in no format PIL reads "
                           "(JPEG, PNG, WebP, BMP, GIF, ...).") from None
  except Exception as e:  # pylint: disable=broad-except  (PIL's plugins raise many types on bad bytes)
    raise UploadError(400, f"Not an image that can be read (JPEG, PNG, WebP, BMP, GIF, ...): {e}") from None
  if width * height > limits.max_pixels:
    raise UploadError(413, f"The image is {width} x {height} = {width * height:,} pixels; photos up to "
                           f"{limits.max_pixels:,} pixels are accepted. Send a smaller photo.")
  try:
    return files.preprocess(data, size)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise UploadError(413, _bomb(e, limits)) from None
  except errors.CatalogError as e:  # Decoding failed after the header was read (truncated data, a bad stream).
    raise UploadError(400, str(e)) from None
  except Exception as e:  # pylint: disable=broad-except  (a corrupt body: the client's input, not our fault)
    raise UploadError(400, f"Could not decode the image: {type(e).__name__}: {e}") from None


def _bomb(error: Exception, limits: Limits) -> str:
  return (f"Refused: the image declares more pixels than the limit of {limits.max_pixels:,} (a possible "
          f"decompression bomb): {error}")
