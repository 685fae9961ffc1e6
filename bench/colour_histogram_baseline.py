"""Colour-histogram nearest-neighbour retrieval on a synthetic In-shop config: how far colour alone gets.

The synthetic products are meant to differ in shape and pattern, not only colour, so this baseline must stay
low (R@1 < 0.25 on `small`). For contrast it also reports a handcrafted shape feature (gradient-orientation
histograms on a grid, HOG-like) and the two together: untrained features that see shape, a floor for what a
learned embedding should beat.

  python bench/colour_histogram_baseline.py --config small
  python bench/colour_histogram_baseline.py --config inshop --data_dir /data/tfds

The dataset is prepared into `--data_dir` (default `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`) if missing.
"""

import argparse
from collections.abc import Callable, Sequence
import os
import sys
import time

import numpy as np
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_prep import synthetic_inshop

KS = (1, 10, 20)


def recall_at_k(query_features: np.ndarray, query_ids: np.ndarray, gallery_features: np.ndarray,
                gallery_ids: np.ndarray, ks: Sequence[int] = KS,
                distance: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
                chunk: int = 256) -> dict[int, float]:
  """In-shop Recall@K: a query is a hit at K when any of its K nearest gallery images shows its product.

  Args:
    query_features: `[Q, D]`.
    query_ids: `[Q]` item ids.
    gallery_features: `[G, D]`.
    gallery_ids: `[G]` item ids.
    ks: cut-offs.
    distance: maps (`[q, D]`, `[G, D]`) to distances `[q, G]`; default squared Euclidean.
    chunk: queries per block (bounds memory to `[chunk, G]` distances, `[chunk, G, D]` for L1).

  Returns:
    {k: fraction of queries that are hits at k}.
  """
  distance = distance or squared_euclidean
  max_k = min(max(ks), len(gallery_ids))
  hits = {k: 0 for k in ks}
  for start in range(0, len(query_ids), chunk):
    d = distance(query_features[start:start + chunk], gallery_features)
    # Stable sort: ties go to the lower gallery index, so the result does not depend on the platform.
    nearest = np.argsort(d, axis=1, kind="stable")[:, :max_k]
    same = gallery_ids[nearest] == query_ids[start:start + chunk, None]
    for k in ks:
      hits[k] += int(same[:, :k].any(axis=1).sum())
  return {k: hits[k] / len(query_ids) for k in ks}


def squared_euclidean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T


def l1(a: np.ndarray, b: np.ndarray, rows: int = 8) -> np.ndarray:
  """L1 distances `[len(a), len(b)]`, a few rows at a time to bound the `[rows, len(b), D]` temporary."""
  return np.concatenate([np.abs(a[i:i + rows, None, :] - b[None, :, :]).sum(-1) for i in range(0, len(a), rows)])


def _histograms(codes: np.ndarray, num_bins: int, weights: np.ndarray | None = None) -> np.ndarray:
  """Per-row histograms `[N, num_bins]` of integer codes `[N, P]` (optionally weighted), by one bincount."""
  n = codes.shape[0]
  flat = (codes + num_bins * np.arange(n)[:, None]).ravel()
  counts = np.bincount(flat, None if weights is None else weights.ravel(), minlength=n * num_bins)
  return counts.reshape(n, num_bins)


def rgb_histograms(images: np.ndarray, bins: int = 8, crop: float = 1.0) -> np.ndarray:
  """Joint RGB histograms `[N, bins**3]`, each summing to 1, of the central `crop` fraction of `[N, H, W, 3]`."""
  n, h, w, _ = images.shape
  dh, dw = int(round(h * (1 - crop) / 2)), int(round(w * (1 - crop) / 2))
  pixels = images[:, dh:h - dh, dw:w - dw].reshape(n, -1, 3).astype(np.int64) * bins // 256
  codes = (pixels[..., 0] * bins + pixels[..., 1]) * bins + pixels[..., 2]
  return _histograms(codes, bins ** 3) / codes.shape[1]


