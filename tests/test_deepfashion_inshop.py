"""The `deepfashion_inshop` builder on a fake download in the exact layout of the official release."""

import dataclasses
import logging
import zipfile

import fake_inshop  # tests/ is on sys.path under pytest.
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import inshop_features
from data_prep import problems
from data_prep.deepfashion_inshop import __main__ as cli
from data_prep.deepfashion_inshop import builder as builder_lib
from data_prep.deepfashion_inshop import release

IMAGES = fake_inshop.make_images()


def build(manual_dir, data_dir, config="all"):
  builder = builder_lib.DeepfashionInshop(config=config, data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def raw_records(builder, split):
  """Records of a split with the image left as the stored bytes."""
  source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return [source[i] for i in range(len(source))]


def expected_bbox(image):
  x1, y1, x2, y2 = image.bbox
  return np.array([y1 / image.height, x1 / image.width, y2 / image.height, x2 / image.width], np.float32)


def expected_landmarks(image):
  """`[8, 3]` (visibility, x, y) in image units in the slots of the 8 full-body landmarks; absent: (-1, 0, 0)."""
  slots = {1: (0, 1, 2, 3, 6, 7), 2: (4, 5, 6, 7), 3: tuple(range(8))}[image.clothes_type]
  expected = np.array([[-1, 0, 0]] * 8, np.float32)
  for slot, (visibility, x, y) in zip(slots, image.landmarks, strict=True):
    expected[slot] = (visibility, x / image.width, y / image.height)
  return expected


def replace_image(images, index, **changes):
  return [dataclasses.replace(im, **changes) if i == index else im for i, im in enumerate(images)]


# ---- Parsing and validation (pure, no build) ----

def test_plan_reads_rows_separated_by_runs_of_spaces():
  names = {im.name for im in IMAGES}
  plan = release.plan_build(fake_inshop.partition_text(IMAGES), names, fake_inshop.bbox_text(IMAGES))
  for split in inshop_features.SPLITS:
    want = [im for im in IMAGES if im.split == split]
    got = plan.records[split]
    assert [r.image_name for r in got] == [im.name for im in want]  # File order kept.
    assert [r.item_id for r in got] == [im.item_id for im in want]
    assert [r.category for r in got] == [im.category for im in want]
    assert [r.bbox for r in got] == [im.bbox for im in want]
    assert [(r.clothes_type, r.pose_type) for r in got] == [(im.clothes_type, im.pose_type) for im in want]
  # Line numbers count the count line and the header.
  first_query = plan.records["query"][0]
  assert first_query.line == 2 + 1 + [im.name for im in IMAGES].index(first_query.image_name)
  assert plan.has_bbox


def test_plan_without_bbox_file_leaves_annotations_unknown():
  plan = release.plan_build(fake_inshop.partition_text(IMAGES), {im.name for im in IMAGES}, None)
  assert not plan.has_bbox
  assert all(r.bbox is None and r.clothes_type == 0 and r.pose_type == 0
             for records in plan.records.values() for r in records)


def _full_release_partition() -> tuple[str, set[str]]:
  """A partition file with exactly the reference counts of the full release (names only, no images)."""
  rows, item = [], 0

  def add_item(statuses):
    nonlocal item
    item += 1
    category = inshop_features.CATEGORY_NAMES[item % 23]
    rows.extend((f"img/{category}/id_{item:08d}/{j:02d}_1_front.jpg", f"id_{item:08d}", s)
                for j, s in enumerate(statuses))

  for i in range(3997):  # 25,882 train images: 1,900 items of 7, the rest of 6.
    add_item(["train"] * (7 if i < 1900 else 6))
  for i in range(3985):  # 14,218 query (2,263 items of 4) and 12,612 gallery (657 items of 4) images.
    add_item(["query"] * (4 if i < 2263 else 3) + ["gallery"] * (4 if i < 657 else 3))
  text = "\n".join([str(len(rows)), "image_name item_id evaluation_status"]
                   + [f"{n:<60s}{i:<15s}{s}" for n, i, s in rows])
  return text, {n for n, _, _ in rows}


def test_full_release_counts_give_no_warning_and_partial_download_warns():
  text, names = _full_release_partition()
  plan = release.plan_build(text, names)
  assert plan.warnings == ()
  assert sum(len(r) for r in plan.records.values()) == 52_712
  partial = release.plan_build(fake_inshop.partition_text(IMAGES), {im.name for im in IMAGES})
  assert len(partial.warnings) == 1
  assert "12 images (full release: 52712)" in partial.warnings[0]
  assert "partial or modified download" in partial.warnings[0]


def _query_row_of_train_item():
  """The first query image moved into the folder of train item 2: the same product in train and test."""
  i = next(i for i, im in enumerate(IMAGES) if im.split == "query")
  return replace_image(IMAGES, i, name="img/WOMEN/Dresses/id_00000002/09_1_front.jpg"), i


HAT = replace_image(IMAGES, 0, name="img/WOMEN/Hats/id_00000002/1.jpg")

BAD_PARTITIONS = {
    "wrong count line": (lambda: (fake_inshop.partition_text(IMAGES, count=13), IMAGES),
                         ["Eval/list_eval_partition.txt line 1: says 13 images but the file has 12 rows"]),
    "count line not a number": (lambda: (fake_inshop.partition_text(IMAGES, count="12 images"), IMAGES),
                                ["line 1: expected the number of images, found '12 images'"]),
    "wrong header": (lambda: (fake_inshop.partition_text(IMAGES, header="image_name item_id status"), IMAGES),
                     ["line 2: expected the header 'image_name item_id evaluation_status'"]),
    "unknown status": (lambda: (fake_inshop.partition_text(IMAGES).replace("query", "val", 1), IMAGES),
                       ["line 8: unknown evaluation_status 'val' (expected train, query or gallery)"]),
    "train/test overlap": (
        lambda: (fake_inshop.partition_text(_query_row_of_train_item()[0]), _query_row_of_train_item()[0]),
        ["item id_00000002 is in train (line 3) and in query/gallery (line 8)"]),
    "unknown category": (
        lambda: (fake_inshop.partition_text(HAT), HAT),
        ["line 3: unknown category 'WOMEN/Hats'"]),
    "item id differs from folder": (
        lambda: (fake_inshop.partition_text(IMAGES).replace("id_00000007    train", "id_00000008  train", 1),
                 IMAGES),
        ["line 5: item_id id_00000008 does not match the folder id_00000007"]),
    "name leaving the tree": (
        lambda: (fake_inshop.partition_text(IMAGES).replace("img/MEN/Denim/id_00000007/01_1_front.jpg",
                                                            "img/../../../etc/passwd", 1), IMAGES),
        ["line 5: 'img/../../../etc/passwd' is not an image name of the release"]),
    "row with 2 fields": (lambda: (fake_inshop.partition_text(IMAGES).replace("id_00000011    ", "", 1),
                                   IMAGES),
                          ["line 7: expected 3 fields (image_name item_id evaluation_status), found 2"]),
}


@pytest.mark.parametrize("case", BAD_PARTITIONS)
def test_bad_partition_file_names_the_problem(tmp_path, case):
  make, expected = BAD_PARTITIONS[case]
  partition, images = make()
  fake_inshop.write_release(tmp_path, images, partition=partition, bbox=False)
  with pytest.raises(release.InshopDownloadError) as error:
    release.validate_release(tmp_path)
  for text in expected:
    assert text in str(error.value)


def test_missing_images_are_listed_with_their_rows(tmp_path):
  missing = IMAGES[3].name
  fake_inshop.write_release(tmp_path, IMAGES, omit=(missing,))
  with pytest.raises(release.InshopDownloadError,
                     match=rf"Eval/list_eval_partition.txt line 6: {missing} is not in Img/img.zip"):
    release.validate_release(tmp_path)


def test_many_problems_are_capped_with_a_count(tmp_path):
  rows = [(f"img/MEN/Denim/id_{i:08d}/01_1_front.jpg", "train") for i in range(30)]
  images = fake_inshop.make_images(rows, grayscale_index=None)
  fake_inshop.write_release(tmp_path, images, omit=tuple(im.name for im in images[:25]), bbox=False)
  with pytest.raises(release.InshopDownloadError) as error:
    release.validate_release(tmp_path)
  message = str(error.value)
  assert "has 25 problems" in message
  assert message.count("is not in Img/img.zip") == problems.MAX_LISTED_PROBLEMS
  assert "... and 5 more." in message


def test_bad_bbox_file_names_the_problem(tmp_path):
  bbox = fake_inshop.bbox_text(IMAGES).splitlines()
  bbox[3] = bbox[3].replace("  2  2  ", "  4  2  ", 1)  # Line 4: an unknown clothes type.
  bbox[4] = bbox[4].replace("003  002  017", "018  002  017", 1)  # Line 5: x_1 > x_2.
  bbox[0] = "11"  # Line 1: 11 rows announced, 12 present.
  fake_inshop.write_release(tmp_path, IMAGES, bbox="\n".join(bbox))
  with pytest.raises(release.InshopDownloadError) as error:
    release.validate_release(tmp_path)
  message = str(error.value)
  assert "Anno/list_bbox_inshop.txt line 4: clothes_type 4 is not 1 (upper), 2 (lower) or 3 (full)" in message
  assert "Anno/list_bbox_inshop.txt line 5: the box (18, 2, 17, 31) has x_1 > x_2 or y_1 > y_2" in message
  assert "Anno/list_bbox_inshop.txt line 1: says 11 images but the file has 12 rows" in message


def test_images_without_a_box_warn_and_stay_unknown(tmp_path):
  bbox = fake_inshop.bbox_text(IMAGES).splitlines()
  del bbox[5]  # No box for the 4th image.
  bbox[0] = str(len(bbox) - 2)
  fake_inshop.write_release(tmp_path, IMAGES, bbox="\n".join(bbox), landmarks=False)
  _, plan = release.validate_release(tmp_path)
  assert f"has no box for 1 image(s) (e.g. {IMAGES[3].name}" in plan.warnings[-1]
  unboxed = next(r for r in plan.records["train"] if r.image_name == IMAGES[3].name)
  assert (unboxed.bbox, unboxed.clothes_type, unboxed.pose_type) == (None, 0, 0)
  boxed = next(r for r in plan.records["train"] if r.image_name == IMAGES[2].name)
  assert (boxed.bbox, boxed.clothes_type, boxed.pose_type) == (
      IMAGES[2].bbox, IMAGES[2].clothes_type, IMAGES[2].pose_type)


def _edit_lines(text: str, edits: dict[int, tuple[str, str]] | None = None, *, count: str | None = None,
                header: str | None = None) -> str:
  """`text` with `old -> new` replaced once on the given 1-based lines, and the count or header line replaced."""
  lines = text.splitlines()
  for number, (old, new) in (edits or {}).items():
    assert old in lines[number - 1], (old, lines[number - 1])
    lines[number - 1] = lines[number - 1].replace(old, new, 1)
  if count is not None:
    lines[0] = count
  if header is not None:
    lines[1] = header
  return "\n".join(lines) + "\n"


LANDMARKS = fake_inshop.landmarks_text(IMAGES)


def _set_fields(text: str, line: int, fields: dict[int, str] | None = None, extra: tuple[str, ...] = (),
                drop_last: int = 0) -> str:
  """`text` with fields of one 1-based line replaced (by 0-based index), fields appended or dropped."""
  lines = text.splitlines()
  row = lines[line - 1].split()
  for index, value in (fields or {}).items():
    row[index] = value
  row = row[:len(row) - drop_last] + list(extra)
  lines[line - 1] = "  ".join(row)
  return "\n".join(lines) + "\n"


# Line i + 3 of the annotation files is IMAGES[i]; IMAGES[0] is upper-body (6 landmarks), IMAGES[1] lower (4),
# IMAGES[2] full body (8). Landmark rows: name, clothes_type, variation_type, then (visibility, x, y) triples.
BAD_LANDMARKS = {
    "wrong count line": (lambda: _edit_lines(LANDMARKS, count="13"),
                         "line 1: says 13 images but the file has 12 rows"),
    "wrong header": (lambda: _edit_lines(LANDMARKS, header="image_name clothes_type pose_type landmark_1"),
                     "line 2: expected the header 'image_name clothes_type variation_type ...', found "
                     "'image_name clothes_type pose_type landmark_1'"),
    "not a number": (lambda: _set_fields(LANDMARKS, 3, {5: "x12"}),
                     "line 3: expected an image name, clothes_type, variation_type and integer landmark triples"),
    "unknown clothes type": (lambda: _set_fields(LANDMARKS, 3, {1: "4"}),
                             "line 3: clothes_type 4 is not 1 (upper), 2 (lower) or 3 (full)"),
    "unknown variation type": (lambda: _set_fields(LANDMARKS, 4, {2: "6"}),
                               "line 4: variation_type 6 is not between 1 and 5"),
    "too few landmarks for the type": (
        lambda: _set_fields(LANDMARKS, 3, drop_last=3),
        "line 3: clothes_type 1 (upper) has 6 landmarks, so the row needs 21 fields (or 27), found 18"),
    "lower-body row with 6 landmarks": (
        lambda: _set_fields(LANDMARKS, 4, extra=("0", "001", "001", "0", "002", "002")),
        "line 4: clothes_type 2 (lower) has 4 landmarks, so the row needs 15 fields (or 27), found 21"),
    "bad visibility": (lambda: _set_fields(LANDMARKS, 5, {6: "7"}),
                       "line 5: landmark 2 has visibility 7; expected 0 (visible), 1 (occluded) or 2 (truncated)"),
    "negative coordinate": (lambda: _set_fields(LANDMARKS, 3, {4: "-4"}),
                            f"line 3: landmark 1 is at (-4, {IMAGES[0].landmarks[0][2]}); coordinates are "
                            "pixels >= 0"),
    "image listed twice": (
        lambda: _edit_lines(LANDMARKS, count="13") + LANDMARKS.splitlines()[2] + "\n",
        "line 15: img/WOMEN/Dresses/id_00000002/02_1_front.jpg has two landmark rows (first on line 3)"),
}


@pytest.mark.parametrize("case", BAD_LANDMARKS)
def test_bad_landmark_file_names_the_problem(tmp_path, case):
  make, expected = BAD_LANDMARKS[case]
  fake_inshop.write_release(tmp_path, IMAGES, landmarks=make())
  with pytest.raises(release.InshopDownloadError) as error:
    release.validate_release(tmp_path)
  assert f"Anno/list_landmarks_inshop.txt {expected}" in str(error.value)


def test_landmark_rows_padded_to_eight_are_read_by_clothes_type():
  """An upper-body row with 8 triples: the first 6 are its landmarks, the padding is not read."""
  lines = LANDMARKS.splitlines()
  lines[2] += "  0  000  000  0  000  000"
  plan = release.plan_build(fake_inshop.partition_text(IMAGES), {im.name for im in IMAGES},
                            landmarks_text="\n".join(lines))
  record = plan.records["train"][0]
  assert record.landmarks == (*IMAGES[0].landmarks[:4], None, None, *IMAGES[0].landmarks[4:])
  assert plan.has_landmarks and record.clothes_type == 1 and record.pose_type == 0


def test_images_without_landmarks_warn_and_clothes_types_that_disagree_warn():
  # IMAGES[0] full-body in the landmark file, upper-body in the bbox file; no landmarks for IMAGES[3].
  lines = _set_fields(LANDMARKS, 3, {1: "3"}, extra=("0", "001", "001", "0", "002", "002")).splitlines()
  del lines[5]
  lines[0] = str(len(lines) - 2)
  names = {im.name for im in IMAGES}
  plan = release.plan_build(fake_inshop.partition_text(IMAGES), names, fake_inshop.bbox_text(IMAGES),
                            landmarks_text="\n".join(lines))
  warnings = "\n".join(plan.warnings)
  assert f"has no landmarks for 1 image(s) (e.g. {IMAGES[3].name}" in warnings
  assert (f"give different clothes types for 1 image(s) (e.g. {IMAGES[0].name}: "
          "Anno/list_landmarks_inshop.txt line 3 says 3, the bbox file 1)") in warnings
  first = plan.records["train"][0]
  # Slots follow the landmark file's type (full body: the file's order is the slots' order).
  assert first.clothes_type == 1
  assert first.landmarks == (*IMAGES[0].landmarks, (0, 1, 1), (0, 2, 2))
  assert next(r for r in plan.records["train"] if r.image_name == IMAGES[3].name).landmarks is None


ATTR_ITEMS = fake_inshop.attr_items_text(IMAGES)
ATTR_CLOTH = fake_inshop.attr_cloth_text()

BAD_ATTRIBUTES = {
    "names file without values file": (
        dict(attr_items=False),
        "Anno/list_attr_cloth.txt is there but Anno/list_attr_items.txt is not: the attributes need both files"),
    "values file without names file": (
        dict(attr_cloth=False),
        "Anno/list_attr_items.txt is there but Anno/list_attr_cloth.txt is not"),
    "names count line": (dict(attr_cloth=_edit_lines(ATTR_CLOTH, count="464")),
                         "Anno/list_attr_cloth.txt line 1: says 464 attributes but the file has 463 rows"),
    "names header": (dict(attr_cloth=_edit_lines(ATTR_CLOTH, header="name type")),
                     "Anno/list_attr_cloth.txt line 2: expected the header 'attribute_name ...', found 'name type'"),
    "not 463 names": (dict(attr_cloth=fake_inshop.attr_cloth_text(fake_inshop.attribute_names()[:400])),
                      "Anno/list_attr_cloth.txt: lists 400 attributes; the In-shop release has 463"),
    "values count line": (dict(attr_items=_edit_lines(ATTR_ITEMS, count="5")),
                          "Anno/list_attr_items.txt line 1: says 5 items but the file has 6 rows"),
    "values header": (dict(attr_items=_edit_lines(ATTR_ITEMS, header="image_name attribute_labels")),
                      "Anno/list_attr_items.txt line 2: expected the header 'item_id ...'"),
    "bad item id": (dict(attr_items=_edit_lines(ATTR_ITEMS, {4: ("id_00000007", "item_7")})),
                    "Anno/list_attr_items.txt line 4: item_id 'item_7' is not of the form id_XXXXXXXX"),
    "too few values": (dict(attr_items=_set_fields(ATTR_ITEMS, 3, drop_last=1)),
                       "Anno/list_attr_items.txt line 3: id_00000002 has 462 attribute values; "
                       "list_attr_cloth.txt names 463"),
    "value not in -1, 0, 1": (dict(attr_items=_set_fields(ATTR_ITEMS, 5, {9: "2"})),
                              "Anno/list_attr_items.txt line 5: attribute value '2' of id_00000011 is not -1, 0 "
                              "or 1"),
    "item listed twice": (dict(attr_items=_edit_lines(ATTR_ITEMS, count="7") + ATTR_ITEMS.splitlines()[3] + "\n"),
                          "Anno/list_attr_items.txt line 9: id_00000007 is listed twice (first on line 4)"),
}


@pytest.mark.parametrize("case", BAD_ATTRIBUTES)
def test_bad_attribute_files_name_the_problem(tmp_path, case):
  files, expected = BAD_ATTRIBUTES[case]
  fake_inshop.write_release(tmp_path, IMAGES, **files)
  with pytest.raises(release.InshopDownloadError) as error:
    release.validate_release(tmp_path)
  assert expected in str(error.value)


def test_items_without_attributes_warn_and_get_none():
  lines = ATTR_ITEMS.splitlines()
  del lines[3]  # No attributes for item 7.
  lines[0] = str(len(lines) - 2)
  plan = release.plan_build(fake_inshop.partition_text(IMAGES), {im.name for im in IMAGES},
                            attr_cloth_text=ATTR_CLOTH, attr_items_text="\n".join(lines))
  assert "Anno/list_attr_items.txt has no attributes for 1 item(s) (e.g. id_00000007)" in plan.warnings[-1]
  assert 7 not in plan.item_attributes
  np.testing.assert_array_equal(plan.item_attributes[2], fake_inshop.item_attributes(2))
  assert plan.attribute_names == tuple(fake_inshop.attribute_names())  # The type number is not in the name.


def test_missing_files_and_broken_zip_are_reported(tmp_path):
  with pytest.raises(release.InshopDownloadError, match="does not exist"):
    release.validate_release(tmp_path / "nowhere")
  (tmp_path / "Img").mkdir()
  with pytest.raises(release.InshopDownloadError,
                     match=r"lacks Eval/list_eval_partition.txt .* and Img/img.zip"):
    release.validate_release(tmp_path)
  fake_inshop.write_release(tmp_path, IMAGES)
  zip_path = tmp_path / "Img" / "img.zip"
  zip_path.write_bytes(zip_path.read_bytes()[:-100])  # An interrupted download: no central directory.
  with pytest.raises(release.InshopDownloadError, match="Img/img.zip is not a readable zip file"):
    release.validate_release(tmp_path)


# ---- Building and reading back ----

def test_builder_is_registered_with_23_labels_in_every_config():
  assert tfds.builder_cls("deepfashion_inshop") is builder_lib.DeepfashionInshop
  for config in ("all", "women", "men"):
    builder = tfds.builder(f"deepfashion_inshop/{config}", data_dir="/nonexistent")
    assert builder.info.features["category"].names == list(inshop_features.CATEGORY_NAMES)


def test_build_from_zip_reads_back_everything(tmp_path):
  fake_inshop.write_release(tmp_path / "manual", IMAGES)
  builder = build(tmp_path / "manual", tmp_path / "data")
  assert builder.info.file_format == tfds.core.file_adapters.FileFormat.ARRAY_RECORD
  assert {s: builder.info.splits[s].num_examples for s in inshop_features.SPLITS} == {
      "train": 5, "query": 3, "gallery": 4}
  for split in inshop_features.SPLITS:
    want = [im for im in IMAGES if im.split == split]
    got = raw_records(builder, split)
    for record, image in zip(got, want, strict=True):
      assert record["image_name"].decode() == image.name
      assert record["image"] == image.jpeg  # The original bytes, not re-encoded.
      assert record["item_id"] == image.item_id
      assert record["category"] == inshop_features.CATEGORY_NAMES.index(image.category)
      np.testing.assert_allclose(record["bbox"], expected_bbox(image), rtol=1e-6)
      assert (record["clothes_type"], record["pose_type"]) == (image.clothes_type, image.pose_type)
      assert record["has_bbox"] and record["has_landmarks"] and record["has_attributes"]
      np.testing.assert_allclose(record["landmarks"], expected_landmarks(image), rtol=1e-6)
      np.testing.assert_array_equal(record["attributes"], fake_inshop.item_attributes(image.item_id))
      assert record["attributes"].dtype == np.int8
  assert builder.info.metadata["attribute_names"] == fake_inshop.attribute_names()
  assert builder.info.metadata["landmarks_from"] == "Anno/list_landmarks_inshop.txt"
  # What the trainer does: the registered name and a decoded image, grayscale widened to 3 channels.
  decoded = tfds.data_source("deepfashion_inshop/all", data_dir=str(tmp_path / "data"), split="train")
  for i, image in enumerate(im for im in IMAGES if im.split == "train"):
    assert decoded[i]["image"].shape == (image.height, image.width, 3)
    assert decoded[i]["image"].dtype == np.uint8


@pytest.mark.parametrize("form", ["Img/img", "img"])
def test_build_from_extracted_tree(tmp_path, form):
  fake_inshop.write_release(tmp_path / "manual", IMAGES, form=form, bbox=False, landmarks=False,
                            attr_cloth=False, attr_items=False)
  builder = build(tmp_path / "manual", tmp_path / "data")
  gallery = raw_records(builder, "gallery")
  assert [r["image"] for r in gallery] == [im.jpeg for im in IMAGES if im.split == "gallery"]
  # Without the annotation files: the same features, marked absent.
  assert all(r["clothes_type"] == 0 and r["pose_type"] == 0 for r in gallery)
  np.testing.assert_array_equal(np.stack([r["bbox"] for r in gallery]), [[0, 0, 1, 1]] * len(gallery))
  assert not any(r["has_bbox"] or r["has_landmarks"] or r["has_attributes"] for r in gallery)
  for r in gallery:
    np.testing.assert_array_equal(r["landmarks"], [[-1, 0, 0]] * 8)
    np.testing.assert_array_equal(r["attributes"], np.zeros(463, np.int8))
  assert builder.info.metadata["bbox_from"] is None
  assert builder.info.metadata["attribute_names"] == []


def test_gender_configs_keep_global_labels(tmp_path):
  fake_inshop.write_release(tmp_path / "manual", IMAGES)
  for config, gender in (("women", "WOMEN"), ("men", "MEN")):
    builder = build(tmp_path / "manual", tmp_path / "data", config=config)
    for split in inshop_features.SPLITS:
      want = [im for im in IMAGES if im.split == split and im.category.startswith(gender + "/")]
      got = raw_records(builder, split)
      assert [r["image_name"].decode() for r in got] == [im.name for im in want]
      labels = [inshop_features.CATEGORY_NAMES.index(im.category) for im in want]
      assert [r["category"] for r in got] == labels


def test_partial_download_builds_with_a_warning(tmp_path, caplog):
  fake_inshop.write_release(tmp_path / "manual", IMAGES)
  with caplog.at_level(logging.WARNING):
    builder = build(tmp_path / "manual", tmp_path / "data")
  assert builder.info.splits["train"].num_examples == 5
  assert any("differs from the full DeepFashion In-shop release" in r.getMessage() for r in caplog.records)


def _truncated(jpeg: bytes) -> bytes:
  """Cut in the middle of the compressed scan: the headers still parse, only a full decode fails."""
  start_of_scan = jpeg.index(b"\xff\xda")
  return jpeg[:(start_of_scan + len(jpeg)) // 2]


def _png(_: bytes) -> bytes:
  import io  # pylint: disable=g-import-not-at-top

  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.new("RGB", (8, 8)).save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.mark.parametrize("form", ["zip", "img"])
@pytest.mark.parametrize("damage, reason", [(_truncated, "is not a readable JPEG"), (_png, "is a PNG file")])
def test_bad_image_fails_the_build_and_leaves_no_dataset(tmp_path, form, damage, reason):
  bad = IMAGES[6]
  fake_inshop.write_release(tmp_path / "manual", IMAGES, form=form,
                            archive_bytes={bad.name: damage(bad.jpeg)})
  with pytest.raises(release.InshopDownloadError) as error:
    build(tmp_path / "manual", tmp_path / "data")
  assert f"{bad.name} (Eval/list_eval_partition.txt line 9) {reason}" in str(error.value)
  config_dir = tmp_path / "data" / "deepfashion_inshop" / "all"
  assert not config_dir.exists() or not any(config_dir.iterdir())  # No 2.0.0/, no incomplete.* folder.
  # A rerun after the download is fixed builds normally.
  fake_inshop.write_release(tmp_path / "manual", IMAGES, form=form)
  builder = build(tmp_path / "manual", tmp_path / "data")
  assert raw_records(builder, "gallery")[0]["image"] == bad.jpeg


# ---- The command ----

def test_command_builds_and_summarizes(tmp_path, capsys):
  fake_inshop.write_release(tmp_path / "manual", IMAGES)
  argv = ["--manual_dir", str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data"), "--config", "men"]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  version_dir = tmp_path / "data" / "deepfashion_inshop" / "men" / "2.0.0"
  assert f"to {version_dir}" in out
  assert "train         2 images of     1 items in 1 shards" in out
  assert "query         2 images of     2 items in 1 shards" in out
  assert "Warning: Eval/list_eval_partition.txt differs from the full" in out
  assert list(version_dir.glob("deepfashion_inshop-query.array_record-*"))
  assert cli.main(argv) == 0
  assert "already in" in capsys.readouterr().out
  assert cli.main(argv + ["--overwrite"]) == 0
  assert f"to {version_dir}" in capsys.readouterr().out
  assert not [p for p in version_dir.parent.iterdir() if p.name != "2.0.0"]  # The old copy is gone.


def test_command_reports_a_bad_download_without_traceback(tmp_path, capsys):
  fake_inshop.write_release(tmp_path / "manual", IMAGES, omit=(IMAGES[0].name,))
  assert cli.main(["--manual_dir", str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data")]) == 1
  err = capsys.readouterr().err
  assert f"error: The DeepFashion In-shop download has 1 problem:\n  Eval/list_eval_partition.txt line 3: " \
         f"{IMAGES[0].name} is not in Img/img.zip" in err
  assert "Traceback" not in err
  assert not (tmp_path / "data").exists()  # Checked before anything is written.


def test_zip_is_read_not_extracted(tmp_path, monkeypatch):
  fake_inshop.write_release(tmp_path / "manual", IMAGES)
  monkeypatch.setattr(zipfile.ZipFile, "extract", lambda *a, **k: pytest.fail("extract called"))
  monkeypatch.setattr(zipfile.ZipFile, "extractall", lambda *a, **k: pytest.fail("extractall called"))
  build(tmp_path / "manual", tmp_path / "data")
  assert sorted(p.name for p in (tmp_path / "manual").rglob("*") if p.is_file()) == [
      "img.zip", "list_attr_cloth.txt", "list_attr_items.txt", "list_bbox_inshop.txt", "list_eval_partition.txt",
      "list_landmarks_inshop.txt"]


def test_home_in_data_dir_is_expanded(tmp_path, monkeypatch):
  fake_inshop.write_release(tmp_path / "manual", IMAGES)
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  build("~/manual", "~/data", config="men")
  assert (tmp_path / "data" / "deepfashion_inshop" / "men" / "2.0.0" / "dataset_info.json").exists()
  assert not (tmp_path / "~").exists()
  assert len(tfds.data_source("deepfashion_inshop/men", data_dir="~/data", split="gallery")) == 2


def test_old_version_is_refused_with_the_command_that_rebuilds_it(tmp_path, capsys):
  manual, data = tmp_path / "manual", tmp_path / "data"
  fake_inshop.write_release(manual, IMAGES)
  build(manual, data, config="men")
  config_dir = data / "deepfashion_inshop" / "men"
  (config_dir / "2.0.0").rename(config_dir / "1.0.0")  # What an older jaxret left (without the new features).
  with pytest.raises(release.InshopDownloadError) as error:
    tfds.data_source("deepfashion_inshop/men", data_dir=str(data), split="train")
  message = str(error.value)
  assert "deepfashion_inshop/men 2.0.0 is not prepared" in message
  assert "only version 1.0.0 is there, written by an older jaxret" in message
  assert f"python -m data_prep.deepfashion_inshop --manual_dir DIR --data_dir {data} --config men" in message
  # That command builds the new version beside the old one, and says the old one may go.
  assert cli.main(["--manual_dir", str(manual), "--data_dir", str(data), "--config", "men"]) == 0
  assert f"Older version(s) 1.0.0 of deepfashion_inshop/men are still in {data}" in capsys.readouterr().out
  assert len(tfds.data_source("deepfashion_inshop/men", data_dir=str(data), split="gallery")) == 2


def test_command_summary_says_which_annotations_are_absent(tmp_path, capsys):
  fake_inshop.write_release(tmp_path / "manual", IMAGES, landmarks=False, attr_cloth=False, attr_items=False)
  assert cli.main(["--manual_dir", str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data")]) == 0
  out = capsys.readouterr().out
  assert "bbox/clothes_type/pose_type from Anno/list_bbox_inshop.txt" in out
  assert "landmarks absent (no Anno/list_landmarks_inshop.txt)" in out
  assert "attributes absent (no Anno/list_attr_cloth.txt and Anno/list_attr_items.txt)" in out


def test_overwrite_with_a_damaged_image_keeps_the_good_dataset(tmp_path, capsys):
  """The new build is made beside the old one and swapped in only when complete (docs/reliability.md)."""
  fake_inshop.write_release(tmp_path / "manual", IMAGES)
  argv = ["--manual_dir", str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data")]
  assert cli.main(argv) == 0
  version_dir = tmp_path / "data" / "deepfashion_inshop" / "all" / "2.0.0"
  before = {p.name: p.read_bytes() for p in version_dir.iterdir()}
  bad = IMAGES[6]
  fake_inshop.write_release(tmp_path / "manual", IMAGES, archive_bytes={bad.name: _truncated(bad.jpeg)})
  assert cli.main(argv + ["--overwrite"]) == 1
  assert "is not a readable JPEG" in capsys.readouterr().err
  assert {p.name: p.read_bytes() for p in version_dir.iterdir()} == before  # Untouched, still readable.
  assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["deepfashion_inshop"]  # No staging left.


def test_leftovers_of_a_killed_build_are_removed_by_the_next_one(tmp_path):
  from data_prep import staged_build  # pylint: disable=g-import-not-at-top
  fake_inshop.write_release(tmp_path / "manual", IMAGES)
  config_dir = tmp_path / "data" / "deepfashion_inshop" / "all"
  leftovers = [config_dir / "incomplete.AB12CD_2.0.0", tmp_path / "data" / ".staging-999999999"]
  for path in leftovers:
    (path / "part").mkdir(parents=True)
  assert cli.main(["--manual_dir", str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data")]) == 0
  assert not any(path.exists() for path in leftovers)
  assert sorted(p.name for p in config_dir.iterdir()) == ["2.0.0"]
  assert staged_build.remove_leftovers(str(tmp_path / "data"), str(config_dir / "2.0.0")) == []
