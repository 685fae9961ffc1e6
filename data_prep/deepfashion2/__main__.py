"""Converts the DeepFashion2 download (train.zip, validation.zip) into ArrayRecord shards that jaxret reads.

  python -m data_prep.deepfashion2 --manual_dir ~/deepfashion2 [--data_dir DIR] [--password P]

Exits with status 1 and a message listing the problems when the download is incomplete, damaged or cannot be
opened. The password is used in memory only: it is not written anywhere.
"""

import argparse
from collections.abc import Sequence
import os
import pathlib
import sys
import time

import tensorflow_datasets as tfds

from data_prep import staged_build
from data_prep.deepfashion2 import builder as builder_lib
from data_prep.deepfashion2 import release

# What Python's zipfile decrypts ZipCrypto at (pure Python), measured on the 2-core development machine.
_DECRYPT_BYTES_PER_SECOND = 0.6e6


def default_data_dir() -> str:
  """`$TFDS_DATA_DIR`, else TFDS's default `~/tensorflow_datasets`."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.deepfashion2", description=__doc__.splitlines()[0],
      epilog=builder_lib.MANUAL_DOWNLOAD_INSTRUCTIONS, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--manual_dir", required=True,
                      help="folder holding train.zip and validation.zip (or train/ and validation/ extracted)")
  parser.add_argument("--data_dir", default=default_data_dir(),
                      help="TFDS data dir to write to (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--password", default=None,
                      help="password of the encrypted zips (used in memory only, never stored)")
  parser.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset is already there")
  return parser.parse_args(argv)


def summary(builder: tfds.core.DatasetBuilder, plan: release.BuildPlan, sources: dict, seconds: float) -> str:
  """What was written where, split by split, and how to read it."""
  took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
  lines = [f"Wrote {builder.name} {builder.version} in {took} to {builder.data_dir}"]
  for split, info in builder.info.splits.items():
    lines.append(f"  {split:8s} {info.num_examples:7d} garments of {len(plan.images[split]):6d} images in "
                 f"{info.num_shards} shards")
  lines.append("  images from " + ", ".join(source.label for source in sources.values()))
  lines.append(f'Read it with: tfds.data_source("{builder.name}", data_dir="{builder.data_dir_root}", '
               'split="query") after `import data_prep.deepfashion2`.')
  lines += [f"Warning: {w}" for w in plan.warnings]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  data_dir = os.path.expanduser(args.data_dir)
  builder = builder_lib.Deepfashion2(data_dir=data_dir)
  if (pathlib.Path(builder.data_dir) / "dataset_info.json").exists() and not args.overwrite:
    print(f"{builder.name} is already in {builder.data_dir}; pass --overwrite to rebuild it.")
    return 0
  start = time.perf_counter()
  try:
    # Checked here first so that a bad download is reported before TFDS creates any folder.
    sources, plan = release.validate_release(args.manual_dir, password=args.password)
    encrypted = sum(source.encrypted_bytes for source in sources.values())
    if encrypted:
      hours = encrypted / _DECRYPT_BYTES_PER_SECOND / 3600
      print(f"Note: the zips are encrypted, and Python decrypts them slowly (about "
            f"{_DECRYPT_BYTES_PER_SECOND / 1e6:.1f} MB/s here), so reading their {encrypted / 1e9:.1f} GB takes "
            f"about {hours:.1f} h. Extracting them once (e.g. `unzip train.zip`, which asks for the password) "
            "and running again on the extracted folders is much faster.", flush=True)
    # Built beside any existing copy, which is replaced only once the new one is complete (--overwrite).
    builder = staged_build.prepare_beside(
        lambda directory: builder_lib.Deepfashion2(data_dir=directory, password=args.password,
                                                   plan=(sources, plan)),
        data_dir, tfds.download.DownloadConfig(manual_dir=os.path.expanduser(args.manual_dir)))
  except release.DeepFashion2Error as e:
    print(f"\nerror: {e}", file=sys.stderr)
    return 1
  print(summary(builder, plan, sources, time.perf_counter() - start))
  return 0


if __name__ == "__main__":
  sys.exit(main())
