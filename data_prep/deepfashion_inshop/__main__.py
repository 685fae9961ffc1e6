"""Converts the DeepFashion In-shop download into ArrayRecord shards that the trainer reads.

  python -m data_prep.deepfashion_inshop --manual_dir ~/deepfashion/inshop [--data_dir DIR] [--config women]

Exits with status 1 and a message listing the problems when the download is incomplete or damaged.
"""

import argparse
from collections.abc import Sequence
import os
import pathlib
import sys
import time

import tensorflow_datasets as tfds

from data_prep import staged_build
from data_prep.deepfashion_inshop import builder as builder_lib
from data_prep.deepfashion_inshop import release


def default_data_dir() -> str:
  """`$TFDS_DATA_DIR`, else TFDS's default `~/tensorflow_datasets`."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.deepfashion_inshop", description=__doc__.splitlines()[0],
      epilog=builder_lib.MANUAL_DOWNLOAD_INSTRUCTIONS, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--manual_dir", required=True,
                      help="folder holding Img/img.zip and Eval/list_eval_partition.txt (and optionally the "
                           "Anno/ files)")
  parser.add_argument("--data_dir", default=default_data_dir(),
                      help="TFDS data dir to write to (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  configs = [c.name for c in builder_lib.DeepfashionInshop.BUILDER_CONFIGS]
  parser.add_argument("--config", default="all", choices=configs,
                      help="which genders to keep (default: all); labels are the same in every config")
  parser.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset is already there")
  return parser.parse_args(argv)


def summary(builder: tfds.core.DatasetBuilder, plan: release.BuildPlan, files: release.ReleaseFiles,
            seconds: float) -> str:
  """What was written where, split by split, and how to read it."""
  name = f"{builder.name}/{builder.builder_config.name}"
  selected = plan.select(builder.builder_config.genders)
  took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
  lines = [f"Wrote {name} {builder.version} in {took} to {builder.data_dir}"]
  for split, info in builder.info.splits.items():
    items = len({r.item_id for r in selected[split]})
    lines.append(f"  {split:8s} {info.num_examples:6d} images of {items:5d} items in {info.num_shards} "
                 "shards")
  lines.append(f"  images from {files.images_label}")
  absent = "absent (no {})".format
  lines.append("  bbox/clothes_type/pose_type " + (f"from {files.label(files.bbox)}" if files.bbox
                                                   else absent("Anno/list_bbox_inshop.txt")))
  lines.append("  landmarks " + (f"from {files.label(files.landmarks)}" if files.landmarks
                                 else absent("Anno/list_landmarks_inshop.txt")))
  lines.append("  attributes " + (f"from {files.label(files.attr_items)} ({len(plan.attribute_names)} names "
                                  f"from {files.label(files.attr_cloth)})" if plan.has_attributes
                                  else absent("Anno/list_attr_cloth.txt and Anno/list_attr_items.txt")))
  if files.unused_annotations:
    lines.append("  present but not read: " + ", ".join(files.label(p) for p in files.unused_annotations))
  lines.append(f'Read it with: tfds.data_source("{name}", data_dir="{builder.data_dir_root}", split="train") '
               "after `import data_prep.deepfashion_inshop`.")
  older = [v for v in builder_lib.prepared_versions(builder.data_dir_root, builder.builder_config.name)
           if v != str(builder.version)]
  if older:
    lines.append(f"Older version(s) {', '.join(older)} of {name} are still in {builder.data_dir_root}; jaxret "
                 "no longer reads them, so they may be deleted.")
  lines += [f"Warning: {w}" for w in plan.warnings]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  builder = builder_lib.DeepfashionInshop(config=args.config, data_dir=os.path.expanduser(args.data_dir))
  # Not builder.is_prepared(): it logs a warning about the missing folder before every first build.
  if (pathlib.Path(builder.data_dir) / "dataset_info.json").exists() and not args.overwrite:
    print(f"{builder.name}/{args.config} is already in {builder.data_dir}; pass --overwrite to rebuild it.")
    return 0
  start = time.perf_counter()
  try:
    # Checked here first so that a bad download is reported before TFDS creates any folder.
    files, plan = release.validate_release(args.manual_dir)
    plan.select(builder.builder_config.genders)
    # Built beside any existing copy, which is replaced only once the new one is complete (--overwrite).
    builder = staged_build.prepare_beside(
        lambda data_dir: builder_lib.DeepfashionInshop(config=args.config, data_dir=data_dir),
        os.path.expanduser(args.data_dir),
        tfds.download.DownloadConfig(manual_dir=os.path.expanduser(args.manual_dir)))
  except release.InshopDownloadError as e:
    print(f"\nerror: {e}", file=sys.stderr)
    return 1
  print(summary(builder, plan, files, time.perf_counter() - start))
  return 0


if __name__ == "__main__":
  sys.exit(main())
