"""Reads and checks the official DeepFashion2 release (train and validation), before anything is written.

The release (Ge et al., "DeepFashion2: A Versatile Benchmark for Detection, Pose Estimation, Segmentation and
Re-Identification of Clothing Images", CVPR 2019), as downloaded by hand:

  train.zip        entries train/image/NNNNNN.jpg and train/annos/NNNNNN.json (or the folder train/)
  validation.zip   entries validation/image/NNNNNN.jpg and validation/annos/NNNNNN.json (or validation/)

One annotation file per image:

  {"source": "user" | "shop", "pair_id": int,
   "item1": {"category_id": 1..13, "category_name": str, "style": int >= 0,
             "bounding_box": [x1, y1, x2, y2], "landmarks": [x1, y1, v1, ..., xn, yn, vn],
             "segmentation": [[...], ...], "scale": 1..3, "occlusion": 1..3, "zoom_in": 1..3,
             "viewpoint": 1..3},
   "item2": {...}, ...}

with n = `LANDMARK_COUNTS[category_id - 1]` landmarks, v = 2 visible, 1 occluded, 0 not labelled. A user item
and a shop item match when their images share `pair_id` and the items share a `style` > 0.

`validate_split(source)` reads every annotation once, checks it and returns an `ImagePlan` per image (small:
the annotations are read again, already checked, while writing); every problem is gathered into one
`DeepFashion2Error` that names the file and the JSON key. The zips are read member by member (nothing is
extracted); encrypted ones need the password (`open_split(..., password=)`), which is kept in memory only.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import json
import math
import os
import pathlib
import re
import zipfile
import zlib

from data_prep.problems import format_problems

# The 13 categories; `category_id` c of the release is class label c - 1.
CATEGORY_NAMES = ("short sleeve top", "long sleeve top", "short sleeve outwear", "long sleeve outwear", "vest",
                  "sling", "shorts", "trousers", "skirt", "short sleeve dress", "long sleeve dress", "vest dress",
                  "sling dress")
# Landmarks of each category, in the release's order (294 in all).
LANDMARK_COUNTS = (25, 33, 31, 39, 15, 15, 10, 14, 8, 29, 37, 19, 19)
SOURCES = ("user", "shop")
# The release's folders, and the splits written from each: validation's user items are the queries and its shop
# items the gallery, as in DeepFashion2's retrieval benchmark.
RELEASE_SPLITS = ("train", "validation")
SPLITS = ("train", "query", "gallery")

# item_id = offset + pair_id * STYLES_PER_PAIR + style for style > 0, so matching user and shop items share it;
# style 0 ("matches nothing") gets an id of its own, -(offset + image_id * STYLES_PER_PAIR + item number).
# Train and validation number their pairs independently; the offset keeps their ids apart.
STYLES_PER_PAIR = 1000
MAX_PAIR_ID = 999_999
ITEM_ID_OFFSET = {"train": 0, "validation": 1_000_000_000}

# ZIP compression method 99: WinZip AES encryption, which Python's zipfile cannot decrypt.
_AES_METHOD = 99
_IMAGE_NAME = re.compile(r"(train|validation)/image/(\d{6})\.jpg")
_ANNOTATION_NAME = re.compile(r"(train|validation)/annos/(\d{6})\.json")
_ITEM_KEY = re.compile(r"item([1-9]\d*)")


class DeepFashion2Error(ValueError):
  """The download in the manual dir is incomplete, damaged or unreadable; the message says what and where."""


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
  """One garment of an annotation file, checked.

  Attributes:
    number: n of its key `item<n>`.
    category_id: 1 to 13 (`CATEGORY_NAMES[category_id - 1]`).
    style: 0 (matches nothing) or the style shared by the matching items of its pair.
    bbox: `(x1, y1, x2, y2)` in pixels.
    landmarks: `LANDMARK_COUNTS[category_id - 1]` triples `(x, y, v)`: pixels and visibility (2 visible,
      1 occluded, 0 not labelled).
  """
  number: int
  category_id: int
  style: int
  bbox: tuple[float, float, float, float]
  landmarks: tuple[tuple[float, float, int], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Annotation:
  """One annotation file, checked: the image's source and pair, and its garments by item number."""
  source: str
  pair_id: int
  items: tuple[Item, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class ImagePlan:
  """What the validation pass keeps of an image (the items are read again while writing).

  Attributes:
    image_id: the number of `NNNNNN.jpg` (DeepFashion2's evaluation calls it image_id).
    source: "user" or "shop".
    pair_id: the image's pair.
    num_items: how many garments its annotation lists (one example each).
    positive_styles: the styles > 0 of its items.
  """
  image_id: int
  source: str
  pair_id: int
  num_items: int
  positive_styles: tuple[int, ...]


def image_name(split: str, image_id: int) -> str:
  return f"{split}/image/{image_id:06d}.jpg"


def annotation_name(split: str, image_id: int) -> str:
  return f"{split}/annos/{image_id:06d}.json"


def item_id(split: str, image_id: int, pair_id: int, item: Item) -> int:
  """The retrieval label: equal for a user and a shop item exactly when they match (see `STYLES_PER_PAIR`)."""
  offset = ITEM_ID_OFFSET[split]
  if item.style > 0:
    return offset + pair_id * STYLES_PER_PAIR + item.style
  return -(offset + image_id * STYLES_PER_PAIR + item.number)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."


def parse_annotation(data: bytes, where: str, problems: list[str], notes: list[str] | None = None
                     ) -> Annotation | None:
  """Parses and checks one annotation file; appends its problems (each naming `where` and the JSON key).

  Args:
    data: the file's bytes.
    where: how messages name the file, e.g. `train.zip: train/annos/000001.json`.
    problems: where problems are appended.
    notes: where oddities that do not stop a build are appended (a `category_name` that is not the name of
      its `category_id`: the id is what is used, and the names could not all be confirmed here).

  Returns:
    The annotation, or None when it has problems.
  """
  try:
    root = json.loads(data.decode("utf-8-sig"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    problems.append(f"{where}: not valid JSON ({e}).")
    return None
  if not isinstance(root, dict):
    problems.append(f"{where}: expected a JSON object with source, pair_id and item1, item2, ..., found "
                    f"{type(root).__name__}.")
    return None
  found = len(problems)
  source, pair_id = root.get("source"), root.get("pair_id")
  if source not in SOURCES:
    problems.append(f"{where}: source is {_short(source) if 'source' in root else 'missing'}; expected "
                    "\"user\" or \"shop\".")
  if not _is_int(pair_id) or not 0 <= pair_id <= MAX_PAIR_ID:
    problems.append(f"{where}: pair_id is {_short(pair_id) if 'pair_id' in root else 'missing'}; expected an "
                    f"integer in [0, {MAX_PAIR_ID}].")
  items = []
  for key in sorted((k for k in root if _ITEM_KEY.fullmatch(k)), key=lambda k: int(k[4:])):
    item = _parse_item(root[key], f"{where}: {key}", int(key[4:]), problems, notes)
    if item is not None:
      items.append(item)
  if len(problems) > found:
    return None
  return Annotation(source=source, pair_id=pair_id, items=tuple(items))


def _parse_item(value, where: str, number: int, problems: list[str], notes: list[str] | None) -> Item | None:
  """Checks one `item<n>` object of an annotation file."""
  if not isinstance(value, dict):
    problems.append(f"{where}: expected an object, found {_short(value)}.")
    return None
  found = len(problems)
  category_id = value.get("category_id")
  if not _is_int(category_id) or not 1 <= category_id <= len(CATEGORY_NAMES):
    problems.append(f"{where}.category_id is {_short(category_id) if 'category_id' in value else 'missing'}; "
                    f"expected an integer from 1 to {len(CATEGORY_NAMES)}.")
    category_id = None
  elif "category_name" in value and value["category_name"] != CATEGORY_NAMES[category_id - 1] and notes is not None:
    notes.append(f"{where}.category_name {_short(value['category_name'])} is not the name of category_id "
                 f"{category_id} ({CATEGORY_NAMES[category_id - 1]!r})")
  style = value.get("style")
  if not _is_int(style) or not 0 <= style < STYLES_PER_PAIR:
    problems.append(f"{where}.style is {_short(style) if 'style' in value else 'missing'}; expected an integer "
                    f"in [0, {STYLES_PER_PAIR - 1}] (0: no pair).")
  box = value.get("bounding_box")
  if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
    problems.append(f"{where}.bounding_box is {_short(box) if 'bounding_box' in value else 'missing'}; "
                    "expected 4 numbers [x1, y1, x2, y2].")
    box = None
  elif box[0] > box[2] or box[1] > box[3]:
    problems.append(f"{where}.bounding_box {_short(box)} has x1 > x2 or y1 > y2.")
  landmarks = value.get("landmarks")
  if not isinstance(landmarks, list) or not all(_is_number(v) for v in landmarks):
    problems.append(f"{where}.landmarks is {_short(landmarks) if 'landmarks' in value else 'missing'}; "
                    "expected a list of numbers [x1, y1, v1, ...].")
    landmarks = None
  elif category_id is not None:
    count = LANDMARK_COUNTS[category_id - 1]
    if len(landmarks) != 3 * count:
      problems.append(f"{where}.landmarks has {len(landmarks)} numbers; category {category_id} "
                      f"({CATEGORY_NAMES[category_id - 1]}) has {count} landmarks, so {3 * count}.")
    else:
      bad = next((i for i in range(count) if landmarks[3 * i + 2] not in (0, 1, 2)), None)
      if bad is not None:
        problems.append(f"{where}.landmarks: landmark {bad + 1} has visibility {_short(landmarks[3 * bad + 2])}; "
                        "expected 0 (not labelled), 1 (occluded) or 2 (visible).")
  if len(problems) > found:
    return None
  triples = tuple((float(landmarks[i]), float(landmarks[i + 1]), int(landmarks[i + 2]))
                  for i in range(0, len(landmarks), 3))
  return Item(number=number, category_id=category_id, style=style, bbox=tuple(float(v) for v in box),
              landmarks=triples)


class SplitSource:
  """One release folder (`train` or `validation`): its zip (members read, nothing extracted) or its tree.

  The password of an encrypted zip lives in this object only: it is never written, logged or put in a message.
  """

  def __init__(self, manual_dir: pathlib.Path, split: str, *, password: str | None = None):
    self.split = split
    zip_path, tree = manual_dir / f"{split}.zip", manual_dir / split
    self._zip, self._password = None, None
    if zip_path.is_file():
      self.label = zip_path.relative_to(manual_dir).as_posix()
      try:
        self._zip = zipfile.ZipFile(zip_path)
      except (zipfile.BadZipFile, OSError) as e:
        raise DeepFashion2Error(f"{self.label} is not a readable zip file ({e}); the download is probably "
                                "incomplete: download it again.") from e
      self._password = password.encode("utf-8") if password is not None else None
    elif (tree / "annos").is_dir() or (tree / "image").is_dir():
      self.label, self._root = f"{split}/", manual_dir
    else:
      raise DeepFashion2Error(f"{manual_dir} has neither {split}.zip nor an extracted {split}/ folder (with "
                              f"{split}/image/ and {split}/annos/). Put DeepFashion2's {split}.zip there (see "
                              "docs/deepfashion.md).")

  def close(self):
    if self._zip is not None:
      self._zip.close()

  @property
  def is_zip(self) -> bool:
    return self._zip is not None

  def names(self) -> Iterator[str]:
    """Names of the files, relative to the manual dir (`train/image/000001.jpg`)."""
    if self._zip is not None:
      yield from (info.filename for info in self._zip.infolist() if not info.is_dir())
      return
    for folder in ("image", "annos"):
      base = self._root / self.split / folder
      if base.is_dir():
        yield from (f"{self.split}/{folder}/{entry.name}" for entry in os.scandir(base) if entry.is_file())

  def check_readable(self):
    """Refuses AES-encrypted zips and a missing or wrong password.

    Raises:
      DeepFashion2Error: saying what to do.
    """
    if self._zip is None:
      return
    infos = [i for i in self._zip.infolist() if not i.is_dir()]
    if any(i.compress_type == _AES_METHOD for i in infos):
      raise DeepFashion2Error(
          f"{self.label} is encrypted with AES, which Python's zipfile cannot decrypt. Extract it once with a "
          f"tool that can (e.g. `7z x {self.label}`, which asks for the password) into the manual dir, then "
          "run again: the extracted folder is read instead.")
    encrypted = [i for i in infos if i.flag_bits & 0x1]
    if encrypted and self._password is None:
      raise DeepFashion2Error(
          f"{self.label} is encrypted: pass its password with --password (DeepFashion2's authors send it when "
          "you fill in their form), or extract the zip once yourself and run again.")
    if encrypted:
      # zipfile checks one byte of the key per member (1 wrong password in 256 passes that); reading the
      # smallest member whole also checks its CRC-32.
      probe = min(encrypted, key=lambda i: i.file_size)
      try:
        self._zip.read(probe, pwd=self._password)
      except (RuntimeError, zipfile.BadZipFile, zlib.error) as e:
        raise DeepFashion2Error(f"The password does not open {self.label} ({e}). Check it and run again.") from e

  @property
  def encrypted_bytes(self) -> int:
    """Bytes of encrypted members (Python decrypts them slowly: about 1 MB/s)."""
    if self._zip is None:
      return 0
    return sum(i.compress_size for i in self._zip.infolist() if i.flag_bits & 0x1)

  def read(self, name: str) -> bytes:
    """The bytes of one file; OSError/ValueError (with the reason) when it cannot be read whole."""
    if self._zip is not None:
      try:
        return self._zip.read(name, pwd=self._password)  # Checks the member's CRC-32.
      except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, RuntimeError) as e:
        raise ValueError(f"cannot be read from {self.label}: {e}") from e
    return (self._root / name).read_bytes()


def validate_split(source: SplitSource, problems: list[str], notes: list[str] | None = None) -> list[ImagePlan]:
  """Checks a release folder: every image has an annotation and the reverse, every annotation is valid.

  Args:
    source: the folder or zip.
    problems: where problems are appended (file and JSON key named).
    notes: where oddities that do not stop a build are appended (see `parse_annotation`).

  Returns:
    One plan per image that has a valid annotation, by image id.
  """
  images, annotations, strays = set(), set(), []
  for name in source.names():
    match = _IMAGE_NAME.fullmatch(name) or _ANNOTATION_NAME.fullmatch(name)
    if match is None or match.group(1) != source.split:
      strays.append(name)
      continue
    (images if name.endswith(".jpg") else annotations).add(int(match.group(2)))
  if not images and not annotations:
    example = next((n for n in strays if not n.startswith("__MACOSX")), None)
    problems.append(f"{source.label}: holds no {source.split}/image/NNNNNN.jpg or {source.split}/annos/NNNNNN.json"
                    + (f" (it holds e.g. {example!r})." if example else " (it is empty)."))
    return []
  for image_id in sorted(images - annotations):
    problems.append(f"{source.label}: {image_name(source.split, image_id)} has no annotation "
                    f"{annotation_name(source.split, image_id)}.")
  for image_id in sorted(annotations - images):
    problems.append(f"{source.label}: {annotation_name(source.split, image_id)} has no image "
                    f"{image_name(source.split, image_id)}.")
  plans = []
  for image_id in sorted(images & annotations):
    name = annotation_name(source.split, image_id)
    where = f"{source.label}: {name}"
    try:
      data = source.read(name)
    except (OSError, ValueError) as e:
      problems.append(f"{where}: {e}.")
      continue
    annotation = parse_annotation(data, where, problems, notes)
    if annotation is not None:
      plans.append(ImagePlan(image_id=image_id, source=annotation.source, pair_id=annotation.pair_id,
                             num_items=len(annotation.items),
                             positive_styles=tuple(sorted({i.style for i in annotation.items if i.style > 0}))))
  return plans


@dataclasses.dataclass(frozen=True)
class BuildPlan:
  """What to write: the images of each split (train, query, gallery) by image id, and warnings."""
  images: dict[str, tuple[ImagePlan, ...]]
  warnings: tuple[str, ...] = ()

  def num_items(self, split: str) -> int:
    return sum(p.num_items for p in self.images[split])


def plan_build(train: Sequence[ImagePlan], validation: Sequence[ImagePlan], *,
               validation_label: str = "validation.zip", notes: Sequence[str] = ()) -> BuildPlan:
  """Splits the release into train, query (validation user images) and gallery (validation shop images).

  Warns (does not refuse) about images without garments, queries whose pair and style no gallery item has
  (those can never be retrieved; DeepFashion2's evaluation script asserts they do not exist) and the `notes`
  of the annotations.
  """
  images = {"train": tuple(train),
            "query": tuple(p for p in validation if p.source == "user"),
            "gallery": tuple(p for p in validation if p.source == "shop")}
  warnings = []
  empty = [p for split in images.values() for p in split if not p.num_items]
  if empty:
    warnings.append(f"{len(empty)} image(s) list no garment, so they give no example (e.g. image "
                    f"{empty[0].image_id:06d}).")
  in_gallery = {(p.pair_id, s) for p in images["gallery"] for s in p.positive_styles}
  lonely = [(p, s) for p in images["query"] for s in p.positive_styles if (p.pair_id, s) not in in_gallery]
  if lonely:
    (p, s), = lonely[:1]
    warnings.append(f"{validation_label}: {len(lonely)} query item(s) have no gallery item of their pair and "
                    f"style, so they cannot be retrieved (e.g. pair_id {p.pair_id} style {s} in "
                    f"{image_name('validation', p.image_id)}).")
  if notes:
    warnings.append(f"{len(notes)} garment(s) have a category_name other than their category_id's (e.g. "
                    f"{notes[0]}); category_id is what is used.")
  return BuildPlan(images=images, warnings=tuple(warnings))


def validate_release(manual_dir: str | os.PathLike, *, password: str | None = None
                     ) -> tuple[dict[str, SplitSource], BuildPlan]:
  """Finds, opens and checks both release folders (images are decoded later, as they are written).

  Returns:
    The open sources (`train`, `validation`; close them when done) and the plan.

  Raises:
    DeepFashion2Error: with every problem found, each naming its file and JSON key.
  """
  root = pathlib.Path(manual_dir).expanduser()
  if not root.is_dir():
    raise DeepFashion2Error(f"The manual dir {root} does not exist. Download DeepFashion2's train.zip and "
                            "validation.zip into it (see docs/deepfashion.md) and pass it as --manual_dir.")
  sources = {}
  try:
    for split in RELEASE_SPLITS:
      sources[split] = SplitSource(root, split, password=password)
      sources[split].check_readable()
    problems, notes = [], []
    plans = {split: validate_split(source, problems, notes) for split, source in sources.items()}
    if problems:
      raise DeepFashion2Error(format_problems(
          "The DeepFashion2 download", problems,
          "No dataset was written. Fix or re-download the files named above (see docs/deepfashion.md), then "
          "run again."))
    plan = plan_build(plans["train"], plans["validation"], validation_label=sources["validation"].label,
                      notes=notes)
    empty = [split for split in SPLITS if not plan.num_items(split)]
    if empty:
      raise DeepFashion2Error(
          f"The DeepFashion2 download gives no garment for split(s) {', '.join(empty)} (train: train's images; "
          "query: validation's user images; gallery: validation's shop images), so there is nothing to train or "
          "evaluate on. Check that train.zip and validation.zip are DeepFashion2's.")
    return sources, plan
  except BaseException:
    for source in sources.values():
      source.close()
    raise
