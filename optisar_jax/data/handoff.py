"""Hand-off of a worker's batch to the training process: one shared-memory block per batch, one copy.

grain's worker processes (`mp_prefetch`) return a batch by copying each array into a fresh
shared-memory block of its own (`grain`'s `copy_to_shm`): `np.copyto` into a new mapping, whose pages the
worker then faults in and the kernel zeroes one 4 KiB page at a time, and one block (created, mapped,
sent, opened, mapped again and unlinked) for each of the batch's eight arrays. For the paper's input (8
images of 640 x 640 x 3 uint8 per batch, 9.8 MB) the copy alone took 7.6 ms per batch on a 2-core x86
host, against 0.35 ms for stacking the same batch in ordinary memory (docs/benchmarks.md, "Input
pipeline").

`PackBatch` is the last map of a worker's graph. It writes all numeric arrays of the batch into one
block, each at a 64-byte aligned offset, with `os.pwrite` on the block's file descriptor: the kernel
copies the bytes into the block's pages as it allocates them, with no page faults in the worker (4.3 ms
for such a batch). The block travels as a grain `SharedMemoryArray`, which grain's hand-off sends by name
without copying it again; the training process maps it once and unlinks it when the batch is released,
as it does for grain's own blocks. `UnpackBatch`, the first map in the training process, turns the block
back into the batch: each array is a view of the block at its offset, with its shape and dtype. Values
are unchanged (the same bytes), so batches stay bit-identical with and without workers
(tests/test_pipeline.py).

Arrays that grain would not move either (object dtypes, empty arrays) and non-array values stay in the
element and are pickled. Only a worker's output goes through `PackBatch` (`TrainDataset.iter_dataset`
adds both maps when `data.worker_count` > 0): in the training process a shared-memory block would only
cost.
"""

from __future__ import annotations

import os
import sys
from multiprocessing import shared_memory
from typing import Any

import grain
import numpy as np
from grain.multiprocessing import SharedMemoryArray

ALIGNMENT = 64                 # bytes: every array starts on a cache line (and on what XLA:CPU aligns to)
BLOCK_KEY = '_handoff_block'   # the element's keys for the block and its table of contents
LAYOUT_KEY = '_handoff_layout'


def _aligned(n: int) -> int:
  return -(-n // ALIGNMENT) * ALIGNMENT


def _eligible(value: Any) -> bool:
  """Arrays grain would copy into shared memory itself (numeric, non-empty); others stay as they are."""
  return (isinstance(value, np.ndarray) and not isinstance(value, SharedMemoryArray)
          and not value.dtype.hasobject and value.nbytes > 0)


def _write(fd: int, array: np.ndarray, offset: int) -> None:
  """`array`'s raw bytes at `offset` of the file `fd`; pwrite may write less than asked, so continue."""
  view = memoryview(array.reshape(-1).view(np.uint8))   # raw bytes of any fixed-size dtype
  written = 0
  while written < array.nbytes:
    written += os.pwrite(fd, view[written:], offset + written)


def pack(arrays: dict[str, np.ndarray]) -> tuple[SharedMemoryArray, tuple]:
  """All `arrays` in one new shared-memory block, written with `os.pwrite` (no page faults here).

  Args:
    arrays: key -> numeric, non-empty numpy array (any layout; written C-contiguous).
  Returns:
    (block, layout): the block as a 1-D uint8 `SharedMemoryArray` of the padded total size, and the
    table of contents ((key, offset, shape, dtype), ...) in `arrays`' order.
  """
  contiguous = {key: np.asarray(value, order='C') for key, value in arrays.items()}   # 0-d keeps its shape
  layout, size = [], 0
  for key, value in contiguous.items():
    layout.append((key, size, tuple(value.shape), value.dtype))   # the dtype itself: structured fields kept
    size += _aligned(value.nbytes)
  block = shared_memory.SharedMemory(create=True, size=max(size, 1))
  try:
    fd = getattr(block, '_fd', -1)         # CPython's descriptor of the block (POSIX)
    for (_, offset, shape, dtype), value in zip(layout, contiguous.values()):
      if fd < 0:                           # no descriptor: copy through the mapping, as grain does
        np.copyto(np.ndarray(shape, dtype, buffer=block.buf, offset=offset), value, casting='no')
      else:
        _write(fd, value, offset)
  except BaseException:                    # e.g. /dev/shm full: the block does not stay behind
    block.close()
    block.unlink()
    raise
  return SharedMemoryArray.from_shared_memory(block, (block.size,), np.uint8), tuple(layout)


def unpack(block: np.ndarray, layout: tuple) -> dict[str, np.ndarray]:
  """The arrays of `pack`, as views of `block` (which they keep alive), in the packed order."""
  return {key: np.ndarray(shape, np.dtype(dtype), buffer=block, offset=offset)
          for key, offset, shape, dtype in layout}


class PackBatch(grain.transforms.Map):
  """grain map, the last one in each worker: a dict batch -> its numeric arrays in one shared-memory block
  (`BLOCK_KEY`) and their table of contents with the batch's key order (`LAYOUT_KEY`), beside its other
  values."""

  def map(self, element: dict) -> dict:
    if not sys.platform.startswith('linux'):   # pwrite on a POSIX shared-memory object is Linux's
      return element
    if BLOCK_KEY in element or LAYOUT_KEY in element:
      raise ValueError(f'PackBatch: the batch already has a key {BLOCK_KEY!r} or {LAYOUT_KEY!r}')
    arrays = {key: value for key, value in element.items() if _eligible(value)}
    if not arrays:
      return element
    out = {key: value for key, value in element.items() if key not in arrays}
    block, layout = pack(arrays)
    out[BLOCK_KEY], out[LAYOUT_KEY] = block, (layout, tuple(element))   # tuple(element): the key order
    return out


class UnpackBatch(grain.transforms.Map):
  """grain map, the first one in the training process: `PackBatch`'s element -> the batch dict, its
  arrays views of the received block in the batch's own key order; other elements pass unchanged."""

  def map(self, element: dict) -> dict:
    if not isinstance(element, dict) or BLOCK_KEY not in element:
      return element
    rest = dict(element)
    layout, order = rest.pop(LAYOUT_KEY)
    arrays = unpack(rest.pop(BLOCK_KEY), layout)
    return {key: arrays[key] if key in arrays else rest[key] for key in order}
