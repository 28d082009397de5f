"""Training batches (determinism, sharding, resume) and evaluation examples (optisar_jax/data/pipeline.py)."""

import json

import numpy as np
import pytest
from grain.multiprocessing import SharedMemoryArray

from optisar_jax.config import load_config
from optisar_jax.data import augment as A
from optisar_jax.data import pipeline as P
from optisar_jax.data import vocabulary as V

CAPTIONS = ['the plane on the left', 'the large ship in the upper left corner', 'a bright storage tank',
            'the vehicle at the center of the image', 'the bridge on the right side', 'two small boats',
            'the tennis court at the bottom', 'the ship to the east of the pier', 'a harbor']


def make_records(n, seed=0):
  """In-memory records in the TFDS feature layout (docs/interfaces.md section 4)."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    h, w = [(48, 64), (64, 48), (40, 40), (72, 96)][i % 4]
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    k = int(rng.integers(1, 5))
    y0, x0 = rng.uniform(0, 0.6, k), rng.uniform(0, 0.6, k)
    bh, bw = rng.uniform(0.15, 0.4, k), rng.uniform(0.15, 0.4, k)
    bbox = np.stack([y0, x0, y0 + bh, x0 + bw], 1).astype(np.float32)
    captions = np.array([CAPTIONS[j].encode() for j in rng.integers(0, len(CAPTIONS), k)], dtype=object)
    records.append({'image': image, 'image/filename': f'opt_{i + 1:06d}.jpg'.encode(), 'image/id': i + 1,
                    'domain': i % 2,
                    'objects': {'id': np.arange(k, dtype=np.int64) + 100 * i, 'bbox': bbox,
                                'category': np.full(k, i % 16, np.int64), 'caption': captions}})
  return records


RECORDS = make_records(24)


def _config(**overrides):
  cfg = load_config('tiny')
  cfg.train.batch_size = 4
  cfg.train.num_steps = 0
  cfg.train.epochs = 3
  for key, value in overrides.items():
    node = cfg
    parts = key.split('.')
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return cfg


def _vocab(cfg):
  return V.build_vocabulary(V.source_captions(RECORDS), ['optical ship'], cfg.data)


def _assert_equal_batches(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_contract():
  cfg = _config()
  vocab = _vocab(cfg)
  ds = P.make_train_dataset(RECORDS, cfg, vocab)
  assert ds.steps_per_epoch == 6 and ds.num_steps == 18 and ds.num_epochs == 3
  S, K, M, B = 64, cfg.data.max_text_slots, cfg.data.max_boxes, 4
  batch = next(iter(ds))
  expected = {'image': ((B, S, S, 3), np.uint8), 'boxes': ((B, M, 4), np.float32),
              'box_slots': ((B, M), np.int32), 'box_mask': ((B, M), np.bool_),
              'text_ids': ((B, K), np.int32), 'text_mask': ((B, K), np.bool_), 'domain': ((B,), np.int32),
              'hsv_gains': ((B, 3), np.float32)}
  assert set(batch) == set(expected)
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, key
  # The colour jitter is left to the train step (data.augment.hsv_on_device): the recipe's gains ride along.
  assert cfg.data.augment.hsv_on_device
  assert np.all(np.abs(batch['hsv_gains'] - 1) <= np.float32([0.015, 0.7, 0.4])) and (batch['hsv_gains'] != 1).any()
  for step in range(4):
    b = ds.batch_at(step)
    assert ((b['text_ids'] >= 0) & (b['text_ids'] < len(vocab))).all()
    boxes, mask = b['boxes'], b['box_mask']
    assert ((boxes >= 0) & (boxes <= S)).all()
    assert (boxes[~mask] == 0).all() and (b['box_slots'][~mask] == 0).all()
    assert ((boxes[mask][:, 2] > boxes[mask][:, 0]) & (boxes[mask][:, 3] > boxes[mask][:, 1])).all()
    for i in range(B):
      slots = b['box_slots'][i][mask[i]]
      n_pos = len(np.unique(slots))
      np.testing.assert_array_equal(np.unique(slots), np.arange(n_pos))   # positives come first
      texts = [vocab[t] for t in b['text_ids'][i]]
      assert 'background' in texts[n_pos:] or n_pos == K


def test_same_seed_same_batches_different_seed_differs():
  cfg = _config()
  vocab = _vocab(cfg)
  a = P.make_train_dataset(RECORDS, cfg, vocab)
  b = P.make_train_dataset(RECORDS, cfg, vocab)
  it_a, it_b = iter(a), iter(b)
  for _ in range(3):
    _assert_equal_batches(next(it_a), next(it_b))
  c = P.make_train_dataset(RECORDS, _config(seed=1), vocab)
  assert not np.array_equal(a.batch_at(0)['image'], c.batch_at(0)['image'])
  # epochs are fresh permutations
  assert not np.array_equal(a.batch_at(0)['image'], a.batch_at(a.steps_per_epoch)['image'])


def test_process_shards_are_rows_of_the_global_batch():
  cfg = _config()
  vocab = _vocab(cfg)
  full = P.make_train_dataset(RECORDS, cfg, vocab)
  parts = [P.make_train_dataset(RECORDS, cfg, vocab, process_index=p, process_count=2) for p in range(2)]
  assert parts[0].batch_size == 2
  for step in (0, 7):
    whole = full.batch_at(step)
    for p, part in enumerate(parts):
      shard = part.batch_at(step)
      for key in whole:
        np.testing.assert_array_equal(shard[key], whole[key][2 * p:2 * p + 2], err_msg=key)
  with pytest.raises(ValueError, match='train.batch_size'):
    P.make_train_dataset(RECORDS, cfg, vocab, process_index=0, process_count=3)


def test_iterator_state_restore_gives_the_next_batch():
  cfg = _config()
  vocab = _vocab(cfg)
  ds = P.make_train_dataset(RECORDS, cfg, vocab)
  it = iter(ds)
  next(it), next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = next(it)
  resumed = P.make_train_dataset(RECORDS, cfg, vocab).iterator()
  resumed.set_state(state)
  _assert_equal_batches(next(resumed), expected)
  _assert_equal_batches(expected, ds.batch_at(2))              # depends only on (seed, step)
  _assert_equal_batches(ds.map_dataset(start_step=2)[0], expected)  # the grain MapDataset view
  bad = dict(state, seed=123)
  with pytest.raises(ValueError, match='seed'):
    resumed.set_state(bad)


def test_mosaic_closes_for_the_last_epochs_and_augment_off():
  cfg = _config(**{'data.augment.close_mosaic_epochs': 1})
  vocab = _vocab(cfg)
  ds = P.make_train_dataset(RECORDS, cfg, vocab)
  assert ds.mosaic_enabled(0) and ds.mosaic_enabled(2 * ds.steps_per_epoch - 1)
  assert not ds.mosaic_enabled(2 * ds.steps_per_epoch)
  # augmentation off: the image is the plain letterbox of the record
  cfg = _config(**{'data.augment.enabled': False})
  one = RECORDS[:1]
  ds = P.make_train_dataset(one, cfg, V.build_vocabulary(V.source_captions(one), [], cfg.data))
  batch = ds.batch_at(0)
  canvas, params = A.letterbox(one[0]['image'], 64)
  for i in range(4):
    np.testing.assert_array_equal(batch['image'][i], canvas)
  sample = P.record_to_sample(one[0])
  n = len(sample.boxes)
  expected = A.boxes_to_letterbox(sample.boxes, params)
  got = batch['boxes'][0][batch['box_mask'][0]]
  assert len(got) == n
  np.testing.assert_allclose(np.sort(got, axis=0), np.sort(expected, axis=0), atol=1e-4)


def test_eval_examples():
  examples = list(P.make_eval_examples(RECORDS[:3], 64))
  assert len(examples) == 3
  for ex, rec in zip(examples, RECORDS[:3]):
    h, w = rec['image'].shape[:2]
    assert ex['image'].shape == (64, 64, 3) and ex['orig_size'] == (h, w)
    ymin, xmin, ymax, xmax = rec['objects']['bbox'].T
    np.testing.assert_allclose(ex['gt_boxes'], np.stack([xmin * w, ymin * h, xmax * w, ymax * h], 1), rtol=1e-5)
    np.testing.assert_array_equal(ex['query_ids'], rec['objects']['id'])
    assert ex['captions'] == [c.decode() for c in rec['objects']['caption']]
    canvas, params = A.letterbox(rec['image'], 64)
    np.testing.assert_array_equal(ex['image'], canvas)
    assert ex['letterbox'] == params and ex['domain'] == rec['domain']
  shard = list(P.make_eval_examples(RECORDS[:3], 64, process_index=1, process_count=2))
  assert [e['image_id'] for e in shard] == [2]


def test_worker_processes_give_the_same_batches():
  cfg = _config()
  vocab = _vocab(cfg)
  expected = [P.make_train_dataset(RECORDS, cfg, vocab).batch_at(s) for s in (1, 2)]
  cfg.data.worker_count = 2
  with P.make_train_dataset(RECORDS, cfg, vocab).iterator(start_step=1) as it:
    got = [next(it) for _ in range(2)]
    for a, b in zip(expected, got):
      _assert_equal_batches(a, b)
      for key in a:                                           # same dtypes, views of one block (handoff.py)
        assert b[key].dtype == a[key].dtype and b[key].base is b['image'].base, key
      assert isinstance(b['image'].base, SharedMemoryArray)
    del got


def test_map_dataset_is_per_sample_and_matches_direct_batches():
  """The grain graph maps single samples and batches them afterwards; its batches equal `batch_at`."""
  cfg = _config()
  vocab = _vocab(cfg)
  ds = P.make_train_dataset(RECORDS, cfg, vocab, process_index=1, process_count=2)
  samples = ds.sample_dataset(start_step=3)
  assert len(samples) == (ds.num_steps - 3) * ds.batch_size == 15 * 2
  assert samples[0]['image'].shape == (64, 64, 3)           # one sample, not a batch
  _assert_equal_batches(samples[3], {k: v[1] for k, v in ds.batch_at(4).items()})
  mapped = ds.map_dataset(start_step=3)
  for k in (0, 4):
    _assert_equal_batches(mapped[k], ds.batch_at(3 + k))


def test_worker_count_resolution():
  import os
  cores = len(os.sched_getaffinity(0))
  assert P.resolve_worker_count(0) == 0 and P.resolve_worker_count(3) == 3
  assert P.resolve_worker_count(-1, 16) == min(cores - 1, 16)
  assert P.resolve_worker_count(-1, 0) == 0
  with pytest.raises(ValueError, match="data.worker_count"):
    P.resolve_worker_count(-2)


def test_state_at_is_the_iterator_state():
  cfg = _config()
  ds = P.make_train_dataset(RECORDS, cfg, _vocab(cfg))
  it = ds.iterator(start_step=5)
  next(it)
  assert it.get_state() == ds.state_at(6)
  assert json.loads(json.dumps(ds.state_at(6)))['next_step'] == 6
  it.close()


def test_device_prefetch_keeps_order_and_raises_in_place():
  from optisar_jax.runtime.prefetch import DevicePrefetch
  placed = []

  def place(x):
    placed.append(x)
    return x * 10

  with DevicePrefetch(iter(range(7)), place, size=2) as batches:
    assert list(batches) == [0, 10, 20, 30, 40, 50, 60]
  assert placed == list(range(7))

  def failing():
    yield 1
    yield 2
    raise OSError('disk gone')

  batches = DevicePrefetch(failing(), lambda x: x, size=2)
  assert next(batches) == 1 and next(batches) == 2
  with pytest.raises(OSError, match='disk gone'):
    next(batches)
  batches.close()
  # The producer never runs more than `size` batches ahead of the consumer (plus the one being placed).
  produced = []
  batches = DevicePrefetch(iter(range(100)), lambda x: produced.append(x) or x, size=2)
  assert next(batches) == 0
  import time
  time.sleep(0.3)
  assert len(produced) <= 1 + 2 + 1
  batches.close()
  with pytest.raises(ValueError, match='data.device_prefetch'):
    DevicePrefetch(iter(()), lambda x: x, size=0)


def test_box_cap_victims_are_passed_to_the_slot_sampler(monkeypatch):
  """The pipeline hands the captions of the boxes the `data.max_boxes` cap removed to the sampler, which
  keeps them out of the negatives (tests/test_negatives.py has the sampler's side)."""
  cfg = _config(**{'data.max_boxes': 2, 'data.augment.enabled': False})
  ds = P.make_train_dataset(RECORDS, cfg, _vocab(cfg))
  calls = []
  original = ds.builder.slots

  def spy(labels, texts, rng, *, dropped_labels=None):
    calls.append((np.asarray(labels).copy(), None if dropped_labels is None else np.asarray(dropped_labels).copy()))
    return original(labels, texts, rng, dropped_labels=dropped_labels)

  monkeypatch.setattr(ds.builder, 'slots', spy)
  for step in range(3):
    ds.batch_at(step)
  capped = [(kept, dropped) for kept, dropped in calls if dropped is not None]
  assert capped, 'no sample had more than 2 boxes'
  for kept, dropped in capped:
    assert len(kept) == 2 and len(dropped) >= 1
  assert all(dropped is None for kept, dropped in calls if len(kept) < 2)
