"""Prepares a synthetic In-shop config into a TFDS data dir (the trainer also does this on first use).

  python -m data_prep.synthetic_inshop --config inshop --data_dir /data/tfds
  python -m data_prep.synthetic_inshop --config small   # into $TFDS_DATA_DIR or ~/tensorflow_datasets
"""

import argparse
import os
import time

from data_prep.synthetic_inshop import synthetic_inshop


def main(argv: list[str] | None = None):
  names = [c.name for c in synthetic_inshop.BUILDER_CONFIGS]
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="small", choices=names, help="which config to prepare")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir; default $TFDS_DATA_DIR, else ~/tensorflow_datasets")
  parser.add_argument("--num_workers", type=int, default=None,
                      help="rendering processes (-1: all cores, 0: this process); default: the config's")
  args = parser.parse_args(argv)
  data_dir = args.data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  builder = synthetic_inshop.SyntheticInshop(config=args.config, data_dir=data_dir, num_workers=args.num_workers)
  start = time.perf_counter()
  builder.download_and_prepare()
  splits = ", ".join(f"{name} {info.num_examples}" for name, info in builder.info.splits.items())
  print(f"synthetic_inshop/{args.config} ready in {builder.data_dir} ({splits}; {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
  main()
