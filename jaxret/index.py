"""Embeds catalogue images with the latest checkpoint of a run and upserts them into a Milvus collection.

  python -m jaxret.index --workdir RUN --uri catalog.db [--split gallery | --images DIR] [--collection NAME]

`--uri` is a Milvus Lite database (a local path ending in `.db`, made on first use) or a Milvus server
(`http://host:19530`). `--split` indexes a split of the run's dataset (default: gallery); `--images` indexes
the image files under a folder instead (`.../id_00000123/photo.jpg` gives the product id). Indexing the same
images again replaces their rows. `--index HNSW` or `IVF_FLAT` builds an approximate index for a new
collection (default FLAT, exact); see docs/search.md.

Several processes (`jax.distributed`, the trainer's flags) share the work, each embedding its block of every
batch of images:

  python -m jaxret.index --workdir RUN --uri http://host:19530 \
      --coordinator_address HOST0:12355 --num_processes N --process_id I

With a Milvus server each process upserts the rows it embedded (one upsert per process, no row twice). A
Milvus Lite database can be open in one process only: process 0 opens it and receives every row.
"""

import argparse
import sys
import time

from absl import logging
import jax

from jaxret import catalog
from jaxret import distributed
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
  processes = parser.add_argument_group("several processes (jax.distributed; see docs/distributed.md)")
  processes.add_argument("--coordinator_address", default=None,
                         help=distributed.FLAGS_HELP["coordinator_address"])
  processes.add_argument("--num_processes", type=int, default=None, help=distributed.FLAGS_HELP["num_processes"])
  processes.add_argument("--process_id", type=int, default=None, help=distributed.FLAGS_HELP["process_id"])
  processes.add_argument("--heartbeat_timeout_seconds", type=int, default=30,
                         help=distributed.FLAGS_HELP["heartbeat_timeout_seconds"])
  args = parser.parse_args(argv)
  try:
    distributed.check_settings(args.coordinator_address, args.num_processes, args.process_id)
  except ValueError as e:
    parser.error(str(e))
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log at INFO.
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                         args.heartbeat_timeout_seconds)
  start = time.perf_counter()
  try:
    with catalog.Catalog(args.workdir, args.uri, args.collection, index_type=args.index,
                         overwrite=args.overwrite, data_dir=args.data_dir) as shop:
      if args.images is not None:
        written, unreadable = shop.add_images(args.images)
        what = f"image files under {args.images}"
        if jax.process_index() == 0:
          for path in unreadable[:10]:
            print(f"warning: skipped {path}: not a readable image.", file=sys.stderr)
          if len(unreadable) > 10:
            print(f"warning: skipped {len(unreadable) - 10} more unreadable files.", file=sys.stderr)
      else:
        split = args.split or "gallery"
        written = shop.add_split(split)
        what = f"{shop.embedder.config.input.dataset} {split} images"
      embedder = shop.embedder
      if jax.process_count() > 1:
        print(f"process {jax.process_index()} of {jax.process_count()}: upserted {shop.rows_written} rows.")
      if jax.process_index() != 0:
        return 0  # Process 0 reports for all.
      processes = f" by {jax.process_count()} processes" if jax.process_count() > 1 else ""
      print(f"Indexed {written} {what}{processes} in {time.perf_counter() - start:.1f} s: collection "
            f"{args.collection!r} in {shop.uri} now holds {shop.count()} images ({shop.index_type()} index, "
            f"{shop.metric_type} metric, {embedder.dim}-d embeddings of {embedder.config.model.name} at step "
            f"{embedder.step}).")
  except (catalog.CatalogError, embedding.RunError, run_config.ConfigError,
          input_pipeline.DatasetNotPreparedError) as e:
    # Problems a user can fix: the message, not a traceback.
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Exception as e:  # Any failure of a multi-process run: first say which process is gone, then the trace.
    if jax.process_count() > 1:
      distributed.report_peer_failure(e)
    raise
  return 0


if __name__ == "__main__":
  sys.exit(main())
