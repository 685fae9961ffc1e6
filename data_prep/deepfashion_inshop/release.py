"""Reads and checks the official DeepFashion In-shop release, before anything is written.

The release (Liu et al., "DeepFashion: Powering Robust Clothes Recognition and Retrieval with Rich
Annotations", CVPR 2016), as downloaded by hand from the DeepFashion page:

  Img/img.zip                    entries img/<GENDER>/<Category>/id_XXXXXXXX/NN_V_view.jpg
                                 (or the same tree extracted as Img/img/ or img/)
  Eval/list_eval_partition.txt   line 1: number of images; line 2: `image_name item_id evaluation_status`;
                                 then one row per image, fields separated by runs of spaces
  Anno/list_bbox_inshop.txt      optional; line 1: count; line 2:
                                 `image_name clothes_type pose_type x_1 y_1 x_2 y_2`; one row per image

`validate_release(manual_dir)` finds these files, lists the archive and calls the pure `plan_build`, which
parses the text files, checks them against the archive listing and returns a `BuildPlan` (what to write,
split by split, in file order) or raises one `InshopDownloadError` listing every problem with its file and
line. Images themselves are decoded while the builder writes them (`check_jpeg`), so that the release is
read once.
"""

from collections.abc import Collection, Iterable, Sequence
import dataclasses
import io
import os
import pathlib
import re
import zipfile
import zlib

from PIL import Image

from data_prep import inshop_features

# Files of the release, relative to the manual dir. The first existing candidate wins; the zip comes before
# an extracted tree so that an interrupted `unzip` beside a complete zip does not hide the zip.
PARTITION_CANDIDATES = ("Eval/list_eval_partition.txt", "list_eval_partition.txt")
ZIP_CANDIDATES = ("Img/img.zip", "img.zip")
# An extracted tree is named by the folder that holds `img/`.
EXTRACTED_CANDIDATES = ("Img", ".")
BBOX_CANDIDATES = ("Anno/list_bbox_inshop.txt", "list_bbox_inshop.txt")
# Annotation files of the release that this builder does not read (yet); reported so users know.
UNUSED_ANNOTATIONS = ("list_landmarks_inshop.txt", "list_item_inshop.txt", "list_description_inshop.json",
                      "list_attr_items.txt", "list_attr_cloth.txt")

PARTITION_HEADER = ("image_name", "item_id", "evaluation_status")
BBOX_HEADER = ("image_name", "clothes_type", "pose_type", "x_1", "y_1", "x_2", "y_2")

# Names of the codes in Anno/list_bbox_inshop.txt; index = the code in the file, 0 = no annotation.
CLOTHES_TYPE_NAMES = ("unknown", "upper", "lower", "full")
POSE_NAMES = ("unknown", "frontal", "side", "back", "zoom_out", "zoom_in", "stand_alone")

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

MAX_LISTED_PROBLEMS = 20

# img/<GENDER>/<Category>/id_<digits>/<file>: one folder level each, so that no name can leave the tree.
_IMAGE_NAME = re.compile(r"img/(WOMEN|MEN)/([A-Za-z0-9_\-]+)/(id_(\d+))/([^/\\]+)")
_ITEM_ID = re.compile(r"id_(\d+)")


class InshopDownloadError(ValueError):
  """The download in the manual dir is incomplete or damaged; the message lists what and where."""


def format_problems(what: str, problems: Sequence[str], advice: str) -> str:
  """One message for many problems: the first `MAX_LISTED_PROBLEMS`, then how many more."""
  noun = "problem" if len(problems) == 1 else "problems"
  lines = [f"{what} has {len(problems)} {noun}:"]
  lines += [f"  {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
  if len(problems) > MAX_LISTED_PROBLEMS:
    lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more.")
  lines.append(advice)
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True, slots=True)
class ImageRecord:
  """One image of the release, as the partition (and bbox) files describe it.

  Attributes:
    image_name: path inside the release, e.g. `img/WOMEN/Dresses/id_00000002/02_1_front.jpg`.
    item_id: the product, from `id_XXXXXXXX`.
    category: `GENDER/Category`, one of `inshop_features.CATEGORY_NAMES`.
    split: `train`, `query` or `gallery`.
    line: 1-based line of the row in the partition file.
    bbox: `(x_1, y_1, x_2, y_2)` in pixels, or None without a bbox file.
    clothes_type: code from the bbox file (1 upper, 2 lower, 3 full), 0 without one.
    pose: code from the bbox file (1 frontal ... 6 stand-alone), 0 without one.
  """
  image_name: str
  item_id: int
  category: str
  split: str
  line: int
  bbox: tuple[int, int, int, int] | None = None
  clothes_type: int = 0
  pose: int = 0

  @property
  def gender(self) -> str:
    return self.category.split("/")[0]


