"""Times `python -m data_prep.deepfashion2` on fake downloads of growing size and reports peak memory.

  python bench/build_deepfashion2.py                              # 20,000 and 390,884 train images
  python bench/build_deepfashion2.py --num_images 2000 --keep /tmp/df2_bench

Each fake download has the official layout (train.zip and validation.zip with <split>/image/NNNNNN.jpg and
<split>/annos/NNNNNN.json) and DeepFashion2's proportions: validation has 8.6% as many images as train (33,669
for 390,884), half of them user photos; 1.5 garments an image; pairs of 2 user and 2 shop photos. Annotations
carry every key of the release, with a 40-point segmentation polygon per garment (~1.5 KB a file; the
segmentation is not read but is parsed). Images are small JPEGs (96x72, ~3 KB) from a pool of 64: this measures
what grows with the number of images (the zip directories, the plan, the writer) rather than decoding large
photos, which costs per image and is streamed. The build runs in a child process, so its CPU time and peak RSS
are the builder's alone (wall time also counts waiting for the CPU when the machine is busy).
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # The fake release layout lives with the tests.
sys.path.insert(0, str(REPO))

import fake_deepfashion2  # pylint: disable=g-import-not-at-top,wrong-import-position
import fake_inshop  # pylint: disable=g-import-not-at-top,wrong-import-position

_VALIDATION_PER_TRAIN = 33_669 / 390_884


def fake_annotation(image_id: int, height: int, width: int) -> tuple[bytes, int]:
  """(JSON bytes, number of garments) of fake image `image_id` (1-based): pairs of 2 user and 2 shop photos."""
  pair_id, position = (image_id - 1) // 4 + 1, (image_id - 1) % 4
  garments = [(1 + image_id % 13, 1)] + ([(1 + (image_id + 5) % 13, image_id % 3)] if image_id % 2 else [])
  image = fake_deepfashion2.FakeImage(
      split="", image_id=image_id, source="user" if position < 2 else "shop", pair_id=pair_id, jpeg=b"",
      height=height, width=width,
      items=tuple(fake_deepfashion2.fake_item(n, c, s, height, width, image_id + n)
                  for n, (c, s) in enumerate(garments, start=1)))
  annotation = fake_deepfashion2.annotation(image)
  for n in range(1, len(garments) + 1):
    annotation[f"item{n}"]["segmentation"] = [[float(v % width) + 0.5 for v in range(80)]]
  return json.dumps(annotation).encode(), len(garments)


def write_fake_split(root: pathlib.Path, split: str, num_images: int, pool: list[bytes], height: int,
                     width: int) -> int:
  """Writes `<split>.zip` (JPEGs stored, JSON deflated, as DeepFashion2's zips); returns its garments."""
  garments = 0
  with zipfile.ZipFile(root / f"{split}.zip", "w") as archive:
    for folder in (f"{split}/", f"{split}/image/", f"{split}/annos/"):
      archive.writestr(folder, b"")
    for image_id in range(1, num_images + 1):
      annotation, count = fake_annotation(image_id, height, width)
      garments += count
      archive.writestr(f"{split}/image/{image_id:06d}.jpg", pool[image_id % len(pool)])
      archive.writestr(f"{split}/annos/{image_id:06d}.json", annotation, compress_type=zipfile.ZIP_DEFLATED)
  return garments


def run_build(manual_dir: pathlib.Path, data_dir: pathlib.Path) -> tuple[float, float, float, str]:
  """Runs the command in a child; returns (wall s, the child's CPU s, its peak RSS in MiB, its stdout)."""
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  start = time.perf_counter()
  child = subprocess.Popen(
      [sys.executable, "-m", "data_prep.deepfashion2", "--manual_dir", str(manual_dir), "--data_dir",
       str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
  stdout = child.stdout.read()
  _, status, usage = os.wait4(child.pid, 0)
  seconds = time.perf_counter() - start
  if os.waitstatus_to_exitcode(status):
    raise RuntimeError(f"the build failed with exit code {os.waitstatus_to_exitcode(status)}:\n{stdout}")
  return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, stdout  # ru_maxrss: KiB on Linux.


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", default="20000,390884", help="comma-separated train sizes (images)")
  parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temp dir)")
  args = parser.parse_args()
  work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="deepfashion2_bench_"))
  height, width = 96, 72
  pool = [fake_inshop.make_jpeg(height, width, seed) for seed in range(64)]
  print(f"{'train images':>12} {'all images':>10} {'garments':>9} {'download MB':>12} {'wall s':>7} {'CPU s':>6} "
        f"{'garments/s':>10} {'peak RSS MiB':>13} {'output MB':>10}", flush=True)
  try:
    for num_train in (int(n) for n in args.num_images.split(",")):
      manual_dir, data_dir = work / f"manual_{num_train}", work / f"data_{num_train}"
      shutil.rmtree(manual_dir, ignore_errors=True)
      shutil.rmtree(data_dir, ignore_errors=True)
      manual_dir.mkdir(parents=True)
      num_validation = max(4, round(num_train * _VALIDATION_PER_TRAIN))
      garments = (write_fake_split(manual_dir, "train", num_train, pool, height, width)
                  + write_fake_split(manual_dir, "validation", num_validation, pool, height, width))
      download_bytes = sum(p.stat().st_size for p in manual_dir.iterdir())
      seconds, cpu_seconds, peak_mib, _ = run_build(manual_dir, data_dir)
      output_bytes = sum(p.stat().st_size for p in data_dir.rglob("*.array_record-*"))
      print(f"{num_train:12d} {num_train + num_validation:10d} {garments:9d} {download_bytes / 1e6:12.0f} "
            f"{seconds:7.1f} {cpu_seconds:6.1f} {garments / seconds:10.0f} {peak_mib:13.0f} "
            f"{output_bytes / 1e6:10.0f}", flush=True)
      if args.keep is None:
        shutil.rmtree(manual_dir, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
  finally:
    if args.keep is None:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
