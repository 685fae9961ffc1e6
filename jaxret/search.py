"""Finds the catalogue images nearest to a photo, or measures Recall@K through the index.

  python -m jaxret.search --workdir RUN --uri catalog.db --image PATH [--k 10] [--out results.html]
  python -m jaxret.search --workdir RUN --uri catalog.db --split query --recall
  python -m jaxret.search ... --preclassify_top_k 1     # search only the photo's predicted category

The first prints the top-K images of each `--image` (repeat it for several photos) as a table and writes an
HTML page (images embedded) and a PNG beside it (`results.png`). The second searches every image of a split
of the run's dataset and prints Recall@K; with a FLAT index over the gallery split it equals the trainer's
evaluation of the same checkpoint. With `--preclassify_top_k K` each photo searches only the catalogue images
of its K most likely categories as the run's model predicts them (a model with a category head or class
capsules; docs/evaluation.md, "Pre-classification"): a smaller search, at the cost of the photos whose
category is mispredicted.

The Python API is `jaxret.search.Catalog` (defined in jaxret/catalog/collection.py); see docs/search.md.
"""

import argparse
import json
import os
import sys
import time

from absl import logging

from jaxret import catalog
from jaxret import embedding
from jaxret import evaluation
from jaxret import input_pipeline
from jaxret import run_config
from jaxret.catalog import Catalog  # The public API: jaxret.search.Catalog.
from jaxret.catalog import CatalogError
from jaxret.catalog import report


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
  parser.add_argument("--preclassify_top_k", type=int, default=0, metavar="K",
                      help="Search only the catalogue images of each photo's K most likely categories, as the "
                           "run's model predicts them (images of unknown category are then never found); 0: "
                           "search them all. Default: %(default)s.")
  args = parser.parse_args(argv)
  if args.preclassify_top_k < 0:
    parser.error(f"--preclassify_top_k must be 0 (off) or more, got {args.preclassify_top_k}.")
  if args.recall == bool(args.image):
    parser.error("give either --image PATH (search a photo) or --recall [--split query] (measure Recall@K).")
  if args.split is not None and not args.recall:
    parser.error("--split is for --recall; to search a photo give --image PATH.")
  if args.k < 1:
    parser.error(f"--k must be at least 1, got {args.k}.")
  return args


def run_recall(shop: Catalog, split: str, preclassify_top_k: int = 0) -> None:
  start = time.perf_counter()
  recalls = shop.recall(split, preclassify_top_k=preclassify_top_k)
  embedder = shop.embedder
  restricted = f", each in its top {preclassify_top_k} predicted categories" if preclassify_top_k else ""
  print(f"{split} images searched against {shop.count()} images of collection {shop.collection!r} "
        f"({shop.index_type()} index{restricted}) in {time.perf_counter() - start:.1f} s:")
  name = f"{embedder.config.model.name} step {embedder.step}, {shop.index_type()}"
  if preclassify_top_k:
    name += f", pre-classified top {preclassify_top_k}"
  print(evaluation.recall_table(recalls, name))
  exact = logged_recall(embedder.workdir, embedder.step)
  if exact is not None:
    unrestricted = ", the whole gallery" if preclassify_top_k else ""
    print(f"Exact evaluation of the same checkpoint (metrics.jsonl, query vs gallery{unrestricted}): " +
          ", ".join(f"R@{k} {100 * v:.1f}" for k, v in sorted(exact.items())))


def run_search(shop: Catalog, images: list[str], k: int, out: str, preclassify_top_k: int = 0) -> None:
  categories = shop.predicted_categories(images, preclassify_top_k) if preclassify_top_k else None
  results = shop.search_many(images, k, categories=categories)
  thumbnails = [[report.query_thumbnail(query)] + [shop.thumbnail(hit, report.THUMBNAIL) for hit in hits]
                for query, hits in zip(images, results)]
  if categories is not None and shop.count("category < 0"):
    print(f"Note: {shop.count('category < 0')} catalogue images have no known category; pre-classification "
          "never finds them.")
  for row, (query, hits) in enumerate(zip(images, results)):
    if categories is not None:
      names = ", ".join(catalog.category_name(int(c)) for c in categories[row])
      print(f"Predicted categories of {query}: {names}; only their "
            f"{shop.count(f'category in {[int(c) for c in categories[row]]}')} images are searched.")
    print(f"Nearest {len(hits)} of {shop.count()} catalogue images to {query}:")
    print(report.format_table(hits))
  out = os.path.abspath(os.path.expanduser(out))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  png = os.path.splitext(out)[0] + ".png"
  report.write_html(out, images, results, thumbnails, f"jaxret search: {shop.collection} ({shop.uri})")
  report.plot_results(png, images, results, thumbnails)
  print(f"Wrote {out} and {png}.")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log at INFO.
  try:
    with Catalog(args.workdir, args.uri, args.collection, data_dir=args.data_dir, create=False) as shop:
      if args.recall:
        run_recall(shop, args.split or "query", args.preclassify_top_k)
      else:
        run_search(shop, args.image, args.k, args.out, args.preclassify_top_k)
  except (CatalogError, embedding.RunError, run_config.ConfigError, input_pipeline.DatasetNotPreparedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
