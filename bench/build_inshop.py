"""Times `python -m data_prep.deepfashion_inshop` on fake downloads of growing size and reports peak memory.

  python bench/build_inshop.py                                 # 5,000 and 52,712 images of 256x256
  python bench/build_inshop.py --num_images 2000 --image_size 64 --keep /tmp/inshop_bench

Each fake download has the official layout (Img/img.zip, Eval/list_eval_partition.txt,
Anno/list_bbox_inshop.txt, list_landmarks_inshop.txt, list_attr_cloth.txt, list_attr_items.txt) and the release's proportions (train 49%, query 27%, gallery 24% of the images;
about 6.6 images per product; 23 categories); at 52,712 images its counts equal the full release's. Images are
JPEGs of the release's size and about its bytes per image (~27 KB at 256x256), drawn from a pool of 64
distinct ones. The build runs in a child process, so its CPU time and peak RSS are the builder's alone
(wall time also counts waiting for the CPU when the machine is busy). Image bytes are streamed, one shard at
a time; what grows with the download is per-image metadata (the plan and the zip's directory, ~1 KB/image).
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # The fake release layout lives with the tests.
sys.path.insert(0, str(REPO))

import fake_inshop  # pylint: disable=g-import-not-at-top,wrong-import-position

from data_prep import inshop_features  # pylint: disable=g-import-not-at-top,wrong-import-position

# Full-release counts: images and products per split (query and gallery share their products).
_FULL = {"images": 52_712, "train": 25_882, "query": 14_218, "gallery": 12_612, "train_items": 3_997,
         "test_items": 3_985}


def _spread(total: int, parts: int) -> list[int]:
  """`total` split into `parts` near-equal positive counts."""
  return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def fake_rows(num_images: int) -> list[tuple[str, str]]:
  """(image name, split) rows with the release's proportions; exact release counts at 52,712 images."""
  scale = num_images / _FULL["images"]
  train, query = round(_FULL["train"] * scale), round(_FULL["query"] * scale)
  gallery = num_images - train - query
  train_items = max(1, round(_FULL["train_items"] * scale))
  test_items = max(1, round(_FULL["test_items"] * scale))
  rows, item = [], 0
  for per_item in _spread(train, train_items):
    item += 1
    rows += [(item, view, "train") for view in range(per_item)]
  for queries, galleries in zip(_spread(query, test_items), _spread(gallery, test_items)):
    item += 1
    rows += [(item, view, "query" if view < queries else "gallery") for view in range(queries + galleries)]
  names = inshop_features.CATEGORY_NAMES
  return [(f"img/{names[item % len(names)]}/id_{item:08d}/{view:02d}_{1 + view % 4}_front.jpg", split)
          for item, view, split in rows]


def write_fake_download(root: pathlib.Path, num_images: int, image_size: int) -> int:
  """Writes the fake download; returns its size in bytes."""
  pool = [fake_inshop.make_jpeg(image_size, image_size, seed) for seed in range(64)]
  images = [fake_inshop.FakeImage(name=name, split=split, jpeg=pool[i % len(pool)], height=image_size,
                                  width=image_size, bbox=(10, 12, image_size - 20, image_size - 8),
                                  clothes_type=1 + i % 3, pose_type=1 + i % 6,
                                  landmarks=fake_inshop.fake_landmarks(1 + i % 3, image_size, image_size, i))
            for i, (name, split) in enumerate(fake_rows(num_images))]
  fake_inshop.write_release(root, images)
  return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def run_build(manual_dir: pathlib.Path, data_dir: pathlib.Path) -> tuple[float, float, float, str]:
  """Runs the command in a child; returns (wall s, the child's CPU s, its peak RSS in MiB, its stdout)."""
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  start = time.perf_counter()
  child = subprocess.Popen(
      [sys.executable, "-m", "data_prep.deepfashion_inshop", "--manual_dir", str(manual_dir), "--data_dir",
       str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
  stdout = child.stdout.read()
  _, status, usage = os.wait4(child.pid, 0)
  seconds = time.perf_counter() - start
  child.returncode = os.waitstatus_to_exitcode(status)
  if child.returncode:
    raise RuntimeError(f"the build failed with exit code {child.returncode}:\n{stdout}")
  cpu_seconds = usage.ru_utime + usage.ru_stime
  return seconds, cpu_seconds, usage.ru_maxrss / 1024, stdout  # ru_maxrss is in KiB on Linux.


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", default="5000,52712", help="comma-separated download sizes")
  parser.add_argument("--image_size", type=int, default=256, help="image height and width (release: 256)")
  parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temp dir)")
  args = parser.parse_args()
  work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="inshop_bench_"))
  print(f"{'images':>8} {'download MB':>12} {'wall s':>7} {'CPU s':>6} {'images/s':>9} {'peak RSS MiB':>13} "
        f"{'output MB':>10}")
  try:
    for num_images in (int(n) for n in args.num_images.split(",")):
      manual_dir, data_dir = work / f"manual_{num_images}", work / f"data_{num_images}"
      shutil.rmtree(manual_dir, ignore_errors=True)
      shutil.rmtree(data_dir, ignore_errors=True)
      download_bytes = write_fake_download(manual_dir, num_images, args.image_size)
      seconds, cpu_seconds, peak_mib, _ = run_build(manual_dir, data_dir)
      output_bytes = sum(p.stat().st_size for p in data_dir.rglob("*.array_record-*"))
      print(f"{num_images:8d} {download_bytes / 1e6:12.0f} {seconds:7.1f} {cpu_seconds:6.1f} "
            f"{num_images / seconds:9.0f} "
            f"{peak_mib:13.0f} {output_bytes / 1e6:10.0f}", flush=True)
  finally:
    if args.keep is None:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
