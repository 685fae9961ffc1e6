"""Starts a multi-process jaxret run on this machine: N processes on 127.0.0.1, M CPU devices each.

This is how a pod slice or several GPU hosts run, in miniature: every process runs the same command with its
own `--process_id`, and JAX's distributed runtime (gloo collectives on CPU) joins them into one device mesh.

  python scripts/launch_local.py --num_processes 2 --devices_per_process 2 -- \\
      --config configs/demo.py:smoke --workdir /tmp/jaxret_2proc

Everything after `--` goes to `python -m jaxret.train` (or to `--module`, e.g. `--module jaxret.index` to index
a catalogue with several processes). The exit status is the first failing process's (0 when
all succeed); when one process fails, the others are stopped after `--grace_seconds`.
"""

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(num_processes: int, devices_per_process: int, train_args: list[str], *, port: int | None = None,
           grace_seconds: float = 90.0, extra_env: dict[str, str] | None = None, stdout=None,
           module: str = "jaxret.train") -> int:
  """Runs the processes to completion; returns the exit status (first non-zero one, else 0).

  `stdout`: a file that receives every process's output (default: this process's stdout and stderr).
  `module`: the command every process runs (`python -m MODULE`), with `train_args` and the distributed flags.
  """
  address = f"127.0.0.1:{port or free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}", **(extra_env or {}))
  processes = [
      subprocess.Popen([sys.executable, "-m", module, *train_args, "--coordinator_address", address,
                        "--num_processes", str(num_processes), "--process_id", str(i)], env=env,
                       stdout=stdout, stderr=subprocess.STDOUT if stdout is not None else None)
      for i in range(num_processes)]
  status, failed_at = 0, None
  while any(p.poll() is None for p in processes):
    time.sleep(0.2)
    for p in processes:
      if p.poll() not in (None, 0) and status == 0:
        status, failed_at = p.returncode, time.time()
    if failed_at is not None and time.time() - failed_at > grace_seconds:
      for p in processes:
        if p.poll() is None:
          p.kill()
  for p in processes:
    if p.returncode not in (None, 0) and status == 0:
      status = p.returncode
  return status


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=2)
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  parser.add_argument("--module", default="jaxret.train",
                      help="command each process runs: jaxret.train (default) or jaxret.index")
  parser.add_argument("--grace_seconds", type=float, default=90.0,
                      help="how long the others may run on after one process failed")
  parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the arguments of the module")
  args = parser.parse_args()
  train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
  sys.exit(launch(args.num_processes, args.devices_per_process, train_args, port=args.port,
                  grace_seconds=args.grace_seconds, module=args.module))


if __name__ == "__main__":
  main()
