"""The workers' shared-memory hand-off (optisar_jax/data/handoff.py): the same bytes, in blocks grain
sends by name."""

import os
import sys
from multiprocessing import shared_memory

import numpy as np
import pytest
from grain.multiprocessing import SharedMemoryArray, SharedMemoryArrayMetadata

from optisar_jax.data import handoff

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='POSIX shared memory via pwrite')


def _release(array):
  """What the training process does with a received block: close and unlink it."""
  array.shm.close()
  array.shm.unlink()


def test_to_shared_memory_holds_the_same_bytes_under_its_name():
  rng = np.random.default_rng(0)
  for source in (rng.integers(0, 256, (8, 640, 640, 3), dtype=np.uint8),     # one batch of the paper's input
                 rng.normal(size=(3, 5)).astype(np.float32), np.array([[True, False, True]]),
                 np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],        # non-contiguous
                 np.array(2.5, np.float64), np.array(['2026-12-06'], 'datetime64[D]')):   # 0-d; no buffer format
    out = handoff.to_shared_memory(source)
    try:
      assert isinstance(out, SharedMemoryArray)
      assert out.shape == source.shape and out.dtype == source.dtype
      np.testing.assert_array_equal(out, source)
      # Another mapping of the block by its name (what grain's receiver does) sees the same bytes.
      other = shared_memory.SharedMemory(out.metadata.name)
      try:
        np.testing.assert_array_equal(np.ndarray(source.shape, source.dtype, buffer=other.buf), source)
      finally:
        other.close()
    finally:
      _release(out)


def test_short_writes_are_continued(monkeypatch):
  """os.pwrite may write fewer bytes than asked: the rest is written at the right offset."""
  calls = []
  real = os.pwrite

  def short(fd, data, offset):
    calls.append(offset)
    return real(fd, bytes(data)[:1000], offset)

  monkeypatch.setattr(handoff.os, 'pwrite', short)
  source = np.random.default_rng(1).integers(0, 256, 4500, dtype=np.uint8)
  out = handoff.to_shared_memory(source)
  try:
    np.testing.assert_array_equal(out, source)
    assert calls == [0, 1000, 2000, 3000, 4000]
  finally:
    _release(out)


def test_batch_map_moves_numeric_arrays_only():
  batch = {'image': np.full((2, 4, 4, 3), 7, np.uint8), 'mask': np.array([True, False]),
           'names': np.array([b'a', b'b'], dtype=object), 'empty': np.zeros((0, 4), np.float32), 'step': 3}
  out = handoff.SharedMemoryBatch().map(batch)
  try:
    assert out.keys() == batch.keys()
    assert isinstance(out['image'], SharedMemoryArray) and isinstance(out['mask'], SharedMemoryArray)
    np.testing.assert_array_equal(out['image'], batch['image'])
    np.testing.assert_array_equal(out['mask'], batch['mask'])
    assert out['names'] is batch['names'] and out['empty'] is batch['empty'] and out['step'] == 3
  finally:
    _release(out['image'])
    _release(out['mask'])


def test_without_a_descriptor_the_bytes_go_through_the_mapping(monkeypatch):
  """A SharedMemory without CPython's `_fd` (another Python): the same bytes, copied through the mapping."""
  real = shared_memory.SharedMemory

  class NoDescriptor(real):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self._saved_fd, self._fd = self._fd, -1

    def close(self):                       # gives the real descriptor back to be closed, once
      self._fd, self._saved_fd = self._saved_fd, -1
      super().close()

  monkeypatch.setattr(handoff.shared_memory, 'SharedMemory', NoDescriptor)
  monkeypatch.setattr(handoff.os, 'pwrite', lambda *a: pytest.fail('pwrite without a descriptor'))
  source = np.random.default_rng(2).normal(size=(7, 9)).astype(np.float32)
  out = handoff.to_shared_memory(source)
  try:
    np.testing.assert_array_equal(out, source)
  finally:
    _release(out)


def test_grain_sends_the_block_by_name():
  """grain's hand-off (copy_to_shm, run on every worker output) passes our block as its metadata, with no
  second copy: a grain upgrade that copied again would fail here."""
  from grain._src.python.ipc import shared_memory_array as grain_shm
  out = handoff.to_shared_memory(np.arange(10, dtype=np.int64))
  try:
    sent = grain_shm.copy_to_shm({'x': out})['x']
    assert isinstance(sent, SharedMemoryArrayMetadata) and sent.name == out.shm.name
  finally:
    _release(out)


def test_a_failed_write_leaves_no_block_of_the_batch(monkeypatch):
  """/dev/shm full on the second array: the block made for the first one is unlinked before the error."""
  made = []
  real = handoff.to_shared_memory

  def fails_second(array):
    if made:
      raise OSError(28, 'No space left on device')
    made.append(real(array))
    return made[-1]

  monkeypatch.setattr(handoff, 'to_shared_memory', fails_second)
  batch = {'image': np.ones((2, 8, 8, 3), np.uint8), 'boxes': np.zeros((2, 4), np.float32)}
  with pytest.raises(OSError, match='No space'):
    handoff.SharedMemoryBatch().map(batch)
  with pytest.raises(FileNotFoundError):
    shared_memory.SharedMemory(made[0].metadata.name)
