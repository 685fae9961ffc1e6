"""The search service: every route and every bad input through FastAPI's test client, batching, the command line,
and the page in a real headless Chromium against the real server in a subprocess.

One smoke training run (module fixture) makes the checkpoint; its gallery split is the catalogue (Milvus Lite).
The API tests run the app in this process with the run's `Embedder`; the browser test starts
`python -m jaxret.serve` on a free loopback port.
"""

import asyncio
import base64
import concurrent.futures
import functools
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from fastapi import testclient
import numpy as np
from PIL import Image
import pytest
from test_index_search import fake_embedder
from test_index_search import smoke_config

from jaxret import catalog
from jaxret import embedding
from jaxret import input_pipeline
from jaxret import trainer
from jaxret.serve import __main__ as serve_main
from jaxret.serve import app as serve_app
from jaxret.serve import batcher as batching
from jaxret.serve import uploads

REPO = pathlib.Path(__file__).resolve().parents[1]
# Small limits, so that "too large" inputs are cheap to make.
LIMITS = uploads.Limits(max_bytes=200_000, max_pixels=1_000_000, max_k=50, default_k=10)
SETTINGS = serve_app.Settings(max_batch=4, max_wait_ms=2.0, limits=LIMITS)


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
def gallery(run):
  """The gallery split: `(SplitIndex, source)`."""
  source = input_pipeline.read_split(input_pipeline.get_builder("synthetic_inshop/tiny", run[1]), "gallery")
  return input_pipeline.index_split(source), source


def index_gallery(run, embedder, uri):
  with catalog.Catalog(run[0], uri, embedder=embedder, data_dir=run[1]) as shop:
    assert shop.add_split("gallery") == 24


@pytest.fixture(scope="module")
def shop(tmp_path_factory, run, embedder):
  uri = str(tmp_path_factory.mktemp("milvus") / "catalog.db")
  index_gallery(run, embedder, uri)
  with catalog.Catalog(run[0], uri, embedder=embedder, data_dir=run[1], create=False) as opened:
    yield opened


@pytest.fixture(scope="module")
def client(shop):
  pixel_limit = Image.MAX_IMAGE_PIXELS
  with testclient.TestClient(serve_app.create_app(shop, SETTINGS)) as test_client:
    yield test_client
  Image.MAX_IMAGE_PIXELS = pixel_limit  # create_app sets PIL's process-wide limit; other tests expect PIL's.


def photo(gallery, record: int) -> bytes:
  """The JPEG bytes of a gallery image, as a shop's photo would arrive."""
  return gallery[1][record]["image"]


def png(width: int, height: int, mode: str = "RGB") -> bytes:
  encoded = io.BytesIO()
  Image.new(mode, (width, height)).save(encoded, format="PNG")
  return encoded.getvalue()


@functools.cache
def bomb() -> bytes:
  """A decompression bomb: a PNG of a few kilobytes that declares 100 million pixels."""
  return png(10_000, 10_000, mode="1")


def post_photo(client, data: bytes, **fields):
  return client.post("/search", files={"image": ("photo.jpg", data, "image/jpeg")},
                     data={k: str(v) for k, v in fields.items()})


def assert_refused(response, status: int, *phrases: str):
  assert response.status_code == status, response.text
  detail = response.json()["detail"]
  for phrase in phrases:
    assert phrase in detail, detail


# --- POST /search ---


