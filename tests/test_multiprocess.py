"""Real multi-process training on JAX's distributed runtime: 2 processes x 2 CPU devices on 127.0.0.1.

One run of each kind, shared by the assertions: a 1-process, 4-device reference; a 2-process run that loses
process 1 after its first checkpoint (process 0 must stop with an error, not hang); and the rerun of both
processes, which resumes and must end where the reference ends.
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

ARGS = ["--config", f"{REPO / 'configs' / 'demo.py'}:smoke", "--config.total_steps=24",
        "--config.checkpoint_every=4", "--config.eval_every=24", "--heartbeat_timeout_seconds=10"]


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


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("one_process")
  completed = subprocess.run([sys.executable, "-m", "jaxret.train", *ARGS, "--workdir", str(workdir)], cwd=REPO,
                             env=env_with(4, data_dir), capture_output=True, text=True, timeout=400)
  assert completed.returncode == 0, completed.stderr[-3000:]
  assert "4 device(s)" in completed.stdout
  return read_metrics(workdir)


def test_two_processes_survive_a_lost_peer_resume_and_match_one_process(tmp_path, data_dir, reference):
  workdir = tmp_path / "two_processes"
  address = f"127.0.0.1:{launch_local.free_port()}"
  processes = [subprocess.Popen(
      [sys.executable, "-m", "jaxret.train", *ARGS, "--workdir", str(workdir), "--coordinator_address", address,
       "--num_processes", "2", "--process_id", str(i)], cwd=REPO, env=env_with(2, data_dir),
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
  finished = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert finished and finished[-1] < 24, f"the run was not interrupted: checkpoints {finished}"

  # Rerun both processes: they resume from the last checkpoint and end where one process with 4 devices ends.
  status = launch_local.launch(2, 2, [*ARGS, "--workdir", str(workdir)], grace_seconds=60,
                               extra_env={"TFDS_DATA_DIR": str(data_dir)})
  assert status == 0
  rows = read_metrics(workdir)
  assert [r["step"] for r in rows] == [r["step"] for r in reference]
  loss, recall = final(rows)
  want_loss, want_recall = final(reference)
  assert loss == pytest.approx(want_loss, rel=1e-3)
  assert recall == want_recall
