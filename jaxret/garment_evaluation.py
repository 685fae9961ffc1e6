"""DeepFashion2's top-k accuracy inside evaluation: the splits' garments as its official metric sees them, and
the searches of a detections file (`--detections FILE`).

`jaxret.deepfashion2_metric` is the metric on rankings and boxes; this module makes both from a run's splits:

* Ground truth of a split (`ground_truth`): each record is a garment with its image, box, category, and its
  match key (pair_id, style) — DeepFashion2's own fields, or for In-shop-like datasets the product id as
  pair_id with style 1 (every garment matches the same product), so the metric runs on the synthetic
  consumer-to-shop data too.
* With ground-truth boxes (`GroundTruthSearch`), every query garment searches with its own crop and the gallery
  is the gallery garments: `df2/top@k`.
* With a detections file (`DetectionSearch`), the detections of a side's images replace its garments (a side
  the file names no image of keeps its ground truth): each detection is cropped from its photo's decoded pixels
  (its pixel box divided by the photo's stored size, read from the JPEG header) and embedded like a garment;
  the official assignment of detections to query garments and the IoU test of retrieved boxes then apply:
  `df2_detections/top@k`.

Boxes are compared in image units ([0, 1] fractions of width and height): IoU is the same as in pixels.
"""

import functools
import io

import jax
import ml_collections
import numpy as np
from PIL import Image

from jaxret import decoded_cache
from jaxret import deepfashion2_metric
from jaxret import detections as detections_file
from jaxret import metrics

# Rankings this deep are enough for every k of the metric.
DEPTH = max(deepfashion2_metric.TOP_K)
PREFIX = "df2"
DETECTIONS_PREFIX = "df2_detections"


def logs_metric(config: ml_collections.ConfigDict) -> bool:
  """Whether evaluation logs DeepFashion2's metric: on DeepFashion2 and the synthetic consumer-to-shop data."""
  dataset = config.input.dataset
  return dataset.split("/")[0] == "deepfashion2" or dataset.startswith("synthetic_inshop/c2s")


def image_ids(index: decoded_cache.SplitIndex) -> tuple[np.ndarray, dict[str, int]]:
  """`[N]` int64 id of each record's photo (records of one photo share it) and the name -> id map."""
  names, ids = np.unique(np.asarray(index.image_names).astype(str), return_inverse=True)
  return ids.astype(np.int64), {str(name): i for i, name in enumerate(names)}


def corner_boxes(bbox: np.ndarray) -> np.ndarray:
  """`[N, 4]` `(ymin, xmin, ymax, xmax)` (TFDS `BBoxFeature`) -> `[N, 4]` `(x1, y1, x2, y2)`, the metric's order."""
  bbox = np.asarray(bbox, np.float64).reshape(-1, 4)
  return bbox[:, [1, 0, 3, 2]]


def ground_truth(index: decoded_cache.SplitIndex) -> deepfashion2_metric.GroundTruth:
  """The garments of a split as DeepFashion2's metric sees them (see the module docstring).

  Raises:
    ValueError: the split has no `bbox` feature.
  """
  if "bbox" not in index.features:
    raise ValueError(f"DeepFashion2's metric needs garment boxes; this split's records have only "
                     f"{sorted(index.features)}.")
  num = len(index)
  styles = np.asarray(index.features["style"]) if "style" in index.features else np.ones(num, np.int64)
  pair_ids = np.asarray(index.features["pair_id"]) if "pair_id" in index.features else index.item_ids
  return deepfashion2_metric.GroundTruth.of(image_ids(index)[0], corner_boxes(index.features["bbox"]),
                                            index.categories, styles, pair_ids)


def nearest_gallery(queries: np.ndarray, gallery: np.ndarray, *, metric: str, depth: int = DEPTH,
                    chunk: int = 1024) -> np.ndarray:
  """`[Q, depth]` int64 indices of each query's nearest gallery rows, best first; -1 pads a smaller gallery.

  Ranked in chunks of queries on the default device (`metrics.retrieval_distances`, `metrics.nearest_first`:
  ties broken by gallery index, as Recall@K breaks them).
  """
  queries = np.asarray(queries, np.float32)
  gallery = np.asarray(gallery, np.float32)
  kept = min(depth, len(gallery))
  out = np.full((len(queries), depth), -1, np.int64)
  if not kept or not len(queries):
    return out
  for start in range(0, len(queries), chunk):
    block = queries[start:start + chunk]
    padded = np.concatenate([block, np.zeros((chunk - len(block), block.shape[1]), np.float32)])
    out[start:start + len(block), :kept] = np.asarray(_nearest(padded, gallery, metric, kept))[:len(block)]
  return out


