"""Input pipelines: records (tfds.data_source or any random-access source) -> grain -> numpy batches.

Training (`make_train_dataset`) yields fixed-shape batches, leading axis = this process's share B of the
global batch G = `train.batch_size` (docs/internals.md, "Training batch"):

  image uint8 (B,S,S,3), boxes float32 (B,M,4) xyxy canvas pixels, box_slots int32 (B,M),
  box_mask bool (B,M), text_ids int32 (B,K), text_mask bool (B,K), domain int32 (B,),
  hsv_gains float32 (B,3) (the HSV gains the train step applies with data.augment.hsv_on_device; ones
  otherwise)

Determinism and sharding. Global step s, row j of the global batch (0 <= j < G) is the sample at
position q = (s - e * steps_per_epoch) * G + j of epoch e = s // steps_per_epoch, i.e. record
perm_e[q mod N] where perm_e is a permutation seeded by (seed, e) (a fresh one every epoch; the tail
N mod G of every epoch is dropped). All of that sample's randomness (mosaic choice, mosaic partners,
affine, colour, flips, negative slots) comes from a generator seeded by (seed, e, q). So a batch depends
only on (seed, s) and the source, never on the worker count, the process count or where iteration
started; process p of P computes and reads only rows [p*B, (p+1)*B) (B = G / P). Mosaic is switched off
for the last `data.augment.close_mosaic_epochs` epochs; `data.augment.enabled = False` gives letterbox
only. The iterator's state is just the next step (`get_state()` / `set_state()`, JSON-serialisable), the
same in every process, so a checkpoint restores onto any process count.

The grain graph (`TrainDataset.iter_dataset`), one element per sample until the batch:

  MapDataset.range(start*B, steps*B)     position i of this process's sample stream
    .map(_SampleMap)                     i -> (step i // B, global row p*B + i % B) -> decoded, augmented
                                         sample, all randomness from np.random.default_rng((seed, epoch, q))
    .batch(B, drop_remainder=True)       this process's rows of one global step
    .to_iter_dataset(ReadOptions)        one reader thread: a thread pool only adds GIL contention here
    .map(PackBatch)                      (with workers) the batch's arrays written into one shared-memory
                                         block in one copy (`handoff.py`); grain passes it by name
    .mp_prefetch(workers)                `data.worker_count` worker processes (0 = in this process; -1 =
                                         auto: host cores - 1, at most `data.max_auto_workers`); worker w
                                         builds batches w, w + W, ..., and they come back in order
    .map(UnpackBatch)                    (with workers, in this process) the arrays as views of the block

and the training loop places the next `data.device_prefetch` batches on the devices ahead of the step
(`optisar_jax/runtime/prefetch.py`).

Evaluation (`make_eval_examples`) yields one letterboxed image with all of its queries at a time.
"""

from __future__ import annotations

import io
import math
import os
from typing import Iterator, Sequence

import grain
import numpy as np

from optisar_jax.data import augment
from optisar_jax.data import handoff
from optisar_jax.data.negatives import SlotSampler
from optisar_jax.data.vocabulary import TextVocabulary, config_value, global_negative_pool, source_captions

_TAG_PERMUTATION = 0
_TAG_SAMPLE = 1
_STATE_FORMAT = 'optisar_jax.train_iterator/1'


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.bytes_):
    return bytes(value).decode('utf-8')
  return str(value)


