"""Catalogue search end to end: a smoke run's gallery indexed in Milvus Lite, searched, and Recall@K checked.

One short training run (module fixture) makes the checkpoint; one `Embedder` of it is shared by the API
tests, and the command-line tests run `index.main` / `search.main` in this process.
"""

import copy
import fcntl
import importlib.util
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from jaxret import catalog
from jaxret import embedding
from jaxret import index
from jaxret import metrics
from jaxret import search
from jaxret import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(data_dir):
  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.data_dir = str(data_dir)
  # Two steps, a checkpoint and an evaluation at the end: enough for a trained (non-initial) checkpoint.
  config.total_steps = config.eval_every = config.checkpoint_every = config.log_every = 2
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A smoke training run: `(workdir, data_dir)`."""
  data_dir = tmp_path_factory.mktemp("tfds")
  workdir = tmp_path_factory.mktemp("run")
  trainer.train_and_evaluate(smoke_config(data_dir), str(workdir))
  return str(workdir), str(data_dir)


@pytest.fixture(scope="module")
def embedder(run):
  return catalog.Embedder(run[0])


@pytest.fixture(scope="module")
def splits(embedder, run):
  """Exact embeddings of the query and gallery splits: `{split: (embeddings, SplitIndex, source)}`."""
  return {split: embedder.embed_split(split, run[1]) for split in ("query", "gallery")}


@pytest.fixture(scope="module")
def gallery_db(tmp_path_factory, run, embedder):
  """A Milvus Lite database whose default collection holds the gallery split (FLAT)."""
  uri = str(tmp_path_factory.mktemp("milvus") / "catalog.db")
  with catalog.Catalog(run[0], uri, embedder=embedder, data_dir=run[1]) as shop:
    assert shop.add_split("gallery") == 24
  return uri


def export_images(source, split_index, records, folder):
  """Writes records of a split as JPEG files at their In-shop paths under `folder`; returns the paths."""
  paths = []
  for i in records:
    path = os.path.join(folder, str(split_index.image_names[i]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(source[int(i)]["image"])
    paths.append(path)
  return paths


def fake_embedder(embedder, **changes):
  """An object with the fields `Catalog` records, as another model would have them."""
  fields = dict(dim=embedder.dim, metric=embedder.metric, fingerprint=embedder.fingerprint, step=1,
                workdir="/elsewhere", config=embedder.config)
  fields.update(changes)
  return types.SimpleNamespace(**fields)


def test_recall_through_flat_index_equals_exact_recall(run, embedder, splits, gallery_db):
  query, query_index, _ = splits["query"]
  gallery, gallery_index, _ = splits["gallery"]
  ks = tuple(embedder.config.evals.ks)
  with catalog.Catalog(run[0], gallery_db, embedder=embedder, data_dir=run[1], create=False) as shop:
    assert shop.index_type() == "FLAT"
    through_index = shop.recall("query")
  exact = metrics.recall_at_k(query, query_index.item_ids, gallery, gallery_index.item_ids, ks=ks,
                              metric=embedder.metric)
  assert through_index == exact
  # ... and both are the trainer's own evaluation of this checkpoint.
  with open(os.path.join(run[0], "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f if "recall@1" in line][-1]
  assert logged["step"] == embedder.step == 2
  assert {k: logged[f"recall@{k}"] for k in ks} == exact
  assert 0 < exact[1] < 1  # Not a degenerate case where any ranking would agree.


def test_search_ranks_and_distances_match_a_numpy_oracle(run, embedder, splits, gallery_db):
  query, _, _ = splits["query"]
  gallery, gallery_index, _ = splits["gallery"]
  with catalog.Catalog(run[0], gallery_db, embedder=embedder, data_dir=run[1]) as shop:
    results = shop.search_embeddings(query, k=5)
  q, g = query.astype(np.float64), gallery.astype(np.float64)
  oracle = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)  # squared Euclidean, float64
  for row, hits in enumerate(results):
    nearest = np.argsort(oracle[row], kind="stable")[:5]
    assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert [h.image for h in hits] == [str(gallery_index.image_names[i]) for i in nearest]
    np.testing.assert_allclose([h.distance for h in hits], oracle[row, nearest], rtol=1e-4, atol=1e-5)
    assert [h.item_id for h in hits] == [int(gallery_index.item_ids[i]) for i in nearest]
    assert [h.category for h in hits] == [int(gallery_index.categories[i]) for i in nearest]


def test_reindexing_the_same_images_adds_no_duplicates(run, embedder, tmp_path):
  uri = str(tmp_path / "catalog.db")
  with catalog.Catalog(run[0], uri, embedder=embedder, data_dir=run[1]) as shop:
    shop.add_split("gallery")
    shop.add_split("gallery")
    assert shop.count() == 24
    ids = shop.client.query(shop.collection, filter="", output_fields=["id"], limit=100)
    assert len({row["id"] for row in ids}) == 24
    shop.add_split("query")  # other images: added
    assert shop.count() == 48


def test_search_by_file_finds_the_same_image_in_an_indexed_folder(run, embedder, splits, tmp_path):
  _, gallery_index, gallery_source = splits["gallery"]
  paths = export_images(gallery_source, gallery_index, range(6), tmp_path / "shop")
  broken = tmp_path / "shop" / "broken.jpg"
  broken.write_bytes(b"not a jpeg")
  uri = str(tmp_path / "files.db")
  with catalog.Catalog(run[0], uri, embedder=embedder) as shop:
    written, unreadable = shop.add_images(tmp_path / "shop")
    assert (written, unreadable) == (6, [str(broken)])
    assert shop.add_images(paths[:3]) == (3, [])  # again: replaced, not added
    assert shop.count() == 6
    hits = shop.search(paths[4], k=3)
  assert hits[0].image == paths[4] and hits[0].source == catalog.FILE_SOURCE
  assert hits[0].distance == pytest.approx(0.0, abs=1e-5)
  # The product and category come from the In-shop path `.../GENDER/Category/id_XXXXXXXX/name.jpg`.
  assert hits[0].item_id == gallery_index.item_ids[4]
  assert hits[0].category == gallery_index.categories[4]


def test_a_query_photo_file_gets_its_split_embedding(run, embedder, splits, gallery_db, tmp_path):
  query, query_index, query_source = splits["query"]
  paths = export_images(query_source, query_index, [0, 5], tmp_path)
  with catalog.Catalog(run[0], gallery_db, embedder=embedder, data_dir=run[1]) as shop:
    from_files = shop.search_many(paths, k=4)
    from_split = shop.search_embeddings(query[[0, 5]], k=4)
  for file_hits, split_hits in zip(from_files, from_split):
    assert [h.id for h in file_hits] == [h.id for h in split_hits]
    np.testing.assert_allclose([h.distance for h in file_hits], [h.distance for h in split_hits], rtol=1e-4,
                               atol=1e-5)


def test_another_dimension_or_model_is_refused(run, embedder, tmp_path):
  uri = str(tmp_path / "catalog.db")
  with catalog.Catalog(run[0], uri, "small", embedder=fake_embedder(embedder, dim=7)) as other:
    other.upsert(np.ones((2, 7)), [1, 2], [0, 0], ["a.jpg", "b.jpg"], catalog.FILE_SOURCE)
  with pytest.raises(catalog.CatalogError, match=r"7-dimensional vectors .* makes \d+-dimensional"):
    catalog.Catalog(run[0], uri, "small", embedder=embedder)
  another_model = fake_embedder(embedder, fingerprint="0" * 16)
  with catalog.Catalog(run[0], uri, "same_size", embedder=another_model) as other:
    other.upsert(np.ones((1, embedder.dim)), [1], [0], ["a.jpg"], catalog.FILE_SOURCE)
  with pytest.raises(catalog.CatalogError, match="not by the model at step 2"):
    catalog.Catalog(run[0], uri, "same_size", embedder=embedder)
  # --overwrite replaces it.
  with catalog.Catalog(run[0], uri, "same_size", embedder=embedder, overwrite=True) as shop:
    assert shop.count() == 0


def test_index_type_is_chosen_for_a_new_collection_and_kept(run, embedder, splits, tmp_path):
  uri = str(tmp_path / "catalog.db")
  with catalog.Catalog(run[0], uri, "hnsw", index_type="HNSW", embedder=embedder, data_dir=run[1]) as shop:
    shop.add_split("gallery")
    assert shop.index_type() == "HNSW"
    assert shop.default_search_params(10) == {"ef": 64}
    hits = shop.search_embeddings(splits["query"][0][:3], k=3)
  assert [len(h) for h in hits] == [3, 3, 3]
  with pytest.raises(catalog.CatalogError, match="has a HNSW index, not FLAT"):
    catalog.Catalog(run[0], uri, "hnsw", index_type="FLAT", embedder=embedder)


def test_cosine_runs_index_with_the_cosine_metric(run, embedder, splits, tmp_path):
  # The same weights evaluated with config.evals.metric = "cosine" (another fingerprint, no recompiling).
  cosine = copy.copy(embedder)
  cosine.metric, cosine.fingerprint = "cosine", "c" * 16
  query, query_index, _ = splits["query"]
  gallery, gallery_index, _ = splits["gallery"]
  with catalog.Catalog(run[0], str(tmp_path / "c.db"), embedder=cosine, data_dir=run[1]) as shop:
    shop.add_split("gallery")
    assert shop.metric_type == "COSINE" and shop.stored_metadata()["metric"] == "cosine"
    recalls = shop.recall("query")
    hits = shop.search_embeddings(query[:1], k=3)[0]
  assert recalls == metrics.recall_at_k(query, query_index.item_ids, gallery, gallery_index.item_ids,
                                        ks=tuple(embedder.config.evals.ks), metric="cosine")
  oracle = np.asarray(metrics.retrieval_distances(query[:1], gallery, "cosine"))[0]
  np.testing.assert_allclose([h.distance for h in hits], np.sort(oracle)[:3], atol=1e-5)


def test_missing_checkpoint_is_reported(tmp_path, capsys):
  with pytest.raises(embedding.RunError, match=r"no config.json\). Train a model first"):
    catalog.Embedder(str(tmp_path / "never_trained"))
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(embedding.RunError, match="no finished checkpoint. Train a model first"):
    catalog.Embedder(str(tmp_path))
  assert index.main(["--workdir", str(tmp_path / "never_trained"), "--uri", str(tmp_path / "c.db")]) == 1
  assert "python -m jaxret.train" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "c.db")


def test_missing_catalogue_or_collection_is_reported(run, embedder, gallery_db, tmp_path):
  with pytest.raises(catalog.CatalogError, match=r"(?s)No catalogue at .*Index one first"):
    catalog.Catalog(run[0], str(tmp_path / "none.db"), embedder=embedder, create=False)
  assert not os.path.exists(tmp_path / "none.db")
  with pytest.raises(catalog.CatalogError, match=r"(?s)No collection 'shoes' .*python -m jaxret.index"):
    catalog.Catalog(run[0], gallery_db, "shoes", embedder=embedder, create=False)


def test_milvus_lite_lock_is_released_on_close(run, embedder, tmp_path):
  uri = str(tmp_path / "catalog.db")
  first = catalog.Catalog(run[0], uri, embedder=embedder)
  second = catalog.Catalog(run[0], uri, embedder=embedder)  # shares the in-process server
  assert catalog.milvus.lite_folder_locked(uri)
  first.close()
  assert catalog.milvus.lite_folder_locked(uri)
  second.close()
  # Another process may open it now.
  assert not catalog.milvus.lite_folder_locked(uri)
  # While another process holds it (its flock on LOCK, taken here on a separate open file), opening says so.
  fd = os.open(os.path.join(uri, "LOCK"), os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(catalog.CatalogError, match="Another process has the Milvus Lite database"):
      catalog.Catalog(run[0], uri, embedder=embedder)
  finally:
    os.close(fd)


def test_command_lines_index_search_and_recall(run, embedder, splits, tmp_path, capsys, monkeypatch):
  workdir, data_dir = run
  monkeypatch.setattr(catalog, "Embedder", lambda _: embedder)  # Loaded and compiled once, by the fixture.
  uri = str(tmp_path / "cli.db")
  assert index.main(["--workdir", workdir, "--uri", uri, "--split", "gallery", "--data_dir", data_dir]) == 0
  assert "now holds 24 images (FLAT index" in capsys.readouterr().out

  _, gallery_index, gallery_source = splits["gallery"]
  photo = export_images(gallery_source, gallery_index, [3], tmp_path / "photos")[0]
  out = tmp_path / "out" / "results.html"
  assert search.main(["--workdir", workdir, "--uri", uri, "--image", photo, "--k", "4", "--out", str(out),
                      "--data_dir", data_dir]) == 0
  lines = capsys.readouterr().out.splitlines()
  header = next(i for i, line in enumerate(lines) if line.split()[:5] == ["rank", "distance", "item_id",
                                                                          "category", "image"])
  first = lines[header + 1].split()
  assert first[0] == "1" and float(first[1]) == pytest.approx(0, abs=1e-4)  # the photo is in the gallery
  assert first[2] == str(gallery_index.item_ids[3]) and first[4] == gallery_index.image_names[3]
  assert [line.split()[0] for line in lines[header + 1:header + 5]] == ["1", "2", "3", "4"]
  page = out.read_text()
  assert page.count("data:image/jpeg;base64,") == 5 and str(gallery_index.image_names[3]) in page
  assert (tmp_path / "out" / "results.png").stat().st_size > 1000

  assert search.main(["--workdir", workdir, "--uri", uri, "--split", "query", "--recall",
                      "--data_dir", data_dir]) == 0
  printed = capsys.readouterr().out
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f if "recall@1" in line][-1]
  row = next(line for line in printed.splitlines() if "FLAT |" in line)
  assert [float(x) for x in row.split("|")[2:-1]] == [round(100 * logged[f"recall@{k}"], 1)
                                                      for k in (1, 10, 20, 30, 40, 50)]

  assert search.main(["--workdir", workdir, "--uri", uri, "--collection", "nope", "--recall"]) == 1
  assert "No collection 'nope'" in capsys.readouterr().err


def test_labels_from_path_and_stable_keys():
  assert catalog.labels_from_path("/x/img/WOMEN/Dresses/id_00000002/02_1_front.jpg") == (2, 3)
  assert catalog.labels_from_path("shop/12345/photo.png") == (12345, -1)
  assert catalog.labels_from_path("photo.png") == (-1, -1)
  assert catalog.labels_from_path("shop/red_dress/photo.png") == (-1, -1)
  key = catalog.image_key_id("file", "/a/b.jpg")
  assert key == catalog.image_key_id("file", "/a/b.jpg") and 0 <= key < 2**63
  assert key != catalog.image_key_id("synthetic_inshop/tiny:gallery", "/a/b.jpg")


def test_format_table_columns():
  hits = [catalog.Hit(rank=1, distance=0.5, id=1, item_id=7, category=3, image="a.jpg", source="file"),
          catalog.Hit(rank=2, distance=12.25, id=2, item_id=-1, category=-1, image="b c.jpg", source="file")]
  lines = catalog.report.format_table(hits).splitlines()
  assert lines[0].split() == ["rank", "distance", "item_id", "category", "image"]
  assert lines[1].split() == ["1", "0.5000", "7", "WOMEN/Dresses", "a.jpg"]
  assert lines[2].split() == ["2", "12.2500", "-", "-", "b", "c.jpg"]


def test_the_catalogue_commands_do_not_import_the_trainer():
  """`jaxret.search --help` and `jaxret.catalog` stand alone: no training flags, no training code."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import runpy, sys\n"
          "sys.argv = ['jaxret.search', '--help']\n"
          "try:\n  runpy.run_module('jaxret.search', run_name='__main__')\nexcept SystemExit as e:\n  assert not e.code\n"
          "import jaxret.catalog, jaxret.index\n"
          "print(sorted(m for m in sys.modules if m in ('jaxret.train', 'jaxret.trainer')))\n")
  completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             cwd=pathlib.Path(__file__).resolve().parents[1])
  assert completed.returncode == 0, completed.stderr
  assert "--workdir" in completed.stdout
  assert completed.stdout.strip().endswith("[]")


