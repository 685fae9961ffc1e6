"""Reads and checks the official DeepFashion In-shop release, before anything is written.

The release (Liu et al., "DeepFashion: Powering Robust Clothes Recognition and Retrieval with Rich
Annotations", CVPR 2016), as downloaded by hand from the DeepFashion page:

  Img/img.zip                    entries img/<GENDER>/<Category>/id_XXXXXXXX/NN_V_view.jpg
                                 (or the same tree extracted as Img/img/ or img/)
  Eval/list_eval_partition.txt   line 1: number of images; line 2: `image_name item_id evaluation_status`;
                                 then one row per image, fields separated by runs of spaces
  Anno/list_bbox_inshop.txt      optional; line 1: count; line 2:
                                 `image_name clothes_type pose_type x_1 y_1 x_2 y_2`; one row per image
  Anno/list_landmarks_inshop.txt optional; line 1: count; line 2: `image_name clothes_type variation_type
                                 landmark_visibility_1 landmark_location_x_1 landmark_location_y_1 ...`;
                                 one row per image with 6 (upper), 4 (lower) or 8 (full body) landmarks
  Anno/list_attr_cloth.txt       optional, with the next; line 1: number of attributes (463); line 2:
                                 header; then one attribute name a row
  Anno/list_attr_items.txt       line 1: number of items; line 2: header (`item_id ...`); then
                                 `id_XXXXXXXX` and one value in {-1, 0, 1} per attribute

`validate_release(manual_dir)` finds these files, lists the archive and calls the pure `plan_build`, which
parses the text files, checks them against the archive listing and returns a `BuildPlan` (what to write,
split by split, in file order) or raises one `InshopDownloadError` listing every problem with its file and
line. Images themselves are decoded while the builder writes them (`check_jpeg`), so that the release is
read once.
"""

from collections.abc import Collection, Iterable, Sequence
import dataclasses
import os
import pathlib
import re
import zipfile
import zlib

import numpy as np

from data_prep import inshop_features
from data_prep.problems import format_problems

# Files of the release, relative to the manual dir. The first existing candidate wins; the zip comes before
# an extracted tree so that an interrupted `unzip` beside a complete zip does not hide the zip.
PARTITION_CANDIDATES = ("Eval/list_eval_partition.txt", "list_eval_partition.txt")
ZIP_CANDIDATES = ("Img/img.zip", "img.zip")
# An extracted tree is named by the folder that holds `img/`.
EXTRACTED_CANDIDATES = ("Img", ".")
BBOX_CANDIDATES = ("Anno/list_bbox_inshop.txt", "list_bbox_inshop.txt")
LANDMARKS_CANDIDATES = ("Anno/list_landmarks_inshop.txt", "list_landmarks_inshop.txt")
ATTR_CLOTH_CANDIDATES = ("Anno/list_attr_cloth.txt", "list_attr_cloth.txt")
ATTR_ITEMS_CANDIDATES = ("Anno/list_attr_items.txt", "list_attr_items.txt")
# Annotation files of the release that this builder does not read; reported so users know.
UNUSED_ANNOTATIONS = ("list_item_inshop.txt", "list_description_inshop.json")

PARTITION_HEADER = ("image_name", "item_id", "evaluation_status")
BBOX_HEADER = ("image_name", "clothes_type", "pose_type", "x_1", "y_1", "x_2", "y_2")
# Only these leading fields of the other headers are checked: the rest of those header lines could not be
# confirmed from a copy of the release (see docs/deepfashion.md).
LANDMARKS_HEADER_START = ("image_name", "clothes_type", "variation_type")
ATTR_CLOTH_HEADER_START = ("attribute_name",)
ATTR_ITEMS_HEADER_START = ("item_id",)

# Names of the codes in Anno/list_bbox_inshop.txt; index = the code in the file, 0 = no annotation.
CLOTHES_TYPE_NAMES = inshop_features.CLOTHES_TYPE_NAMES
POSE_TYPE_NAMES = inshop_features.POSE_TYPE_NAMES
# variation_type of list_landmarks_inshop.txt: 1 normal pose ... 5 large zoom-in.
NUM_VARIATION_TYPES = 5
# The release's attribute vocabulary (Anno/list_attr_cloth.txt); the `attributes` feature has this length.
NUM_ATTRIBUTES = 463