def record_to_sample(record) -> augment.Sample:
  """A TFDS-format record -> `augment.Sample` (boxes in pixels, captions stripped and de-duplicated).

  Boxes with an empty caption are dropped, identical captions share one id (first appearance order),
  and exact duplicates of (caption, box) are removed, as in the reference's training cache.
  """
  image = augment._as_rgb(record['image'])
  h, w = image.shape[:2]
  objects = record['objects']
  bbox = np.asarray(objects['bbox'], np.float64).reshape(-1, 4)
  captions = [_text(c).strip() for c in objects['caption']]
  if len(captions) != len(bbox):
    raise ValueError(f"record {_text(record.get('image/filename', b'?'))!r}: {len(bbox)} boxes but "
                     f'{len(captions)} captions')
  texts, index, labels, boxes, seen = [], {}, [], [], set()
  for cap, (ymin, xmin, ymax, xmax) in zip(captions, bbox):
    if not cap:
      continue
    if cap not in index:
      index[cap] = len(texts)
      texts.append(cap)
    box = (xmin * w, ymin * h, xmax * w, ymax * h)
    key = (index[cap], box)
    if key in seen:
      continue
    seen.add(key)
    labels.append(index[cap])
    boxes.append(box)
  return augment.Sample(image=image, boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                        labels=np.asarray(labels, np.int64), texts=texts,
                        domain=int(record.get('domain', 0)))


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Optimizer steps per epoch: N // G (the remainder is dropped), at least 1."""
  return max(1, int(num_examples) // int(global_batch_size))


class _BatchBuilder:
  """Samples of the training stream: (global step, global row) -> one sample as numpy arrays."""

  def __init__(self, source, *, seed: int, num_examples: int, global_batch_size: int, batch_size: int,
               process_index: int, steps_per_epoch: int, num_epochs: int, augment_config: augment.AugmentConfig,
               slot_sampler: SlotSampler, max_boxes: int):
    self.source = source
    self.seed = int(seed) % (1 << 63)
    self.num_examples = int(num_examples)
    self.global_batch_size = int(global_batch_size)
    self.batch_size = int(batch_size)
    self.process_index = int(process_index)
    self.steps_per_epoch = int(steps_per_epoch)
    self.num_epochs = int(num_epochs)
    self.aug = augment_config
    self.slots = slot_sampler
    self.max_boxes = int(max_boxes)
    self._perms = {}

  def _permutation(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, _TAG_PERMUTATION, epoch]).permutation(self.num_examples)
      if len(self._perms) > 2:
        self._perms.clear()
      self._perms[epoch] = perm
    return perm

  def mosaic_enabled(self, epoch: int) -> bool:
    return (self.aug.enabled and self.aug.mosaic > 0
            and epoch < self.num_epochs - self.aug.close_mosaic_epochs)

  def sample(self, step: int, row: int) -> dict:
    """Row `row` (0..G-1) of the global batch at `step`, as numpy arrays."""
    epoch = step // self.steps_per_epoch
    q = (step - epoch * self.steps_per_epoch) * self.global_batch_size + row
    index = int(self._permutation(epoch)[q % self.num_examples])
    rng = np.random.default_rng([self.seed, _TAG_SAMPLE, epoch, q])
    main = record_to_sample(self.source[index])
    if self.aug.enabled:
      samples = [main]
      if self.mosaic_enabled(epoch) and rng.random() < self.aug.mosaic:
        extra = rng.integers(0, self.num_examples, size=3)
        samples += [record_to_sample(self.source[int(j)]) for j in extra]
      out = augment.augment_sample(samples, rng, self.aug)
    else:
      out = augment.letterbox_sample(main, self.aug.imgsz, self.aug.pad_value, resize=self.aug.resize)

    boxes, labels = out.boxes, out.labels
    dropped = None
    if len(boxes) > self.max_boxes:
      keep = np.sort(rng.choice(len(boxes), size=self.max_boxes, replace=False))
      dropped = np.delete(labels, keep)          # the cap's victims: their captions stay out of the negatives
      boxes, labels = boxes[keep], labels[keep]
    slots = self.slots(labels, out.texts, rng, dropped_labels=dropped)
    boxes = boxes[slots.box_keep]
    n = len(boxes)
    M = self.max_boxes
    padded_boxes = np.zeros((M, 4), np.float32)
    padded_boxes[:n] = boxes
    box_slots = np.zeros((M,), np.int32)
    box_slots[:n] = slots.box_slots
    box_mask = np.zeros((M,), bool)
    box_mask[:n] = True
    return {'image': out.image, 'boxes': padded_boxes, 'box_slots': box_slots, 'box_mask': box_mask,
            'text_ids': slots.text_ids, 'text_mask': slots.text_mask, 'domain': np.int32(out.domain),
            'hsv_gains': (out.hsv_gains if out.hsv_gains is not None else np.ones(3, np.float32))}

  def batch(self, step: int) -> dict:
    """This process's rows of global step `step`, stacked (computed directly in this thread)."""
    first = self.process_index * self.batch_size
    rows = [self.sample(step, first + j) for j in range(self.batch_size)]
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


