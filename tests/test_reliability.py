"""Training that cannot silently go wrong: non-finite steps, changed configs, signals, broken checkpoints,
unwritable workdirs, bad config files, repeated metrics lines (docs/reliability.md lists what each shows)."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from jaxret import checkpointing
from jaxret import input_pipeline
from jaxret import trainer
from jaxret import workdir as run_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")
# A smoke run long enough to be stopped in the middle: checkpoints at 5, 10, 15, 20.
LONGER = ["--config.total_steps=20", "--config.checkpoint_every=5", "--config.eval_every=20"]


def trainer_command(workdir, *extra, config=f"{DEMO}:smoke"):
  return [sys.executable, "-m", "jaxret.train", "--config", config, "--workdir", str(workdir), *extra]


def run(workdir, data_dir, *extra, config=f"{DEMO}:smoke", background=False):
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  command = trainer_command(workdir, *extra, config=config)
  if background:
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def metrics_lines(workdir):
  """metrics.jsonl parsed strictly: NaN or Infinity (not JSON) fails the test."""

  def refuse(constant):
    raise AssertionError(f"metrics.jsonl holds {constant}, which is not JSON")

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def checkpoint_steps(workdir):
  directory = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.get_builder("synthetic_inshop/tiny", str(path))
  return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """An uninterrupted 20-step smoke run."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  completed = run(workdir, data_dir, *LONGER)
  assert completed.returncode == 0, completed.stderr
  return workdir


def same_metrics(got, want):
  assert [r["step"] for r in got] == [r["step"] for r in want]  # No step twice, none missing.
  for a, b in zip(got, want):
    for key in set(a) - {"images_per_sec"}:
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_a_non_finite_step_stops_the_run_and_is_never_saved(tmp_path, data_dir):
  completed = run(tmp_path, data_dir, "--config.optim.learning_rate=1e30", "--config.loss.name=triplet",
                  "--config.total_steps=12", "--config.checkpoint_every=2", "--config.log_every=4")
  assert completed.returncode == 1
  errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, completed.stderr
  assert errors[0].startswith("error: Step ") and "non-finite" in errors[0] and "learning_rate" in errors[0]
  assert "Traceback" not in completed.stderr
  rows = metrics_lines(tmp_path)  # Valid JSON throughout.
  bad = [r for r in rows if "not saved" in r.get("note", "")]
  assert len(bad) == 1
  # Every checkpoint left is finite, and none is from the bad step or later.
  saved = checkpoint_steps(tmp_path)
  assert all(step < bad[0]["step"] for step in saved)
  if saved:
    import numpy as np  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    restored = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(saved[-1]) / "default")
    import jax  # pylint: disable=g-import-not-at-top
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(restored["params"]))


@pytest.mark.parametrize("change,field", [
    ("--config.model.name=sccapsnet_tiny", "model.name: 'rccapsnet_tiny' -> 'sccapsnet_tiny'"),
    ("--config.loss.name=contrastive", "loss.name: 'triplet' -> 'contrastive'"),
    ("--config.optim.learning_rate=0.01", "optim.learning_rate: 0.001 -> 0.01"),
    ("--config.total_steps=40", "total_steps: 20 -> 40"),
])
def test_resuming_with_another_config_is_refused_before_anything_is_written(tmp_path, reference, data_dir,
                                                                           change, field):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  completed = run(workdir, data_dir, *LONGER, change)
  assert completed.returncode == 1
  assert "error:" in completed.stderr and field in completed.stderr and "new --workdir" in completed.stderr
  assert "Traceback" not in completed.stderr
  after = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  assert after == before  # config.json, checkpoints and metrics untouched.
  if "total_steps" in field:
    assert "--extend_total_steps" in completed.stderr