# Counts of the full release (the DeepFashion In-shop benchmark); a download that differs gets a warning.
REFERENCE_COUNTS = {
    "images": 52_712,
    "items": 7_982,
    "categories": 23,
    "train images": 25_882,
    "train items": 3_997,
    "query images": 14_218,
    "gallery images": 12_612,
    "query/gallery items": 3_985,
}


# img/<GENDER>/<Category>/id_<digits>/<file>: one folder level each, so that no name can leave the tree.
_IMAGE_NAME = re.compile(r"img/(WOMEN|MEN)/([A-Za-z0-9_\-]+)/(id_(\d+))/([^/\\]+)")
_ITEM_ID = re.compile(r"id_(\d+)")


class InshopDownloadError(ValueError):
  """The download in the manual dir is incomplete or damaged; the message lists what and where."""


@dataclasses.dataclass(frozen=True, slots=True)
class ImageRecord:
  """One image of the release, as the partition (and bbox) files describe it.

  Attributes:
    image_name: path inside the release, e.g. `img/WOMEN/Dresses/id_00000002/02_1_front.jpg`.
    item_id: the product, from `id_XXXXXXXX`.
    category: `GENDER/Category`, one of `inshop_features.CATEGORY_NAMES`.
    split: `train`, `query` or `gallery`.
    line: 1-based line of the row in the partition file.
    bbox: `(x_1, y_1, x_2, y_2)` in pixels, or None without a box.
    clothes_type: code from the bbox file (1 upper, 2 lower, 3 full), else from the landmark file, else 0.
    pose_type: code from the bbox file (1 frontal ... 6 stand-alone), 0 without one.
    landmarks: the 8 slots of `inshop_features.LANDMARK_NAMES`, each `(visibility, x, y)` in pixels or None
      (a slot that the garment's clothes type does not have); None without landmarks.
  """
  image_name: str
  item_id: int
  category: str
  split: str
  line: int
  bbox: tuple[int, int, int, int] | None = None
  clothes_type: int = 0
  pose_type: int = 0
  landmarks: tuple[tuple[int, int, int] | None, ...] | None = None

  @property
  def gender(self) -> str:
    return self.category.split("/")[0]


@dataclasses.dataclass(frozen=True)
class BuildPlan:
  """What to write: every image of the release by split, in the order of the partition file.

  Attributes:
    records: split name -> records of that split (all genders).
    has_bbox: whether bbox, clothes type and pose type come from an annotation file.
    has_landmarks: whether landmarks come from an annotation file.
    attribute_names: names of the `NUM_ATTRIBUTES` attributes, or () without the attribute files.
    item_attributes: item id -> `[NUM_ATTRIBUTES]` int8 values (1, -1, 0 unknown); empty without the files.
    warnings: differences from the full release that do not stop a build.
  """
  records: dict[str, tuple[ImageRecord, ...]]
  has_bbox: bool
  has_landmarks: bool = False
  attribute_names: tuple[str, ...] = ()
  item_attributes: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
  warnings: tuple[str, ...] = ()

  @property
  def has_attributes(self) -> bool:
    return bool(self.attribute_names)

  def select(self, genders: Collection[str]) -> dict[str, tuple[ImageRecord, ...]]:
    """The records of the given genders (`WOMEN`, `MEN`), by split; every split must keep an image."""
    selected = {split: tuple(r for r in records if r.gender in genders)
                for split, records in self.records.items()}
    empty = [split for split, records in selected.items() if not records]
    if empty:
      raise InshopDownloadError(
          f"The download has no {'/'.join(sorted(genders))} images in split(s) {', '.join(empty)}, so "
          "there is nothing to train or evaluate on; check Eval/list_eval_partition.txt.")
    return selected