def test_search_answers_what_the_catalog_answers(client, shop, gallery, embedder):
  index, _ = gallery
  response = post_photo(client, photo(gallery, 3), k=5)
  assert response.status_code == 200, response.text
  answer = response.json()
  expected = shop.search(photo(gallery, 3), k=5)
  assert [h["rank"] for h in answer["hits"]] == [1, 2, 3, 4, 5]
  assert [int(h["id"]) for h in answer["hits"]] == [h.id for h in expected]
  np.testing.assert_allclose([h["distance"] for h in answer["hits"]], [h.distance for h in expected], rtol=1e-5,
                             atol=1e-6)
  first = answer["hits"][0]
  # The photo is a gallery image: it finds itself, its product and category.
  assert first["image"] == str(index.image_names[3]) and first["distance"] == pytest.approx(0, abs=1e-4)
  assert first["item_id"] == index.item_ids[3] and first["category"] == index.categories[3]
  assert first["category_name"] == catalog.category_name(int(index.categories[3]))
  assert first["thumbnail_url"] == f"/items/{first['id']}/image"
  assert answer["fingerprint"] == embedder.fingerprint == answer["model"]["fingerprint"]
  assert answer["k"] == 5 and answer["category"] is None and answer["batch_size"] >= 1
  assert set(answer["timings_ms"]) == {"read", "decode", "queue", "embed", "search", "total"}
  assert all(v >= 0 for v in answer["timings_ms"].values())


def test_search_by_json_base64_and_data_url(client, gallery):
  by_form = post_photo(client, photo(gallery, 7), k=4).json()["hits"]
  encoded = base64.b64encode(photo(gallery, 7)).decode()
  for image in (encoded, "data:image/jpeg;base64," + encoded):
    response = client.post("/search", json={"image": image, "k": 4})
    assert response.status_code == 200, response.text
    assert [h["id"] for h in response.json()["hits"]] == [h["id"] for h in by_form]


def test_k_defaults_and_the_category_filter(client, gallery):
  index, _ = gallery
  assert len(post_photo(client, photo(gallery, 0)).json()["hits"]) == LIMITS.default_k
  category = int(index.categories[5])
  name = catalog.category_name(category)
  in_category = int((index.categories == category).sum())
  assert 0 < in_category < 24
  for value in (name, category):
    answer = post_photo(client, photo(gallery, 5), k=20, category=value).json()
    assert answer["category"] == name
    assert len(answer["hits"]) == in_category  # Only that category's images, all of them.
    assert {h["category_name"] for h in answer["hits"]} == {name}
    assert answer["hits"][0]["image"] == str(index.image_names[5])
  assert len(client.post("/search", json={"image": base64.b64encode(photo(gallery, 5)).decode(), "k": 20,
                                          "category": category}).json()["hits"]) == in_category
  assert len(post_photo(client, photo(gallery, 5), k=30, category="any").json()["hits"]) == 24


@pytest.mark.parametrize("k", ["0", "-1", "51", "ten", "2.5", "1e3"])
def test_bad_k_is_refused(client, gallery, k):
  assert_refused(post_photo(client, photo(gallery, 0), k=k), 400, "k must be an integer from 1 to 50")


@pytest.mark.parametrize("k", [2.5, True, [3], "0"])
def test_bad_k_in_json_is_refused(client, gallery, k):
  response = client.post("/search", json={"image": base64.b64encode(photo(gallery, 0)).decode(), "k": k})
  assert_refused(response, 400, "k must be an integer from 1 to 50")


@pytest.mark.parametrize("category", ["WOMEN/Socks", "women/dresses", "99", "-1"])
def test_unknown_category_is_refused(client, gallery, category):
  assert_refused(post_photo(client, photo(gallery, 0), category=category), 400, "Unknown category",
                 "WOMEN/Dresses")


