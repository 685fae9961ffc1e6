"""The decoded cache: its pixels and labels are the records', a stale cache is rebuilt, a killed build is not read."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from jaxret import decoded_cache
from jaxret import input_pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.get_builder("synthetic_inshop/tiny", str(path))
  return str(path)


@pytest.fixture(scope="module")
def builder(data_dir):
  return input_pipeline.get_builder("synthetic_inshop/tiny", data_dir)


@pytest.fixture(scope="module")
def records(builder):
  source = input_pipeline.read_split(builder, "train")
  return source.__getitems__(list(range(len(source))))


def assert_is_the_split(split, records, size):
  assert split.images.shape == (len(records), size, size, 3) and split.images.dtype == np.uint8
  for i, record in enumerate(records):
    np.testing.assert_array_equal(split.images[i], decoded_cache.decode_pixels(record["image"], size))
  np.testing.assert_array_equal(split.index.item_ids, [r["item_id"] for r in records])
  np.testing.assert_array_equal(split.index.categories, [r["category"] for r in records])
  assert list(split.index.image_names) == [r["image_name"].decode() for r in records]


def test_worker_processes_and_this_process_build_the_same_cache(builder, records, tmp_path):
  in_workers = decoded_cache.open_split(builder, "train", 16, cache_dir=str(tmp_path / "a"), num_workers=2,
                                        chunk_size=16)
  assert_is_the_split(in_workers, records, 16)
  here = decoded_cache.open_split(builder, "train", 16, cache_dir=str(tmp_path / "b"), num_workers=0)
  np.testing.assert_array_equal(here.images, in_workers.images)
  labels = decoded_cache.open_split(builder, "train", None, cache_dir=str(tmp_path / "b"), num_workers=0)
  assert labels.images is None
  np.testing.assert_array_equal(labels.index.item_ids, here.index.item_ids)
  assert sorted(os.listdir(tmp_path / "b" / "synthetic_inshop" / "tiny" / str(builder.info.version))) == ["train-16px", "train-labels"]


def test_default_location_is_beside_the_prepared_dataset(builder):
  split = decoded_cache.open_split(builder, "query", 8, num_workers=0)
  assert split.path == os.path.join(os.fspath(builder.data_dir), "decoded", "query-8px")
  assert split.index.features.keys() >= {"item_id", "category", "image_name"}


def rebuilt(builder, cache_dir, capsys, size=16) -> bool:
  """Opens the cache; whether it was rebuilt (it says so)."""
  capsys.readouterr()
  decoded_cache.open_split(builder, "train", size, cache_dir=cache_dir, num_workers=0, progress=False)
  return "rebuilding it" in capsys.readouterr().out


def test_a_stale_cache_is_rebuilt(builder, records, tmp_path, capsys):
  cache_dir = str(tmp_path)
  split = decoded_cache.open_split(builder, "train", 16, cache_dir=cache_dir, num_workers=0)
  meta_path = os.path.join(split.path, "meta.json")
  assert not rebuilt(builder, cache_dir, capsys)  # Current: read as it is.

  # Another dataset version.
  with open(meta_path) as f:
    meta = json.load(f)
  assert str(builder.info.version) in meta["dataset"]
  meta["dataset"] = meta["dataset"].replace(str(builder.info.version), "0.9.0")
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  assert rebuilt(builder, cache_dir, capsys)
  assert not rebuilt(builder, cache_dir, capsys)

  # The data files were rewritten (same name and version, e.g. a dataset regenerated in place).
  data_file = decoded_cache.split_files(builder, "train")[0]
  stat = os.stat(data_file)
  try:
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert rebuilt(builder, cache_dir, capsys)
  finally:
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))

  # Another resolution is another folder; both stay.
  assert not rebuilt(builder, cache_dir, capsys, size=8)
  assert sorted(os.listdir(os.path.dirname(split.path))) == ["train-16px", "train-8px"]

  # A truncated images file (e.g. a disk that filled up while copying) is not read.
  with open(os.path.join(split.path, "images.npy"), "r+b") as f:
    f.truncate(os.path.getsize(os.path.join(split.path, "images.npy")) // 2)
  assert rebuilt(builder, cache_dir, capsys)
  assert_is_the_split(decoded_cache.open_split(builder, "train", 16, cache_dir=cache_dir), records, 16)


def test_a_build_killed_halfway_is_never_used(builder, records, data_dir, tmp_path):
  cache_dir = str(tmp_path)
  # A process that builds the cache and is killed (SIGKILL: no cleanup) after its second chunk is written.
  script = f"""
import os, signal
import tensorflow_datasets as tfds
import data_prep.synthetic_inshop  # Registers the builder (without importing JAX, unlike input_pipeline).
from jaxret import decoded_cache
builder = tfds.builder("synthetic_inshop/tiny", data_dir={data_dir!r}, file_format="array_record")
decode_chunk, written = decoded_cache._decode_chunk, []
def decode_then_die(start, stop):
  result = decode_chunk(start, stop)
  written.append(stop)
  if len(written) == 2:
    os.kill(os.getpid(), signal.SIGKILL)
  return result
decoded_cache._decode_chunk = decode_then_die
decoded_cache.open_split(builder, "train", 16, cache_dir={cache_dir!r}, num_workers=0, chunk_size=16)
"""
  completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert completed.returncode == -signal.SIGKILL, completed.stderr[-2000:]
  root = os.path.join(cache_dir, "synthetic_inshop", "tiny", str(builder.info.version))
  left = os.listdir(root)
  assert len(left) == 1 and left[0].startswith("train-16px.tmp-"), left  # Only the temporary folder.
  half = np.load(os.path.join(root, left[0], "images.npy"), mmap_mode="r")
  assert half[:32].any() and not half[32:].any()  # Two chunks written, the rest never.

  split = decoded_cache.open_split(builder, "train", 16, cache_dir=cache_dir, num_workers=0)
  assert_is_the_split(split, records, 16)
  assert os.listdir(root) == ["train-16px"]  # The dead build's folder is gone.


def test_features_of_varying_shape_are_left_out_of_the_labels():
  """DeepFashion2's landmarks are `[n, 3]` with n by category: not one array, so not kept (whatever the chunks)."""
  records = [{"image": b"", "item_id": 1, "landmarks": np.zeros((2, 3))},
             {"image": b"", "item_id": 2, "landmarks": np.zeros((3, 3))}]
  assert set(decoded_cache.stack_labels(records)) == {"item_id"}
  one_by_one = [decoded_cache.stack_labels(records[:1]), decoded_cache.stack_labels(records[1:])]
  assert all("landmarks" in chunk for chunk in one_by_one)  # Each chunk alone has one shape ...
  joined = decoded_cache.concatenate_labels(one_by_one)  # ... but the split has two.
  assert set(joined) == {"item_id"} and joined["item_id"].tolist() == [1, 2]
