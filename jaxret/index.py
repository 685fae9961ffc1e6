"""Embeds catalogue images with the latest checkpoint of a run and upserts them into a Milvus collection.

  python -m jaxret.index --workdir RUN --uri catalog.db [--split gallery | --images DIR] [--collection NAME]

`--uri` is a Milvus Lite database (a local path ending in `.db`, made on first use) or a Milvus server
(`http://host:19530`). `--split` indexes a split of the run's dataset (default: gallery); `--images` indexes
the image files under a folder instead (`.../id_00000123/photo.jpg` gives the product id). Indexing the same
images again replaces their rows. `--index HNSW` or `IVF_FLAT` builds an approximate index for a new
collection (default FLAT, exact); see docs/search.md.
"""

import argparse
import sys
import time

from absl import logging

from jaxret import catalog
from jaxret import embedding
from jaxret import input_pipeline
from jaxret import run_config


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m jaxret.index", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="Training run whose latest checkpoint embeds the images.")
  parser.add_argument("--uri", default=catalog.DEFAULT_URI,
                      help="Milvus Lite file (PATH.db) or server (http://host:19530). Default: %(default)s.")
  what = parser.add_mutually_exclusive_group()
  what.add_argument("--split", default=None, help="Split of the run's dataset to index (default: gallery).")
  what.add_argument("--images", default=None, help="Folder of image files to index (searched recursively).")
  parser.add_argument("--collection", default=catalog.DEFAULT_COLLECTION, help="Default: %(default)s.")
  parser.add_argument("--index", default=None, choices=list(catalog.milvus.INDEX_BUILD_PARAMS),
                      help="Vector index of a new collection (default FLAT: exact search).")
  parser.add_argument("--overwrite", action="store_true",
                      help="Drop the collection first (to change model or index type).")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default: the run's, else $TFDS_DATA_DIR).")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log at INFO.
  start = time.perf_counter()
  try:
    with catalog.Catalog(args.workdir, args.uri, args.collection, index_type=args.index,
                         overwrite=args.overwrite, data_dir=args.data_dir) as shop:
      if args.images is not None:
        written, unreadable = shop.add_images(args.images)
        what = f"image files under {args.images}"
        for path in unreadable[:10]:
          print(f"warning: skipped {path}: not a readable image.", file=sys.stderr)
        if len(unreadable) > 10:
          print(f"warning: skipped {len(unreadable) - 10} more unreadable files.", file=sys.stderr)
      else:
        split = args.split or "gallery"
        written = shop.add_split(split)
        what = f"{shop.embedder.config.input.dataset} {split} images"
      embedder = shop.embedder
      print(f"Indexed {written} {what} in {time.perf_counter() - start:.1f} s: collection "
            f"{args.collection!r} in {shop.uri} now holds {shop.count()} images ({shop.index_type()} index, "
            f"{shop.metric_type} metric, {embedder.dim}-d embeddings of {embedder.config.model.name} at step "
            f"{embedder.step}).")
  except (catalog.CatalogError, embedding.RunError, run_config.ConfigError,
          input_pipeline.DatasetNotPreparedError) as e:
    # Problems a user can fix: the message, not a traceback.
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
