"""The real trainer, end to end on the synthetic dataset: smoke runs, 8 fake devices, kill and resume, errors."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxret import input_pipeline
from jaxret import losses
from jaxret import run_config
from jaxret import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")


def load_config(path, arg=None, **overrides):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def run_trainer(workdir, data_dir, *extra, devices=1, background=False):
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  command = [sys.executable, "-m", "jaxret.train", "--config", f"{DEMO}:smoke", "--workdir", str(workdir), *extra]
  if background:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny synthetic dataset, generated once for this module."""
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.get_builder("synthetic_inshop/tiny", str(path))
  return path


def test_smoke_run_in_process_compiles_the_step_once(tmp_path, data_dir, monkeypatch):
  traces = []
  original = trainer.train_step

  def counting_train_step(*args, **kwargs):
    traces.append(1)  # Runs only while jax traces the step.
    return original(*args, **kwargs)

  monkeypatch.setattr(trainer, "train_step", counting_train_step)
  config = load_config(DEMO, "smoke", data_dir=str(data_dir))
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert len(traces) == 1
  rows = read_metrics(tmp_path)
  steps_with_loss = [r["step"] for r in rows if "loss" in r]
  assert steps_with_loss == list(range(config.log_every, config.total_steps + 1, config.log_every))
  evals = [r for r in rows if "recall@1" in r]
  assert [r["step"] for r in evals] == [0, 3, 6]  # untrained, every eval_every, and the end
  assert all(0 <= r["recall@1"] <= r["recall@50"] <= 1 for r in evals)
  assert all(0 <= r["map@r"] <= 1 and 0 <= r["r_precision"] <= 1 and "precision@10" in r for r in evals)
  assert any(key.startswith("category/") and key.endswith("/recall@1") for key in evals[-1])
  assert result["recall@1"] == evals[-1]["recall@1"]
  assert result["loss"] == [r["loss"] for r in rows if "loss" in r][-1]
  for picture in ("retrievals.png", "curves.png"):
    assert (tmp_path / picture).stat().st_size > 10_000
  assert json.loads((tmp_path / "config.json").read_text())["model"]["name"] == "rccapsnet_tiny"


def test_smoke_run_on_8_fake_devices(tmp_path, data_dir):
  completed = run_trainer(tmp_path, data_dir, "--config.evals.rerank=k_reciprocal", devices=8)
  assert completed.returncode == 0, completed.stdout + completed.stderr
  assert "Untrained network: R@1" in completed.stdout
  assert "| Model | R@1 | R@10 |" in completed.stdout
  rows = read_metrics(tmp_path)
  assert rows[-1]["step"] == 6 and "recall@1" in rows[-1]
  assert 0 <= rows[-1]["rerank/recall@1"] <= 1 and "rerank/map@r" in rows[-1]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, data_dir):
  longer = ["--config.total_steps=60", "--config.checkpoint_every=5", "--config.eval_every=60"]
  reference = run_trainer(tmp_path / "reference", data_dir, *longer)
  assert reference.returncode == 0, reference.stderr

  workdir = tmp_path / "interrupted"
  process = run_trainer(workdir, data_dir, *longer, background=True)
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      break
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  finished = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert finished and finished[-1] < 60, f"the run was not interrupted: checkpoints {finished}"

  resumed = run_trainer(workdir, data_dir, *longer)
  assert resumed.returncode == 0, resumed.stderr
  assert "Untrained network" not in resumed.stdout  # It resumed instead of starting again.
  want, got = read_metrics(tmp_path / "reference"), read_metrics(workdir)
  assert [r["step"] for r in got] == [r["step"] for r in want]  # No duplicated or missing lines.
  for a, b in zip(got, want):
    for key in a:
      if key not in ("images_per_sec", "host_cpu_ms_per_image"):  # timings
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