class _SampleMap(grain.transforms.Map):
  """grain Map: position i of this process's sample stream -> one sample of global step i // B, global row
  process_index * B + i % B (B = rows per process and step)."""

  def __init__(self, builder: _BatchBuilder):
    self.builder = builder

  def map(self, element):
    b = self.builder
    step, j = divmod(int(element), b.batch_size)
    return b.sample(step, b.process_index * b.batch_size + j)


class TrainDataset:
  """The training input of one process. Iterate it (or call `iterator(start_step)`) for batches.

  Attributes:
    num_examples: N, records in the source.
    global_batch_size: G (`train.batch_size`); batch_size: B = G / process_count (rows per batch here).
    steps_per_epoch: N // G (at least 1); num_steps: `train.num_steps` if > 0 else epochs * steps_per_epoch.
    num_epochs: epochs the run spans (decides when mosaic closes).
  """

  def __init__(self, source, config, vocabulary: TextVocabulary, *, process_index: int = 0,
               process_count: int = 1, global_pool: Sequence[str] | None = None, num_steps: int | None = None):
    data = config_value(config, 'data', prefix='')
    self.num_examples = len(source)
    if self.num_examples == 0:
      raise ValueError('make_train_dataset: the training source has no records')
    self.global_batch_size = int(config_value(config, 'train.batch_size', prefix=''))
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} / process_count {process_count} is not a valid split')
    if self.global_batch_size % process_count:
      raise ValueError(f"config key 'train.batch_size' ({self.global_batch_size}) is not divisible by the "
                       f'process count {process_count}')
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.batch_size = self.global_batch_size // process_count
    self.seed = int(config_value(config, 'seed', prefix=''))
    self.steps_per_epoch = steps_per_epoch(self.num_examples, self.global_batch_size)
    if num_steps is None:
      num_steps = int(config_value(config, 'train.num_steps', prefix=''))
      if num_steps <= 0:
        num_steps = int(config_value(config, 'train.epochs', prefix='')) * self.steps_per_epoch
    self.num_steps = int(num_steps)
    self.num_epochs = max(1, math.ceil(self.num_steps / self.steps_per_epoch))
    self.worker_count = resolve_worker_count(int(config_value(data, 'worker_count')),
                                             int(config_value(data, 'max_auto_workers')))
    self.prefetch_buffer = int(config_value(data, 'prefetch_buffer'))
    if self.prefetch_buffer < 1:
      raise ValueError(f"config key 'data.prefetch_buffer' must be >= 1, got {self.prefetch_buffer}")
    self.augment_config = augment.AugmentConfig.from_config(data)
    if global_pool is None:
      global_pool = vocabulary.global_pool
      if not global_pool:
        global_pool = global_negative_pool(source_captions(source), int(config_value(data, 'negatives.global_pool_size')))
    self.slot_sampler = SlotSampler.from_config(vocabulary, data, global_pool=global_pool)
    self.builder = _BatchBuilder(
        source, seed=self.seed, num_examples=self.num_examples, global_batch_size=self.global_batch_size,
        batch_size=self.batch_size, process_index=self.process_index, steps_per_epoch=self.steps_per_epoch,
        num_epochs=self.num_epochs, augment_config=self.augment_config, slot_sampler=self.slot_sampler,
        max_boxes=int(config_value(data, 'max_boxes')))

  def __len__(self) -> int:
    return self.num_steps

  def epoch_of_step(self, step: int) -> int:
    return int(step) // self.steps_per_epoch

  def mosaic_enabled(self, step: int) -> bool:
    """Whether samples of global step `step` may be mosaics (False in the last close_mosaic_epochs)."""
    return self.builder.mosaic_enabled(self.epoch_of_step(step))

  def batch_at(self, step: int) -> dict:
    """This process's batch at global step `step`, computed directly in this thread."""
    return self.builder.batch(int(step))

  def sample_dataset(self, start_step: int = 0) -> grain.MapDataset:
    """grain MapDataset of this process's samples from step `start_step` on: element i is row i % B of
    this process's share of step start_step + i // B (`_SampleMap`)."""
    b = self.batch_size
    return grain.MapDataset.range(int(start_step) * b, self.num_steps * b).map(_SampleMap(self.builder))

  def map_dataset(self, start_step: int = 0) -> grain.MapDataset:
    """grain MapDataset of this process's batches for steps [start_step, num_steps): element k is the batch
    of step start_step + k (`sample_dataset` batched by B)."""
    return self.sample_dataset(start_step).batch(self.batch_size, drop_remainder=True)

  def iter_dataset(self, start_step: int = 0) -> grain.IterDataset:
    """The IterDataset the training loop reads: `map_dataset` with `worker_count` worker processes, each
    keeping up to `prefetch_buffer` batches ready."""
    ds = self.map_dataset(start_step).to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch_buffer))
    if self.worker_count > 0:
      # In each worker the batch's arrays go into one shared-memory block; here they are views of it
      # (handoff.py).
      ds = ds.map(handoff.PackBatch()).mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.worker_count, per_worker_buffer_size=self.prefetch_buffer)).map(handoff.UnpackBatch())
    return ds

  def iterator(self, start_step: int = 0) -> 'TrainIterator':
    return TrainIterator(self, start_step)

  def state_at(self, next_step: int) -> dict:
    """The iterator state whose next batch is that of global step `next_step` (JSON; what a checkpoint of
    step `next_step` saves: the loop may have prefetched further)."""
    return {'format': _STATE_FORMAT, 'next_step': int(next_step), 'seed': self.seed,
            'global_batch_size': self.global_batch_size, 'num_examples': self.num_examples}

  def __iter__(self) -> 'TrainIterator':
    return self.iterator(0)


