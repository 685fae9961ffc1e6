"""DeepFashion2's consumer-to-shop retrieval evaluation: top-k accuracy, k = 1, 5, 10, 15, 20.

Pure NumPy on the host: the inputs are rankings that retrieval has already produced (gallery indices per query,
best first) and boxes, and the evaluation walks over garments of different images, as the official script does.

The official script (`deepfashion2_api/PythonAPI/deepfashion2_retrieval_test.py` of switchablenorms/DeepFashion2,
described in its `evaluation/evaluation.md`) evaluates a submission of *detected* query garments:

1. The denominator is the number of ground-truth query garments (consumer photos) with style > 0.
2. In each query image, every detection is assigned the ground-truth garment of that image it overlaps most
   (`argmax` of the IoU over all of the image's ground-truth garments, style 0 included; a detection that
   overlaps none is assigned the image's first garment, as `argmax` of all zeros is 0).
3. A ground-truth garment with style > 0 is represented by the detection, among those assigned to it *and*
   classified as its category, with the highest score (the first one on ties); without one it is a miss.
4. That detection's ranked gallery garments (detected in shop photos: an image id and a box each) are walked
   in order: the true matches are the ground-truth gallery garments with the query's pair_id and style; a
   retrieved garment is a hit when its image is the image of a true match and its box has IoU >= 0.5 with
   that match's box (with any of them, when an image holds several). The query counts at k when one of the
   first k is a hit.

With ground-truth query boxes (`top_k_accuracy_ground_truth`) step 2 and 3 are skipped: each ground-truth
query garment with style > 0 searches with itself. IoU is that of pycocotools (`maskUtils.iou` on boxes, no
"+1" on widths), which IoU of `[x1, y1, x2, y2]` boxes equals; it is the same in pixels or in image units.

References:
  Ge et al., "DeepFashion2: A Versatile Benchmark for Detection, Pose Estimation, Segmentation and
  Re-Identification of Clothing Images", CVPR 2019, section 5.4.
  https://github.com/switchablenorms/DeepFashion2/blob/master/evaluation/evaluation.md
"""

from collections.abc import Sequence
import dataclasses

import numpy as np
import numpy.typing as npt

TOP_K = (1, 5, 10, 15, 20)
IOU_THRESHOLD = 0.5


def box_iou(boxes_a: npt.ArrayLike, boxes_b: npt.ArrayLike) -> np.ndarray:
  """Intersection over union of every pair of boxes.

  Args:
    boxes_a: `[N, 4]` boxes `[x1, y1, x2, y2]` (x1 <= x2, y1 <= y2).
    boxes_b: `[M, 4]` boxes, the same way.

  Returns:
    `[N, M]` float64 IoU in [0, 1]; 0 where the union is empty (two empty boxes).

  >>> box_iou([[0, 0, 2, 2]], [[1, 0, 3, 2], [4, 4, 5, 5]]).round(3).tolist()
  [[0.333, 0.0]]
  """
  a = np.asarray(boxes_a, np.float64).reshape(-1, 4)
  b = np.asarray(boxes_b, np.float64).reshape(-1, 4)
  width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
  height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
  intersection = np.clip(width, 0, None) * np.clip(height, 0, None)
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  union = area_a[:, None] + area_b[None, :] - intersection
  return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """Annotated garments of one side (the consumer queries, or the shop gallery).

  Attributes:
    image_ids: `[N]` int, the photo of each garment (DeepFashion2's image id; any id that is equal exactly for
      garments of one photo works).
    boxes: `[N, 4]` float `[x1, y1, x2, y2]` (pixels, or image units: IoU is the same).
    categories: `[N]` int class of each garment (any coding, the same as the detections').
    styles: `[N]` int, 0 = matches nothing.
    pair_ids: `[N]` int; a query and a gallery garment match when pair_id and style (> 0) are equal.
  """
  image_ids: np.ndarray
  boxes: np.ndarray
  categories: np.ndarray
  styles: np.ndarray
  pair_ids: np.ndarray

  @classmethod
  def of(cls, image_ids, boxes, categories, styles, pair_ids) -> "GroundTruth":
    """Checked arrays; ValueError says which is wrong."""
    arrays = {"image_ids": np.asarray(image_ids, np.int64).reshape(-1),
              "boxes": np.asarray(boxes, np.float64).reshape(-1, 4),
              "categories": np.asarray(categories, np.int64).reshape(-1),
              "styles": np.asarray(styles, np.int64).reshape(-1),
              "pair_ids": np.asarray(pair_ids, np.int64).reshape(-1)}
    _check_lengths("GroundTruth", arrays)
    return cls(**arrays)

  def __len__(self) -> int:
    return len(self.image_ids)