def hue_saturation_histograms(images: np.ndarray, hue_bins: int = 12, sat_bins: int = 4) -> np.ndarray:
  """Hue x saturation histograms `[N, hue_bins * sat_bins]` weighted by saturation (ignores brightness)."""
  rgb = images.astype(np.float32) / 255.0
  high, low = rgb.max(-1), rgb.min(-1)
  chroma = high - low
  sat = np.where(high > 0, chroma / np.maximum(high, 1e-9), 0.0)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  safe = np.maximum(chroma, 1e-9)
  hue = np.where(high == r, ((g - b) / safe) % 6, np.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
  h_idx = np.minimum((hue * hue_bins).astype(np.int64), hue_bins - 1)
  s_idx = np.minimum((sat * sat_bins).astype(np.int64), sat_bins - 1)
  n = len(images)
  hist = _histograms((h_idx * sat_bins + s_idx).reshape(n, -1), hue_bins * sat_bins, sat.reshape(n, -1))
  return hist / np.maximum(hist.sum(1, keepdims=True), 1e-9)


def gradient_histograms(images: np.ndarray, cells: int = 8, orientations: int = 8) -> np.ndarray:
  """HOG-like shape feature `[N, cells * cells * orientations]`: per grid cell, gradient-orientation histograms
  of the grey image weighted by gradient magnitude, each cell L2-normalised (Dalal & Triggs 2005, simplified)."""
  grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
  gx = np.zeros_like(grey)
  gy = np.zeros_like(grey)
  gx[:, :, 1:-1] = grey[:, :, 2:] - grey[:, :, :-2]
  gy[:, 1:-1, :] = grey[:, 2:, :] - grey[:, :-2, :]
  magnitude = np.hypot(gx, gy)
  angle = np.arctan2(gy, gx) % np.pi  # unsigned: a flipped garment keeps its edge orientations' set
  bin_index = np.minimum((angle / np.pi * orientations).astype(np.int64), orientations - 1)
  n, h, w = grey.shape
  cy = np.minimum(np.arange(h) * cells // h, cells - 1)
  cx = np.minimum(np.arange(w) * cells // w, cells - 1)
  codes = ((cy[:, None] * cells + cx[None, :])[None] * orientations + bin_index).reshape(n, -1)
  hist = _histograms(codes, cells * cells * orientations, magnitude.reshape(n, -1)).reshape(n, cells * cells, -1)
  hist /= np.linalg.norm(hist, axis=-1, keepdims=True) + 1e-6
  return hist.reshape(n, -1) / cells


# name: (feature of images [N, H, W, 3] -> [N, D], distance). The colour-only ones are COLOUR_FEATURES; the
# baseline is the best of them. The last two see shape: a floor for what a learned embedding should beat.
FEATURES = {
    "rgb hist 8^3, L1": (lambda x: rgb_histograms(x, 8), l1),
    "rgb hist 4^3, L1": (lambda x: rgb_histograms(x, 4), l1),
    "rgb hist 8^3 centre 50%, L1": (lambda x: rgb_histograms(x, 8, crop=0.5), l1),
    "rgb hist 8^3, sqrt + L2 (Hellinger)": (lambda x: np.sqrt(rgb_histograms(x, 8)), squared_euclidean),
    "hue x saturation hist, L1": (hue_saturation_histograms, l1),
    "gradient histograms (HOG-like), L2": (gradient_histograms, squared_euclidean),
    "HOG-like + sqrt rgb hist 4^3, L2": (
        lambda x: np.concatenate([gradient_histograms(x), np.sqrt(rgb_histograms(x, 4))], 1), squared_euclidean),
}
COLOUR_FEATURES = tuple(FEATURES)[:5]


def compute_features(images: np.ndarray) -> dict[str, np.ndarray]:
  """Every feature of FEATURES for images `[N, H, W, 3]` uint8: {name: float32 [N, D]}."""
  return {name: feature(images).astype(np.float32) for name, (feature, _) in FEATURES.items()}


def split_features(config: str, data_dir: str | None, split: str, chunk: int = 64
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Features (see `compute_features`) and item ids `[N]` of a split, reading `chunk` images at a time."""
  source = tfds.data_source(f"synthetic_inshop/{config}", data_dir=data_dir, split=split)
  parts, ids = [], []
  for start in range(0, len(source), chunk):
    examples = [source[i] for i in range(start, min(start + chunk, len(source)))]
    parts.append(compute_features(np.stack([e["image"] for e in examples])))
    ids.extend(int(e["item_id"]) for e in examples)
  return {name: np.concatenate([p[name] for p in parts]) for name in FEATURES}, np.asarray(ids)


def baselines_of_features(query: dict[str, np.ndarray], query_ids: np.ndarray, gallery: dict[str, np.ndarray],
                          gallery_ids: np.ndarray, ks: Sequence[int] = KS) -> dict[str, dict[int, float]]:
  """Recall@K of each feature: {name: {k: recall}}."""
  return {name: recall_at_k(query[name], query_ids, gallery[name], gallery_ids, ks, distance)
          for name, (_, distance) in FEATURES.items()}


def baselines(query: np.ndarray, query_ids: np.ndarray, gallery: np.ndarray, gallery_ids: np.ndarray,
              ks: Sequence[int] = KS) -> dict[str, dict[int, float]]:
  """Recall@K of each feature on query and gallery images `[N, H, W, 3]`: {name: {k: recall}}."""
  return baselines_of_features(compute_features(query), query_ids, compute_features(gallery), gallery_ids, ks)


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="small", help="synthetic_inshop config name (small, tiny, inshop)")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir; default $TFDS_DATA_DIR, else ~/tensorflow_datasets")
  parser.add_argument("--ks", default="1,10,20", help="comma-separated Recall@K cut-offs")
  args = parser.parse_args(argv)
  ks = tuple(int(k) for k in args.ks.split(","))
  data_dir = args.data_dir or os.environ.get("TFDS_DATA_DIR")
  start = time.perf_counter()
  synthetic_inshop.SyntheticInshop(config=args.config, data_dir=data_dir).download_and_prepare()
  query, query_ids = split_features(args.config, data_dir, "query")
  gallery, gallery_ids = split_features(args.config, data_dir, "gallery")
  print(f"synthetic_inshop/{args.config}: {len(query_ids)} query, {len(gallery_ids)} gallery images of "
        f"{len(np.unique(query_ids))} products (prepared and featurised in {time.perf_counter() - start:.1f} s)")
  results = baselines_of_features(query, query_ids, gallery, gallery_ids, ks)
  width = max(len(name) for name in results)
  print(f"{'feature':<{width}}  " + "  ".join(f"R@{k:<4d}" for k in ks))
  for name, recall in results.items():
    print(f"{name:<{width}}  " + "  ".join(f"{recall[k]:.3f} " for k in ks))
  colour = max(results[name][ks[0]] for name in COLOUR_FEATURES)
  print(f"colour-histogram baseline (best colour variant) R@{ks[0]} = {colour:.3f}")


if __name__ == "__main__":
  main()
