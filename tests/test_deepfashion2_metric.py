"""DeepFashion2's retrieval evaluation against hand-built cases and a transcription of the official script."""

import doctest

import numpy as np
import pytest

from jaxret import deepfashion2_metric as metric

# ---- A hand-built validation set ----
# Query ground truth: (image, box, category, style, pair). q3 has style 0: it is not counted, but detections
# may be assigned to it.
QUERIES = metric.GroundTruth.of(
    image_ids=[1, 1, 2, 3, 3],
    boxes=[[0, 0, 10, 10], [20, 0, 30, 10], [0, 0, 10, 10], [5, 5, 15, 15], [0, 0, 20, 20]],
    categories=[1, 8, 1, 5, 13],
    styles=[1, 2, 1, 0, 1],
    pair_ids=[1, 1, 1, 2, 2])
# Gallery ground truth. True matches: q0, q2 -> g0; q1 -> g1, g2; q4 -> g3. g5 (style 0) overlaps g3 in image
# 12 (IoU 0.81); g6 (style 0) sits in g0's image 10 but overlaps g0 little (IoU 0.16).
GALLERY = metric.GroundTruth.of(
    image_ids=[10, 10, 11, 12, 13, 12, 10],
    boxes=[[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10], [0, 0, 20, 20], [0, 0, 10, 10], [1, 1, 19, 19],
           [0, 0, 4, 4]],
    categories=[1, 8, 8, 13, 4, 5, 1],
    styles=[1, 2, 2, 1, 0, 0, 0],
    pair_ids=[1, 1, 1, 2, 3, 2, 1])


def padded(*rows, width=20):
  return np.array([list(r) + [-1] * (width - len(r)) for r in rows], np.int64)


def test_ground_truth_boxes_hand_built():
  rankings = padded(
      [6, 4, 0],        # q0: g6 is in g0's image but overlaps it too little; g0 at rank 2.
      [0, 4, 3, 5, 1],  # q1: g1 at rank 4.
      [4, 3, 5, 2, 1],  # q2: its only match, g0, is not retrieved.
      [0, 1, 2],        # q3: style 0, ignored.
      [5, 3])           # q4: g5 is another garment, but in g3's image and overlapping it by 0.81: a hit at 0.
  got = metric.top_k_accuracy_ground_truth(rankings, QUERIES, GALLERY)
  assert got == {1: 1 / 4, 5: 3 / 4, 10: 3 / 4, 15: 3 / 4, 20: 3 / 4}
  ranks = metric.first_hit_ranks(rankings, np.array([0, 1, 2, -1, 4]), metric.Boxes.of(GALLERY.image_ids,
                                 GALLERY.boxes), QUERIES, GALLERY)
  assert ranks.tolist() == [2, 4, 20, -1, 0]


# Detected gallery garments that the rankings of the detection case index.
DETECTED_GALLERY = metric.Boxes.of(
    image_ids=[10, 10, 11, 12, 13, 10],
    boxes=[[0, 0, 10, 10], [20, 20, 29, 29], [0, 0, 5, 10], [0, 0, 20, 20], [0, 0, 10, 10], [0, 0, 4, 4]])
# Detected query garments (image, box, category, score).
DETECTIONS = metric.Boxes.of(
    image_ids=[1, 1, 1, 1, 1, 3, 3],
    boxes=[[0, 0, 10, 10],        # d0: q0, category right.
           [1, 1, 10, 10],        # d1: q0 (IoU 0.81), higher score than d0.
           [20, 0, 30, 10],       # d2: q1, but classified 7 (shorts): never chosen.
           [21, 0, 30, 10],       # d3: q1, right category: stands for q1.
           [100, 100, 110, 110],  # d4: overlaps nothing -> assigned the image's first garment, q0; best score.
           [5, 5, 15, 15],        # d5: q3 (style 0) overlaps it most, so it cannot stand for q4.
           [0, 0, 18, 18]],       # d6: q4 (IoU 0.81): stands for q4. Image 2 (q2) has no detection: missed.
    categories=[1, 1, 7, 8, 1, 13, 13],
    scores=[0.9, 0.95, 0.99, 0.5, 1.0, 0.8, 0.3])