@dataclasses.dataclass(frozen=True)
class Boxes:
  """Garments that were searched or retrieved: ground-truth ones, or a detector's.

  Attributes:
    image_ids: `[N]` int, the photo of each.
    boxes: `[N, 4]` float `[x1, y1, x2, y2]`.
    categories: `[N]` int predicted class (queries only; ignored for the gallery).
    scores: `[N]` float detection score (queries only; ignored for the gallery).
  """
  image_ids: np.ndarray
  boxes: np.ndarray
  categories: np.ndarray
  scores: np.ndarray

  @classmethod
  def of(cls, image_ids, boxes, categories=None, scores=None) -> "Boxes":
    """Checked arrays (categories -1 and scores 1 when not given); ValueError says which is wrong."""
    image_ids = np.asarray(image_ids, np.int64).reshape(-1)
    arrays = {"image_ids": image_ids, "boxes": np.asarray(boxes, np.float64).reshape(-1, 4),
              "categories": (np.full(len(image_ids), -1, np.int64) if categories is None
                             else np.asarray(categories, np.int64).reshape(-1)),
              "scores": (np.ones(len(image_ids)) if scores is None else np.asarray(scores, np.float64).reshape(-1))}
    _check_lengths("Boxes", arrays)
    return cls(**arrays)

  def __len__(self) -> int:
    return len(self.image_ids)


def _check_lengths(what: str, arrays: dict[str, np.ndarray]):
  lengths = {name: len(array) for name, array in arrays.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"{what}: the arrays must have one entry per garment, got lengths {lengths}.")
  if not np.all(np.isfinite(arrays["boxes"])):
    raise ValueError(f"{what}: boxes must be finite.")
  if np.any(arrays["boxes"][:, 2] < arrays["boxes"][:, 0]) or np.any(arrays["boxes"][:, 3] < arrays["boxes"][:, 1]):
    raise ValueError(f"{what}: boxes must be [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2.")


def assign_detections(detections: Boxes, queries: GroundTruth) -> np.ndarray:
  """The detection that stands for each ground-truth query garment, as DeepFashion2's evaluation picks it.

  Each detection is assigned the ground-truth garment of its image that it overlaps most (all zeros: the
  image's first garment); a ground-truth garment with style > 0 takes, among the detections assigned to it
  with its category, the one with the highest score (the first on ties).

  Args:
    detections: `[D]` detected query garments (with categories and scores).
    queries: `[T]` ground-truth query garments.

  Returns:
    `[T]` int64 index into `detections`, -1 for a missed garment and for every garment of style 0.
  """
  chosen = np.full(len(queries), -1, np.int64)
  order = np.argsort(detections.image_ids, kind="stable")
  sorted_ids = detections.image_ids[order]
  for image_id in np.unique(queries.image_ids):
    start, stop = np.searchsorted(sorted_ids, image_id, "left"), np.searchsorted(sorted_ids, image_id, "right")
    if start == stop:
      continue  # Nothing detected in this image: its garments are missed.
    found = order[start:stop]  # Detections of the image, in submission order.
    truth = np.flatnonzero(queries.image_ids == image_id)  # Its garments, in ground-truth order.
    assigned = truth[np.argmax(box_iou(detections.boxes[found], queries.boxes[truth]), axis=1)]
    for t in truth:
      if queries.styles[t] <= 0:
        continue
      candidates = found[(assigned == t) & (detections.categories[found] == queries.categories[t])]
      if len(candidates):
        chosen[t] = candidates[np.argmax(detections.scores[candidates])]
  return chosen


def first_hit_ranks(rankings: npt.ArrayLike, searched: np.ndarray, gallery: Boxes, queries: GroundTruth,
                    gallery_truth: GroundTruth, *, iou_threshold: float = IOU_THRESHOLD) -> np.ndarray:
  """Rank (0-based) of the first hit in each ground-truth query garment's ranking.

  Args:
    rankings: `[R, K]` int gallery indices, best first, one row per searched garment; -1 pads rows of a gallery
      smaller than K.
    searched: `[T]` row of `rankings` that stands for each ground-truth query garment, -1 for none.
    gallery: `[G]` the garments that `rankings` indexes (their images and boxes).
    queries: `[T]` ground-truth query garments.
    gallery_truth: the ground-truth gallery garments, which define the true matches.
    iou_threshold: a retrieved box must overlap a true match's box at least this much.

  Returns:
    `[T]` int64: the rank of the first hit, K when no hit is ranked, -1 for garments of style 0.
  """
  rankings = np.asarray(rankings, np.int64)
  num_ranked = rankings.shape[1]
  ranks = np.where(queries.styles > 0, num_ranked, -1).astype(np.int64)
  # The true matches of each (pair, style), found once.
  matches: dict[tuple[int, int], np.ndarray] = {}
  for j in np.flatnonzero(gallery_truth.styles > 0):
    key = (int(gallery_truth.pair_ids[j]), int(gallery_truth.styles[j]))
    matches.setdefault(key, []).append(j)
  for t in np.flatnonzero((queries.styles > 0) & (searched >= 0)):
    truth = np.asarray(matches.get((int(queries.pair_ids[t]), int(queries.styles[t])), []), np.int64)
    retrieved = rankings[searched[t]]
    valid = retrieved >= 0
    if not len(truth) or not valid.any():
      continue
    picked = retrieved[valid]
    same_image = gallery.image_ids[picked][:, None] == gallery_truth.image_ids[truth][None, :]
    overlaps = box_iou(gallery.boxes[picked], gallery_truth.boxes[truth]) >= iou_threshold
    hits = np.flatnonzero((same_image & overlaps).any(axis=1))
    if len(hits):
      ranks[t] = np.flatnonzero(valid)[hits[0]]
  return ranks