@pytest.mark.parametrize("overrides,field", [
    ({"input.batch_size": 18}, "config.input.batch_size=18 is not divisible by config.input.images_per_product"),
    ({"input.images_per_product": 1}, "config.input.images_per_product=1 must be at least 2"),
    ({"model.name": "capsnet9000"}, "config.model.name='capsnet9000' is not a known model"),
    ({"loss.name": "hinge"}, "config.loss.name='hinge': use one of"),
    ({"loss.triplet.margn": 0.1}, "config.loss.triplet.margn is not an option of the triplet loss"),
    ({"loss.triplet.mining": "hardest"}, "config.loss.triplet.mining must be one of"),
    ({"evals.metric": "l1"}, "config.evals.metric='l1' must be one of"),
    ({"evals.batch_size": 0}, "config.evals.batch_size=0 must be a positive integer"),
    ({"input.image_size": 0}, "config.input.image_size=0 must be a positive integer"),
    ({"model.embedding": "mean"}, "Unknown embedding 'mean'"),
    ({"input.cache": "gpu"}, "config.input.cache='gpu' must be one of"),
    ({"input.cache_memory_fraction": 0.0}, "config.input.cache_memory_fraction=0.0 must be in"),
])
def test_bad_config_stops_before_compiling(tmp_path, overrides, field, monkeypatch):
  monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before the config was checked"))
  config = load_config(DEMO, "smoke", **overrides)
  with pytest.raises(run_config.ConfigError, match=field.replace("(", r"\(").replace("[", r"\[")):
    trainer.train_and_evaluate(config, str(tmp_path))


def test_batch_not_divisible_by_devices_names_the_field():
  config = load_config(DEMO, "smoke", **{"input.batch_size": 12, "input.images_per_product": 3})
  with pytest.raises(run_config.ConfigError, match="config.input.batch_size=12 is not divisible by the 8 devices"):
    run_config.validate(config, device_count=8)


