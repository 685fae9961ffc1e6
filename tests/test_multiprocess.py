"""Real multi-process training on JAX's distributed runtime: 2 processes x 2 CPU devices on 127.0.0.1.

The smoke run on 2 processes must end with the loss and Recall@1 of the same run on 1 process with 4 devices.
A longer 2-process run that loses process 1 after its first checkpoint must stop process 0 with an error
(not hang), and the rerun of both processes must resume from that checkpoint and finish.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import launch_local  # pylint: disable=g-import-not-at-top,wrong-import-position

SMOKE = ["--config", f"{REPO / 'configs' / 'demo.py'}:smoke"]
# Long enough to be killed between checkpoints. (Its losses are not compared with another topology: over
# dozens of steps, float summation order in the cross-device sums grows into visible differences.)
LONGER = [*SMOKE, "--config.total_steps=24", "--config.checkpoint_every=4", "--config.eval_every=24",
          "--heartbeat_timeout_seconds=10"]


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def env_with(devices, data_dir):
  return dict(os.environ, JAX_PLATFORMS="cpu", TFDS_DATA_DIR=str(data_dir),
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def final(rows):
  loss = [r["loss"] for r in rows if "loss" in r][-1]
  recall = [r["recall@1"] for r in rows if "recall@1" in r][-1]
  return loss, recall


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jaxret import input_pipeline  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("tfds")
  input_pipeline.get_builder("synthetic_inshop/tiny", str(path))
  return path


def run_one_process(workdir, data_dir, devices, args):
  completed = subprocess.run([sys.executable, "-m", "jaxret.train", *args, "--workdir", str(workdir)], cwd=REPO,
                             env=env_with(devices, data_dir), capture_output=True, text=True, timeout=400)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert f"{devices} device(s)" in completed.stdout
  return read_metrics(workdir)


def test_two_processes_end_where_one_process_with_four_devices_ends(tmp_path, data_dir):
  reference = run_one_process(tmp_path / "one_process", data_dir, 4, SMOKE)
  status = launch_local.launch(2, 2, [*SMOKE, "--workdir", str(tmp_path / "two_processes")], grace_seconds=60,
                               extra_env={"TFDS_DATA_DIR": str(data_dir)})
  assert status == 0
  rows = read_metrics(tmp_path / "two_processes")
  assert [r["step"] for r in rows] == [r["step"] for r in reference]
  loss, recall = final(rows)
  want_loss, want_recall = final(reference)
  assert loss == pytest.approx(want_loss, rel=1e-3)
  assert recall == want_recall


def test_a_lost_process_stops_the_other_and_both_resume(tmp_path, data_dir):
  workdir = tmp_path / "two_processes"
  address = f"127.0.0.1:{launch_local.free_port()}"
  processes = [subprocess.Popen(
      [sys.executable, "-m", "jaxret.train", *LONGER, "--workdir", str(workdir), "--coordinator_address",
       address, "--num_processes", "2", "--process_id", str(i)], cwd=REPO, env=env_with(2, data_dir),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and all(p.poll() is None for p in processes):
    if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      break
    time.sleep(0.05)
  processes[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  try:
    processes[0].wait(timeout=60)
  except subprocess.TimeoutExpired:
    processes[0].kill()
    pytest.fail("process 0 still ran a minute after process 1 was killed")
  processes[1].wait()
  output = processes[0].stdout.read()
  assert processes[0].returncode != 0, output[-3000:]
  assert time.time() - killed_at < 60
  # One line says what happened: ours when the error reaches Python first (a collective that fails when the
  # peer's connection closes), else the runtime's, which ends the process itself when its main thread is
  # blocked in a collective as the heartbeat times out (jaxret.distributed.report_peer_failure).
  assert ("error: process 0 of 2 stops:" in output
          or "Terminating process because the JAX distributed service detected fatal errors. This most likely "
             "indicates that another task died" in output), output[-3000:]
  finished = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert finished and finished[-1] < 24, f"the run was not interrupted: checkpoints {finished}"

  # Rerun both processes: they resume from the last checkpoint and finish, without repeating logged steps.
  with open(tmp_path / "rerun.log", "w") as log:
    status = launch_local.launch(2, 2, [*LONGER, "--workdir", str(workdir)], grace_seconds=60,
                                 extra_env={"TFDS_DATA_DIR": str(data_dir)}, stdout=log)
  output = (tmp_path / "rerun.log").read_text()
  assert status == 0, output[-3000:]
  assert f"Resumed from the checkpoint of step {finished[-1]}" in output
  assert "Untrained network" not in output
  rows = read_metrics(workdir)
  steps = [r["step"] for r in rows]
  assert steps == sorted(steps) and steps[-1] == 24 and "recall@1" in rows[-1]
  assert len(steps) == len(set((r["step"], "loss" in r) for r in rows))  # no step logged twice
  assert max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == 24
