"""Detections files: the format of jaxret/detections.py, read back and refused when malformed."""

import json

import numpy as np
import pytest

from jaxret import detections as detections_lib

GOOD = {
    "box_format": "x1y1x2y2",
    "images": {
        "validation/image/000001.jpg": [
            {"box": [12.5, 40, 210, 388], "score": 0.97, "category_id": 2, "landmarks": [1, 2, 2]},
            {"box": [0, 0, 5, 5], "score": 0.1, "category_id": 13},
        ],
        "validation/image/000002.jpg": [],
        "validation/image/000003.jpg": [{"box": [1, 2, 3, 4], "score": 1, "category_id": 1}],
    },
}
NAMES = [f"validation/image/{i:06d}.jpg" for i in range(1, 6)]


def write(tmp_path, document) -> str:
  path = tmp_path / "detections.json"
  path.write_text(document if isinstance(document, str) else json.dumps(document))
  return str(path)


def test_reads_every_detection_in_file_order(tmp_path):
  got = detections_lib.load_detections(write(tmp_path, GOOD), num_categories=13, image_names=NAMES)
  assert got.image_names == ("validation/image/000001.jpg", "validation/image/000001.jpg",
                             "validation/image/000003.jpg")
  np.testing.assert_array_equal(got.boxes, [[12.5, 40, 210, 388], [0, 0, 5, 5], [1, 2, 3, 4]])
  np.testing.assert_array_equal(got.scores, [0.97, 0.1, 1.0])
  np.testing.assert_array_equal(got.category_ids, [2, 13, 1])
  assert got.image_ids({name: i for i, name in enumerate(NAMES, start=1)}).tolist() == [1, 1, 3]


def test_xywh_boxes_are_converted(tmp_path):
  document = {"box_format": "xywh", "images": {NAMES[0]: [{"box": [10, 20, 5, 7], "score": 0.5, "category_id": 1}]}}
  got = detections_lib.load_detections(write(tmp_path, document))
  np.testing.assert_array_equal(got.boxes, [[10, 20, 15, 27]])


def test_an_empty_file_of_detections_is_fine(tmp_path):
  got = detections_lib.load_detections(write(tmp_path, {"box_format": "xywh", "images": {}}))
  assert len(got) == 0 and got.boxes.shape == (0, 4)


def _with(image, index, **changes):
  document = json.loads(json.dumps(GOOD))
  detection = document["images"][image][index]
  for key, value in changes.items():
    if value is None:
      del detection[key]
    else:
      detection[key] = value
  return document


_ONE = "validation/image/000001.jpg"
BAD = {
    "not an object": ([GOOD], "expected a JSON object with \"box_format\" and \"images\", found list"),
    "no box_format": ({"images": {}}, "box_format is missing; expected \"x1y1x2y2\" or \"xywh\""),
    "unknown box_format": ({**GOOD, "box_format": "yxyx"}, "box_format is \"yxyx\""),
    "images a list": ({**GOOD, "images": []}, "images is []; expected an object from image name"),
    "detections not a list": ({**GOOD, "images": {_ONE: {"box": [0, 0, 1, 1]}}},
                              f"images[\"{_ONE}\"]: expected a list of detections"),
    "detection not an object": ({**GOOD, "images": {_ONE: [[0, 0, 1, 1]]}},
                                f"images[\"{_ONE}\"][0]: expected an object with box, score and category_id"),
    "box of 3 numbers": (_with(_ONE, 1, box=[0, 0, 5]), f"images[\"{_ONE}\"][1].box is [0, 0, 5]; expected 4 numbers"),
    "box with a string": (_with(_ONE, 0, box=[0, 0, "5", 5]), f"images[\"{_ONE}\"][0].box is [0, 0, \"5\", 5]"),
    "box with NaN": (_with(_ONE, 0, box=[0, 0, float("nan"), 5]), f"images[\"{_ONE}\"][0].box is [0, 0, NaN, 5]"),
    "x1 > x2": (_with(_ONE, 0, box=[10, 0, 5, 5]),
                f"images[\"{_ONE}\"][0].box [10, 0, 5, 5] has x1 > x2 or y1 > y2 (is it \"xywh\"?)"),
    "missing score": (_with(_ONE, 0, score=None), f"images[\"{_ONE}\"][0].score is missing; expected a finite number"),
    "score a string": (_with(_ONE, 0, score="high"), f"images[\"{_ONE}\"][0].score is \"high\""),
    "missing category": (_with(_ONE, 1, category_id=None), f"images[\"{_ONE}\"][1].category_id is missing"),
    "category 0": (_with(_ONE, 1, category_id=0),
                   f"images[\"{_ONE}\"][1].category_id is 0; expected an integer from 1 to 13"),
    "category 14": (_with(_ONE, 1, category_id=14), f"images[\"{_ONE}\"][1].category_id is 14"),
    "category a float": (_with(_ONE, 1, category_id=2.0), f"images[\"{_ONE}\"][1].category_id is 2.0"),
    "unknown image": ({**GOOD, "images": {"train/image/000001.jpg": []}},
                      "images: 1 name(s) are not images of the dataset (e.g. 'train/image/000001.jpg'; its names "
                      "look like 'validation/image/000001.jpg')"),
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_file_is_refused_with_the_json_path(tmp_path, case):
  document, expected = BAD[case]
  with pytest.raises(detections_lib.DetectionsFileError) as error:
    detections_lib.load_detections(write(tmp_path, document), num_categories=13, image_names=NAMES)
  assert expected in str(error.value), str(error.value)


def test_negative_xywh_size_and_all_problems_at_once(tmp_path):
  document = {"box_format": "xywh", "images": {NAMES[0]: [{"box": [0, 0, -1, 5], "score": 1, "category_id": 1},
                                                          {"box": [0, 0, 1, 5], "score": None, "category_id": 0}]}}
  with pytest.raises(detections_lib.DetectionsFileError) as error:
    detections_lib.load_detections(write(tmp_path, document), num_categories=13)
  message = str(error.value)
  assert "has 3 problems" in message
  assert f"images[\"{NAMES[0]}\"][0].box [0, 0, -1, 5] has a negative width or height" in message
  assert f"images[\"{NAMES[0]}\"][1].score is null" in message


def test_unreadable_and_invalid_json_files(tmp_path):
  with pytest.raises(detections_lib.DetectionsFileError, match="Cannot read the detections file"):
    detections_lib.load_detections(tmp_path / "missing.json")
  with pytest.raises(detections_lib.DetectionsFileError, match=r"is not valid JSON \(Expecting"):
    detections_lib.load_detections(write(tmp_path, '{"box_format": "xywh", "images": {'))
