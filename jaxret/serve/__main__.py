"""Serves a catalogue: the search API and page over the latest checkpoint of a run and its Milvus collection.

  python -m jaxret.serve --workdir RUN --uri catalog.db [--host 127.0.0.1 --port 8000]

Then open http://127.0.0.1:8000/ and drop a photo, or

  curl -F image=@photo.jpg -F k=5 http://127.0.0.1:8000/search

The server binds to 127.0.0.1 unless told otherwise. It refuses to start on a collection indexed by another
model (the fingerprint the collection records), and says how to re-index it. Several replicas can serve one
Milvus server behind a load balancer; see docs/search.md.
"""

import argparse
import os
import sys
import warnings

from absl import logging
from PIL import Image

from jaxret import catalog
from jaxret import embedding
from jaxret import input_pipeline
from jaxret import run_config
from jaxret.serve import app as serve_app
from jaxret.serve import uploads

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m jaxret.serve", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="Training run whose latest checkpoint made the index.")
  parser.add_argument("--uri", default=catalog.DEFAULT_URI,
                      help="Milvus Lite file (PATH.db) or server (http://host:19530). Default: %(default)s.")
  parser.add_argument("--collection", default=catalog.DEFAULT_COLLECTION, help="Default: %(default)s.")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir of the run's dataset, for thumbnails of dataset images (default: the "
                           "run's, else $TFDS_DATA_DIR).")
  parser.add_argument("--host", default="127.0.0.1",
                      help="Address to listen on. Default: %(default)s (this machine only).")
  parser.add_argument("--port", type=int, default=8000, help="Default: %(default)s.")
  defaults, limits = serve_app.Settings(), uploads.Limits()
  batching = parser.add_argument_group("batching on the device")
  batching.add_argument("--max_batch", type=int, default=defaults.max_batch,
                        help="Most requests embedded and searched together; 1 turns batching off. "
                             "Default: %(default)s.")
  batching.add_argument("--max_wait_ms", type=float, default=defaults.max_wait_ms,
                        help="Longest a batch waits for requests still being decoded (a lone request never "
                             "waits). Default: %(default)s.")
  batching.add_argument("--max_queue", type=int, default=defaults.max_queue,
                        help="Most requests waiting for the device; more get 503 at once. Default: %(default)s.")
  batching.add_argument("--decode_threads", type=int, default=min(defaults.decode_threads, os.cpu_count() or 1),
                        help="Threads decoding uploaded photos. Default: %(default)s.")
  requests = parser.add_argument_group("request limits")
  requests.add_argument("--max_bytes", type=int, default=limits.max_bytes,
                        help="Largest photo accepted, in bytes. Default: %(default)s.")
  requests.add_argument("--max_pixels", type=int, default=limits.max_pixels,
                        help="Largest photo accepted, width x height (PIL's decompression-bomb limit). "
                             "Default: %(default)s.")
  requests.add_argument("--max_k", type=int, default=limits.max_k,
                        help="Most results per query. Default: %(default)s.")
  parser.add_argument("--access_log", action="store_true", help="Log every request.")
  args = parser.parse_args(argv)
  for name in ("max_batch", "max_queue", "decode_threads", "max_bytes", "max_pixels", "max_k"):
    if getattr(args, name) < 1:
      parser.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
  if args.max_wait_ms < 0:
    parser.error(f"--max_wait_ms must be at least 0, got {args.max_wait_ms}.")
  if not 0 <= args.port < 65536:
    parser.error(f"--port must be in [0, 65535], got {args.port}.")
  return args


def settings_from_args(args) -> serve_app.Settings:
  return serve_app.Settings(
      max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
      decode_threads=args.decode_threads,
      limits=uploads.Limits(max_bytes=args.max_bytes, max_pixels=args.max_pixels, max_k=args.max_k,
                            default_k=min(uploads.Limits().default_k, args.max_k)))


def open_catalog(args) -> catalog.Catalog:
  """The run's model and its collection, checked (fingerprint, dimension, metric); CatalogError if unusable."""
  try:
    return catalog.Catalog(args.workdir, args.uri, args.collection, data_dir=args.data_dir, create=False)
  except catalog.IncompatibleCollectionError as e:
    raise catalog.CatalogError(
        f"{e}\nTo serve the model of {args.workdir}, re-index the catalogue with it first, e.g.\n"
        f"  python -m jaxret.index --workdir {args.workdir} --uri {args.uri} --collection {args.collection} "
        "--overwrite [--images DIR]\n"
        f"or serve the run that made the collection (--workdir {e.made_by_workdir or 'RUN'}).") from None


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.WARNING)  # Orbax and TFDS log at INFO.
  # Process-wide, before any request: PIL's "more pixels than the limit" warning becomes an error (refused).
  warnings.simplefilter("error", Image.DecompressionBombWarning)
  import uvicorn  # pylint: disable=g-import-not-at-top  (only the server needs it)
  try:
    shop = open_catalog(args)
  except (catalog.CatalogError, embedding.RunError, run_config.ConfigError,
          input_pipeline.DatasetNotPreparedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  with shop:
    settings = settings_from_args(args)
    if args.host not in _LOOPBACK:
      print(f"note: listening on {args.host}, reachable from other machines; the API has no authentication, "
            "so put it behind a proxy or firewall you control.", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving {shop.count()} images of collection {shop.collection!r} in {shop.uri} with "
          f"{shop.embedder.config.model.name} at step {shop.embedder.step} (fingerprint "
          f"{shop.embedder.fingerprint}) at http://{host}:{args.port}/ once compiled for batches of up to "
          f"{settings.max_batch}; Ctrl-C stops.", flush=True)
    server = uvicorn.Server(uvicorn.Config(serve_app.create_app(shop, settings), host=args.host, port=args.port,
                                           log_level="info", access_log=args.access_log,
                                           timeout_graceful_shutdown=10))
    server.run()
  return 0


if __name__ == "__main__":
  sys.exit(main())
