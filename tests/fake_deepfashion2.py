"""A small fake DeepFashion2 download, in the layout of the official release.

  <root>/train.zip        train/image/NNNNNN.jpg + train/annos/NNNNNN.json (or the folder train/)
  <root>/validation.zip   validation/image/NNNNNN.jpg + validation/annos/NNNNNN.json (or validation/)

Annotations have every key of the release (source, pair_id, item<n> with category_name, category_id, style,
bounding_box, landmarks, segmentation, scale, occlusion, zoom_in, viewpoint). Zips may be encrypted with
ZipCrypto (written here: Python's zipfile reads such zips but cannot write them), or marked AES.

Used by tests/test_deepfashion2.py and bench/build_deepfashion2.py.
"""

import dataclasses
import json
import os
import pathlib
import struct
import zipfile
import zlib

import fake_inshop  # tests/ is on sys.path under pytest (bench/ puts it there too).

CATEGORY_NAMES = ("short sleeve top", "long sleeve top", "short sleeve outwear", "long sleeve outwear", "vest",
                  "sling", "shorts", "trousers", "skirt", "short sleeve dress", "long sleeve dress", "vest dress",
                  "sling dress")
LANDMARK_COUNTS = (25, 33, 31, 39, 15, 15, 10, 14, 8, 29, 37, 19, 19)


@dataclasses.dataclass(frozen=True)
class FakeItem:
  number: int
  category_id: int
  style: int
  bbox: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels.
  landmarks: tuple[tuple[int, int, int], ...]  # (x, y, v): v 2 visible, 1 occluded, 0 not labelled.


@dataclasses.dataclass(frozen=True)
class FakeImage:
  split: str  # "train" or "validation"
  image_id: int
  source: str
  pair_id: int
  items: tuple[FakeItem, ...]
  jpeg: bytes
  height: int
  width: int

  @property
  def image_name(self) -> str:
    return f"{self.split}/image/{self.image_id:06d}.jpg"

  @property
  def annotation_name(self) -> str:
    return f"{self.split}/annos/{self.image_id:06d}.json"


def fake_item(number: int, category_id: int, style: int, height: int, width: int, seed: int) -> FakeItem:
  """A garment inside the image, with its category's landmarks (every visibility code) inside its box."""
  x1, y1 = 1 + seed % 3, 2 + seed % 2
  x2, y2 = width - 2 - number, height - 1 - seed % 4
  count = LANDMARK_COUNTS[category_id - 1]
  landmarks = tuple((x1 + (3 * j + seed) % (x2 - x1), y1 + (5 * j + seed) % (y2 - y1), (j + seed) % 3)
                    for j in range(count))
  return FakeItem(number=number, category_id=category_id, style=style, bbox=(x1, y1, x2, y2), landmarks=landmarks)


# (image id, source, pair id, [(category_id, style), ...]) of the default fake: pairs with several styles, shop
# images with two matches, style-0 garments in user and shop images, a shop image no query matches.
TRAIN_IMAGES = (
    (1, "user", 1, [(1, 1), (8, 2)]),
    (2, "shop", 1, [(1, 1)]),
    (3, "shop", 1, [(8, 2), (9, 0)]),
    (4, "user", 2, [(11, 1)]),
    (5, "shop", 2, [(11, 1)]),
    (6, "user", 3, [(7, 0)]),
)
VALIDATION_IMAGES = (
    (1, "user", 1, [(2, 1), (7, 2)]),
    (2, "user", 1, [(2, 1)]),
    (3, "shop", 1, [(2, 1), (7, 2)]),
    (4, "shop", 1, [(7, 2)]),
    (5, "user", 2, [(13, 1), (5, 0)]),
    (6, "shop", 2, [(13, 1)]),
    (7, "shop", 3, [(4, 0)]),
)


def make_images(split: str, rows, *, grayscale_id: int | None = None) -> list[FakeImage]:
  """Images of varied, non-square sizes (the builder must not assume one size)."""
  images = []
  for image_id, source, pair_id, garments in rows:
    height, width = 30 + 3 * image_id, 24 + 2 * image_id
    seed = image_id + (100 if split == "validation" else 0)
    items = tuple(fake_item(n, c, s, height, width, seed + n) for n, (c, s) in enumerate(garments, start=1))
    images.append(FakeImage(split=split, image_id=image_id, source=source, pair_id=pair_id, items=items,
                            jpeg=fake_inshop.make_jpeg(height, width, seed, grayscale=image_id == grayscale_id),
                            height=height, width=width))
  return images


def default_release() -> tuple[list[FakeImage], list[FakeImage]]:
  return make_images("train", TRAIN_IMAGES, grayscale_id=4), make_images("validation", VALIDATION_IMAGES)