def test_inshop_config_without_the_dataset_says_how_to_prepare_it(tmp_path):
  completed = subprocess.run(
      [sys.executable, "-m", "jaxret.train", "--config", str(REPO / "configs" / "inshop_quad.py"),
       "--workdir", str(tmp_path / "run"), f"--config.data_dir={tmp_path / 'empty'}"],
      cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert completed.returncode != 0
  assert "python -m data_prep.deepfashion_inshop --manual_dir" in completed.stderr
  assert "Traceback" not in completed.stderr


@pytest.fixture(scope="module")
def deepfashion_data_dir(tmp_path_factory):
  """What `python -m data_prep.deepfashion_inshop` writes for a small fake release: 6 training products in 4
  categories (two categories with 2 products each, for the category-balanced sampler), 4 test products."""
  import fake_inshop  # pylint: disable=g-import-not-at-top  # tests/ is on sys.path under pytest.

  from data_prep.deepfashion_inshop import __main__ as prepare  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("deepfashion")
  categories = ("WOMEN/Dresses", "MEN/Denim", "WOMEN/Skirts", "MEN/Tees_Tanks")
  rows = [(f"img/{categories[item % 4]}/id_{item:08d}/{view:02d}_1_front.jpg", "train")
          for item in range(1, 7) for view in range(1, 4)]
  rows += [(f"img/{categories[item % 4]}/id_{item:08d}/{view:02d}_2_side.jpg", split)
           for item in range(11, 15) for view, split in ((1, "query"), (2, "gallery"), (3, "gallery"))]
  fake_inshop.write_release(root / "download", fake_inshop.make_images(rows))
  assert prepare.main(["--manual_dir", str(root / "download"), "--data_dir", str(root / "tfds")]) == 0
  return root / "tfds"


INSHOP_CONFIGS = ("inshop_triplet", "inshop_quad", "inshop_triplet_paper", "inshop_quad_paper")


@pytest.mark.parametrize("name", INSHOP_CONFIGS)
def test_inshop_config_trains_on_a_prepared_deepfashion_download(tmp_path, deepfashion_data_dir, name):
  """Every In-shop config's `:smoke` run reads what `python -m data_prep.deepfashion_inshop` writes and trains
  (the paper configs also embed the evaluation splits with their ground-truth categories)."""
  config = load_config(REPO / "configs" / f"{name}.py", "smoke", data_dir=str(deepfashion_data_dir))
  assert config.input.dataset == "deepfashion_inshop/all"
  result = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert 0 < result["recall@1"] <= result["recall@10"] == 1.0  # 4 products: every query is found in 10
  rows = read_metrics(tmp_path / "run")
  losses_logged = [r["loss"] for r in rows if "loss" in r]
  assert len(losses_logged) == 3 and all(np.isfinite(losses_logged))
  assert any(r["grad_norm"] > 0 for r in rows if "loss" in r)  # Its batches hold tuples to learn from.


def test_demo_quad_has_exactly_inshop_quads_loss_mining_and_sampler():
  demo = load_config(REPO / "configs" / "demo_quad.py")
  inshop = load_config(REPO / "configs" / "inshop_quad.py")
  assert demo.loss.name == inshop.loss.name == "category_quadruplet"
  assert demo.loss.category_quadruplet.to_dict() == inshop.loss.category_quadruplet.to_dict()
  assert demo.input.sampler == inshop.input.sampler == "category_balanced"
  assert demo.input.categories_per_batch == inshop.input.categories_per_batch
  assert demo.input.images_per_product == inshop.input.images_per_product
  for field in ("embedding", "dropout_rate", "logit_update"):
    assert demo.model[field] == inshop.model[field], field
  assert demo.input.dataset == "synthetic_inshop/small" and demo.model.name == "qrccapsnet_tiny"


def test_demo_has_inshop_triplets_loss_and_model_options():
  """The demo is configs/inshop_triplet.py's recipe at demo scale: its R@1 (docs/benchmarks.md) is the recipe's."""
  demo = load_config(DEMO)
  inshop = load_config(REPO / "configs" / "inshop_triplet.py")
  assert demo.loss.name == inshop.loss.name == "triplet"
  assert demo.loss.triplet.to_dict() == inshop.loss.triplet.to_dict()
  for field in ("embedding", "dropout_rate", "logit_update"):
    assert demo.model[field] == inshop.model[field], field


def test_exponential_per_epoch_schedule():
  config = load_config(REPO / "configs" / "inshop_quad_paper.py")
  schedule = trainer.learning_rate_schedule(config, steps_per_epoch=10)
  np.testing.assert_allclose([schedule(0), schedule(9), schedule(10), schedule(25)],
                             [1e-3, 1e-3, 1e-3 * 0.995, 1e-3 * 0.995**2], rtol=1e-6)
  config.warmup_steps = 4
  schedule = trainer.learning_rate_schedule(config, steps_per_epoch=10)
  np.testing.assert_allclose([schedule(0), schedule(2), schedule(4), schedule(10)],
                             [0.0, 0.5e-3, 1e-3, 1e-3 * 0.995], rtol=1e-6)
  with pytest.raises(ValueError, match="needs steps_per_epoch"):
    trainer.learning_rate_schedule(config)
  config.optim.schedule = "step"
  with pytest.raises(run_config.ConfigError, match="config.optim.schedule='step' must be one of"):
    run_config.validate(config, device_count=1)



# A loss that owns a parameter: one learnable centre per training product, pulled towards its embeddings.
# It exists only here, registered like every other loss, to show that such a loss needs no trainer change.
def _centre_loss(params, outputs, batch, *, scale):
  centres = params["centres"][batch["class_index"]]
  return scale * jnp.mean(jnp.sum(jnp.square(outputs["embedding"] - centres), axis=-1))


CENTRE_LOSS = losses.Loss(
    name="test_centres", apply=_centre_loss,
    options={"scale": losses.Option(0.1, "Weight."), "lr_multiplier": losses.Option(10.0, "Centre rate.")},
    init=lambda key, context, **options: {
        "centres": jax.random.normal(key, (context.num_classes, context.embedding_dim))})


def test_a_loss_with_its_own_parameters_trains_checkpoints_and_resumes(tmp_path, data_dir, monkeypatch):
  monkeypatch.setitem(losses.LOSSES, "test_centres", CENTRE_LOSS)
  config = load_config(DEMO, "smoke", data_dir=str(data_dir))
  config.loss.name = "triplet+test_centres"
  config.loss.test_centres = {"scale": 0.1, "weight": 0.5}
  trainer.train_and_evaluate(config, str(tmp_path / "reference"))

  def centres(workdir, step):
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "default")
    return np.asarray(restored["loss_params"]["test_centres"]["centres"])

  reference = tmp_path / "reference"
  context = losses.LossContext(num_classes=centres(reference, 3).shape[0], num_categories=23,
                               embedding_dim=centres(reference, 3).shape[1])
  initial = np.asarray(CENTRE_LOSS.init_params(
      jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 2), 1), context, {})["centres"])
  assert np.abs(centres(reference, 6) - initial).max() > 1e-4  # The centres learned.
  rows = read_metrics(reference)
  assert all("loss/triplet" in r and "loss/test_centres" in r for r in rows if "loss" in r)

  # Interrupted after step 3: the rerun restores the centres with the model and ends where the reference did.
  resumed = tmp_path / "resumed"
  shutil.copytree(reference, resumed)
  shutil.rmtree(resumed / "checkpoints" / "6")
  trainer.train_and_evaluate(config, str(resumed))
  np.testing.assert_allclose(centres(resumed, 6), centres(reference, 6), rtol=1e-5, atol=1e-6)
  assert read_metrics(resumed)[-1]["recall@1"] == pytest.approx(rows[-1]["recall@1"])
