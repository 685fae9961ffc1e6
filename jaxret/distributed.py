"""JAX's multi-controller start-up, shared by every jaxret command that runs on several processes.

`jaxret.train` (absl flags) and `jaxret.index` (argparse) both take `--coordinator_address`, `--num_processes`,
`--process_id` and `--heartbeat_timeout_seconds` and hand them to `initialize`; see docs/distributed.md.
"""

import re
import sys
import threading

import jax

# What `jax.distributed.initialize()` raises when it finds no cluster to join (a single-process run).
_NO_CLUSTER_MESSAGE = "coordinator_address should be defined"
# What it raises when JAX has already started in this process.
_ALREADY_STARTED_MESSAGE = "must be called before"

FLAGS_HELP = {
    "coordinator_address": "HOST:PORT of process 0 for a multi-process run (jax.distributed); without it, "
                           "clusters that JAX detects (Cloud TPU VM slices, SLURM, Open MPI, Kubernetes) are "
                           "initialised automatically.",
    "num_processes": "Number of processes of a multi-process run.",
    "process_id": "This process's index in [0, num_processes).",
    "heartbeat_timeout_seconds": "A multi-process run stops with an error when a process has not been heard "
                                 "from for this long (so that one dead process does not leave the others "
                                 "hanging).",
}


def check_settings(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
  """Raises ValueError unless the three settings are all given or all left out, and consistent."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together; e.g.\n"
                     "  --coordinator_address 127.0.0.1:12355 --num_processes 2 --process_id 0")
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id {process_id} is not in [0, --num_processes {num_processes}).")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_seconds: int = 30) -> None:
  """Starts JAX's multi-controller runtime from explicit settings, or from a cluster JAX detects; else nothing.

  Without settings, `jax.distributed.initialize()` itself looks for a cluster (Cloud TPU VM slice, SLURM,
  Open MPI, Kubernetes). When it finds none it raises a ValueError saying that the coordinator address is
  missing; that error means "a single process", as does "must be called before any JAX calls" when JAX
  already runs in this process (a command's `main` called from Python); they are the only ones swallowed.

  Raises:
    ValueError: only some of `coordinator_address`, `num_processes`, `process_id` are given.
  """
  check_settings(coordinator_address, num_processes, process_id)
  explicit = (coordinator_address, num_processes, process_id)
  # CPU processes exchange data over loopback or TCP with gloo; GPUs and TPUs use their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(*explicit, heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  except ValueError as e:
    if coordinator_address is not None or _NO_CLUSTER_MESSAGE not in str(e):
      raise
  except RuntimeError as e:
    # A command's `main` called from Python after JAX already started (tests, notebooks): without explicit
    # settings, that program is one process and stays one.
    if coordinator_address is not None or _ALREADY_STARTED_MESSAGE not in str(e):
      raise


_reported = threading.Event()


def peer_failure_line(error: BaseException) -> str:
  """One line for a multi-process run that failed: which process stopped, as far as the error tells."""
  text = str(error)
  lost = sorted({int(n) for n in re.findall(r"task[:_ /]*(\d+)", text)} - {jax.process_index()})
  who = (f"process {', '.join(map(str, lost))} stopped or cannot be reached" if lost
         else "another process stopped or the coordinator lost contact with it")
  return (f"error: process {jax.process_index()} of {jax.process_count()} stops: {who} "
          f"({type(error).__name__}). Rerun every "
          "process with the same command to resume from the last checkpoint they all finished.")


def report_peer_failure(error: BaseException) -> None:
  """Prints `peer_failure_line(error)` to stderr, once per process.

  Called where a Python error reaches a command's `main`. When the main thread is instead blocked inside a
  collective as the coordination service notices the missing process (after `--heartbeat_timeout_seconds`),
  JAX's runtime ends the process itself, with its own line "Terminating process because the JAX distributed
  service detected fatal errors. This most likely indicates that another task died" (its Python hook for this,
  `missed_heartbeat_callback`, fails with std::bad_cast in jaxlib 0.10, so no line of ours can come first).
  """
  if not _reported.is_set():
    _reported.set()
    print(peer_failure_line(error), file=sys.stderr, flush=True)
