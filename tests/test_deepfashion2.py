"""The `deepfashion2` builder on a fake download in the layout of the official release."""

import json
import zipfile

import fake_deepfashion2  # tests/ is on sys.path under pytest.
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep.deepfashion2 import __main__ as cli
from data_prep.deepfashion2 import builder as builder_lib
from data_prep.deepfashion2 import release

TRAIN, VALIDATION = fake_deepfashion2.default_release()


def build(manual_dir, data_dir, password=None):
  builder = builder_lib.Deepfashion2(data_dir=str(data_dir), password=password)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def raw_records(builder, split):
  source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  return [source[i] for i in range(len(source))]


def expected_records(split):
  """(image, item) pairs of a split, in the order the builder writes them."""
  images = {"train": TRAIN, "query": [im for im in VALIDATION if im.source == "user"],
            "gallery": [im for im in VALIDATION if im.source == "shop"]}[split]
  return [(image, item) for image in images for item in image.items]


def expected_landmarks(image, item):
  codes = {2: 0, 1: 1}  # visible, occluded; not labelled -> absent (-1, 0, 0)
  return np.array([(codes[v], x / image.width, y / image.height) if v else (-1, 0, 0)
                   for x, y, v in item.landmarks], np.float32)


def test_registered_with_13_categories():
  assert tfds.builder_cls("deepfashion2") is builder_lib.Deepfashion2
  builder = tfds.builder("deepfashion2", data_dir="/nonexistent")
  assert builder.info.features["category"].names == list(fake_deepfashion2.CATEGORY_NAMES)
  assert builder.info.features["source"].names == ["user", "shop"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("deepfashion2")
  fake_deepfashion2.write_release(root / "manual")
  return build(root / "manual", root / "data")


@pytest.mark.parametrize("split", release.SPLITS)
def test_build_from_zips_reads_back_one_record_per_garment(built, split):
  assert built.info.file_format == tfds.core.file_adapters.FileFormat.ARRAY_RECORD
  records = raw_records(built, split)
  expected = expected_records(split)
  assert len(records) == len(expected)
  for record, (image, item) in zip(records, expected, strict=True):
    assert record["image"] == image.jpeg  # The whole photo, its original bytes.
    assert record["image_name"].decode() == image.image_name
    assert (record["image_id"], record["item_number"]) == (image.image_id, item.number)
    assert record["category"] == item.category_id - 1
    assert (record["style"], record["pair_id"]) == (item.style, image.pair_id)
    assert record["source"] == ["user", "shop"].index(image.source)
    x1, y1, x2, y2 = item.bbox
    np.testing.assert_allclose(record["bbox"], [y1 / image.height, x1 / image.width, y2 / image.height,
                                                x2 / image.width], rtol=1e-6)
    np.testing.assert_allclose(record["landmarks"], expected_landmarks(image, item), rtol=1e-6)
    assert record["landmarks"].shape == (fake_deepfashion2.LANDMARK_COUNTS[item.category_id - 1], 3)


def test_item_ids_match_exactly_the_positive_pairs(built):
  records = {split: raw_records(built, split) for split in release.SPLITS}
  # (release folder, pair, style, image, item) of every garment: the oracle for who matches whom.
  everything = [(split == "train", int(r["pair_id"]), int(r["style"]), int(r["image_id"]), int(r["item_number"]),
                 int(r["item_id"])) for split in release.SPLITS for r in records[split]]
  for a in everything:
    for b in everything:
      positive = a[0] == b[0] and a[1] == b[1] and a[2] == b[2] > 0
      same_garment = a[0] == b[0] and a[3:5] == b[3:5]
      assert (a[5] == b[5]) == (positive or same_garment), (a, b)
  assert all(g[5] < 0 for g in everything if g[2] == 0)
  # The pair of validation image 1's item 1 (pair 1, style 1): image 2's item 1 and shop image 3's item 1.
  query = {(r["image_id"], r["item_number"]): r["item_id"] for r in records["query"]}
  gallery = {(r["image_id"], r["item_number"]): r["item_id"] for r in records["gallery"]}
  assert query[(1, 1)] == query[(2, 1)] == gallery[(3, 1)] == 1_000_000_000 + 1 * 1000 + 1
  assert gallery[(3, 2)] == gallery[(4, 1)] == query[(1, 2)]


def test_decoded_images_and_the_registered_name(built):
  decoded = tfds.data_source("deepfashion2", data_dir=built.data_dir_root, split="train")
  for i, (image, _) in enumerate(expected_records("train")):
    assert decoded[i]["image"].shape == (image.height, image.width, 3)  # grayscale widened to 3 channels


def test_build_from_extracted_folders(tmp_path):
  fake_deepfashion2.write_release(tmp_path / "manual", form="tree")
  builder = build(tmp_path / "manual", tmp_path / "data")
  assert [r["image"] for r in raw_records(builder, "gallery")] == [im.jpeg for im, _ in expected_records("gallery")]
  assert builder.info.metadata["images_from"] == {"train": "train/", "validation": "validation/"}


def test_encrypted_zips_need_the_password_which_is_never_stored(tmp_path):
  fake_deepfashion2.write_release(tmp_path / "manual", password=b"open sesame")
  with pytest.raises(release.DeepFashion2Error, match="train.zip is encrypted: pass its password with --password"):
    build(tmp_path / "manual", tmp_path / "data")
  with pytest.raises(release.DeepFashion2Error, match="The password does not open train.zip"):
    build(tmp_path / "manual", tmp_path / "data", password="open sesame!")
  builder = build(tmp_path / "manual", tmp_path / "data", password="open sesame")
  assert [r["image"] for r in raw_records(builder, "query")] == [im.jpeg for im, _ in expected_records("query")]
  for path in (tmp_path / "data").rglob("*"):
    if path.is_file():
      assert b"open sesame" not in path.read_bytes(), path


def test_aes_zip_is_refused_with_what_to_do(tmp_path):
  fake_deepfashion2.write_release(tmp_path / "manual")
  fake_deepfashion2.mark_as_aes(tmp_path / "manual" / "train.zip")
  with pytest.raises(release.DeepFashion2Error,
                     match=r"train.zip is encrypted with AES, which Python's zipfile cannot decrypt. Extract it"):
    build(tmp_path / "manual", tmp_path / "data", password="x")


def _annotation_of(split, image_id, edit):
  """The JSON bytes of one fake image's annotation after `edit(obj)` (which may return a replacement)."""
  image = next(im for im in (TRAIN if split == "train" else VALIDATION) if im.image_id == image_id)
  obj = fake_deepfashion2.annotation(image)
  obj = edit(obj) or obj
  return {image.annotation_name: obj if isinstance(obj, bytes) else json.dumps(obj).encode()}


def _set(path, value):
  def edit(obj):
    target = obj
    for key in path[:-1]:
      target = target[key]
    if value is _DELETE:
      del target[path[-1]]
    else:
      target[path[-1]] = value
  return edit


_DELETE = object()
_VAL3 = "validation.zip: validation/annos/000003.json"

BAD_ANNOTATIONS = {
    "not JSON": (lambda o: b'{"source": "shop",', f"{_VAL3}: not valid JSON (Expecting property name"),
    "not an object": (lambda o: [o], f"{_VAL3}: expected a JSON object with source, pair_id and item1"),
    "unknown source": (_set(["source"], "store"), f"{_VAL3}: source is \"store\"; expected \"user\" or \"shop\""),
    "missing source": (_set(["source"], _DELETE), f"{_VAL3}: source is missing"),
    "pair_id not an integer": (_set(["pair_id"], "1"), f"{_VAL3}: pair_id is \"1\"; expected an integer"),
    "item not an object": (_set(["item2"], [1, 2]), f"{_VAL3}: item2: expected an object, found [1, 2]"),
    "category_id out of range": (_set(["item1", "category_id"], 14),
                                 f"{_VAL3}: item1.category_id is 14; expected an integer from 1 to 13"),
    "negative style": (_set(["item2", "style"], -1), f"{_VAL3}: item2.style is -1; expected an integer in [0, 999]"),
    "style a boolean": (_set(["item2", "style"], True), f"{_VAL3}: item2.style is true"),
    "missing bounding box": (_set(["item1", "bounding_box"], _DELETE), f"{_VAL3}: item1.bounding_box is missing"),
    "box of 3 numbers": (_set(["item1", "bounding_box"], [1, 2, 3]),
                         f"{_VAL3}: item1.bounding_box is [1, 2, 3]; expected 4 numbers [x1, y1, x2, y2]"),
    "box with x1 > x2": (_set(["item1", "bounding_box"], [20, 2, 10, 30]),
                         f"{_VAL3}: item1.bounding_box [20, 2, 10, 30] has x1 > x2 or y1 > y2"),
    "landmarks of another category": (_set(["item2", "landmarks"], [1, 2, 2] * 8),
                                      f"{_VAL3}: item2.landmarks has 24 numbers; category 7 (shorts) has 10 "
                                      "landmarks, so 30"),
    "landmark visibility 3": (_set(["item2", "landmarks"], [1, 2, 2] * 9 + [1, 2, 3]),
                              f"{_VAL3}: item2.landmarks: landmark 10 has visibility 3; expected 0 (not labelled), "
                              "1 (occluded) or 2 (visible)"),
    "landmarks not numbers": (_set(["item2", "landmarks"], "none"), f"{_VAL3}: item2.landmarks is \"none\""),
}


@pytest.mark.parametrize("case", BAD_ANNOTATIONS)
def test_bad_annotation_is_refused_with_file_and_key_and_nothing_written(tmp_path, capsys, case):
  edit, expected = BAD_ANNOTATIONS[case]
  fake_deepfashion2.write_release(tmp_path / "manual", annotation_bytes=_annotation_of("validation", 3, edit))
  assert cli.main(["--manual_dir", str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data")]) == 1
  err = capsys.readouterr().err
  assert "error: The DeepFashion2 download has 1 problem:" in err, err
  assert expected in err, err
  assert "Traceback" not in err
  assert not (tmp_path / "data").exists()  # Checked before anything is written.


def test_every_problem_is_listed_at_once(tmp_path):
  edits = {**_annotation_of("validation", 3, _set(["source"], "store")),
           **_annotation_of("validation", 5, _set(["item2", "style"], -2))}
  fake_deepfashion2.write_release(tmp_path / "manual", annotation_bytes=edits,
                                  omit=("train/annos/000002.json", "validation/image/000007.jpg"))
  with pytest.raises(release.DeepFashion2Error) as error:
    release.validate_release(tmp_path / "manual")
  message = str(error.value)
  assert "has 4 problems" in message
  assert "train.zip: train/image/000002.jpg has no annotation train/annos/000002.json." in message
  assert "validation.zip: validation/annos/000007.json has no image validation/image/000007.jpg." in message
  assert "validation/annos/000005.json: item2.style is -2" in message


def test_missing_and_damaged_archives_are_reported(tmp_path):
  with pytest.raises(release.DeepFashion2Error, match="does not exist"):
    release.validate_release(tmp_path / "nowhere")
  manual = tmp_path / "manual"
  fake_deepfashion2.write_release(manual)
  (manual / "validation.zip").unlink()
  with pytest.raises(release.DeepFashion2Error, match="has neither validation.zip nor an extracted validation/"):
    release.validate_release(manual)
  fake_deepfashion2.write_release(manual)
  (manual / "train.zip").write_bytes((manual / "train.zip").read_bytes()[:-100])  # An interrupted download.
  with pytest.raises(release.DeepFashion2Error, match="train.zip is not a readable zip file"):
    release.validate_release(manual)


def test_zip_of_another_layout_says_what_it_holds(tmp_path):
  manual = tmp_path / "manual"
  fake_deepfashion2.write_release(manual)
  with zipfile.ZipFile(manual / "train.zip", "w") as archive:
    archive.writestr("DeepFashion2/train/image/000001.jpg", TRAIN[0].jpeg)
  with pytest.raises(release.DeepFashion2Error,
                     match=r"train.zip: holds no train/image/NNNNNN.jpg or train/annos/NNNNNN.json \(it holds e.g. "
                           r"'DeepFashion2/train/image/000001.jpg'\)"):
    release.validate_release(manual)


def test_empty_gallery_is_refused(tmp_path):
  users_only = [im for im in VALIDATION if im.source == "user"]
  fake_deepfashion2.write_release(tmp_path / "manual", validation=users_only)
  with pytest.raises(release.DeepFashion2Error, match=r"gives no garment for split\(s\) gallery"):
    release.validate_release(tmp_path / "manual")


def test_a_category_name_that_is_not_its_ids_warns(tmp_path):
  fake_deepfashion2.write_release(
      tmp_path / "manual", annotation_bytes=_annotation_of("validation", 3, _set(["item1", "category_name"], "tee")))
  sources, plan = release.validate_release(tmp_path / "manual")
  for source in sources.values():
    source.close()
  assert any(f"1 garment(s) have a category_name other than their category_id's (e.g. {_VAL3}: item1.category_name "
             "\"tee\" is not the name of category_id 2 ('long sleeve top')); category_id is what is used." in w
             for w in plan.warnings), plan.warnings


def test_queries_without_a_gallery_match_warn():
  plans = [release.ImagePlan(1, "user", 4, 2, (1, 2)), release.ImagePlan(2, "shop", 4, 1, (1,)),
           release.ImagePlan(3, "shop", 5, 0, ())]
  plan = release.plan_build([], plans)
  assert [p.image_id for p in plan.images["query"]] == [1]
  assert [p.image_id for p in plan.images["gallery"]] == [2, 3]
  assert any("1 query item(s) have no gallery item of their pair and style" in w and "pair_id 4 style 2" in w
             for w in plan.warnings)
  assert any("1 image(s) list no garment" in w for w in plan.warnings)


def _truncated(jpeg: bytes) -> bytes:
  start_of_scan = jpeg.index(b"\xff\xda")
  return jpeg[:(start_of_scan + len(jpeg)) // 2]


@pytest.mark.parametrize("form", ["zip", "tree"])
def test_bad_image_fails_the_build_and_leaves_no_dataset(tmp_path, form):
  bad = VALIDATION[3]
  fake_deepfashion2.write_release(tmp_path / "manual", form=form,
                                  image_bytes={bad.image_name: _truncated(bad.jpeg)})
  with pytest.raises(release.DeepFashion2Error) as error:
    build(tmp_path / "manual", tmp_path / "data")
  label = "validation.zip" if form == "zip" else "validation/"
  assert f"{label}: {bad.image_name} is not a readable JPEG" in str(error.value)
  dataset_dir = tmp_path / "data" / "deepfashion2"
  assert not dataset_dir.exists() or not any(p.name[0].isdigit() or p.name.startswith("incomplete")
                                             for p in dataset_dir.iterdir())
  fake_deepfashion2.write_release(tmp_path / "manual", form=form)
  assert len(raw_records(build(tmp_path / "manual", tmp_path / "data"), "gallery")) == 5


def test_shards_hold_whole_images_of_about_the_item_budget():
  plans = tuple(release.ImagePlan(i, "shop", 1, n, ()) for i, n in enumerate([2, 3, 1, 4, 1, 1]))
  assert builder_lib.shard_bounds(plans, 4) == [(0, 2), (2, 4), (4, 6)]
  assert builder_lib.shard_bounds(plans, 100) == [(0, 6)]
  assert builder_lib.shard_bounds((), 10) == [(0, 0)]


def test_command_builds_and_summarizes(tmp_path, capsys):
  fake_deepfashion2.write_release(tmp_path / "manual")
  argv = ["--manual_dir", str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data")]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  assert "Wrote deepfashion2 1.0.0 in" in out
  assert "train          8 garments of      6 images in 1 shards" in out
  assert "query          5 garments of      3 images in 1 shards" in out
  assert "gallery        5 garments of      4 images in 1 shards" in out
  assert cli.main(argv) == 0
  assert "already in" in capsys.readouterr().out
  assert cli.main(argv + ["--overwrite"]) == 0
  assert "Wrote deepfashion2" in capsys.readouterr().out


def test_command_notes_that_encrypted_zips_are_slow(tmp_path, capsys):
  fake_deepfashion2.write_release(tmp_path / "manual", password=b"Zq9-word")
  assert cli.main(["--manual_dir", str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data"),
                   "--password", "Zq9-word"]) == 0
  captured = capsys.readouterr()
  assert "the zips are encrypted, and Python decrypts them slowly" in captured.out
  assert "Zq9-word" not in captured.out + captured.err


def test_unprepared_dataset_is_refused_with_the_command(tmp_path):
  with pytest.raises(release.DeepFashion2Error) as error:
    tfds.data_source("deepfashion2", data_dir=str(tmp_path), split="query")
  assert f"python -m data_prep.deepfashion2 --manual_dir DIR --data_dir {tmp_path}" in str(error.value)


def test_the_input_pipeline_reads_the_prepared_dataset(built, tmp_path):
  """`config.input.dataset = "deepfashion2"` reaches the prepared dataset: its splits decode into the cache
  with every garment's labels; an unprepared data dir gets the command that prepares it."""
  from jaxret import decoded_cache  # pylint: disable=g-import-not-at-top
  from jaxret import input_pipeline  # pylint: disable=g-import-not-at-top
  builder = input_pipeline.get_builder("deepfashion2", built.data_dir_root)
  records = raw_records(built, "query")
  split = decoded_cache.open_split(builder, "query", 16, cache_dir=str(tmp_path / "cache"), num_workers=0,
                                   progress=False)
  assert split.images.shape == (len(records), 16, 16, 3)
  np.testing.assert_array_equal(split.index.item_ids, [r["item_id"] for r in records])
  np.testing.assert_array_equal(split.index.features["bbox"], [r["bbox"] for r in records])
  with pytest.raises(input_pipeline.DatasetNotPreparedError,
                     match="python -m data_prep.deepfashion2 --manual_dir DIR --data_dir"):
    input_pipeline.get_builder("deepfashion2", str(tmp_path / "empty"))