def test_detections_are_assigned_as_the_official_script_does():
  assert metric.assign_detections(DETECTIONS, QUERIES).tolist() == [4, 3, -1, -1, 6]


def test_detected_boxes_hand_built():
  rankings = padded(
      [0], [0], [1],  # d0, d1, d2: not chosen, so their perfect rankings do not count.
      [4, 2],         # d3 (q1): G2 is in g2's image with IoU exactly 0.5: a hit at rank 1.
      [5, 0],         # d4 (q0): G5 is in g0's image but overlaps it by 0.16; G0 at rank 1.
      [3],            # d5: assigned to the style-0 garment.
      [4, 0, 1, 5, 2, 3])  # d6 (q4): G3 at rank 5.
  got = metric.top_k_accuracy(rankings, DETECTIONS, DETECTED_GALLERY, QUERIES, GALLERY)
  assert got == {1: 0.0, 5: 2 / 4, 10: 3 / 4, 15: 3 / 4, 20: 3 / 4}
  # A stricter threshold drops the boundary hit of q1.
  strict = metric.top_k_accuracy(rankings, DETECTIONS, DETECTED_GALLERY, QUERIES, GALLERY, iou_threshold=0.51)
  assert strict[5] == 1 / 4


# ---- A transcription of deepfashion2_retrieval_test.py (switchablenorms/DeepFashion2), as the oracle ----

def _coco_iou(dts, gts):
  """pycocotools maskUtils.iou for [x, y, w, h] boxes, iscrowd 0: loops over pairs, as its C code does."""
  out = np.zeros((len(dts), len(gts)))
  for i, d in enumerate(dts):
    for j, g in enumerate(gts):
      w = min(d[0] + d[2], g[0] + g[2]) - max(d[0], g[0])
      h = min(d[1] + d[3], g[1] + g[3]) - max(d[1], g[1])
      if w <= 0 or h <= 0:
        continue
      inter = w * h
      out[i, j] = inter / (d[2] * d[3] + g[2] * g[3] - inter)
  return out


def official_script(results, query_gt, gallery_gt, thresh=0.5):
  """The official evaluation, line for line (Python 3 prints dropped; `gellery_box` typo fixed)."""
  xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]
  r_image = np.array([r["query_image_id"] for r in results])
  r_score = np.array([r["query_score"] for r in results])
  r_cls = np.array([r["query_cls"] for r in results])
  r_box = np.array([xywh(r["query_bbox"]) for r in results])
  r_gallery_id = np.array([r["gallery_image_id"] for r in results])
  r_gallery_box = np.array([[xywh(b) for b in r["gallery_bbox"]] for r in results])
  q_image = np.array([q["query_image_id"] for q in query_gt])
  q_box = np.array([xywh(q["bbox"]) for q in query_gt])
  q_cls = np.array([q["cls"] for q in query_gt])
  q_style = np.array([q["style"] for q in query_gt])
  q_pair = np.array([q["pair_id"] for q in query_gt])
  query_num = len(np.where(q_style > 0)[0])
  g_image = np.array([g["gallery_image_id"] for g in gallery_gt])
  g_box = np.array([xywh(g["bbox"]) for g in gallery_gt])
  g_style = np.array([g["style"] for g in gallery_gt])
  g_pair = np.array([g["pair_id"] for g in gallery_gt])
  correct = {k: 0 for k in (1, 5, 10, 15, 20)}
  for image in np.unique(q_image):
    results_ind = np.where(r_image == image)[0]
    if len(results_ind) == 0:
      continue
    query_ind = np.where(q_image == image)[0]
    pair_id = q_pair[query_ind]
    assert len(np.unique(pair_id)) == 1
    pair_id = pair_id[0]
    iou_ind = np.argmax(_coco_iou(r_box[results_ind], q_box[query_ind]), axis=1)
    for i in range(len(query_ind)):
      style, cls = q_style[query_ind][i], q_cls[query_ind][i]
      if style > 0:
        ind = np.intersect1d(np.where(iou_ind == i)[0], np.where(r_cls[results_ind] == cls)[0])
        if len(ind) > 0:
          chosen = ind[np.argmax(r_score[results_ind][ind])]
          retrieved_id = r_gallery_id[results_ind][chosen]
          retrieved_box = r_gallery_box[results_ind][chosen]
          gt_ind = np.intersect1d(np.where(g_pair == pair_id)[0], np.where(g_style == style)[0])
          gt_image, gt_box = g_image[gt_ind], g_box[gt_ind]
          assert len(gt_ind) > 0
          if len(gt_ind) == 1:
            gt_image = [gt_image]
          for k in correct:
            for t in range(0, k):
              if retrieved_id[t] in gt_image:
                which = np.where(gt_image == retrieved_id[t])[0]
                if len(np.where(_coco_iou([retrieved_box[t]], gt_box[which]) >= thresh)[0]) > 0:
                  correct[k] += 1
                  break
  return {k: c / query_num for k, c in correct.items()}