def resolve_worker_count(worker_count: int, max_auto_workers: int = 16) -> int:
  """`data.worker_count`: n >= 0 as given; -1 = automatic, one worker per host core but one (the training
  loop's), at most `max_auto_workers` (`data.max_auto_workers`)."""
  if worker_count >= 0:
    return worker_count
  if worker_count != -1:
    raise ValueError(f"config key 'data.worker_count' must be >= 0 or -1 (automatic), got {worker_count}")
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
  return max(0, min(cores - 1, int(max_auto_workers)))


class TrainIterator:
  """Iterator over a TrainDataset's batches (`TrainDataset.iter_dataset`: grain, with worker processes).

  `get_state()` returns a JSON-serialisable dict; `set_state(state)` makes the next batch the one an
  uninterrupted run would produce next. The state holds only the next global step (and what checks that
  it belongs to this run), so it is the same in every process and restores onto any process count.
  """

  def __init__(self, dataset: TrainDataset, start_step: int = 0):
    self.dataset = dataset
    self._next_step = int(start_step)
    self._grain_iter = None

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._next_step >= self.dataset.num_steps:
      raise StopIteration
    if self._grain_iter is None:
      self._grain_iter = iter(self.dataset.iter_dataset(self._next_step))
    batch = next(self._grain_iter)
    self._next_step += 1
    return batch

  def close(self) -> None:
    """Stops grain's worker processes (if any); iteration can continue later from the same step."""
    grain_iter, self._grain_iter = self._grain_iter, None
    if grain_iter is not None:
      grain_iter.close()

  def __enter__(self) -> 'TrainIterator':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def step(self) -> int:
    """The global step of the next batch."""
    return self._next_step

  def get_state(self) -> dict:
    return self.dataset.state_at(self._next_step)

  def set_state(self, state: dict) -> None:
    ds = self.dataset
    if not isinstance(state, dict) or 'next_step' not in state:
      raise ValueError(f"input iterator state must be a dict with 'next_step', got {state!r}")
    for key, mine in (('seed', ds.seed), ('global_batch_size', ds.global_batch_size),
                      ('num_examples', ds.num_examples)):
      if key in state and int(state[key]) != mine:
        raise ValueError(f'input iterator state: {key} {state[key]} does not match this run ({mine})')
    self.close()
    self._next_step = int(state['next_step'])