def test_empty_and_undecodable_images_are_refused(client, gallery):
  assert_refused(post_photo(client, b""), 400, "empty")
  assert_refused(post_photo(client, b"this is a text file, not a photo\n" * 10), 400, "not an image")
  assert_refused(post_photo(client, photo(gallery, 0)[:300]), 400, "Not an image that can be read")  # No header.
  whole = photo(gallery, 0)
  assert_refused(post_photo(client, whole[:len(whole) // 2]), 400, "Could not decode the image")  # Pixels cut.
  corrupt = bytearray(photo(gallery, 0))
  corrupt[200:260] = b"\xff" * 60
  assert post_photo(client, bytes(corrupt)).status_code in (200, 400)  # Whatever PIL makes of it, never a 500.


def test_too_many_bytes_is_refused_before_decoding(client):
  noise = np.random.default_rng(0).integers(0, 256, (270, 270, 3), np.uint8)
  encoded = io.BytesIO()
  Image.fromarray(noise).save(encoded, format="PNG")
  big = encoded.getvalue()
  assert LIMITS.max_bytes < len(big) < LIMITS.max_body_bytes  # Passes the body limit: the image limit refuses.
  assert_refused(post_photo(client, big), 413, "200,000 bytes are accepted")
  huge = b"\0" * (LIMITS.max_body_bytes + 1)
  assert_refused(post_photo(client, huge), 413, "The request body has")  # From Content-Length alone.

  def chunks():  # No Content-Length: the body is cut off once it passes the limit.
    for _ in range(LIMITS.max_body_bytes // 65536 + 2):
      yield b"\0" * 65536

  response = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
  assert_refused(response, 413, "more than")
  response = client.post("/search", json={"image": base64.b64encode(big).decode()})
  assert_refused(response, 413, "200,000 bytes are accepted")


# PIL only warns between its limit and twice it; the server refuses those itself (the warning is expected).
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_too_many_pixels_and_decompression_bombs_are_refused(client):
  assert LIMITS.max_pixels == Image.MAX_IMAGE_PIXELS  # The app set PIL's own limit.
  # Just over the limit (PIL would only warn): the server's own check.
  assert_refused(post_photo(client, png(1001, 1000)), 413, "1001 x 1000 = 1,001,000 pixels",
                 "1,000,000 pixels are accepted")
  # A bomb: 100 million pixels in a few kilobytes; PIL refuses it from the header, before decoding.
  assert len(bomb()) < 50_000
  assert_refused(post_photo(client, bomb()), 413, "decompression bomb")
  assert post_photo(client, png(1000, 1000)).status_code == 200  # At the limit: accepted.


def test_malformed_requests_are_refused(client, gallery):
  assert_refused(client.post("/search", content=photo(gallery, 0), headers={"content-type": "image/jpeg"}), 415,
                 "multipart/form-data")
  assert_refused(client.post("/search"), 415, "no content type")
  assert_refused(client.post("/search", data={"k": "3"}, files={"other": ("a.jpg", b"x")}), 400,
                 "No `image` in the form")
  assert_refused(client.post("/search", data={"image": "not a file"},
                             files={"other": ("a.jpg", b"x")}), 400, "must be a file")
  assert client.post("/search", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}).status_code == 400
  assert_refused(client.post("/search", content=b"{not json", headers={"content-type": "application/json"}), 400,
                 "not valid JSON")
  assert_refused(client.post("/search", json=[1, 2]), 400, "Expected a JSON object")
  assert_refused(client.post("/search", json={"k": 3}), 400, "Expected a JSON object")
  assert_refused(client.post("/search", json={"image": 12}), 400, "base64 string")
  assert_refused(client.post("/search", json={"image": "@@@@"}), 400, "not valid base64")
  assert client.get("/search").status_code == 405


def test_the_server_still_answers_after_bad_requests(client, gallery):
  for data in (b"", b"junk", bomb()):
    assert post_photo(client, data).status_code in (400, 413)
  assert post_photo(client, photo(gallery, 2), k=3).json()["hits"][0]["image"] == str(gallery[0].image_names[2])
  assert client.get("/healthz").json()["status"] == "ok"


# --- GET /items/{id}/image, /healthz, / ---


def test_thumbnails_of_hits_and_unknown_items(client, shop, gallery):
  hits = post_photo(client, photo(gallery, 4), k=3).json()["hits"]
  for hit in hits:
    response = client.get(hit["thumbnail_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    picture = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), np.float32)
    assert picture.shape == (128, 128, 3)
    expected = shop.thumbnail(shop.row(int(hit["id"])), 128).astype(np.float32)
    assert np.abs(picture - expected).mean() < 4  # The same picture, up to JPEG.
  # A row that no search returned yet is looked up in Milvus.
  key = catalog.image_key_id("synthetic_inshop/tiny:gallery", str(gallery[0].image_names[23]))
  assert client.get(f"/items/{key}/image").status_code == 200
  assert_refused(client.get("/items/12345/image"), 404, "No item 12345")
  assert_refused(client.get("/items/abc/image"), 400, "integers from 0 to 2^63 - 1")
  assert_refused(client.get("/items/-3/image"), 400, "integers")
  assert_refused(client.get(f"/items/{2**63}/image"), 400, "integers")


def test_healthz_reports_model_and_collection(client, embedder, shop):
  health = client.get("/healthz").json()
  assert health["status"] == "ok"
  assert health["collection"] == {"name": shop.collection, "uri": shop.uri, "rows": 24, "index": "FLAT",
                                  "metric": "L2"}
  assert health["model"]["fingerprint"] == embedder.fingerprint
  assert health["model"]["step"] == embedder.step and health["model"]["dim"] == embedder.dim
  assert health["batching"]["max_batch"] == SETTINGS.max_batch
  assert health["limits"]["max_k"] == LIMITS.max_k


def test_the_page_is_one_offline_document(client):
  response = client.get("/")
  assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
  page = response.text
  for element in ('id="file"', 'id="drop"', 'id="results"', 'id="k"', 'id="category"', "WOMEN/Dresses",
                  'max="50"'):
    assert element in page
  # Nothing from another origin: no external scripts, styles, fonts or images.
  assert "http://" not in page and "https://" not in page and "//cdn" not in page
  assert "<script src" not in page and "<link rel=\"stylesheet\"" not in page
  assert client.get("/docs").status_code == 404  # FastAPI's docs page would load a CDN.


# --- Batching ---


def single_answer(shop, gallery, record, k, category=None):
  image = catalog.preprocess(photo(gallery, record), shop.embedder.input_size)
  return shop.search_embeddings(shop.embedder.embed_images(image[None]), k, category=category)[0]


def test_a_batch_answers_each_query_as_if_alone(shop, gallery):
  # Mixed k and category filters in one batch: one embedding call, one search per filter.
  queries = [(0, 3, None), (9, 5, None), (13, 7, int(gallery[0].categories[13])), (20, 2, None),
             (21, 4, int(gallery[0].categories[13]))]
  size = shop.embedder.input_size
  searcher = serve_app.Searcher(shop, SETTINGS)
  answers = searcher.search_batch([serve_app.Query(catalog.preprocess(photo(gallery, record), size), k, category)
                                   for record, k, category in queries])
  assert [a.batch_size for a in answers] == [5] * 5
  for (record, k, category), answer in zip(queries, answers):
    single = single_answer(shop, gallery, record, k, category)
    assert [h.id for h in answer.hits] == [h.id for h in single] and 0 < len(single) <= k
    np.testing.assert_allclose([h.distance for h in answer.hits], [h.distance for h in single], rtol=1e-4,
                               atol=1e-5)
    if category is not None:
      assert {h.category for h in answer.hits} == {category}


def test_concurrent_requests_get_their_own_answers(client, shop, gallery):
  records = [1, 6, 11, 16, 21, 2, 7, 12]
  before = client.get("/healthz").json()["batching"]
  with concurrent.futures.ThreadPoolExecutor(len(records)) as pool:
    answers = list(pool.map(lambda r: post_photo(client, photo(gallery, r), k=3).json(), records))
  after = client.get("/healthz").json()["batching"]
  assert after["requests"] - before["requests"] == len(records)
  assert 1 <= after["batches"] - before["batches"] <= len(records)
  for record, answer in zip(records, answers):
    assert [int(h["id"]) for h in answer["hits"]] == [h.id for h in single_answer(shop, gallery, record, 3)]
    assert 1 <= answer["batch_size"] <= SETTINGS.max_batch


def run_batcher(process, items, **options):
  async def main():
    batcher = batching.Batcher(process, **options)
    await batcher.start()
    try:
      return await asyncio.gather(*(batcher.submit(item) for item in items), return_exceptions=True), batcher
    finally:
      await batcher.stop()

  return asyncio.run(main())


def test_batcher_takes_up_to_max_batch_and_keeps_order():
  sizes = []

  def double(items):
    sizes.append(len(items))
    return [2 * x for x in items]

  results, batcher = run_batcher(double, range(10), max_batch=4, max_wait_ms=1000)
  assert results == [2 * x for x in range(10)]
  assert sizes == [4, 4, 2] and batcher.stats.largest == 4 and batcher.stats.requests == 10
  sizes.clear()
  results, _ = run_batcher(double, range(5), max_batch=1, max_wait_ms=1000)  # No batching.
  assert results == [0, 2, 4, 6, 8] and sizes == [1, 1, 1, 1, 1]


def test_batcher_waits_for_announced_requests_only():
  sizes = []

  def record_sizes(items):
    sizes.append(len(items))
    return items

  async def main(late_request: str, max_wait_ms: float):
    batcher = batching.Batcher(record_sizes, max_batch=8, max_wait_ms=max_wait_ms)
    await batcher.start()

    async def late():
      if late_request != "unannounced":
        batcher.announce()
      await asyncio.sleep(0.2)  # e.g. a photo being decoded
      if late_request == "withdrawn":
        batcher.withdraw()  # e.g. it was not an image
        return None
      return await batcher.submit("late", announced=late_request == "announced")

    try:
      started = time.perf_counter()
      results = await asyncio.gather(batcher.submit("first"), late())
      return results, time.perf_counter() - started
    finally:
      await batcher.stop()

  assert asyncio.run(main("announced", max_wait_ms=10_000))[0] == ["first", "late"]
  assert sizes == [2]  # The first waited for the announced one.
  sizes.clear()
  assert asyncio.run(main("unannounced", max_wait_ms=10_000))[0] == ["first", "late"]
  assert sizes == [1, 1]  # Nothing announced: the first went alone, at once.
  sizes.clear()
  assert asyncio.run(main("announced", max_wait_ms=20))[0] == ["first", "late"]
  assert sizes == [1, 1]  # Announced, but later than max_wait_ms.
  sizes.clear()
  results, seconds = asyncio.run(main("withdrawn", max_wait_ms=600_000))
  assert results == ["first", None] and sizes == [1]
  assert seconds < 300  # The withdrawal released the waiting batch: it did not wait out the 10 minutes.


def test_batcher_fails_only_the_failing_batch_and_refuses_a_full_queue():
  def fail_on_three(items):
    if 3 in items:
      raise ValueError("three")
    return items

  results, _ = run_batcher(fail_on_three, range(6), max_batch=2, max_wait_ms=1000)
  assert results[:2] == [0, 1] and results[4:] == [4, 5]
  assert all(isinstance(r, ValueError) for r in results[2:4])
  results, _ = run_batcher(lambda items: items, range(5), max_batch=1, max_wait_ms=0, max_queue=3)
  assert results[:3] == [0, 1, 2]
  assert all(isinstance(r, batching.QueueFull) for r in results[3:])
  with pytest.raises(ValueError, match="max_batch >= 1"):
    batching.Batcher(lambda items: items, max_batch=0)


# --- The command line ---


def test_refuses_another_models_catalogue_and_says_how_to_reindex(run, embedder, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(embedding, "Embedder", lambda _: embedder)  # Loaded once, by the fixture.
  uri = str(tmp_path / "other.db")
  with catalog.Catalog(run[0], uri, embedder=fake_embedder(embedder, fingerprint="0" * 16)) as other:
    other.upsert(np.ones((1, embedder.dim)), [1], [0], ["a.jpg"], catalog.FILE_SOURCE)
  assert serve_main.main(["--workdir", run[0], "--uri", uri]) == 1
  error = capsys.readouterr().err
  assert "not by the model at step 2" in error and "re-index the catalogue" in error
  assert f"python -m jaxret.index --workdir {run[0]} --uri {uri} --collection jaxret_catalog --overwrite" in error
  assert "--workdir /elsewhere" in error  # ... or serve the run that made it.
  assert serve_main.main(["--workdir", run[0], "--uri", str(tmp_path / "none.db")]) == 1
  assert "Index one first" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--max_batch", "0"], ["--max_wait_ms", "-1"], ["--port", "70000"]])
def test_bad_flags_are_refused(flag, capsys):
  with pytest.raises(SystemExit):
    serve_main.parse_args(["--workdir", "w", *flag])
  assert flag[0] in capsys.readouterr().err


def test_binds_loopback_by_default():
  assert serve_main.parse_args(["--workdir", "w"]).host == "127.0.0.1"


# --- The page in a real browser, against the real server ---

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,820"]


def free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def server(run, embedder, tmp_path):
  """`python -m jaxret.serve` on a free loopback port over its own copy of the gallery catalogue; its URL."""
  uri = str(tmp_path / "served.db")  # Its own database: Milvus Lite lets one process open a database.
  index_gallery(run, embedder, uri)
  port = free_port()
  log = open(tmp_path / "server.log", "w+")  # noqa: SIM115  (the server writes to it until the fixture ends)
  process = subprocess.Popen(
      [sys.executable, "-m", "jaxret.serve", "--workdir", run[0], "--uri", uri, "--data_dir", run[1], "--port",
       str(port), "--max_batch", "2"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 600
    while True:
      if process.poll() is not None:
        log.seek(0)
        pytest.fail(f"The server stopped with status {process.returncode}:\n{log.read()[-3000:]}")
      try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
          if response.status == 200:
            break
      except OSError:
        pass
      if time.time() > deadline:
        pytest.fail("The server did not answer /healthz within 10 minutes.")
      time.sleep(0.5)
    yield url
  finally:
    process.terminate()
    try:
      process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      process.kill()
    log.close()


@pytest.fixture
def browser(monkeypatch):
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    if os.environ.get("JAXRET_REQUIRE_BROWSER"):
      pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are required (apt-get install chromium chromium-driver).")
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
  webdriver = pytest.importorskip("selenium.webdriver")
  from selenium.webdriver.chrome import service  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager never downloads anything.
  monkeypatch.setenv("SE_AVOID_STATS", "true")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  profile = tempfile.mkdtemp(prefix="jaxret-chromium-")
  for flag in BROWSER_FLAGS + [f"--user-data-dir={profile}"]:
    options.add_argument(flag)
  # Giving the driver's path skips Selenium Manager altogether.
  driver = webdriver.Chrome(options=options, service=service.Service(executable_path=CHROMEDRIVER))
  try:
    yield driver
  finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_the_page_finds_the_product_of_an_uploaded_photo(server, browser, gallery, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  index, _ = gallery
  record = 10
  query = tmp_path / "query photo.jpg"
  query.write_bytes(photo(gallery, record))
  browser.get(server + "/")
  WebDriverWait(browser, 60).until(lambda b: "24 catalogue images" in b.find_element(By.ID, "about").text)
  browser.find_element(By.ID, "file").send_keys(str(query))
  results = browser.find_element(By.ID, "results")
  WebDriverWait(browser, 120).until(lambda b: results.get_attribute("data-state") in ("done", "error"))
  assert results.get_attribute("data-state") == "done", browser.find_element(By.ID, "status").text
  hits = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
  assert len(hits) == 10
  assert hits[0].get_attribute("data-item-id") == str(index.item_ids[record])
  assert hits[0].get_attribute("data-image") == str(index.image_names[record])
  assert "d = 0.0000" in hits[0].text and "#1" in hits[0].text
  assert browser.find_element(By.ID, "query").get_attribute("hidden") is None
  WebDriverWait(browser, 60).until(lambda b: b.execute_script(
      "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
  screenshot = tmp_path / "search_page.png"
  assert browser.save_screenshot(str(screenshot))
  assert Image.open(screenshot).size[0] >= 1000
  # A file that is not a photo: the page shows the server's message instead of results.
  not_a_photo = tmp_path / "notes.jpg"
  not_a_photo.write_text("not a photo")
  browser.find_element(By.ID, "file").send_keys(str(not_a_photo))
  WebDriverWait(browser, 60).until(lambda b: results.get_attribute("data-state") == "error")
  assert "not an image" in browser.find_element(By.ID, "status").text
  assert browser.find_elements(By.CSS_SELECTOR, "#results .hit") == []