def _random_case(seed):
  """Images with 1-3 garments each, a detector that jitters, misclassifies and misses, random rankings."""
  rng = np.random.default_rng(seed)
  query_gt, gallery_gt = [], []
  for image in range(1, 13):  # 12 consumer photos of 4 pairs
    pair = 1 + image % 4
    for _ in range(rng.integers(1, 4)):
      x, y = rng.integers(0, 50, 2)
      query_gt.append({"query_image_id": image, "bbox": [int(x), int(y), int(x + rng.integers(5, 40)),
                                                         int(y + rng.integers(5, 40))],
                       "cls": int(rng.integers(1, 4)), "style": int(rng.integers(0, 3)), "pair_id": pair})
  for image in range(100, 116):  # 16 shop photos; every (pair, style) of the queries appears
    pair = 1 + image % 4
    for style in (1, 2, 0):
      x, y = rng.integers(0, 50, 2)
      gallery_gt.append({"gallery_image_id": image, "bbox": [int(x), int(y), int(x + rng.integers(5, 40)),
                                                             int(y + rng.integers(5, 40))],
                         "style": style, "pair_id": pair})
  gallery_detected = [(g["gallery_image_id"], [v + float(rng.normal(0, 3)) for v in g["bbox"]]) for g in gallery_gt]
  gallery_detected = [(i, [b[0], b[1], max(b[0], b[2]), max(b[1], b[3])]) for i, b in gallery_detected]
  results = []
  for q in query_gt:
    for _ in range(rng.integers(0, 3)):  # 0 to 2 detections per garment, some far off
      box = [v + float(rng.normal(0, 4 if rng.random() < 0.8 else 30)) for v in q["bbox"]]
      box = [box[0], box[1], max(box[0] + 1, box[2]), max(box[1] + 1, box[3])]
      picked = rng.permutation(len(gallery_detected))[:20]
      results.append({"query_image_id": q["query_image_id"], "query_bbox": box,
                      "query_cls": q["cls"] if rng.random() < 0.8 else int(rng.integers(1, 4)),
                      "query_score": float(np.round(rng.random(), 1)),  # rounded: ties happen
                      "gallery_image_id": [gallery_detected[g][0] for g in picked],
                      "gallery_bbox": [gallery_detected[g][1] for g in picked], "picked": picked})
  rng.shuffle(results)
  return query_gt, gallery_gt, gallery_detected, results


