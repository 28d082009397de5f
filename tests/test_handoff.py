"""The workers' shared-memory hand-off (optisar_jax/data/handoff.py): one block per batch holding the same
bytes, sent by grain by name and turned back into the same batch in the training process."""

import os
import sys
from multiprocessing import shared_memory

import numpy as np
import pytest
from grain.multiprocessing import SharedMemoryArray, SharedMemoryArrayMetadata

from optisar_jax.data import handoff

pytestmark = pytest.mark.skipif(not sys.platform.startswith('linux'), reason='POSIX shared memory via pwrite')


def _release(block):
  """What the training process does with a received block once the batch is dropped: close and unlink."""
  block.shm.close()
  block.shm.unlink()


def _mixed_arrays():
  rng = np.random.default_rng(0)
  return {'image': rng.integers(0, 256, (8, 640, 640, 3), dtype=np.uint8),   # one batch of the paper's input
          'floats': rng.normal(size=(3, 5)).astype(np.float32), 'mask': np.array([[True, False, True]]),
          'strided': np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],      # non-contiguous
          'scalar': np.array(2.5, np.float64),                                  # 0-d
          'dates': np.array(['2026-12-06'], 'datetime64[D]'),                   # no buffer format
          'records': np.array([(1.5, 2), (3.0, -4)], [('x', '<f4'), ('y', '<i4')])}   # structured


def test_pack_holds_the_same_bytes_under_one_name():
  arrays = _mixed_arrays()
  block, layout = handoff.pack(arrays)
  try:
    assert isinstance(block, SharedMemoryArray) and block.dtype == np.uint8 and block.ndim == 1
    assert [entry[0] for entry in layout] == list(arrays)
    offsets = [entry[1] for entry in layout]
    assert offsets[0] == 0 and all(o % handoff.ALIGNMENT == 0 for o in offsets)
    # image (8*640*640*3 bytes, a multiple of 64), floats (60 -> 64), mask (3 -> 64), strided (24 -> 64), ...
    assert offsets[:5] == [0, 9830400, 9830464, 9830528, 9830592]
    out = handoff.unpack(block, layout)
    for key, source in arrays.items():
      assert out[key].shape == source.shape and out[key].dtype == source.dtype, key
      np.testing.assert_array_equal(out[key], source)
    # Another mapping of the block by its name (what grain's receiver does) sees the same bytes.
    other = shared_memory.SharedMemory(block.metadata.name)
    try:
      np.testing.assert_array_equal(handoff.unpack(np.ndarray((block.size,), np.uint8, buffer=other.buf),
                                                   layout)['image'], arrays['image'])
    finally:
      other.close()
  finally:
    _release(block)


def test_short_writes_are_continued(monkeypatch):
  """os.pwrite may write fewer bytes than asked: the rest is written at the right offset, and the next
  array starts at its aligned offset."""
  calls = []
  real = os.pwrite

  def short(fd, data, offset):
    calls.append(offset)
    return real(fd, bytes(data)[:1000], offset)

  monkeypatch.setattr(handoff.os, 'pwrite', short)
  rng = np.random.default_rng(1)
  arrays = {'a': rng.integers(0, 256, 2500, dtype=np.uint8), 'b': rng.integers(0, 256, 1500, dtype=np.uint8)}
  block, layout = handoff.pack(arrays)
  try:
    out = handoff.unpack(block, layout)
    np.testing.assert_array_equal(out['a'], arrays['a'])
    np.testing.assert_array_equal(out['b'], arrays['b'])
    assert calls == [0, 1000, 2000, 2560, 3560]      # 'b' at 2500 rounded up to 64 bytes
  finally:
    _release(block)


