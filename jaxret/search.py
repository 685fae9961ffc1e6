"""Finds the catalogue images nearest to a photo, or measures Recall@K through the index.

  python -m jaxret.search --workdir RUN --uri catalog.db --image PATH [--k 10] [--out results.html]
  python -m jaxret.search --workdir RUN --uri catalog.db --split query --recall

The first prints the top-K images of each `--image` (repeat it for several photos) as a table and writes an
HTML page (images embedded) and a PNG beside it (`results.png`). The second searches every image of a split
of the run's dataset and prints Recall@K; with a FLAT index over the gallery split it equals the trainer's
evaluation of the same checkpoint.

The Python API is `jaxret.search.Catalog` (defined in jaxret/catalog.py); see docs/search.md.
"""

import argparse
import base64
import html
import io
import json
import os
import sys
import time

from absl import logging
import numpy as np
from PIL import Image

from jaxret import catalog
from jaxret import input_pipeline
from jaxret import pictures
from jaxret import run_config
from jaxret import train
from jaxret.catalog import Catalog, CatalogError, Hit  # pylint: disable=unused-import  (the public API)

THUMBNAIL = 128


def format_table(hits: list[Hit]) -> str:
  """Search results as a fixed-width text table: rank, distance, item_id, category, image."""
  rows = [("rank", "distance", "item_id", "category", "image")]
  rows += [(str(h.rank), f"{h.distance:.4f}", str(h.item_id) if h.item_id >= 0 else "-", h.category_name,
            h.image) for h in hits]
  widths = [max(len(row[c]) for row in rows) for c in range(4)]
  lines = []
  for row in rows:
    cells = [row[c].rjust(widths[c]) for c in range(3)] + [row[3].ljust(widths[3]), row[4]]
    lines.append("  ".join(cells))
  return "\n".join(lines)


def _data_uri(pixels: np.ndarray) -> str:
  encoded = io.BytesIO()
  Image.fromarray(pixels).save(encoded, format="JPEG", quality=90)
  return "data:image/jpeg;base64," + base64.b64encode(encoded.getvalue()).decode()


def _query_thumbnail(path: str) -> np.ndarray:
  return np.asarray(Image.fromarray(catalog.load_image(path)).resize((THUMBNAIL, THUMBNAIL), Image.BILINEAR))


def _verdict(query_item: int, hit: Hit) -> str:
  """"same" / "other" product when the query's product is known (from its path), else ""."""
  if query_item < 0 or hit.item_id < 0:
    return ""
  return "same" if hit.item_id == query_item else "other"


def write_html(path: str, queries: list[str], results: list[list[Hit]], thumbnails: list[list[np.ndarray]],
               title: str) -> None:
  """An HTML page with each query photo and its results (images embedded, so the page stands alone)."""
  parts = ["<!doctype html>", "<meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;margin:1em} .row{display:flex;flex-wrap:wrap;gap:8px;"
           "margin-bottom:1.5em} figure{margin:0;width:136px;font-size:11px;word-break:break-all} "
           "img{width:128px;height:128px;border:4px solid #888} .query img{border-color:#333} "
           ".same img{border-color:#1b1} .other img{border-color:#d22}</style>",
           f"<h1>{html.escape(title)}</h1>"]
  for query, hits, (query_thumb, *hit_thumbs) in zip(queries, results, thumbnails):
    query_item, _ = catalog.labels_from_path(query)
    parts.append(f"<h2>{html.escape(query)}</h2><div class='row'>")
    parts.append(f"<figure class='query'><img src='{_data_uri(query_thumb)}' alt='query'>"
                 "<figcaption><b>query</b></figcaption></figure>")
    for hit, thumb in zip(hits, hit_thumbs):
      item = hit.item_id if hit.item_id >= 0 else "-"
      parts.append(
          f"<figure class='{_verdict(query_item, hit)}'>"
          f"<img src='{_data_uri(thumb)}' alt='result {hit.rank}'>"
          f"<figcaption><b>{hit.rank}</b> d={hit.distance:.4g}<br>item {item} · "
          f"{html.escape(hit.category_name)}<br>{html.escape(hit.image)}</figcaption></figure>")
    parts.append("</div>")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(parts) + "\n")
  os.replace(tmp, path)


