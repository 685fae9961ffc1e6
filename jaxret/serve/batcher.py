"""Dynamic batching: concurrent requests wait together for one call of the device, then each gets its answer.

A request joins a queue; one loop takes up to `max_batch` of them and hands them to `process` (one jitted
embedding and one Milvus search for all of them) on a single worker thread, which owns the device. Before a
batch starts, it waits for requests that are announced (`announce`: e.g. a photo still being decoded) until
it is full or the oldest request has waited `max_wait_ms`; it never waits when none is announced, so a lone
request goes at once. While the worker runs a batch, the next one fills up, so under load batches grow by
themselves and throughput grows with them. `max_batch=1` turns batching off (every request is embedded and
searched alone, one after another).
"""

import asyncio
import collections
from collections.abc import Callable, Sequence
import concurrent.futures
import contextlib
import dataclasses
import time
from typing import Any


class QueueFull(Exception):
  """More requests are waiting than `max_queue`: the client should retry later (HTTP 503)."""


@dataclasses.dataclass
class _Waiting:
  item: Any
  future: asyncio.Future
  arrived: float  # time.perf_counter()


@dataclasses.dataclass
class BatchStats:
  """Counters since start: batches run, requests answered, the largest batch."""
  batches: int = 0
  requests: int = 0
  largest: int = 0

  @property
  def mean_batch_size(self) -> float:
    return self.requests / self.batches if self.batches else 0.0


class Batcher:
  """Runs `process(items) -> results` (one result per item, in order) on batches of concurrent submissions.

  Args:
    process: called on the worker thread with 1 to `max_batch` items; returns one result per item. An
      exception fails every request of that batch (and nothing else).
    max_batch: most items per call; 1 turns batching off.
    max_wait_ms: longest time the oldest waiting item waits for others before its batch starts.
    max_queue: most items waiting; beyond it `submit` raises QueueFull at once instead of queueing.
  """

  def __init__(self, process: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = 32,
               max_wait_ms: float = 5.0, max_queue: int = 256):
    if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
      raise ValueError(f"Need max_batch >= 1, max_wait_ms >= 0 and max_queue >= 1; got {max_batch}, "
                       f"{max_wait_ms} and {max_queue}.")
    self._process = process
    self.max_batch = max_batch
    self.max_wait_s = max_wait_ms / 1000
    self.max_queue = max_queue
    self.stats = BatchStats()
    self._announced = 0  # Requests on their way (`announce`d, not yet submitted or withdrawn).
    self._waiting = collections.deque()
    self._arrived = None  # asyncio.Event, made in the running loop by `start`.
    self._loop_task = None
    # One thread: device calls run one at a time, in order (the device is the shared resource).
    self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")

  async def start(self) -> None:
    self._arrived = asyncio.Event()
    self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

  async def stop(self) -> None:
    """Stops taking batches, fails the waiting requests, and lets the running batch finish."""
    if self._loop_task is not None:
      self._loop_task.cancel()
      with contextlib.suppress(asyncio.CancelledError):
        await self._loop_task
      self._loop_task = None
    while self._waiting:
      waiting = self._waiting.popleft()
      if not waiting.future.done():
        waiting.future.cancel()
    self._worker.shutdown(wait=True)

  def announce(self) -> None:
    """Says a submission is on its way (`submit(..., announced=True)` or `withdraw()` must follow).

    A batch that is not full waits for announced requests, up to `max_wait_ms` after its oldest request.
    """
    self._announced += 1

  def withdraw(self) -> None:
    """An announced request will not be submitted (e.g. its photo could not be decoded)."""
    self._announced -= 1
    if self._arrived is not None:
      self._arrived.set()  # The batch waiting for it may go.

  async def submit(self, item, *, announced: bool = False) -> Any:
    """The result of `process` for `item`, computed in a batch with other concurrent submissions."""
    if announced:
      self._announced -= 1
    if self._loop_task is None:
      raise RuntimeError("Batcher.start() was not awaited.")
    if len(self._waiting) >= self.max_queue:
      raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max_queue {self.max_queue}).")
    future = asyncio.get_running_loop().create_future()
    self._waiting.append(_Waiting(item, future, time.perf_counter()))
    self._arrived.set()
    return await future

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      while not self._waiting:
        self._arrived.clear()
        await self._arrived.wait()
      # Wait for announced requests until the batch is full or the oldest request has waited max_wait.
      deadline = self._waiting[0].arrived + self.max_wait_s
      while len(self._waiting) < self.max_batch and self._announced > 0:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
          break
        self._arrived.clear()
        try:
          await asyncio.wait_for(self._arrived.wait(), remaining)
        except TimeoutError:  # (The builtin TimeoutError from Python 3.11.)
          break
      batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
      batch = [w for w in batch if not w.future.done()]  # A client that went away is not computed.
      if not batch:
        continue
      try:
        results = await loop.run_in_executor(self._worker, self._process, [w.item for w in batch])
      except Exception as e:  # pylint: disable=broad-except  (handed to the batch's requests, not raised here)
        for waiting in batch:
          if not waiting.future.done():
            waiting.future.set_exception(e)
        continue
      self.stats.batches += 1
      self.stats.requests += len(batch)
      self.stats.largest = max(self.stats.largest, len(batch))
      for waiting, result in zip(batch, results):
        if not waiting.future.done():
          waiting.future.set_result(result)