def test_batch_maps_move_numeric_arrays_and_restore_the_batch():
  batch = {'names': np.array([b'a', b'b'], dtype=object), 'image': np.full((2, 4, 4, 3), 7, np.uint8),
           'empty': np.zeros((0, 4), np.float32), 'mask': np.array([True, False]), 'step': 3}
  packed = handoff.PackBatch().map(batch)
  try:
    assert set(packed) == {'names', 'empty', 'step', handoff.BLOCK_KEY, handoff.LAYOUT_KEY}
    assert packed['names'] is batch['names'] and packed['empty'] is batch['empty']
    out = handoff.UnpackBatch().map(packed)
    assert list(out) == list(batch)                   # the batch's key order
    np.testing.assert_array_equal(out['image'], batch['image'])
    np.testing.assert_array_equal(out['mask'], batch['mask'])
    assert out['image'].base is packed[handoff.BLOCK_KEY]    # a view of the block, not a copy
    assert out['names'] is batch['names'] and out['empty'] is batch['empty'] and out['step'] == 3
    assert handoff.UnpackBatch().map(batch) is batch         # an element without a block passes
  finally:
    _release(packed[handoff.BLOCK_KEY])


def test_a_batch_key_that_clashes_with_the_block_is_an_error():
  with pytest.raises(ValueError, match=handoff.BLOCK_KEY):
    handoff.PackBatch().map({handoff.BLOCK_KEY: np.ones(3)})


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
  arrays = {'x': np.random.default_rng(2).normal(size=(7, 9)).astype(np.float32), 'y': np.arange(5)}
  block, layout = handoff.pack(arrays)
  try:
    out = handoff.unpack(block, layout)
    np.testing.assert_array_equal(out['x'], arrays['x'])
    np.testing.assert_array_equal(out['y'], arrays['y'])
  finally:
    _release(block)


def test_grain_sends_the_block_by_name_and_the_batch_comes_back(monkeypatch):
  """grain's hand-off (copy_to_shm in the worker, open_from_shm in the training process) passes our block
  as its metadata, with no second copy, and the training process gets the batch back: a grain upgrade that
  copied again or changed the element would fail here."""
  from grain._src.python.ipc import shared_memory_array as grain_shm
  monkeypatch.setattr(SharedMemoryArray, '_del_thread_pool', None)   # unlink at once, not in grain's pool
  batch = {'image': np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3),
           'boxes': np.linspace(0, 1, 16, dtype=np.float32).reshape(2, 2, 4), 'domain': np.array([0, 1], np.int32)}
  packed = handoff.PackBatch().map(batch)
  sent = grain_shm.copy_to_shm(packed)
  assert isinstance(sent[handoff.BLOCK_KEY], SharedMemoryArrayMetadata)
  assert sent[handoff.BLOCK_KEY].name == packed[handoff.BLOCK_KEY].shm.name
  del packed                                         # the worker's mapping goes; the block stays (named)
  received = grain_shm.open_from_shm(sent)
  name = received[handoff.BLOCK_KEY].shm.name
  out = handoff.UnpackBatch().map(received)
  del received
  for key in batch:
    np.testing.assert_array_equal(out[key], batch[key])
  del out                                            # the last view dropped: grain unlinks the block
  with pytest.raises(FileNotFoundError):
    shared_memory.SharedMemory(name)


def test_a_failed_write_leaves_no_block(monkeypatch):
  """/dev/shm full while writing the second array: the batch's block is unlinked before the error."""
  names = []
  real_block, real_write = shared_memory.SharedMemory, handoff._write

  def recording(*args, **kwargs):
    block = real_block(*args, **kwargs)
    names.append(block.name)
    return block

  def fails_second(fd, array, offset):
    if offset:
      raise OSError(28, 'No space left on device')
    real_write(fd, array, offset)

  monkeypatch.setattr(handoff.shared_memory, 'SharedMemory', recording)
  monkeypatch.setattr(handoff, '_write', fails_second)
  batch = {'image': np.ones((2, 8, 8, 3), np.uint8), 'boxes': np.zeros((2, 4), np.float32)}
  with pytest.raises(OSError, match='No space'):
    handoff.PackBatch().map(batch)
  assert len(names) == 1
  with pytest.raises(FileNotFoundError):
    real_block(names[0])
