"""Checkpoints that survive what goes wrong: unreadable ones, full disks, and stop signals.

* `Checkpoints.restore_latest` restores the newest checkpoint that can be read; a broken one (a truncated
  file, a folder half-copied) is named, moved aside to `checkpoints_broken/`, and the previous one is used.
* `Checkpoints.save` / `wait` turn write failures (disk full, permissions) into one `CheckpointError` line
  naming the path; Orbax writes each checkpoint to a temporary folder and renames it when complete, so the
  previous checkpoints stay intact.
* `StopSignals` turns SIGINT (Ctrl-C) and SIGTERM (what Cloud TPU VMs and most schedulers send before they
  preempt) into a request that the training loop honours between steps: it saves the current step and exits
  with one line saying how to resume.
"""

import os
import shutil
import signal
import sys
import threading
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"
BROKEN = "checkpoints_broken"


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or none could be read; the message names the path and what to do."""


def _os_error(error: BaseException) -> OSError | None:
  """The OSError behind an exception (Orbax wraps the errors of its writer threads), if there is one."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


class Checkpoints:
  """The run's `checkpoints/` folder: the last `keep` train states, saved asynchronously by Orbax."""

  def __init__(self, workdir: str, *, keep: int):
    self.workdir = workdir
    self.directory = os.path.join(workdir, CHECKPOINTS)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.last_saved = None

  def restore_latest(self, abstract_state: Any, *, is_chief: bool) -> tuple[Any, int]:
    """The newest readable checkpoint as `(state, step)`, or `(None, 0)` when there is none.

    Raises:
      CheckpointError: when checkpoints exist but none can be read (each named with its reason).
    """
    broken = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # pylint: disable=broad-except  (any failure to read means: try the one before)
        broken.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"))
        continue
      if broken:
        self._set_aside([s for s, _ in broken], is_chief)
        for bad_step, reason in broken:
          print(f"warning: the checkpoint of step {bad_step} ({os.path.join(self.directory, str(bad_step))}) "
                f"cannot be read ({reason}); it was moved to {os.path.join(self.workdir, BROKEN)}/ and the run "
                f"resumes from step {step}.", file=sys.stderr)
      self.last_saved = step
      return state, step
    if broken:
      listed = "\n  ".join(f"{os.path.join(self.directory, str(s))}: {reason}" for s, reason in broken)
      raise CheckpointError(f"None of the checkpoints of {self.workdir} can be read:\n  {listed}\nMove the "
                            f"folder {self.directory} away to start the run afresh, or restore it from a copy.")
    return None, 0

  def _set_aside(self, steps: list[int], is_chief: bool) -> None:
    """Moves broken checkpoint folders out of Orbax's way (a later save of the same step would collide)."""
    if is_chief:
      target = os.path.join(self.workdir, BROKEN)
      os.makedirs(target, exist_ok=True)
      for step in steps:
        name = f"{step}_{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(os.path.join(self.directory, str(step)), os.path.join(target, name))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("broken checkpoints moved")
    self.manager.reload()

  def save(self, step: int, state: Any) -> None:
    """Starts writing the checkpoint of `step` (a failure of an earlier write is raised here)."""
    try:
      self.manager.save(step, args=ocp.args.StandardSave(state))
    except Exception as e:  # pylint: disable=broad-except  (reported as one line, below)
      raise self._write_error(step, e) from e
    self.last_saved = step

  def wait(self) -> None:
    """Waits for the write in flight; raises CheckpointError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(self.last_saved, e) from e

  def _write_error(self, step: int | None, error: BaseException) -> CheckpointError:
    os_error = _os_error(error)
    reason = f"{os_error.strerror} ({os_error.filename or self.directory})" if os_error else str(error)[:300]
    kept = [s for s in self.manager.all_steps() if s != step]
    return CheckpointError(
        f"Could not write the checkpoint of step {step} to {self.directory}: {reason}. "
        + (f"The checkpoints of steps {sorted(kept)} are intact; free space or fix permissions, then rerun "
           "the same command to resume." if kept else "Free space or fix permissions, then rerun."))

  def reached_preemption(self, step: int) -> bool:
    """Whether the processes of a multi-process run agreed to stop at `step` (JAX's preemption service)."""
    return jax.process_count() > 1 and self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.close()


class StopSignals:
  """Records SIGINT/SIGTERM instead of dying mid-step, while training (a context manager).

  The first signal is recorded; the loop checks `requested()` between steps. A second Ctrl-C interrupts at
  once (KeyboardInterrupt), for a user who does not want to wait for the checkpoint. In a multi-process
  run SIGTERM is left to JAX's preemption service (which agrees on a step across processes) and only SIGINT
  is recorded here; `agreed_stop` makes all processes agree on it.
  """

  def __init__(self):
    self.signal_number = None
    self._previous = {}

  def _handle(self, signal_number, frame):
    del frame
    if self.signal_number is not None and signal_number == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_number = signal_number

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      wanted = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
      for number in wanted:
        self._previous[number] = signal.signal(number, self._handle)
    return self

  def __exit__(self, *exc):
    for number, handler in self._previous.items():
      signal.signal(number, handler)
    self._previous = {}

  @property
  def name(self) -> str:
    return signal.Signals(self.signal_number).name if self.signal_number is not None else ""

  def agreed_stop(self) -> bool:
    """Whether any process has a recorded signal (a collective in multi-process runs: call it on every one)."""
    local = self.signal_number is not None
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray([local]))
    return bool(np.any(flags))


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds at least one checkpoint folder (finished or not)."""
  directory = os.path.join(workdir, CHECKPOINTS)
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