@pytest.mark.parametrize("seed", range(8))
def test_matches_the_official_script_on_random_cases(seed):
  query_gt, gallery_gt, gallery_detected, results = _random_case(seed)
  queries = metric.GroundTruth.of([q["query_image_id"] for q in query_gt], [q["bbox"] for q in query_gt],
                                  [q["cls"] for q in query_gt], [q["style"] for q in query_gt],
                                  [q["pair_id"] for q in query_gt])
  gallery = metric.GroundTruth.of([g["gallery_image_id"] for g in gallery_gt], [g["bbox"] for g in gallery_gt],
                                  np.zeros(len(gallery_gt)), [g["style"] for g in gallery_gt],
                                  [g["pair_id"] for g in gallery_gt])
  detections = metric.Boxes.of([r["query_image_id"] for r in results], [r["query_bbox"] for r in results],
                               [r["query_cls"] for r in results], [r["query_score"] for r in results])
  detected_gallery = metric.Boxes.of([i for i, _ in gallery_detected], [b for _, b in gallery_detected])
  rankings = np.stack([r["picked"] for r in results])
  got = metric.top_k_accuracy(rankings, detections, detected_gallery, queries, gallery)
  expected = official_script(results, query_gt, gallery_gt)
  assert got == pytest.approx(expected, abs=1e-12)
  assert max(expected.values()) > 0  # the case exercises hits


def test_box_iou_against_the_coco_loop_and_in_image_units():
  rng = np.random.default_rng(0)
  a = rng.uniform(0, 50, (7, 2))
  a = np.concatenate([a, a + rng.uniform(0, 30, (7, 2))], axis=1)
  b = rng.uniform(0, 50, (5, 2))
  b = np.concatenate([b, b + rng.uniform(0, 30, (5, 2))], axis=1)
  b[0] = a[0]  # identical boxes: IoU 1
  b[1] = [a[1, 2], a[1, 3], a[1, 2] + 5, a[1, 3] + 5]  # touching corners: IoU 0
  xywh = lambda x: np.concatenate([x[:, :2], x[:, 2:] - x[:, :2]], axis=1)
  expected = _coco_iou(xywh(a), xywh(b))
  np.testing.assert_allclose(metric.box_iou(a, b), expected, rtol=1e-12, atol=1e-15)
  assert metric.box_iou(a, b)[0, 0] == pytest.approx(1.0) and metric.box_iou(a, b)[1, 1] == 0.0
  scale = np.array([1 / 640, 1 / 480, 1 / 640, 1 / 480])
  np.testing.assert_allclose(metric.box_iou(a * scale, b * scale), expected, rtol=1e-9, atol=1e-12)
  assert metric.box_iou([[1, 1, 1, 1]], [[1, 1, 1, 1]]).tolist() == [[0.0]]  # empty boxes overlap nothing
  assert doctest.testmod(metric).failed == 0


def test_bad_inputs_raise_saying_what_is_wrong():
  with pytest.raises(ValueError, match="one entry per garment"):
    metric.GroundTruth.of([1, 2], [[0, 0, 1, 1]], [1, 1], [1, 1], [1, 1])
  with pytest.raises(ValueError, match="x1 <= x2"):
    metric.Boxes.of([1], [[5, 0, 1, 1]])
  with pytest.raises(ValueError, match=r"rankings must be \[5, K\]"):
    metric.top_k_accuracy_ground_truth(padded([0]), QUERIES, GALLERY)
  with pytest.raises(ValueError, match="top-20 needs 20; pad rows of a smaller gallery with -1"):
    metric.top_k_accuracy_ground_truth(padded(*[[0]] * 5, width=10), QUERIES, GALLERY)
  with pytest.raises(ValueError, match=r"gallery indices in \[0, 7\)"):
    metric.top_k_accuracy_ground_truth(padded(*[[7]] * 5), QUERIES, GALLERY)
  no_style = metric.GroundTruth.of([1], [[0, 0, 1, 1]], [1], [0], [1])
  with pytest.raises(ValueError, match="No ground-truth query garment has style > 0"):
    metric.top_k_accuracy_ground_truth(padded([0]), no_style, GALLERY)
