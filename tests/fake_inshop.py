"""A small fake DeepFashion In-shop download, in exactly the layout of the official release.

  <root>/Img/img.zip (or Img/img/, img/)   img/<GENDER>/<Category>/id_XXXXXXXX/NN_V_view.jpg
  <root>/Eval/list_eval_partition.txt      count line, header, rows padded with runs of spaces
  <root>/Anno/list_bbox_inshop.txt         count line, header, zero-padded pixel boxes
  <root>/Anno/list_landmarks_inshop.txt    count line, header, 6/4/8 (visibility, x, y) triples by clothes type
  <root>/Anno/list_attr_cloth.txt          463 attribute names
  <root>/Anno/list_attr_items.txt          one row of 463 values in {-1, 0, 1} per item

Used by tests/test_deepfashion_inshop.py and bench/build_inshop.py.
"""

import dataclasses
import io
import pathlib
import zipfile

import numpy as np
from PIL import Image

PARTITION_HEADER = "image_name item_id evaluation_status"
BBOX_HEADER = "image_name  clothes_type  pose_type  x_1  y_1  x_2  y_2"
LANDMARKS_HEADER = "image_name  clothes_type  variation_type  " + "  ".join(
    f"landmark_visibility_{i}  landmark_location_x_{i}  landmark_location_y_{i}" for i in range(1, 9))
ATTR_CLOTH_HEADER = "attribute_name  attribute_type"
ATTR_ITEMS_HEADER = "item_id  attribute_labels"
NUM_ATTRIBUTES = 463
# Landmarks a clothes type has (1 upper, 2 lower, 3 full body).
LANDMARK_COUNTS = {1: 6, 2: 4, 3: 8}


@dataclasses.dataclass(frozen=True)
class FakeImage:
  """One image of the fake release and everything the builder should write for it."""
  name: str
  split: str
  jpeg: bytes
  height: int
  width: int
  bbox: tuple[int, int, int, int]  # x_1, y_1, x_2, y_2 in pixels.
  clothes_type: int
  pose_type: int
  variation_type: int = 1
  landmarks: tuple[tuple[int, int, int], ...] = ()  # (visibility, x, y) in the file's order for clothes_type.

  @property
  def item_field(self) -> str:
    return self.name.split("/")[3]

  @property
  def item_id(self) -> int:
    return int(self.item_field[len("id_"):])

  @property
  def category(self) -> str:
    return "/".join(self.name.split("/")[1:3])


# (image name, split) in file order: 5 train images of 3 items; 3 query and 4 gallery images of 3 items.
# Query and gallery rows interleave, as in the release. Items 2 and 21 are WOMEN, 7, 33 and 34 MEN.
DEFAULT_ROWS = (
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "train"),
    ("img/MEN/Denim/id_00000007/01_1_front.jpg", "train"),
    ("img/MEN/Denim/id_00000007/01_3_back.jpg", "train"),
    ("img/WOMEN/Tees_Tanks/id_00000011/01_4_full.jpg", "train"),
    ("img/WOMEN/Skirts/id_00000021/01_1_front.jpg", "query"),
    ("img/WOMEN/Skirts/id_00000021/01_2_side.jpg", "gallery"),
    ("img/WOMEN/Skirts/id_00000021/01_3_back.jpg", "gallery"),
    ("img/MEN/Suiting/id_00000033/01_1_front.jpg", "query"),
    ("img/MEN/Suiting/id_00000033/01_2_side.jpg", "gallery"),
    ("img/MEN/Tees_Tanks/id_00000034/01_1_front.jpg", "query"),
    ("img/MEN/Tees_Tanks/id_00000034/01_7_additional.jpg", "gallery"),
)


