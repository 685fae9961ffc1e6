"""Detections files (`--detections FILE`): any detector's garment boxes, for cropping and evaluation.

The file is JSON:

  {
    "box_format": "x1y1x2y2",                  // or "xywh" (COCO's and DeepFashion2's detection results)
    "images": {
      "validation/image/000001.jpg": [         // the dataset's image_name
        {"box": [12.5, 40.0, 210.0, 388.0],    // pixels of the image as stored, 0-based
         "score": 0.97,                        // detector confidence (DeepFashion2's evaluation takes the best)
         "category_id": 2},                    // 1-based class, DeepFashion2's category_id (= category label + 1)
        ...
      ],
      "validation/image/000002.jpg": []        // detected nothing (an image may also be left out)
    }
  }

Other keys of a detection (e.g. "landmarks") are ignored. `load_detections` checks all of it and raises one
`DetectionsFileError` that lists every problem with its JSON path.
"""

from collections.abc import Collection
import dataclasses
import json
import math
import os

import numpy as np

from data_prep import problems as problems_message

BOX_FORMATS = ("x1y1x2y2", "xywh")


class DetectionsFileError(ValueError):
  """A detections file is missing or malformed; the message lists every problem with its JSON path."""


@dataclasses.dataclass(frozen=True)
class Detections:
  """All detections of a file, one row each, grouped by image in the file's order.

  Attributes:
    image_names: `[D]` the image of each detection.
    boxes: `[D, 4]` float64 `[x1, y1, x2, y2]` in pixels (converted from "xywh").
    scores: `[D]` float64.
    category_ids: `[D]` int64, 1-based.
  """
  image_names: tuple[str, ...]
  boxes: np.ndarray
  scores: np.ndarray
  category_ids: np.ndarray

  def __len__(self) -> int:
    return len(self.image_names)

  def image_ids(self, id_of_name: dict[str, int]) -> np.ndarray:
    """`[D]` int64 image ids of the detections, from a name -> id map (e.g. the dataset's image_id)."""
    return np.asarray([id_of_name[name] for name in self.image_names], np.int64)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 50 else text[:47] + "..."


def parse_detections(document, label: str, *, num_categories: int | None = None,
                     image_names: Collection[str] | None = None) -> Detections:
  """Checks a detections document (the parsed JSON) and returns its detections.

  Args:
    document: the parsed JSON.
    label: how messages name the file.
    num_categories: when given, category_id must be in [1, num_categories].
    image_names: when given, every image of the file must be one of these (the dataset's image names).

  Raises:
    DetectionsFileError: listing every problem, each with its JSON path.
  """
  problems = []
  if not isinstance(document, dict):
    raise DetectionsFileError(f"{label}: expected a JSON object with \"box_format\" and \"images\", found "
                              f"{type(document).__name__}.")
  box_format = document.get("box_format")
  if box_format not in BOX_FORMATS:
    problems.append(f"box_format is {_short(box_format) if 'box_format' in document else 'missing'}; expected "
                    "\"x1y1x2y2\" or \"xywh\" (say which, so that boxes are never misread).")
  images = document.get("images")
  if not isinstance(images, dict):
    problems.append(f"images is {_short(images) if 'images' in document else 'missing'}; expected an object "
                    "from image name to a list of detections.")
    images = {}
  known = None if image_names is None else set(image_names)
  names, boxes, scores, categories = [], [], [], []
  unknown = [name for name in images if known is not None and name not in known]
  if unknown:
    example = next(iter(sorted(known)), None)
    problems.append(f"images: {len(unknown)} name(s) are not images of the dataset (e.g. {unknown[0]!r}"
                    + (f"; its names look like {example!r})." if example else ")."))
  for name, detections in images.items():
    path = f"images[{json.dumps(name)}]"
    if not isinstance(detections, list):
      problems.append(f"{path}: expected a list of detections, found {_short(detections)}.")
      continue
    for i, detection in enumerate(detections):
      where = f"{path}[{i}]"
      if not isinstance(detection, dict):
        problems.append(f"{where}: expected an object with box, score and category_id, found {_short(detection)}.")
        continue
      found = len(problems)
      box, score, category = detection.get("box"), detection.get("score"), detection.get("category_id")
      if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
        problems.append(f"{where}.box is {_short(box) if 'box' in detection else 'missing'}; expected 4 numbers.")
      elif box_format == "xywh" and (box[2] < 0 or box[3] < 0):
        problems.append(f"{where}.box {_short(box)} has a negative width or height.")
      elif box_format == "x1y1x2y2" and (box[0] > box[2] or box[1] > box[3]):
        problems.append(f"{where}.box {_short(box)} has x1 > x2 or y1 > y2 (is it \"xywh\"?).")
      if not _is_number(score):
        problems.append(f"{where}.score is {_short(score) if 'score' in detection else 'missing'}; expected a "
                        "finite number.")
      if not isinstance(category, int) or isinstance(category, bool) or category < 1 or (
          num_categories is not None and category > num_categories):
        limit = f"from 1 to {num_categories}" if num_categories is not None else ">= 1"
        problems.append(f"{where}.category_id is {_short(category) if 'category_id' in detection else 'missing'}; "
                        f"expected an integer {limit}.")
      if len(problems) > found or box_format not in BOX_FORMATS:
        continue
      x1, y1, a, b = (float(v) for v in box)
      names.append(name)
      boxes.append((x1, y1, x1 + a, y1 + b) if box_format == "xywh" else (x1, y1, a, b))
      scores.append(float(score))
      categories.append(category)
  if problems:
    raise DetectionsFileError(problems_message.format_problems(
        label, problems, "See the format in jaxret/detections.py (or docs/deepfashion.md)."))
  return Detections(image_names=tuple(names), boxes=np.asarray(boxes, np.float64).reshape(-1, 4),
                    scores=np.asarray(scores, np.float64), category_ids=np.asarray(categories, np.int64))


def load_detections(path: str | os.PathLike, *, num_categories: int | None = None,
                    image_names: Collection[str] | None = None) -> Detections:
  """Reads and checks a detections file (see the module docstring for its format).

  Args:
    path: the JSON file.
    num_categories: when given, category_id must be in [1, num_categories] (13 for DeepFashion2).
    image_names: when given, the file may only name these images (the dataset's `image_name`s).

  Raises:
    DetectionsFileError: the file cannot be read or parsed, or has problems (all listed, with JSON paths).
  """
  label = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      document = json.load(f)
  except OSError as e:
    raise DetectionsFileError(f"Cannot read the detections file {label} ({e}).") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DetectionsFileError(f"{label} is not valid JSON ({e}).") from e
  return parse_detections(document, label, num_categories=num_categories, image_names=image_names)