def make_train_dataset(source, config, vocabulary: TextVocabulary, *, process_index: int = 0,
                       process_count: int = 1, global_pool: Sequence[str] | None = None,
                       num_steps: int | None = None) -> TrainDataset:
  """The training input of process `process_index` of `process_count`.

  Args:
    source: random-access records (`tfds.data_source(...)` or a list of TFDS-format dicts).
    config: the full run config (reads seed, data.*, train.batch_size, train.num_steps, train.epochs).
    vocabulary: the run's TextVocabulary (every caption, flip rewrite, background, pool string in it).
    global_pool: pool strings; default `vocabulary.global_pool`, else computed from the source captions.
    num_steps: override of the number of steps (default from config).
  """
  return TrainDataset(source, config, vocabulary, process_index=process_index, process_count=process_count,
                      global_pool=global_pool, num_steps=num_steps)


def _decoded(image) -> np.ndarray:
  """A record's image as (H, W, 3) uint8: decoded arrays as they are, encoded bytes (a source opened with
  `skip_images`) decoded with PIL."""
  if isinstance(image, (bytes, np.bytes_)):
    from PIL import Image
    with Image.open(io.BytesIO(bytes(image))) as pil:
      return augment._as_rgb(np.asarray(pil.convert('RGB')))
  return augment._as_rgb(image)


def _image_size(image) -> tuple[int, int]:
  """(H, W) of a record's image without decoding encoded bytes (PIL reads the header only)."""
  if isinstance(image, (bytes, np.bytes_)):
    from PIL import Image
    with Image.open(io.BytesIO(bytes(image))) as pil:
      return pil.size[1], pil.size[0]
  shape = np.shape(image)
  return int(shape[0]), int(shape[1])


def eval_metadata(record, index: int, imgsz: int) -> dict:
  """Everything evaluation needs of one record but its pixels (a few hundred bytes per image):

    index         position in the source (`eval_canvas(source[index], ...)` gives the pixels)
    letterbox     augment.LetterboxParams(ratio, left, top); canvas = original * ratio + (left, top)
    orig_size     (H, W)
    image_id, filename
    query_ids     int64 (Q,) annotation ids
    captions      list of Q stripped captions
    gt_boxes      float32 (Q, 4) xyxy, original pixels
    category_ids  int64 (Q,)
    domain        int (0 optical, 1 SAR)
  """
  h, w = _image_size(record['image'])
  params, _ = augment.letterbox_params(h, w, imgsz)
  objects = record['objects']
  bbox = np.asarray(objects['bbox'], np.float64).reshape(-1, 4)
  gt = (bbox[:, [1, 0, 3, 2]] * np.array([w, h, w, h], np.float64)).astype(np.float32)
  return {'index': int(index), 'letterbox': params, 'orig_size': (h, w),
          'image_id': int(record.get('image/id', index)), 'filename': _text(record.get('image/filename', b'')),
          'query_ids': np.asarray(objects['id'], np.int64).reshape(-1),
          'captions': [_text(c).strip() for c in objects['caption']], 'gt_boxes': gt,
          'category_ids': np.asarray(objects['category'], np.int64).reshape(-1),
          'domain': int(record.get('domain', 0))}


def eval_canvas(record, imgsz: int, pad_value: int = 114, *, resize: str = 'pil') -> np.ndarray:
  """The letterboxed uint8 (imgsz, imgsz, 3) canvas of one record (decoding it if it is encoded), resampled
  as `data.resize`."""
  return augment.letterbox(_decoded(record['image']), imgsz, pad_value, resize=resize)[0]


def make_eval_examples(source, imgsz: int, *, pad_value: int = 114, process_index: int = 0,
                       process_count: int = 1, resize: str = 'pil') -> Iterator[dict]:
  """One dict per image (images i with i % process_count == process_index), in source order: the
  `eval_metadata` keys plus `image`, the letterboxed uint8 (imgsz, imgsz, 3) canvas. (Evaluation of a
  split streams instead: metadata first, pixels only for the images this process's devices run.)"""
  for i in range(process_index, len(source), process_count):
    record = source[i]
    example = eval_metadata(record, i, imgsz)
    example['image'] = eval_canvas(record, imgsz, pad_value, resize=resize)
    yield example