def test_harmless_changes_and_an_explicit_extension_are_accepted(tmp_path, reference, data_dir):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  completed = run(workdir, data_dir, *LONGER[:-1], "--config.eval_every=10", "--config.total_steps=25",
                  "--extend_total_steps", "--config.log_every=5")
  assert completed.returncode == 0, completed.stderr
  assert "note: resuming with a changed eval_every" in completed.stdout
  assert "total_steps: 20 -> 25" in completed.stdout
  rows = metrics_lines(workdir)
  assert [r["step"] for r in rows].count(20) == 2  # The loss line and the evaluation line, once each.
  assert rows[-1]["step"] == 25 and json.loads((workdir / "config.json").read_text())["total_steps"] == 25


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_current_step_and_the_rerun_resumes(tmp_path, data_dir, signal_number):
  # Long enough to be signalled mid-run on a fast machine; no checkpoint is due before the end.
  longer = ["--config.total_steps=2000", "--config.checkpoint_every=5000", "--config.eval_every=5000",
            "--config.log_every=100"]
  workdir = tmp_path / "run"
  process = run(workdir, data_dir, *longer, background=True)
  deadline = time.time() + 900
  output = ""
  while time.time() < deadline and process.poll() is None:  # Wait until it trains (after step 0's evaluation).
    line = process.stdout.readline()
    output += line
    if "Untrained network" in line:
      break
  time.sleep(2)
  process.send_signal(signal_number)
  rest, _ = process.communicate(timeout=900)
  output += rest
  assert process.returncode == 128 + signal_number, output
  name = signal.Signals(signal_number).name
  assert f"Stopped by {name} after step" in output and "Rerun the same command to resume." in output
  assert "Traceback" not in output and "KeyboardInterrupt" not in output
  stopped_at = checkpoint_steps(workdir)
  assert len(stopped_at) == 1 and 0 < stopped_at[0] < 2000  # The step it was at, although none was due.

  resumed = run(workdir, data_dir, *longer)
  assert resumed.returncode == 0, resumed.stderr
  assert f"Resumed from the checkpoint of step {stopped_at[0]}" in resumed.stdout
  steps = [r["step"] for r in metrics_lines(workdir)]
  assert steps == sorted(steps) and steps[-1] == 2000  # Nothing repeated, and it finished.
  assert len(steps) == len({(r["step"], "loss" in r) for r in metrics_lines(workdir)})


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, data_dir, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / "20")
  latest = workdir / "checkpoints" / "15"
  for path in latest.rglob("*"):  # Truncate every data file of the latest checkpoint.
    if path.is_file() and path.stat().st_size > 64 and "metadata" not in path.name:
      path.write_bytes(path.read_bytes()[:16])
  config = _load_smoke_config(data_dir)
  trainer.train_and_evaluate(config, str(workdir))
  err = capsys.readouterr().err
  assert "the checkpoint of step 15" in err and "cannot be read" in err and "resumes from step 10" in err
  assert (workdir / "checkpoints_broken").exists() and checkpoint_steps(workdir)[-1] == 20
  same_metrics([r for r in metrics_lines(workdir) if "recall@1" in r],
               [r for r in metrics_lines(reference) if "recall@1" in r])


def test_no_readable_checkpoint_is_one_error_naming_the_folders(tmp_path, reference, data_dir):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  for path in (workdir / "checkpoints").rglob("*"):
    if path.is_file() and path.stat().st_size > 64 and "metadata" not in path.name:
      path.write_bytes(b"")
  with pytest.raises(checkpointing.CheckpointError, match=r"(?s)None of the checkpoints .* can be read:.*/20:"):
    trainer.train_and_evaluate(_load_smoke_config(data_dir), str(workdir))


def _load_smoke_config(data_dir):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("demo_config", DEMO)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.data_dir = str(data_dir)
  config.total_steps, config.checkpoint_every, config.eval_every = 20, 5, 20
  return config


def _make_read_only(path):
  if os.geteuid() == 0:  # root writes anywhere whatever the mode; the immutable attribute stops it.
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
      pytest.skip("chattr +i is not available here")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)
  os.chmod(path, 0o500)
  return lambda: os.chmod(path, 0o700)


def test_an_unwritable_workdir_is_one_error_before_anything_runs(tmp_path, data_dir):
  workdir = tmp_path / "locked"
  workdir.mkdir()
  restore = _make_read_only(workdir)
  try:
    completed = run(workdir, data_dir)
  finally:
    restore()
  assert completed.returncode == 1
  assert completed.stderr.strip().splitlines()[-1].startswith(f"error: Cannot write to --workdir {workdir}")
  assert not any(workdir.iterdir())
  in_the_way = tmp_path / "file"
  in_the_way.write_text("not a folder")
  with pytest.raises(run_dir.WorkdirError, match="is a file, not a folder"):
    run_dir.check_writable(str(in_the_way))


@pytest.mark.parametrize("arguments,message", [
    (["--config", str(REPO / "configs" / "no_such_config.py")], "error: could not load the config file"),
    (["--config", f"{DEMO}:smok"], "Unknown config argument(s) ['smok']"),
    (["--config", DEMO, "--config.foo=1"], "error: no such field"),
    (["--config", DEMO, "--config.input.batch_size=many"], "error: flag --config.input.batch_size=many"),
])
def test_bad_config_files_and_flags_are_one_line(tmp_path, arguments, message):
  completed = subprocess.run([sys.executable, "-m", "jaxret.train", *arguments, "--workdir", str(tmp_path / "w")],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
  assert completed.returncode != 0
  assert message in completed.stderr and "Traceback" not in completed.stderr
  assert not (tmp_path / "w").exists()


def test_a_run_killed_before_its_first_checkpoint_does_not_repeat_step_0(tmp_path, data_dir):
  workdir = tmp_path / "run"
  process = run(workdir, data_dir, "--config.checkpoint_every=1000", "--config.total_steps=1000", background=True)
  deadline = time.time() + 900
  while time.time() < deadline and process.poll() is None:
    if "Untrained network" in process.stdout.readline():
      break
  process.kill()
  process.wait()
  assert checkpoint_steps(workdir) == [] and [r["step"] for r in metrics_lines(workdir)] == [0]
  completed = run(workdir, data_dir)
  assert completed.returncode == 0, completed.stderr
  steps = [r["step"] for r in metrics_lines(workdir) if "recall@1" in r]
  assert steps == [0, 3, 6]