@functools.partial(jax.jit, static_argnums=(2, 3))
def _nearest(queries: jax.Array, gallery: jax.Array, metric: str, depth: int) -> jax.Array:
  """`[Q, depth]` indices of the nearest gallery rows; one compiled program per shape, reused by every
  evaluation of a run."""
  return metrics.nearest_first(metrics.retrieval_distances(queries, gallery, metric), depth)[1]


def accuracy_ground_truth(queries: np.ndarray, gallery: np.ndarray, query_index: decoded_cache.SplitIndex,
                          gallery_index: decoded_cache.SplitIndex, *, metric: str) -> dict[str, float]:
  """`{"df2/top@k": accuracy}` of embedded ground-truth garments (`[Q, D]`, `[G, D]`, in record order)."""
  found = deepfashion2_metric.top_k_accuracy_ground_truth(
      nearest_gallery(queries, gallery, metric=metric), ground_truth(query_index), ground_truth(gallery_index))
  return {f"{PREFIX}/top@{k}": value for k, value in found.items()}


class DetectionCrops:
  """The detections of one split's photos, as crops of its decoded pixels.

  Attributes:
    records: `[D]` a record of each detection's photo (its decoded pixels are the photo's).
    bbox: `[D, 4]` float32 `(ymin, xmin, ymax, xmax)` in [0, 1], the detection box over the stored photo size.
    boxes: `deepfashion2_metric.Boxes` of the detections (image ids of `image_ids(index)`, `(x1, y1, x2, y2)`
      in image units, 0-based categories, scores).
  """

  def __init__(self, found: detections_file.Detections, index: decoded_cache.SplitIndex, source):
    ids, id_of_name = image_ids(index)
    first_record = {}
    for record, image in enumerate(ids):
      first_record.setdefault(int(image), record)
    mine = [d for d, name in enumerate(found.image_names) if name in id_of_name]
    image_of = np.asarray([id_of_name[found.image_names[d]] for d in mine], np.int64)
    self.records = np.asarray([first_record[int(i)] for i in image_of], np.int64)
    sizes = {}
    for record in np.unique(self.records):  # The stored photo's size, from its JPEG header (no decoding).
      with Image.open(io.BytesIO(source[int(record)]["image"])) as photo:
        sizes[int(record)] = photo.size  # (width, height)
    width = np.asarray([sizes[int(r)][0] for r in self.records], np.float64)
    height = np.asarray([sizes[int(r)][1] for r in self.records], np.float64)
    corners = found.boxes[mine] / np.stack([width, height, width, height], axis=1) if mine else np.zeros((0, 4))
    corners = np.clip(corners, 0.0, 1.0)
    self.bbox = corners[:, [1, 0, 3, 2]].astype(np.float32)
    self.boxes = deepfashion2_metric.Boxes.of(image_of, corners, found.category_ids[mine] - 1,
                                              found.scores[mine])

  def __len__(self) -> int:
    return len(self.records)

  def batches(self, images: np.ndarray, *, global_batch: int, process_index: int = 0, process_count: int = 1):
    """This process's block of each padded global batch of crops: `{"image", "bbox", "has_bbox"}`."""
    local_batch = global_batch // process_count
    for first in range(0, len(self), global_batch):
      start = min(first + process_index * local_batch, len(self))
      stop = min(start + local_batch, len(self))
      records = self.records[start:stop]
      pad = local_batch - len(records)
      yield {"image": np.concatenate([images[records], np.zeros((pad, *images.shape[1:]), np.uint8)]),
             "bbox": np.concatenate([self.bbox[start:stop], np.zeros((pad, 4), np.float32)]),
             "has_bbox": np.concatenate([np.ones(len(records), bool), np.zeros(pad, bool)])}


def accuracy_with_detections(query_rankings: np.ndarray, query_crops: DetectionCrops | None,
                             gallery_crops: DetectionCrops | None, query_index: decoded_cache.SplitIndex,
                             gallery_index: decoded_cache.SplitIndex) -> dict[str, float]:
  """`{"df2_detections/top@k": accuracy}` from the rankings of the searched garments (the query detections,
  or the query garments when the file has none of their photos) over the gallery (detections or garments)."""
  queries, gallery_truth = ground_truth(query_index), ground_truth(gallery_index)
  gallery = (gallery_crops.boxes if gallery_crops is not None
             else deepfashion2_metric.Boxes.of(gallery_truth.image_ids, gallery_truth.boxes))
  if query_crops is not None:
    found = deepfashion2_metric.top_k_accuracy(query_rankings, query_crops.boxes, gallery, queries, gallery_truth)
  else:  # Each ground-truth query garment searches with itself.
    searched = np.where(queries.styles > 0, np.arange(len(queries)), -1)
    found = deepfashion2_metric.accuracy_from_ranks(deepfashion2_metric.first_hit_ranks(
        query_rankings, searched, gallery, queries, gallery_truth))
  return {f"{DETECTIONS_PREFIX}/top@{k}": value for k, value in found.items()}
