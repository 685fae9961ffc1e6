"""Experiment suites (jaxret.experiments) and the validation split (jaxret.validation), on the tiny data.

The suite tests run the real `python -m jaxret.experiments` on `capsnets_synthetic.py:smoke` (three runs, each
trained once and evaluated again under the leaky protocol), kill it in the middle and rerun it.
"""

import csv
import io
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest

from jaxret import evaluation
from jaxret import experiments
from jaxret import input_pipeline
from jaxret import run_config
from jaxret import samplers
from jaxret import validation
from jaxret import workdir as run_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
SUITES = ("capsnets_synthetic", "capsnets_inshop", "methods_synthetic", "methods_inshop")
SMOKE_SUITE = "configs/suites/capsnets_synthetic.py:smoke"
RUNS = ("sccapsnet", "rccapsnet", "qrccapsnet")


# ------------------------------------------------------------------------------------- validation split


def item_ids_of(counts, first_id=1000, seed=0):
  """Record labels of a split with `counts[p]` images of product `first_id + p`, in shuffled record order."""
  ids = np.concatenate([np.full(n, first_id + p) for p, n in enumerate(counts)])
  return np.random.default_rng(seed).permutation(ids)


def test_hold_out_products_holds_out_exactly_n_products_split_into_query_and_gallery():
  counts = [1, 2, 3, 4, 5, 6, 7, 8] * 5  # 40 products, 5 of them with a single image.
  item_ids = item_ids_of(counts)
  held = validation.hold_out_products(item_ids, 9, seed=3)
  assert len(held.products) == len(set(held.products)) == 9
  assert all(np.sum(item_ids == p) >= 2 for p in held.products)  # Each can give a query and a gallery image.
  # The three record sets partition the split; training holds no image of a held-out product.
  everything = np.concatenate([held.train_records, held.query_records, held.gallery_records])
  np.testing.assert_array_equal(np.sort(everything), np.arange(len(item_ids)))
  assert not set(item_ids[held.train_records]) & set(held.products)
  assert set(item_ids[held.query_records]) == set(item_ids[held.gallery_records]) == set(held.products)
  for product in held.products:  # Half of each product's images (rounded down) are queries.
    images = np.sum(item_ids == product)
    assert np.sum(item_ids[held.query_records] == product) == images // 2
    assert np.sum(item_ids[held.gallery_records] == product) == images - images // 2
  # Deterministic from the seed; another seed holds out other products.
  again = validation.hold_out_products(item_ids, 9, seed=3)
  for field in ("products", "train_records", "query_records", "gallery_records"):
    np.testing.assert_array_equal(getattr(held, field), getattr(again, field))
  assert set(validation.hold_out_products(item_ids, 9, seed=4).products) != set(held.products)


def test_the_sampler_never_draws_a_held_out_product():
  item_ids = item_ids_of([2, 3, 4, 5, 6] * 6)
  held = validation.hold_out_products(item_ids, 6, seed=0, products_per_batch=4)
  inner = samplers.PKSampler(item_ids[held.train_records], products_per_batch=4, images_per_product=2, seed=0)
  sampler = validation.SubsetSampler(inner, held.train_records, item_ids)
  drawn = np.concatenate([sampler.batch_records(step) for step in range(5 * sampler.steps_per_epoch)])
  assert drawn.shape == (5 * sampler.steps_per_epoch * 8,)
  assert set(item_ids[drawn]) == set(item_ids[held.train_records])  # Every training product, and only those.
  assert not set(item_ids[drawn]) & set(held.products)
  # Class indices count the training products only; every drawn record has one.
  assert sorted(set(sampler.class_indices[drawn])) == list(range(24))
  assert np.all(sampler.class_indices[held.query_records] == -1)
  # Each batch is the inner sampler's, mapped to records of the whole split.
  np.testing.assert_array_equal(item_ids[sampler.batch_records(3)], inner.item_ids[inner.batch_records(3)])