def annotation(image: FakeImage) -> dict:
  """The annotation file's object, with every key of the release."""
  root = {"source": image.source, "pair_id": image.pair_id}
  for item in image.items:
    x1, y1, x2, y2 = item.bbox
    root[f"item{item.number}"] = {
        "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
        "scale": 2, "viewpoint": 2, "zoom_in": 1, "occlusion": 1,
        "landmarks": [v for point in item.landmarks for v in point],
        "bounding_box": list(item.bbox),
        "style": item.style,
        "category_id": item.category_id,
        "category_name": CATEGORY_NAMES[item.category_id - 1],
    }
  return root


def members(images, *, annotation_bytes: dict[str, bytes] | None = None, image_bytes: dict[str, bytes] | None = None,
            omit: tuple[str, ...] = ()) -> list[tuple[str, bytes]]:
  """(name, bytes) of a split's files, with replacements and omissions."""
  annotation_bytes, image_bytes = annotation_bytes or {}, image_bytes or {}
  files = []
  for image in images:
    files.append((image.image_name, image_bytes.get(image.image_name, image.jpeg)))
    files.append((image.annotation_name,
                  annotation_bytes.get(image.annotation_name, json.dumps(annotation(image)).encode())))
  return [(name, data) for name, data in files if name not in omit]


def write_split(root: pathlib.Path, split: str, files: list[tuple[str, bytes]], *, form: str = "zip",
                password: bytes | None = None):
  """Writes one release folder as `<split>.zip` (optionally ZipCrypto-encrypted) or the extracted `<split>/`."""
  root.mkdir(parents=True, exist_ok=True)
  if form == "tree":
    for name, data in files:
      (root / name).parent.mkdir(parents=True, exist_ok=True)
      (root / name).write_bytes(data)
  elif password is not None:
    write_encrypted_zip(root / f"{split}.zip", files, password)
  else:
    with zipfile.ZipFile(root / f"{split}.zip", "w") as archive:
      for folder in (f"{split}/", f"{split}/image/", f"{split}/annos/"):  # The release's zips have folders too.
        archive.writestr(folder, b"")
      for name, data in files:
        archive.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if name.endswith(".json")
                         else zipfile.ZIP_STORED)


def write_release(root: pathlib.Path, train=None, validation=None, *, form: str = "zip",
                  password: bytes | None = None, **edits) -> pathlib.Path:
  """Writes a fake release (both splits) into `root`; `edits` go to `members` of both splits."""
  default_train, default_validation = default_release()
  for split, images in (("train", train or default_train), ("validation", validation or default_validation)):
    write_split(root, split, members(images, **edits), form=form, password=password)
  return root


# ---- ZipCrypto ("traditional PKWARE encryption"), APPNOTE.TXT section 6.1, for stored members ----

def _crc_table() -> list[int]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc_table()


class _ZipCryptoCipher:
  """The keystream of one member: three keys updated with every plaintext byte."""

  def __init__(self, password: bytes):
    self.keys = [0x12345678, 0x23456789, 0x34567890]
    for byte in password:
      self._update(byte)

  def _update(self, byte: int):
    k0, k1, k2 = self.keys
    k0 = (k0 >> 8) ^ _CRC_TABLE[(k0 ^ byte) & 0xFF]
    k1 = ((k1 + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
    k2 = (k2 >> 8) ^ _CRC_TABLE[(k2 ^ (k1 >> 24)) & 0xFF]
    self.keys = [k0, k1, k2]

  def encrypt(self, data: bytes) -> bytes:
    out = bytearray()
    for byte in data:
      t = (self.keys[2] | 2) & 0xFFFF
      out.append(byte ^ ((t * (t ^ 1)) >> 8) & 0xFF)
      self._update(byte)
    return bytes(out)


def write_encrypted_zip(path: pathlib.Path, files: list[tuple[str, bytes]], password: bytes):
  """A zip of stored, ZipCrypto-encrypted members."""
  body, directory = bytearray(), bytearray()
  for name, data in files:
    crc, encoded = zlib.crc32(data), name.encode()
    # 11 random bytes, then the CRC's high byte, which zipfile checks to tell a wrong password.
    header = os.urandom(11) + bytes([crc >> 24])
    sealed = _ZipCryptoCipher(password).encrypt(header + data)
    offset = len(body)
    body += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0x1, 0, 0, 0x21, crc, len(sealed), len(data), len(encoded), 0)
    body += encoded + sealed
    directory += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0x1, 0, 0, 0x21, crc, len(sealed), len(data),
                             len(encoded), 0, 0, 0, 0, 0, offset) + encoded
  end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(files), len(files), len(directory), len(body), 0)
  path.write_bytes(bytes(body + directory + end))


def mark_as_aes(path: pathlib.Path):
  """Marks every member of a (stored) zip as WinZip-AES encrypted (method 99, encrypted flag), as 7-Zip writes."""
  data = bytearray(path.read_bytes())
  for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
    start = data.find(signature)
    while start != -1:
      data[start + flag_at:start + flag_at + 2] = struct.pack("<H", 0x1)
      data[start + method_at:start + method_at + 2] = struct.pack("<H", 99)
      start = data.find(signature, start + 4)
  path.write_bytes(bytes(data))