def test_decompression_bombs_are_skipped(run, embedder, splits, tmp_path, capsys):
  """A small file that declares a huge image is refused before decoding, like any unreadable file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _, gallery_index, gallery_source = splits["gallery"]
  export_images(gallery_source, gallery_index, range(3), tmp_path / "shop")
  bomb = tmp_path / "shop" / "bomb.png"
  # 60 megapixels in a file of a few kB: above jaxret's limit (50), below Pillow's own (89), so this is the
  # check of decoded_cache.open_image that refuses it.
  Image.new("1", (8_000, 7_500)).save(bomb)
  assert bomb.stat().st_size < 200_000
  uri = str(tmp_path / "bombs.db")
  with catalog.Catalog(run[0], uri, embedder=embedder) as shop:
    written, unreadable = shop.add_images(tmp_path / "shop")
    assert (written, unreadable) == (3, [str(bomb)])
    with pytest.raises(catalog.CatalogError, match="more than the limit"):
      shop.search(str(bomb))
  assert index.main(["--workdir", run[0], "--uri", uri, "--images", str(tmp_path / "shop")]) == 0
  assert f"warning: skipped {bomb}" in capsys.readouterr().err


# --- Several processes (jax.distributed): each embeds its share of the images ---


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def milvus_server(tmp_path):
  """A Milvus server on a free loopback port (Milvus Lite's gRPC server: the protocol of a Milvus server,
  which many processes may use at once); its URI."""
  port = free_port()
  process = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "milvus"),
                              "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 120
    while True:
      assert process.poll() is None, "the Milvus Lite server stopped"
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        assert time.time() < deadline, "the Milvus Lite server did not listen within 2 minutes"
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
  finally:
    process.terminate()
    process.wait(timeout=30)


def index_with_two_processes(run, uri, tmp_path) -> list[str]:
  """`python -m jaxret.index` on 2 processes x 1 CPU device; the output of each process."""
  address = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(2)]  # noqa: SIM115  (closed after the processes end)
  processes = [subprocess.Popen(
      [sys.executable, "-m", "jaxret.index", "--workdir", run[0], "--uri", uri, "--split", "gallery",
       "--data_dir", run[1], "--coordinator_address", address, "--num_processes", "2", "--process_id", str(i),
       "--heartbeat_timeout_seconds", "20"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
      for i, log in enumerate(logs)]
  outputs = []
  for process, log in zip(processes, logs):
    process.wait(timeout=600)
    log.seek(0)
    outputs.append(log.read())
    log.close()
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]
  return outputs


@pytest.mark.parametrize("backend", ["milvus_server", "milvus_lite"])
def test_two_processes_index_every_image_once(run, embedder, splits, tmp_path, backend, request):
  uri = request.getfixturevalue("milvus_server") if backend == "milvus_server" else str(tmp_path / "lite.db")
  outputs = index_with_two_processes(run, uri, tmp_path)
  assert "Indexed 24 synthetic_inshop/tiny gallery images by 2 processes" in outputs[0]
  assert "now holds 24 images" in outputs[0]
  # The global batch of 16 holds 8 images of each process: process 0 has images 0-7 and 16-23, process 1 8-15.
  written = [int(re.search(r"upserted (\d+) rows", output).group(1)) for output in outputs]
  if backend == "milvus_server":
    assert written == [16, 8]  # Each process upserts its own rows.
  else:
    assert written == [24, 0]  # Milvus Lite: one process opens the database; process 0 upserts every row.
  gallery, gallery_index, _ = splits["gallery"]
  with catalog.Catalog(run[0], uri, embedder=embedder, data_dir=run[1], create=False) as shop:
    assert shop.count() == 24
    rows = shop.client.query(shop.collection, filter="", output_fields=["image", "vector", "item_id"], limit=100)
  assert sorted(row["image"] for row in rows) == sorted(str(n) for n in gallery_index.image_names)
  by_name = {row["image"]: row for row in rows}
  for i, name in enumerate(gallery_index.image_names):
    # The vectors the processes made are the single-process embeddings of the same images.
    np.testing.assert_allclose(by_name[str(name)]["vector"], gallery[i], rtol=1e-4, atol=1e-5)
    assert by_name[str(name)]["item_id"] == gallery_index.item_ids[i]


def test_preclassified_recall_through_the_index_equals_the_exact_restricted_recall(run, embedder, splits,
                                                                                     gallery_db):
  from jaxret import preclassify  # pylint: disable=g-import-not-at-top
  query, query_index, _ = splits["query"]
  gallery, gallery_index, _ = splits["gallery"]
  ks = tuple(embedder.config.evals.ks)
  top = np.asarray(preclassify.top_categories(embedder.category_scores_split("query", run[1]), 2))
  ranks = np.asarray(preclassify.preclassified_ranks(query, query_index.item_ids, top, gallery,
                                                     gallery_index.item_ids, gallery_index.categories))
  exact = metrics.recall_from_ranks(np.where(ranks < len(gallery), ranks, np.iinfo(np.int32).max), ks)
  with catalog.Catalog(run[0], gallery_db, embedder=embedder, data_dir=run[1], create=False) as shop:
    assert shop.recall("query", preclassify_top_k=2) == exact
    assert shop.recall("query", preclassify_top_k=23) == shop.recall("query")  # every category: no restriction
    assert exact != shop.recall("query")  # the restriction changed something
    with pytest.raises(catalog.CatalogError, match="predicts 23; give between 1 and 23"):
      shop.recall("query", preclassify_top_k=24)
    # Each query's hits lie in its own categories, all of them (some categories have no gallery image).
    results = shop.search_embeddings(query, k=24, categories=top)
    for hits, allowed in zip(results, top):
      assert sorted(hit.image for hit in hits) == sorted(
          str(name) for name, category in zip(gallery_index.image_names, gallery_index.categories)
          if category in allowed)
    assert any(results)


def test_command_line_searches_the_predicted_categories_only(run, embedder, splits, gallery_db, tmp_path, capsys,
                                                             monkeypatch):
  workdir, data_dir = run
  monkeypatch.setattr(catalog, "Embedder", lambda _: embedder)
  _, gallery_index, gallery_source = splits["gallery"]
  photo = export_images(gallery_source, gallery_index, [5], tmp_path / "photos")[0]
  with catalog.Catalog(workdir, gallery_db, embedder=embedder, data_dir=data_dir, create=False) as shop:
    predicted = shop.predicted_categories([photo], 1)[0, 0]
  assert search.main(["--workdir", workdir, "--uri", gallery_db, "--image", photo, "--k", "24",
                      "--preclassify_top_k", "1", "--out", str(tmp_path / "results.html"),
                      "--data_dir", data_dir]) == 0
  lines = capsys.readouterr().out.splitlines()
  in_category = int(np.sum(gallery_index.categories == predicted))
  assert f"Predicted categories of {photo}: {catalog.category_name(int(predicted))}; only their {in_category} " \
         "images are searched." in lines
  header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "distance"])
  assert len([line for line in lines[header + 1:] if line.split() and line.split()[0].isdigit()]) == in_category
  assert search.main(["--workdir", workdir, "--uri", gallery_db, "--recall", "--preclassify_top_k", "2",
                      "--data_dir", data_dir]) == 0
  assert "FLAT, pre-classified top 2 |" in capsys.readouterr().out
  with pytest.raises(SystemExit):
    search.main(["--workdir", workdir, "--uri", gallery_db, "--recall", "--preclassify_top_k", "-1"])
  assert "--preclassify_top_k must be 0 (off) or more" in capsys.readouterr().err