def test_validation_splits_read_the_held_out_rows_from_the_cache_or_decode_them(tmp_path):
  """The validation query and gallery are rows of the decoded training split; in stream mode (no decoded
  pixels) the same rows decoded from the JPEGs by the function that fills the cache: identical pixels."""
  builder = input_pipeline.get_builder("synthetic_inshop/tiny", str(tmp_path))
  config = run_config.base_config()
  config.input.cache_size = 16
  decoded = input_pipeline.open_decoded_split(config, builder, "train", progress=False)
  labels_only = input_pipeline.open_decoded_split(config, builder, "train", pixels=False, progress=False)
  held = validation.hold_out_products(decoded.index.item_ids, 3, seed=1)
  from_cache = validation.evaluation_splits(decoded, held)
  decoding = validation.evaluation_splits(labels_only, held, source=input_pipeline.read_split(builder, "train"),
                                          size=16)
  for split, records in (("query", held.query_records), ("gallery", held.gallery_records)):
    for splits in (from_cache, decoding):
      rows = splits[split]
      assert rows.images.shape == (len(records), 16, 16, 3) and len(rows) == len(records)
      np.testing.assert_array_equal(rows.index.item_ids, decoded.index.item_ids[records])
      np.testing.assert_array_equal(rows.images[0:len(records)], decoded.images[records])
      np.testing.assert_array_equal(rows.images[1], decoded.images[records[1]])
    batches = list(input_pipeline.eval_batches(decoding[split], global_batch=4))
    pixels = np.concatenate([b["image"] for b in batches])[:len(records)]
    np.testing.assert_array_equal(pixels, decoded.images[records])


@pytest.mark.parametrize("num_products,products_per_batch,message", [
    (31, 2, "asks for more products than the training split has: 30 of its 35 products have the 2 or more"),
    (28, 4, "leaves 2 training products with 2 or more images, fewer than the 4 products of a training batch"),
])
def test_too_many_validation_products_is_a_config_error(num_products, products_per_batch, message):
  item_ids = item_ids_of([1, 2, 3, 4, 5, 6, 7] * 5)
  with pytest.raises(run_config.ConfigError, match=message):
    validation.hold_out_products(item_ids, num_products, seed=0, products_per_batch=products_per_batch)


def test_validation_products_must_be_a_whole_number():
  config = run_config.base_config()
  config.input.validation_products = -1
  with pytest.raises(run_config.ConfigError, match="config.input.validation_products=-1 must be a whole number"):
    run_config.validate(config, device_count=1)


def test_runs_stored_before_the_field_existed_resume_with_its_default():
  config = json.loads(run_config.base_config().to_json())
  stored = json.loads(json.dumps(config))
  del stored["input"]["validation_products"]
  assert run_dir.config_changes(stored, config) == ([], [])
  config["input"]["validation_products"] = 5
  assert run_dir.config_changes(stored, config)[0] == ["input.validation_products: 0 -> 5"]


# ----------------------------------------------------------------------------------- suites and commands


def parse_train_command(command):
  """The config `python -m jaxret.train` builds from a printed command (its own flag parsing)."""
  argv = shlex.split(command)
  assert argv[:3] == ["python", "-m", "jaxret.train"]
  values = flags.FlagValues()
  # config_flags finds the `--config.FIELD=VALUE` overrides in the argv it is given when defined.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=["jaxret.train", *argv[3:]])
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  flags.DEFINE_bool("eval_only", False, "", flag_values=values)
  values(["jaxret.train", *argv[3:]])
  return values