def plot_results(path: str, queries: list[str], results: list[list[Hit]],
                 thumbnails: list[list[np.ndarray]]) -> None:
  """A PNG: one row per query, the query then its results (green/red when the query's product is known)."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top  (pictures sets the backend)
  columns = 1 + max(len(hits) for hits in results)
  fig, axes = plt.subplots(len(queries), columns, figsize=(1.6 * columns, 1.9 * len(queries)), squeeze=False)
  colours = {"same": pictures.CORRECT_COLOUR, "other": pictures.WRONG_COLOUR, "": (0.6, 0.6, 0.6)}
  for row, (query, hits, (query_thumb, *hit_thumbs)) in enumerate(zip(queries, results, thumbnails)):
    query_item, _ = catalog.labels_from_path(query)
    pictures.show_image(axes[row, 0], query_thumb, "query", (0.2, 0.2, 0.2))
    axes[row, 0].set_ylabel(os.path.basename(query)[:24], fontsize=7)
    for column in range(1, columns):
      axes[row, column].axis("off")
    for hit, thumb in zip(hits, hit_thumbs):
      axes[row, hit.rank].axis("on")
      title = f"{hit.rank}: d={hit.distance:.3g}\nitem {hit.item_id}"
      pictures.show_image(axes[row, hit.rank], thumb, title,
                     colours[_verdict(query_item, hit)])
  known = any(catalog.labels_from_path(q)[0] >= 0 for q in queries)
  fig.suptitle("Query photo and its nearest catalogue images" + (" (green: same product)" if known else ""),
               fontsize=10)
  fig.tight_layout()
  pictures.save_figure(fig, path)


def logged_recall(workdir: str, step: int) -> dict[int, float] | None:
  """The trainer's exact Recall@K of `step` from `metrics.jsonl`, if it logged one."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if r.get("step") == step and any(k.startswith("recall@") for k in r)]
  if not rows:
    return None
  return {int(k[len("recall@"):]): v for k, v in rows[-1].items() if k.startswith("recall@")}


def parse_args(argv):
  # argparse, not absl flags: see jaxret/index.py.
  parser = argparse.ArgumentParser(prog="python -m jaxret.search", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="Training run whose latest checkpoint made the index.")
  parser.add_argument("--uri", default=catalog.DEFAULT_URI,
                      help="Milvus Lite file (PATH.db) or server (http://host:19530). Default: %(default)s.")
  parser.add_argument("--collection", default=catalog.DEFAULT_COLLECTION, help="Default: %(default)s.")
  parser.add_argument("--image", action="extend", nargs="+", default=[], metavar="PATH",
                      help="Query photo(s): --image a.jpg b.jpg, or repeat --image.")
  parser.add_argument("--k", type=int, default=10, help="Results per query. Default: %(default)s.")
  parser.add_argument("--out", default="results.html",
                      help="HTML page of the results; a PNG is written beside it. Default: %(default)s.")
  parser.add_argument("--split", default=None, help="With --recall: the split whose images are the queries.")
  parser.add_argument("--recall", action="store_true", help="Print Recall@K of --split (default: query).")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default: the run's, else $TFDS_DATA_DIR).")
  args = parser.parse_args(argv)
  if args.recall == bool(args.image):
    parser.error("give either --image PATH (search a photo) or --recall [--split query] (measure Recall@K).")
  if args.split is not None and not args.recall:
    parser.error("--split is for --recall; to search a photo give --image PATH.")
  if args.k < 1:
    parser.error(f"--k must be at least 1, got {args.k}.")
  return args


def run_recall(shop: Catalog, split: str) -> None:
  start = time.perf_counter()
  recalls = shop.recall(split)
  embedder = shop.embedder
  print(f"{split} images searched against {shop.count()} images of collection {shop.collection!r} "
        f"({shop.index_type()} index) in {time.perf_counter() - start:.1f} s:")
  name = f"{embedder.config.model.name} step {embedder.step}, {shop.index_type()}"
  print(train.recall_table(recalls, name))
  exact = logged_recall(embedder.workdir, embedder.step)
  if exact is not None:
    print("Exact evaluation of the same checkpoint (metrics.jsonl, query vs gallery): " +
          ", ".join(f"R@{k} {100 * v:.1f}" for k, v in sorted(exact.items())))


def run_search(shop: Catalog, images: list[str], k: int, out: str) -> None:
  results = shop.search_many(images, k)
  thumbnails = [[_query_thumbnail(query)] + [shop.thumbnail(hit, THUMBNAIL) for hit in hits]
                for query, hits in zip(images, results)]
  for query, hits in zip(images, results):
    print(f"Nearest {len(hits)} of {shop.count()} catalogue images to {query}:")
    print(format_table(hits))
  out = os.path.abspath(os.path.expanduser(out))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  png = os.path.splitext(out)[0] + ".png"
  write_html(out, images, results, thumbnails, f"jaxret search: {shop.collection} ({shop.uri})")
  plot_results(png, images, results, thumbnails)
  print(f"Wrote {out} and {png}.")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log at INFO.
  try:
    with Catalog(args.workdir, args.uri, args.collection, data_dir=args.data_dir, create=False) as shop:
      if args.recall:
        run_recall(shop, args.split or "query")
      else:
        run_search(shop, args.image, args.k, args.out)
  except (CatalogError, run_config.ConfigError, input_pipeline.DatasetNotPreparedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