@dataclasses.dataclass(frozen=True)
class BuildPlan:
  """What to write: every image of the release by split, in the order of the partition file.

  Attributes:
    records: split name -> records of that split (all genders).
    has_bbox: whether bbox, clothes type and pose come from an annotation file.
    warnings: differences from the full release that do not stop a build.
  """
  records: dict[str, tuple[ImageRecord, ...]]
  has_bbox: bool
  warnings: tuple[str, ...] = ()

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
                            problems: list[str]) -> list[tuple[int, list[str]]]:
  """Checks the count line and the header of an annotation file; returns its rows."""
  if not lines:
    problems.append(f"{file_label}: the file is empty.")
    return []
  (count_line, count_fields), rows = lines[0], lines[2:]
  if len(count_fields) != 1 or not count_fields[0].isdigit():
    problems.append(f"{file_label} line {count_line}: expected the number of images, "
                    f"found {' '.join(count_fields)!r}.")
  elif int(count_fields[0]) != len(rows):
    problems.append(f"{file_label} line {count_line}: says {int(count_fields[0])} images but the file has "
                    f"{len(rows)} rows (a truncated or edited file?).")
  if len(lines) < 2 or tuple(lines[1][1]) != header:
    header_line, header_fields = lines[1] if len(lines) > 1 else (count_line + 1, [])
    problems.append(f"{file_label} line {header_line}: expected the header {' '.join(header)!r}, "
                    f"found {' '.join(header_fields)!r}.")
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
    if not 1 <= pose < len(POSE_NAMES):
      problems.append(f"{where}: pose_type {pose} is not between 1 and {len(POSE_NAMES) - 1}{hint}.")
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
               partition_label: str = PARTITION_CANDIDATES[0], archive_label: str = ZIP_CANDIDATES[0],
               bbox_label: str = BBOX_CANDIDATES[0]) -> BuildPlan:
  """Parses and checks the release's text files against the archive listing.

  Args:
    partition_text: contents of `Eval/list_eval_partition.txt`.
    archive_names: names of the files in the image archive (`img/WOMEN/...jpg`).
    bbox_text: contents of `Anno/list_bbox_inshop.txt`, or None when it is absent.
    partition_label: name of the partition file in messages.
    archive_label: name of the image archive in messages.
    bbox_label: name of the bbox file in messages.

  Returns:
    The plan: records by split in file order, and warnings for differences from the full release.

  Raises:
    InshopDownloadError: listing every problem found, each with its file and line.
  """
  problems, warnings = [], []
  records = _parse_partition(partition_text, partition_label, problems)
  _check_train_test_disjoint(records, partition_label, problems)
  _check_archive(records, archive_names, partition_label, archive_label, problems)
  if bbox_text is not None:
    boxes = _parse_bbox(bbox_text, bbox_label, {r.image_name for r in records}, problems)
    unboxed = [r for r in records if r.image_name not in boxes]
    if unboxed:
      # Not fatal: these images get the "unknown" codes that a build without the file gives every image.
      warnings.append(f"{bbox_label} has no box for {len(unboxed)} image(s) (e.g. {unboxed[0].image_name}, "
                      f"{partition_label} line {unboxed[0].line}); they get clothes_type and pose 'unknown' "
                      "and the whole image as bbox.")
    records = [dataclasses.replace(r, bbox=boxes[r.image_name][1], clothes_type=boxes[r.image_name][2],
                                   pose=boxes[r.image_name][3]) if r.image_name in boxes else r
               for r in records]
  if problems:
    raise InshopDownloadError(format_problems(
        "The DeepFashion In-shop download", problems,
        "Fix or re-download the files named above (see docs/deepfashion.md), then run again."))
  return BuildPlan(
      records={split: tuple(r for r in records if r.split == split) for split in inshop_features.SPLITS},
      has_bbox=bbox_text is not None,
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
    unused_annotations: other annotation files of the release that are present but not read.
  """
  manual_dir: pathlib.Path
  partition: pathlib.Path
  images: pathlib.Path
  images_are_zip: bool
  bbox: pathlib.Path | None
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
                      images_are_zip=zip_path is not None, bbox=bbox, unused_annotations=unused)


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
  plan = plan_build(
      _read_text(files.partition, files.label(files.partition)),
      list_archive(files),
      _read_text(files.bbox, files.label(files.bbox)) if files.bbox else None,
      partition_label=files.label(files.partition),
      archive_label=files.images_label,
      bbox_label=files.label(files.bbox) if files.bbox else BBOX_CANDIDATES[0])
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


def check_jpeg(data: bytes) -> tuple[int, int]:
  """Decodes a JPEG fully, so that a truncated or corrupt file is caught; returns `(height, width)`.

  Raises:
    ValueError: saying why the bytes are not a usable JPEG.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.format != "JPEG":
        raise ValueError(f"is a {image.format} file, not a JPEG")
      if image.mode not in ("RGB", "L"):
        # Grayscale is widened to 3 channels on read; CMYK and others would not fit `[H, W, 3]`.
        raise ValueError(f"is a {image.mode} JPEG; convert it to RGB")
      image.load()  # Decodes every scan; raises OSError on truncated or corrupt data.
      return image.height, image.width
  except Image.UnidentifiedImageError as e:
    raise ValueError("is not an image file (PIL cannot identify it)") from e
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"is not a readable JPEG ({e})") from e