def make_jpeg(height: int, width: int, seed: int, *, grayscale: bool = False, quality: int = 90) -> bytes:
  """A JPEG of smooth colour gradients plus noise, different for every seed."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = rng.uniform(0, 255, 3) + 40 * np.sin(x[..., None] / (3 + seed % 7) + y[..., None] / 5)
  pixels = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
  image = Image.fromarray(pixels)
  if grayscale:
    image = image.convert("L")
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def make_images(rows=DEFAULT_ROWS, *, grayscale_index: int | None = 4) -> list[FakeImage]:
  """Images of varied, non-square sizes (the builder must not assume 256x256), one of them grayscale."""
  images = []
  for i, (name, split) in enumerate(rows):
    height, width = 24 + 4 * i, 16 + 2 * i
    clothes_type = 1 + i % 3
    images.append(FakeImage(
        name=name, split=split, jpeg=make_jpeg(height, width, seed=i, grayscale=i == grayscale_index),
        height=height, width=width, bbox=(1 + i % 3, 2, width - 3, height - 1 - i % 2),
        clothes_type=clothes_type, pose_type=1 + i % 6, variation_type=1 + i % 5,
        landmarks=fake_landmarks(clothes_type, height, width, seed=i)))
  return images


def fake_landmarks(clothes_type: int, height: int, width: int, seed: int) -> tuple[tuple[int, int, int], ...]:
  """The landmarks of one image: every visibility code, points spread inside the image."""
  return tuple(((seed + j) % 3, (3 + 5 * j + seed) % width, (2 + 7 * j + seed) % height)
               for j in range(LANDMARK_COUNTS[clothes_type]))


def attribute_names() -> list[str]:
  return [f"attribute {i:03d}" for i in range(NUM_ATTRIBUTES)]


def item_attributes(item_id: int) -> list[int]:
  """463 values in {-1, 0, 1}, different for every item."""
  return [(item_id * 7 + j * 3) % 3 - 1 for j in range(NUM_ATTRIBUTES)]


def partition_text(images, *, count: int | str | None = None, header: str = PARTITION_HEADER) -> str:
  """list_eval_partition.txt: count line, header, then fields padded with runs of spaces."""
  rows = [f"{im.name:<60s}{im.item_field:<15s}{im.split}" for im in images]
  return "\n".join([str(len(rows) if count is None else count), header, *rows]) + "\n"


def bbox_text(images) -> str:
  """list_bbox_inshop.txt, with zero-padded coordinates as in the release."""
  rows = [f"{im.name:<60s}{im.clothes_type}  {im.pose_type}  " + "  ".join(f"{v:03d}" for v in im.bbox)
          for im in images]
  return "\n".join([str(len(rows)), BBOX_HEADER, *rows]) + "\n"


def landmarks_text(images) -> str:
  """list_landmarks_inshop.txt: as many triples as the clothes type has landmarks, zero-padded."""
  rows = [f"{im.name:<60s}{im.clothes_type}  {im.variation_type}  "
          + "  ".join(f"{v}  {x:03d}  {y:03d}" for v, x, y in im.landmarks) for im in images]
  return "\n".join([str(len(rows)), LANDMARKS_HEADER, *rows]) + "\n"


def attr_cloth_text(names=None) -> str:
  """list_attr_cloth.txt: attribute names (with spaces) followed by a type number."""
  names = attribute_names() if names is None else names
  rows = [f"{name:<30s}{1 + i % 5}" for i, name in enumerate(names)]
  return "\n".join([str(len(rows)), ATTR_CLOTH_HEADER, *rows]) + "\n"


def attr_items_text(images) -> str:
  """list_attr_items.txt: one row per item of `images`, in order of first appearance."""
  items = list(dict.fromkeys(im.item_field for im in images))
  rows = [f"{item}  " + " ".join(f"{v:2d}" for v in item_attributes(int(item[3:]))) for item in items]
  return "\n".join([str(len(rows)), ATTR_ITEMS_HEADER, *rows]) + "\n"


def write_release(root: pathlib.Path, images, *, form: str = "zip", partition: str | None = None,
                  bbox: str | bool = True, landmarks: str | bool = True, attr_cloth: str | bool = True,
                  attr_items: str | bool = True, archive_bytes: dict[str, bytes] | None = None,
                  omit: tuple[str, ...] = ()) -> pathlib.Path:
  """Writes a fake release into `root` (the manual dir) and returns `root`.

  Args:
    root: the manual dir to create.
    images: `FakeImage`s, in partition-file order.
    form: "zip" (Img/img.zip), "Img/img" or "img" (extracted trees).
    partition: text of list_eval_partition.txt; None writes the correct one.
    bbox: True writes the correct list_bbox_inshop.txt, False none, a string that text.
    landmarks, attr_cloth, attr_items: the same for list_landmarks_inshop.txt, list_attr_cloth.txt and
      list_attr_items.txt.
    archive_bytes: image name -> bytes to store instead of the image's JPEG (e.g. a truncated one).
    omit: image names to leave out of the archive.
  """
  archive_bytes = archive_bytes or {}
  (root / "Eval").mkdir(parents=True, exist_ok=True)
  (root / "Eval" / "list_eval_partition.txt").write_text(
      partition_text(images) if partition is None else partition)
  for file_name, given, correct in (("list_bbox_inshop.txt", bbox, bbox_text),
                                     ("list_landmarks_inshop.txt", landmarks, landmarks_text),
                                     ("list_attr_cloth.txt", attr_cloth, lambda _: attr_cloth_text()),
                                     ("list_attr_items.txt", attr_items, attr_items_text)):
    if given is not False:
      (root / "Anno").mkdir(exist_ok=True)
      (root / "Anno" / file_name).write_text(correct(images) if given is True else given)
  members = [(im.name, archive_bytes.get(im.name, im.jpeg)) for im in images if im.name not in omit]
  if form == "zip":
    (root / "Img").mkdir(exist_ok=True)
    folders = sorted({"/".join(name.split("/")[:depth]) + "/"
                      for name, _ in members for depth in range(1, 5)})
    with zipfile.ZipFile(root / "Img" / "img.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
      for folder in folders:  # The release's zip has folder entries too.
        archive.writestr(folder, b"")
      for name, data in members:
        archive.writestr(name, data)
  else:
    base = root / "Img" if form == "Img/img" else root
    for name, data in members:
      (base / name).parent.mkdir(parents=True, exist_ok=True)
      (base / name).write_bytes(data)
  return root