@pytest.mark.parametrize("suite", SUITES)
def test_print_commands_prints_one_train_line_per_run(suite, monkeypatch):
  monkeypatch.chdir(REPO)
  out = io.StringIO()
  assert experiments.run_suite(f"configs/suites/{suite}.py:smoke", "/runs/x", print_commands=True, out=out) == 0
  runs = experiments.load_suite(f"configs/suites/{suite}.py:smoke")
  lines = out.getvalue().splitlines()
  assert len(lines) == len(runs)
  for line, (name, run) in zip(lines, runs.items()):
    train, *evals = line.split(" && ")
    values = parse_train_command(train)
    assert values.workdir == f"/runs/x/{name}" and not values.eval_only
    # The runner's own reading of the run's config is exactly what the trainer will read from the command.
    assert values.config.to_json() == experiments.load_config(run).to_json()
    assert len(evals) == sum(p != experiments.own_protocol(values.config) for p in run.protocols)
    for command in evals:
      evaluated = parse_train_command(command)
      assert evaluated.eval_only and evaluated.workdir == values.workdir
      assert evaluated.config.model.embedding == experiments.LEAKY_EMBEDDING


def test_bad_suites_are_one_line_errors(tmp_path):
  suite = tmp_path / "bad.py"
  suite.write_text("from jaxret import experiments\n"
                   "def get_suite(arg=None):\n"
                   "  return {'a': experiments.Run(config='configs/demo.py', method='m', "
                   "overrides={'model.nme': 'x'})}\n")
  completed = subprocess.run([sys.executable, "-m", "jaxret.experiments", "--suite", str(suite), "--workdir",
                              str(tmp_path / "w"), "--print_commands"], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
  assert completed.returncode == 2
  assert completed.stderr.strip() == ("error: Override --config.model.nme=x of configs/demo.py: no such field.")


# ------------------------------------------------------------------------------- the runner, end to end


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.get_builder("synthetic_inshop/tiny", str(path))
  return path


def runner(directory, data_dir, *extra, suite=SMOKE_SUITE, background=False):
  command = [sys.executable, "-m", "jaxret.experiments", "--suite", suite, "--workdir", str(directory), *extra]
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu")
  if background:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def lines_of(path):
  return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory, data_dir):
  """capsnets_synthetic:smoke killed (SIGKILL) once its first run is finished and its second has started,
  then rerun to the end. Returns (the folder, the first run's attempts before the kill, the rerun's stdout)."""
  directory = tmp_path_factory.mktemp("suite")
  process = runner(directory, data_dir, background=True)
  first, second = directory / "sccapsnet", directory / "rccapsnet"
  deadline = time.time() + 600
  while time.time() < deadline and process.poll() is None and not (second / experiments.ATTEMPTS_FILE).exists():
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  output = process.communicate()[0]
  assert (second / experiments.ATTEMPTS_FILE).exists(), f"the suite ended or stalled before its 2nd run:\n{output}"
  assert not (directory / "results.md").exists()
  first_attempts = lines_of(first / experiments.ATTEMPTS_FILE)
  assert len(first_attempts) == 4  # Training and the leaky evaluation, each a start and an end line.
  rerun = runner(directory, data_dir)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  return directory, first_attempts, rerun.stdout


def test_a_killed_suite_reruns_only_what_is_left(suite_dir):
  directory, first_attempts, stdout = suite_dir
  assert "[1/3] sccapsnet: finished before; skipped." in stdout
  assert lines_of(directory / "sccapsnet" / experiments.ATTEMPTS_FILE) == first_attempts  # Not run again.
  for name in RUNS[1:]:
    assert f"{name}: done: R@1" in stdout
    config = json.loads((directory / name / "config.json").read_text())
    assert experiments.final_evaluation(str(directory / name), config["total_steps"]) is not None
    assert experiments.eval_only_result(str(directory / name), "leaky", config["total_steps"]) is not None
  # No step is logged twice, whether the killed training had saved a checkpoint (resumed) or not (restarted).
  for name in RUNS:
    rows = [json.loads(line) for line in lines_of(directory / name / "metrics.jsonl")]
    evaluation_steps = [r["step"] for r in rows if "recall@1" in r]
    assert evaluation_steps == [0, 3, 6]