def _data_lines(text: str) -> list[tuple[int, list[str]]]:
  """(1-based line number, whitespace-separated fields) of every non-blank line."""
  return [(number, line.split()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _check_count_and_header(lines: list[tuple[int, list[str]]], file_label: str, header: tuple[str, ...],
                            problems: list[str], *, counted: str = "images", header_start_only: bool = False
                            ) -> list[tuple[int, list[str]]]:
  """Checks the count line and the header of an annotation file; returns its rows.

  Args:
    lines: `_data_lines` of the file.
    file_label: the file's name in messages.
    header: the expected header fields (with `header_start_only`, its expected first fields).
    problems: where problems are appended.
    counted: what the count line counts, for messages.
    header_start_only: check only the first `len(header)` fields of the header line.
  """
  if not lines:
    problems.append(f"{file_label}: the file is empty.")
    return []
  (count_line, count_fields), rows = lines[0], lines[2:]
  if len(count_fields) != 1 or not count_fields[0].isdigit():
    problems.append(f"{file_label} line {count_line}: expected the number of {counted}, "
                    f"found {' '.join(count_fields)!r}.")
  elif int(count_fields[0]) != len(rows):
    problems.append(f"{file_label} line {count_line}: says {int(count_fields[0])} {counted} but the file has "
                    f"{len(rows)} rows (a truncated or edited file?).")
  found = tuple(lines[1][1]) if len(lines) > 1 else ()
  if (found[:len(header)] if header_start_only else found) != header:
    header_line = lines[1][0] if len(lines) > 1 else count_line + 1
    expected = " ".join(header) + (" ..." if header_start_only else "")
    problems.append(f"{file_label} line {header_line}: expected the header {expected!r}, "
                    f"found {' '.join(found)!r}.")
  return rows


def _parse_partition(text: str, file_label: str, problems: list[str]) -> list[ImageRecord]:
  """Parses list_eval_partition.txt into records, appending every problem found."""
  records, first_line_of = [], {}
  for line, fields in _check_count_and_header(_data_lines(text), file_label, PARTITION_HEADER, problems):
    where = f"{file_label} line {line}"
    if len(fields) != 3:
      problems.append(f"{where}: expected 3 fields ({' '.join(PARTITION_HEADER)}), found {len(fields)}: "
                      f"{' '.join(fields)!r}.")
      continue
    image_name, item_field, status = fields
    match = _IMAGE_NAME.fullmatch(image_name)
    if match is None or match.group(5) in (".", ".."):
      problems.append(f"{where}: {image_name!r} is not an image name of the release "
                      "(img/<GENDER>/<Category>/id_XXXXXXXX/<file>.jpg).")
      continue
    gender, category_folder, path_item, path_item_digits, _ = match.groups()
    category = f"{gender}/{category_folder}"
    row_ok = True
    if category not in inshop_features.CATEGORY_NAMES:
      problems.append(f"{where}: unknown category {category!r} in {image_name} "
                      "(expected one of the 23 In-shop categories, e.g. WOMEN/Dresses).")
      row_ok = False
    if _ITEM_ID.fullmatch(item_field) is None:
      problems.append(f"{where}: item_id {item_field!r} is not of the form id_XXXXXXXX.")
      row_ok = False
    elif item_field != path_item:
      problems.append(f"{where}: item_id {item_field} does not match the folder {path_item} of {image_name}.")
      row_ok = False
    if status not in inshop_features.SPLITS:
      problems.append(f"{where}: unknown evaluation_status {status!r} (expected train, query or gallery).")
      row_ok = False
    if image_name in first_line_of:
      problems.append(f"{where}: {image_name} is listed twice (first on line {first_line_of[image_name]}).")
      row_ok = False
    first_line_of.setdefault(image_name, line)
    if row_ok:
      records.append(ImageRecord(image_name=image_name, item_id=int(path_item_digits), category=category,
                                 split=status, line=line))
  return records


def _check_train_test_disjoint(records: Iterable[ImageRecord], file_label: str, problems: list[str]):
  """Retrieval is evaluated on products never seen in training: train and query/gallery items differ."""
  first_train_line, first_test_line = {}, {}
  for r in records:
    (first_train_line if r.split == "train" else first_test_line).setdefault(r.item_id, r.line)
  for item in sorted(first_train_line.keys() & first_test_line.keys()):
    problems.append(f"{file_label}: item id_{item:08d} is in train (line {first_train_line[item]}) and in "
                    f"query/gallery (line {first_test_line[item]}); train and test items must not overlap.")


def _check_archive(records: Sequence[ImageRecord], archive_names: Collection[str], file_label: str,
                   archive_label: str, problems: list[str]):
  """Every listed image must be in the archive."""
  missing = [r for r in records if r.image_name not in archive_names]
  if records and len(missing) == len(records):
    sample = sorted(n for n in archive_names if not n.endswith("/"))[:1]
    problems.append(f"{archive_label}: none of the {len(records)} images of {file_label} is in it"
                    + (f" (it holds e.g. {sample[0]!r}; expected names like {records[0].image_name!r})."
                       if sample else " (it holds no files)."))
  for r in missing:
    problems.append(f"{file_label} line {r.line}: {r.image_name} is not in {archive_label}.")


def _parse_bbox(text: str, file_label: str, wanted: Collection[str], problems: list[str]
                ) -> dict[str, tuple[int, tuple[int, int, int, int], int, int]]:
  """Parses list_bbox_inshop.txt: image name -> (line, (x_1, y_1, x_2, y_2), clothes type, pose)."""
  boxes, hint = {}, " (remove the file to build without boxes)"
  for line, fields in _check_count_and_header(_data_lines(text), file_label, BBOX_HEADER, problems):
    where = f"{file_label} line {line}"
    if len(fields) != 7 or not all(f.isdigit() for f in fields[1:]):
      problems.append(f"{where}: expected an image name and 6 non-negative integers "
                      f"({' '.join(BBOX_HEADER)}), found {' '.join(fields)!r}{hint}.")
      continue
    name, (clothes_type, pose, x1, y1, x2, y2) = fields[0], map(int, fields[1:])
    if name not in wanted:
      continue  # A box for an image that the partition file does not list: nothing to attach it to.
    row_ok = True
    if not 1 <= clothes_type < len(CLOTHES_TYPE_NAMES):
      problems.append(f"{where}: clothes_type {clothes_type} is not 1 (upper), 2 (lower) or 3 (full){hint}.")
      row_ok = False
    if not 1 <= pose < len(POSE_TYPE_NAMES):
      problems.append(f"{where}: pose_type {pose} is not between 1 and {len(POSE_TYPE_NAMES) - 1}{hint}.")
      row_ok = False
    if x1 > x2 or y1 > y2:
      problems.append(f"{where}: the box ({x1}, {y1}, {x2}, {y2}) has x_1 > x_2 or y_1 > y_2{hint}.")
      row_ok = False
    if name in boxes:
      problems.append(f"{where}: {name} has two boxes (first on line {boxes[name][0]}){hint}.")
      row_ok = False
    if row_ok:
      boxes[name] = (line, (x1, y1, x2, y2), clothes_type, pose)
  return boxes


def _parse_landmarks(text: str, file_label: str, wanted: Collection[str], problems: list[str]
                     ) -> dict[str, tuple[int, int, tuple[tuple[int, int, int] | None, ...]]]:
  """Parses list_landmarks_inshop.txt: image name -> (line, clothes type, the 8 landmark slots).

  A row is `image_name clothes_type variation_type` and one `visibility x y` triple per landmark of its
  clothes type (6 upper, 4 lower, 8 full body), in the file's order for that type; 8 triples are also
  accepted for every type (a row padded to the full-body width), of which only the type's first ones are
  read. The triples are put in the slots of `inshop_features.LANDMARK_NAMES`.
  """
  landmarks, hint = {}, " (remove the file to build without landmarks)"
  slots_of = inshop_features.LANDMARK_SLOTS
  for line, fields in _check_count_and_header(_data_lines(text), file_label, LANDMARKS_HEADER_START, problems,
                                              header_start_only=True):
    where = f"{file_label} line {line}"
    values = fields[1:]
    if len(fields) < 3 or not all(_is_int(f) for f in values):
      problems.append(f"{where}: expected an image name, clothes_type, variation_type and integer landmark "
                      f"triples, found {' '.join(fields)!r}{hint}.")
      continue
    name, (clothes_type, variation, *triples) = fields[0], [int(v) for v in values]
    if name not in wanted:
      continue  # Landmarks of an image that the partition file does not list: nothing to attach them to.
    if clothes_type not in slots_of:
      problems.append(f"{where}: clothes_type {clothes_type} is not 1 (upper), 2 (lower) or 3 (full){hint}.")
      continue
    row_ok = True
    if not 1 <= variation <= NUM_VARIATION_TYPES:
      problems.append(f"{where}: variation_type {variation} is not between 1 and {NUM_VARIATION_TYPES}{hint}.")
      row_ok = False
    count = len(slots_of[clothes_type])
    if len(triples) not in (3 * count, 3 * len(inshop_features.LANDMARK_NAMES)):
      problems.append(f"{where}: clothes_type {clothes_type} ({CLOTHES_TYPE_NAMES[clothes_type]}) has {count} "
                      f"landmarks, so the row needs {3 + 3 * count} fields (or {3 + 3 * 8}), found "
                      f"{len(fields)}{hint}.")
      continue
    points = [tuple(triples[3 * i:3 * i + 3]) for i in range(count)]
    for number, (visibility, x, y) in enumerate(points, start=1):
      if visibility not in (inshop_features.VISIBLE, inshop_features.OCCLUDED, inshop_features.TRUNCATED):
        problems.append(f"{where}: landmark {number} has visibility {visibility}; expected 0 (visible), "
                        f"1 (occluded) or 2 (truncated){hint}.")
        row_ok = False
      if x < 0 or y < 0:
        problems.append(f"{where}: landmark {number} is at ({x}, {y}); coordinates are pixels >= 0{hint}.")
        row_ok = False
    if name in landmarks:
      problems.append(f"{where}: {name} has two landmark rows (first on line {landmarks[name][0]}){hint}.")
      row_ok = False
    if row_ok:
      slots: list[tuple[int, int, int] | None] = [None] * len(inshop_features.LANDMARK_NAMES)
      for slot, point in zip(slots_of[clothes_type], points):
        slots[slot] = point
      landmarks[name] = (line, clothes_type, tuple(slots))
  return landmarks


def _is_int(field: str) -> bool:
  return field.lstrip("-").isdigit()


def _parse_attribute_names(text: str, file_label: str, problems: list[str]) -> tuple[str, ...]:
  """Parses list_attr_cloth.txt: the attribute names, one a row (a trailing type number is dropped)."""
  lines = _data_lines(text)
  rows = _check_count_and_header(lines, file_label, ATTR_CLOTH_HEADER_START, problems, counted="attributes",
                                 header_start_only=True)
  # DeepFashion's attribute files may end each name with its attribute type (`attribute_name attribute_type`);
  # names themselves may hold spaces.
  typed = len(lines) > 1 and len(lines[1][1]) > 1
  names = tuple(" ".join(fields[:-1] if typed and len(fields) > 1 and fields[-1].isdigit() else fields)
                for _, fields in rows)
  if len(names) != NUM_ATTRIBUTES and not problems:
    problems.append(f"{file_label}: lists {len(names)} attributes; the In-shop release has {NUM_ATTRIBUTES} "
                    "(the dataset's `attributes` feature has that length). Download the file again, or remove "
                    "it and list_attr_items.txt to build without attributes.")
  return names


def _parse_item_attributes(text: str, file_label: str, num_attributes: int, wanted_items: Collection[int],
                           problems: list[str]) -> dict[int, np.ndarray]:
  """Parses list_attr_items.txt: item id -> `[num_attributes]` int8 values in {-1, 0, 1}."""
  attributes, first_line_of, hint = {}, {}, " (remove both attribute files to build without attributes)"
  for line, fields in _check_count_and_header(_data_lines(text), file_label, ATTR_ITEMS_HEADER_START, problems,
                                              counted="items", header_start_only=True):
    where = f"{file_label} line {line}"
    match = _ITEM_ID.fullmatch(fields[0])
    if match is None:
      problems.append(f"{where}: item_id {fields[0]!r} is not of the form id_XXXXXXXX{hint}.")
      continue
    item = int(match.group(1))
    values = fields[1:]
    if len(values) != num_attributes:
      problems.append(f"{where}: {fields[0]} has {len(values)} attribute values; list_attr_cloth.txt names "
                      f"{num_attributes}{hint}.")
      continue
    bad = next((v for v in values if v not in ("-1", "0", "1")), None)
    if bad is not None:
      problems.append(f"{where}: attribute value {bad!r} of {fields[0]} is not -1, 0 or 1{hint}.")
      continue
    if item in first_line_of:
      problems.append(f"{where}: {fields[0]} is listed twice (first on line {first_line_of[item]}){hint}.")
      continue
    first_line_of[item] = line
    if item in wanted_items:
      attributes[item] = np.array(values, dtype=np.int8)
  return attributes


def _count_warnings(records: Sequence[ImageRecord], file_label: str) -> list[str]:
  """Differences from the full release and query items without gallery images: reported, not fatal."""
  by_split = {split: [r for r in records if r.split == split] for split in inshop_features.SPLITS}
  query_items = {r.item_id for r in by_split["query"]}
  gallery_items = {r.item_id for r in by_split["gallery"]}
  counts = {
      "images": len(records),
      "items": len({r.item_id for r in records}),
      "categories": len({r.category for r in records}),
      "train images": len(by_split["train"]),
      "train items": len({r.item_id for r in by_split["train"]}),
      "query images": len(by_split["query"]),
      "gallery images": len(by_split["gallery"]),
      "query/gallery items": len(query_items | gallery_items),
  }
  warnings = []
  differences = [f"{counts[k]} {k} (full release: {v})"
                 for k, v in REFERENCE_COUNTS.items() if counts[k] != v]
  if differences:
    warnings.append(f"{file_label} differs from the full DeepFashion In-shop release (a partial or modified "
                    f"download?): {'; '.join(differences)}. Published Recall@K numbers use the full release.")
  lonely = sorted(query_items - gallery_items)
  if lonely:
    warnings.append(f"{file_label}: {len(lonely)} query item(s) have no gallery image, so their queries "
                    f"cannot be retrieved (e.g. id_{lonely[0]:08d}).")
  return warnings


def plan_build(partition_text: str, archive_names: Collection[str], bbox_text: str | None = None, *,
               landmarks_text: str | None = None, attr_cloth_text: str | None = None,
               attr_items_text: str | None = None, partition_label: str = PARTITION_CANDIDATES[0],
               archive_label: str = ZIP_CANDIDATES[0], bbox_label: str = BBOX_CANDIDATES[0],
               landmarks_label: str = LANDMARKS_CANDIDATES[0], attr_cloth_label: str = ATTR_CLOTH_CANDIDATES[0],
               attr_items_label: str = ATTR_ITEMS_CANDIDATES[0]) -> BuildPlan:
  """Parses and checks the release's text files against the archive listing.

  Args:
    partition_text: contents of `Eval/list_eval_partition.txt`.
    archive_names: names of the files in the image archive (`img/WOMEN/...jpg`).
    bbox_text: contents of `Anno/list_bbox_inshop.txt`, or None when it is absent.
    landmarks_text: contents of `Anno/list_landmarks_inshop.txt`, or None.
    attr_cloth_text: contents of `Anno/list_attr_cloth.txt` (the attribute names), or None.
    attr_items_text: contents of `Anno/list_attr_items.txt` (the item attributes), or None; it and
      `attr_cloth_text` come together.
    partition_label, archive_label, bbox_label, landmarks_label, attr_cloth_label, attr_items_label: names of
      the files in messages.

  Returns:
    The plan: records by split in file order, the annotations, and warnings for differences from the full
    release.

  Raises:
    InshopDownloadError: listing every problem found, each with its file and line.
  """
  problems, warnings = [], []
  records = _parse_partition(partition_text, partition_label, problems)
  _check_train_test_disjoint(records, partition_label, problems)
  _check_archive(records, archive_names, partition_label, archive_label, problems)
  names = {r.image_name for r in records}
  if bbox_text is not None:
    boxes = _parse_bbox(bbox_text, bbox_label, names, problems)
    unboxed = [r for r in records if r.image_name not in boxes]
    if unboxed:
      # Not fatal: these images get the "unknown" codes that a build without the file gives every image.
      warnings.append(f"{bbox_label} has no box for {len(unboxed)} image(s) (e.g. {unboxed[0].image_name}, "
                      f"{partition_label} line {unboxed[0].line}); they get has_bbox False, clothes_type and "
                      "pose_type 'unknown' and the whole image as bbox.")
    records = [dataclasses.replace(r, bbox=boxes[r.image_name][1], clothes_type=boxes[r.image_name][2],
                                   pose_type=boxes[r.image_name][3]) if r.image_name in boxes else r
               for r in records]
  if landmarks_text is not None:
    landmarks = _parse_landmarks(landmarks_text, landmarks_label, names, problems)
    missing = [r for r in records if r.image_name not in landmarks]
    if missing:
      warnings.append(f"{landmarks_label} has no landmarks for {len(missing)} image(s) (e.g. "
                      f"{missing[0].image_name}, {partition_label} line {missing[0].line}); they get "
                      "has_landmarks False.")
    disagree = [r for r in records if r.image_name in landmarks and r.clothes_type
                and r.clothes_type != landmarks[r.image_name][1]]
    if disagree:
      r = disagree[0]
      warnings.append(f"{landmarks_label} and {bbox_label} give different clothes types for {len(disagree)} "
                      f"image(s) (e.g. {r.image_name}: {landmarks_label} line {landmarks[r.image_name][0]} says "
                      f"{landmarks[r.image_name][1]}, the bbox file {r.clothes_type}); clothes_type is the "
                      "bbox file's, landmark slots follow the landmark file's.")
    records = [dataclasses.replace(r, landmarks=landmarks[r.image_name][2],
                                   clothes_type=r.clothes_type or landmarks[r.image_name][1])
               if r.image_name in landmarks else r for r in records]
  attribute_names, item_attributes = (), {}
  if (attr_cloth_text is None) != (attr_items_text is None):
    present, absent = ((attr_cloth_label, attr_items_label) if attr_items_text is None
                       else (attr_items_label, attr_cloth_label))
    problems.append(f"{present} is there but {absent} is not: the attributes need both files (names and "
                    "values). Add the missing one, or remove this one to build without attributes.")
  elif attr_cloth_text is not None:
    name_problems = []
    attribute_names = _parse_attribute_names(attr_cloth_text, attr_cloth_label, name_problems)
    problems += name_problems
    if not name_problems:
      item_attributes = _parse_item_attributes(attr_items_text, attr_items_label, len(attribute_names),
                                               {r.item_id for r in records}, problems)
      missing = sorted({r.item_id for r in records} - item_attributes.keys())
      if missing:
        warnings.append(f"{attr_items_label} has no attributes for {len(missing)} item(s) (e.g. "
                        f"id_{missing[0]:08d}); their images get has_attributes False.")
  if problems:
    raise InshopDownloadError(format_problems(
        "The DeepFashion In-shop download", problems,
        "Fix or re-download the files named above (see docs/deepfashion.md), then run again."))
  return BuildPlan(
      records={split: tuple(r for r in records if r.split == split) for split in inshop_features.SPLITS},
      has_bbox=bbox_text is not None,
      has_landmarks=landmarks_text is not None,
      attribute_names=attribute_names,
      item_attributes=item_attributes,
      warnings=tuple(_count_warnings(records, partition_label) + warnings))


@dataclasses.dataclass(frozen=True)
class ReleaseFiles:
  """Where the release's files are in a manual dir.

  Attributes:
    manual_dir: the folder the user downloaded into.
    partition: `Eval/list_eval_partition.txt`.
    images: `Img/img.zip`, or the folder that holds the extracted `img/` tree.
    images_are_zip: whether `images` is the zip.
    bbox: `Anno/list_bbox_inshop.txt`, or None.
    landmarks: `Anno/list_landmarks_inshop.txt`, or None.
    attr_cloth: `Anno/list_attr_cloth.txt`, or None.
    attr_items: `Anno/list_attr_items.txt`, or None.
    unused_annotations: other annotation files of the release that are present but not read.
  """
  manual_dir: pathlib.Path
  partition: pathlib.Path
  images: pathlib.Path
  images_are_zip: bool
  bbox: pathlib.Path | None
  landmarks: pathlib.Path | None = None
  attr_cloth: pathlib.Path | None = None
  attr_items: pathlib.Path | None = None
  unused_annotations: tuple[pathlib.Path, ...] = ()

  def label(self, path: pathlib.Path) -> str:
    """`path` relative to the manual dir, as messages name it."""
    return path.relative_to(self.manual_dir).as_posix() or "."

  @property
  def images_label(self) -> str:
    return self.label(self.images) if self.images_are_zip else self.label(self.images / "img") + "/"


def find_release_files(manual_dir: str | os.PathLike) -> ReleaseFiles:
  """Finds the release's files in `manual_dir`; raises InshopDownloadError saying what is missing."""
  root = pathlib.Path(manual_dir).expanduser()
  if not root.is_dir():
    raise InshopDownloadError(f"The manual dir {root} does not exist. Download the DeepFashion In-shop files "
                              "into it (see docs/deepfashion.md) and pass it as --manual_dir.")
  found = lambda candidates: next((root / c for c in candidates if (root / c).is_file()), None)
  partition, zip_path, bbox = found(PARTITION_CANDIDATES), found(ZIP_CANDIDATES), found(BBOX_CANDIDATES)
  extracted = next((root / c for c in EXTRACTED_CANDIDATES if (root / c / "img").is_dir()), None)
  missing = []
  if partition is None:
    missing.append("Eval/list_eval_partition.txt (the train/query/gallery split)")
  if zip_path is None and extracted is None:
    missing.append("Img/img.zip (the images; or the same tree extracted as Img/img/ or img/)")
  if missing:
    present = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:12]
    raise InshopDownloadError(
        f"{root} lacks " + " and ".join(missing) + ". It holds: " + (", ".join(present) or "nothing") + ".\n"
        "Point --manual_dir at the folder that contains Eval/ and Img/ of the In-shop Clothes Retrieval "
        "Benchmark (see docs/deepfashion.md).")
  unused = tuple(p for name in UNUSED_ANNOTATIONS for p in (root / "Anno" / name, root / name) if p.is_file())
  return ReleaseFiles(manual_dir=root, partition=partition, images=zip_path or extracted,
                      images_are_zip=zip_path is not None, bbox=bbox, landmarks=found(LANDMARKS_CANDIDATES),
                      attr_cloth=found(ATTR_CLOTH_CANDIDATES), attr_items=found(ATTR_ITEMS_CANDIDATES),
                      unused_annotations=unused)


def list_archive(files: ReleaseFiles) -> set[str]:
  """Names of the files in the image archive, `img/...` relative to the archive's root."""
  if files.images_are_zip:
    try:
      with zipfile.ZipFile(files.images) as archive:
        return {name for name in archive.namelist() if not name.endswith("/")}
    except (zipfile.BadZipFile, OSError) as e:
      raise InshopDownloadError(f"{files.images_label} is not a readable zip file ({e}); the download is "
                                "probably incomplete: download it again.") from e
  names = set()
  for folder, _, file_names in os.walk(files.images / "img"):
    relative = pathlib.Path(folder).relative_to(files.images).as_posix()
    names.update(f"{relative}/{f}" for f in file_names)
  return names


def _read_text(path: pathlib.Path, label: str) -> str:
  try:
    return path.read_text(encoding="utf-8-sig")
  except (OSError, UnicodeDecodeError) as e:
    raise InshopDownloadError(f"Cannot read {label} as a text file ({e}); download it again.") from e


def validate_release(manual_dir: str | os.PathLike) -> tuple[ReleaseFiles, BuildPlan]:
  """Finds, reads and checks the release in `manual_dir` (images are checked later, as they are written).

  Returns:
    The release's files and the plan of what to write.

  Raises:
    InshopDownloadError: with every problem found, each with its file and line.
  """
  files = find_release_files(manual_dir)
  text = lambda path: _read_text(path, files.label(path)) if path else None
  label = lambda path, candidates: files.label(path) if path else candidates[0]
  plan = plan_build(
      text(files.partition),
      list_archive(files),
      text(files.bbox),
      landmarks_text=text(files.landmarks),
      attr_cloth_text=text(files.attr_cloth),
      attr_items_text=text(files.attr_items),
      partition_label=files.label(files.partition),
      archive_label=files.images_label,
      bbox_label=label(files.bbox, BBOX_CANDIDATES),
      landmarks_label=label(files.landmarks, LANDMARKS_CANDIDATES),
      attr_cloth_label=label(files.attr_cloth, ATTR_CLOTH_CANDIDATES),
      attr_items_label=label(files.attr_items, ATTR_ITEMS_CANDIDATES))
  return files, plan


class ImageArchive:
  """Reads image bytes from the zip (member reads only, nothing extracted) or the extracted tree.

  Names must come from a `BuildPlan`, whose names have been checked to stay inside `img/`.
  """

  def __init__(self, files: ReleaseFiles):
    self._files = files
    self._zip = zipfile.ZipFile(files.images) if files.images_are_zip else None

  def __enter__(self) -> "ImageArchive":
    return self

  def __exit__(self, *exc_info):
    self.close()

  def close(self):
    if self._zip is not None:
      self._zip.close()

  def read(self, image_name: str) -> bytes:
    """The bytes of one image; OSError/ValueError (with the reason) when it cannot be read whole."""
    if self._zip is not None:
      try:
        return self._zip.read(image_name)  # Checks the member's CRC-32.
      except (zipfile.BadZipFile, zlib.error, EOFError, KeyError) as e:
        raise ValueError(f"cannot be read from {self._files.images_label}: {e}") from e
    return (self._files.images / image_name).read_bytes()
