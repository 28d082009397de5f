"""Device prefetch: the next batches are copied to the devices while the current step runs.

    batches = DevicePrefetch(host_batches, place, size=2)
    for batch in batches:          # already on the devices (whatever `place` returns)
      state, metrics = step(state, batch, ...)
    batches.close()

A background thread takes host batches (numpy dicts) from `host_batches`, calls `place` on each (e.g.
`sharding.global_batch_from_process_local`, which starts the host-to-device copies) and keeps at most
`size` placed batches waiting, so the copy of batch s+1 (and the host work behind it: decoding and
augmenting in grain's workers) overlaps step s. Order is preserved; an exception raised while producing
a batch is raised again by `next` at that position; `close()` stops the thread (the host iterator is left
open: closing it is the owner's job).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

_END = object()


class _Raised:
  def __init__(self, error: BaseException):
    self.error = error


class DevicePrefetch:
  """Iterator over `place(batch)` for the batches of `host_batches`, produced `size` ahead in a thread."""

  def __init__(self, host_batches: Iterator[Any], place: Callable[[Any], Any], size: int = 2):
    if size < 1:
      raise ValueError(f"config key 'data.device_prefetch' must be >= 1, got {size}")
    self._host = host_batches
    self._place = place
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._produce, name='device-prefetch', daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    """Puts `item`, waiting for room; False when the consumer closed the prefetcher meanwhile."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    try:
      for batch in self._host:
        if self._stop.is_set() or not self._put(self._place(batch)):
          return
      self._put(_END)
    except BaseException as error:  # handed to the consumer, raised there at this batch's position
      self._put(_Raised(error))

  def __iter__(self) -> 'DevicePrefetch':
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    item = self._queue.get()
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, _Raised):
      self._done = True
      raise item.error
    return item

  def close(self) -> None:
    """Stops the producer thread and drops the batches it had placed (idempotent)."""
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join()
    self._done = True

  def __enter__(self) -> 'DevicePrefetch':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