def test_the_suite_writes_the_three_result_files(suite_dir):
  directory, _, _ = suite_dir
  with open(directory / "results.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], r["protocol"], r["selection"]) for r in rows] == [
      (name, protocol, selection) for name in RUNS
      for protocol, selection in (("honest", "final"), ("honest", "best val"), ("leaky", "final"))]
  for row in rows:
    workdir = directory / row["run"]
    logged = [json.loads(line) for line in lines_of(workdir / "metrics.jsonl")]
    if row["protocol"] == "honest":  # The test numbers logged at the row's step, with that step's validation.
      source = next(r for r in logged if r["step"] == int(row["step"]) and "recall@1" in r)
      assert float(row["val_recall@1"]) == pytest.approx(source["val/recall@1"])
    else:  # The leaky evaluation of the last checkpoint.
      source = [json.loads(line) for line in lines_of(workdir / evaluation.EVAL_ONLY_FILE)][-1]
      assert source["model.embedding"] == "label_leaky_eval"
    for k in experiments.KS:
      assert float(row[f"recall@{k}"]) == pytest.approx(source[f"recall@{k}"])
    assert float(row["map@r"]) == pytest.approx(source["map@r"])
    assert row["model"] == f"{row['run']}_tiny" and row["data"] == "synthetic_inshop/tiny"
    assert row["steps"] == "6" and float(row["images_per_sec"]) > 0 and float(row["wall_time_s"]) > 0
    assert row["commit"] and row["source"] == "jaxret"
  best = [r for r in rows if r["selection"] == "best val"]
  for row in best:  # The step with the highest validation R@1, the first of equals.
    logged = [json.loads(line) for line in lines_of(directory / row["run"] / "metrics.jsonl")]
    validated = [r for r in logged if "val/recall@1" in r]
    assert float(row["val_recall@1"]) == max(r["val/recall@1"] for r in validated)
    assert int(row["step"]) == min(r["step"] for r in validated if r["val/recall@1"] == float(row["val_recall@1"]))
  markdown = (directory / "results.md").read_text()
  assert markdown.count("| sccapsnet |") == 3 and "| leaky | final | 6 |" in markdown
  assert (directory / "results.png").stat().st_size > 10_000
  assert not [p for p in os.listdir(directory) if p.endswith(".tmp")]


def test_eval_only_refuses_a_config_that_would_change_the_run(suite_dir):
  directory, _, _ = suite_dir
  run = experiments.load_suite(SMOKE_SUITE)["rccapsnet"]
  config = experiments.load_config(run)
  config.loss.triplet.margin = 0.5
  with pytest.raises(run_dir.WorkdirError, match=r"loss.triplet.margin: 0.2 -> 0.5"):
    evaluation.evaluate_run(config, str(directory / "rccapsnet"))


def test_a_failed_run_does_not_stop_the_suite(tmp_path, suite_dir, data_dir):
  directory, _, _ = suite_dir
  suite = tmp_path / "suite.py"
  suite.write_text(
      "from jaxret.experiments import Run\n"
      "def get_suite(arg=None):\n"
      "  return {\n"
      "      'too_many': Run(config='configs/demo.py', arg='smoke', method='m', overrides={\n"
      "          'model.embedding': 'label', 'input.validation_products': 23}),\n"
      f"      'rccapsnet': {experiments.load_suite(SMOKE_SUITE)['rccapsnet']!r},\n"
      "  }\n")
  (tmp_path / "runs").mkdir()
  os.symlink(directory / "rccapsnet", tmp_path / "runs" / "rccapsnet")  # A finished run.
  completed = runner(tmp_path / "runs", data_dir, suite=str(suite))
  assert completed.returncode == 1, completed.stdout + completed.stderr
  failure = "too_many: failed (exit status 1): error: config.input.validation_products=23 leaves 1 training product"
  assert f"[1/2] {failure}" in completed.stdout
  assert "[2/2] rccapsnet: finished before; skipped." in completed.stdout
  markdown = (tmp_path / "runs" / "results.md").read_text()
  assert f"- {failure}" in markdown and markdown.count("| rccapsnet |") == 3