def accuracy_from_ranks(ranks: np.ndarray, ks: Sequence[int] = TOP_K) -> dict[int, float]:
  """Top-k accuracy: the fraction of style > 0 garments (ranks >= 0) whose first hit is ranked below k."""
  counted = ranks[ranks >= 0]
  if not len(counted):
    raise ValueError("No ground-truth query garment has style > 0, so top-k accuracy is undefined.")
  return {k: float(np.mean(counted < k)) for k in ks}


def _check_rankings(rankings: np.ndarray, num_rows: int, num_gallery: int, ks: Sequence[int]):
  if rankings.ndim != 2 or rankings.shape[0] != num_rows:
    raise ValueError(f"rankings must be [{num_rows}, K] (one row per searched garment), got {rankings.shape}.")
  if rankings.shape[1] < max(ks):
    raise ValueError(f"rankings have {rankings.shape[1]} columns but top-{max(ks)} needs {max(ks)}; pad rows of a "
                     "smaller gallery with -1.")
  if rankings.size and (rankings.max() >= num_gallery or rankings.min() < -1):
    raise ValueError(f"rankings must hold gallery indices in [0, {num_gallery}) or -1 (padding).")


def top_k_accuracy(rankings: npt.ArrayLike, detections: Boxes, gallery: Boxes, queries: GroundTruth,
                   gallery_truth: GroundTruth, *, ks: Sequence[int] = TOP_K,
                   iou_threshold: float = IOU_THRESHOLD) -> dict[int, float]:
  """DeepFashion2's top-k retrieval accuracy with detected query garments (see the module docstring).

  Args:
    rankings: `[D, K]` int, for each detection the gallery indices it retrieved, best first (-1: padding);
      K >= max(ks).
    detections: `[D]` detected garments of the query (consumer) photos, with categories and scores.
    gallery: `[G]` the garments that `rankings` indexes: detected (or ground-truth) garments of shop photos.
    queries: ground-truth query garments (style 0 included: they take part in assigning detections).
    gallery_truth: ground-truth gallery garments (the true matches).
    ks: the k of top-k.
    iou_threshold: a retrieved box must overlap a true match's box at least this much.

  Returns:
    `{k: accuracy}`: the fraction of ground-truth query garments with style > 0 that are hit within k.

  Raises:
    ValueError: inconsistent shapes, indices out of range, or no query garment with style > 0.
  """
  rankings = np.asarray(rankings, np.int64)
  _check_rankings(rankings, len(detections), len(gallery), ks)
  searched = assign_detections(detections, queries)
  return accuracy_from_ranks(
      first_hit_ranks(rankings, searched, gallery, queries, gallery_truth, iou_threshold=iou_threshold), ks)


def top_k_accuracy_ground_truth(rankings: npt.ArrayLike, queries: GroundTruth, gallery_truth: GroundTruth, *,
                                ks: Sequence[int] = TOP_K, iou_threshold: float = IOU_THRESHOLD
                                ) -> dict[int, float]:
  """DeepFashion2's top-k retrieval accuracy with ground-truth boxes on both sides.

  Each query garment searches with its own box; the gallery is the ground-truth gallery garments.

  Args:
    rankings: `[T, K]` int, for each query garment the `gallery_truth` indices it retrieved, best first
      (-1: padding); K >= max(ks). Rows of style-0 garments are ignored.
    queries: `[T]` ground-truth query garments.
    gallery_truth: `[G]` ground-truth gallery garments.
    ks: the k of top-k.
    iou_threshold: a retrieved box must overlap a true match's box at least this much.

  Returns:
    `{k: accuracy}` over the query garments with style > 0.
  """
  rankings = np.asarray(rankings, np.int64)
  _check_rankings(rankings, len(queries), len(gallery_truth), ks)
  gallery = Boxes.of(gallery_truth.image_ids, gallery_truth.boxes)
  searched = np.where(queries.styles > 0, np.arange(len(queries)), -1)
  return accuracy_from_ranks(
      first_hit_ranks(rankings, searched, gallery, queries, gallery_truth, iou_threshold=iou_threshold), ks)
