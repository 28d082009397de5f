"""Dynamic adversarial negative sampling: the K text slots of one training image.

Reproduces the reference's `adv_RandomLoadText` (docs/training-and-data.md section 4.3), run per sample after
all image augmentation. Given the sample's caption list `texts` and the caption id of every surviving
box, the K slots are, in order:

1. positives: the distinct caption ids of the boxes, ascending (more than K: a uniform random subset of K
   is kept and the boxes of the dropped captions are deleted);
2. the background text (unless already present);
3. adversarial rewrites (section 4.2) of the positives that exist in the vocabulary and are not already
   in the slots, shuffled, at most floor(adv_sample_ratio * |P|) of them;
4. in-sample negatives: n ~ U{neg_samples} (capped at min(|texts|, K) - |P|) captions of the sample
   without a surviving box, in sampled order, skipping strings already present;
5. padding drawn uniformly with replacement from the global negative pool (no de-duplication);
then truncation to K. Deviation 11.2: `text_mask` is False for a negative slot whose text equals
(stripped, case-insensitively) one of the positive captions, so it is not trained toward 0.

Box cap (`data.max_boxes`): boxes beyond the cap are removed before the slots are built, and their caption
ids are passed as `dropped_labels`. A caption whose every box was removed that way describes an object
that IS in the image: it is not a positive (it has no box to train) and it is never an in-sample negative
(nor counted among the sample's texts for the negative cap); with `mask_false_negatives` a pool slot equal
to it is masked like one equal to a positive. The reference has no box cap, so this never arises there.

Pure numpy; every random draw comes from the `np.random.Generator` passed in.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from optisar_jax.data import text_swaps
from optisar_jax.data.vocabulary import TextVocabulary, config_value


@dataclasses.dataclass
class TextSlots:
  """The slots of one sample.

  Attributes:
    text_ids: int32 (K,) vocabulary ids of the slot texts.
    text_mask: bool (K,) False where a negative slot must not be trained (a false negative).
    box_keep: bool (n,) which input boxes survive (False: its caption was dropped, > K positives).
    box_slots: int32 (n_kept,) slot index (0..num_positives-1) of every surviving box, in input order.
    num_positives: number of positive slots (they come first).
    texts: the K slot strings (for inspection and tests).
  """
  text_ids: np.ndarray
  text_mask: np.ndarray
  box_keep: np.ndarray
  box_slots: np.ndarray
  num_positives: int
  texts: list


class SlotSampler:
  """Builds `TextSlots` for samples; holds the vocabulary, the global pool and the config numbers.

  Args:
    vocabulary: the run's `TextVocabulary` (every positive caption must be in it).
    max_slots: K.
    background_text: the text appended after the positives.
    adv_sample_ratio: at most floor(ratio * |P|) adversarial rewrites.
    neg_samples: (lo, hi) inclusive range of the in-sample negative count.
    mask_false_negatives: deviation 11.2 on/off.
    word_boundary: whole-word adversarial swaps (deviation 11.3) instead of substring swaps.
    global_pool: pool strings (default: `vocabulary.global_pool`).
  """

  def __init__(self, vocabulary: TextVocabulary, *, max_slots: int, background_text: str = 'background',
               adv_sample_ratio: float = 0.5, neg_samples: Sequence[int] = (0, 10),
               mask_false_negatives: bool = True, word_boundary: bool = False,
               global_pool: Sequence[str] | None = None):
    if max_slots < 1:
      raise ValueError(f'data.max_text_slots must be >= 1, got {max_slots}')
    if len(neg_samples) != 2 or neg_samples[0] > neg_samples[1] or neg_samples[0] < 0:
      raise ValueError(f'data.negatives.neg_samples must be (lo, hi) with 0 <= lo <= hi, got {neg_samples!r}')
    self.vocabulary = vocabulary
    self.max_slots = int(max_slots)
    self.background_text = background_text
    self.adv_sample_ratio = float(adv_sample_ratio)
    self.neg_samples = (int(neg_samples[0]), int(neg_samples[1]))
    self.mask_false_negatives = bool(mask_false_negatives)
    self.word_boundary = bool(word_boundary)
    pool = vocabulary.global_pool if global_pool is None else tuple(global_pool)
    self.global_pool = tuple(pool)
    self.global_pool_ids = np.asarray([vocabulary.index(s) for s in pool], np.int32)
    self.background_id = vocabulary.index(background_text)

  @classmethod
  def from_config(cls, vocabulary: TextVocabulary, data_config,
                  global_pool: Sequence[str] | None = None) -> 'SlotSampler':
    """From the `data` ConfigDict (max_text_slots and the negatives.* keys)."""
    return cls(vocabulary,
               max_slots=int(config_value(data_config, 'max_text_slots')),
               background_text=str(config_value(data_config, 'negatives.background_text')),
               adv_sample_ratio=float(config_value(data_config, 'negatives.adv_sample_ratio')),
               neg_samples=tuple(config_value(data_config, 'negatives.neg_samples')),
               mask_false_negatives=bool(config_value(data_config, 'negatives.mask_false_negatives')),
               word_boundary=bool(config_value(data_config, 'negatives.word_boundary_swaps')),
               global_pool=global_pool)

  def __call__(self, box_labels, texts: Sequence[str], rng: np.random.Generator, *,
               dropped_labels=None) -> TextSlots:
    """Slots for one sample.

    Args:
      box_labels: int (n,) caption id (index into `texts`) of every box that survived augmentation and
        the box cap.
      texts: the sample's distinct captions (after any flip rewriting).
      rng: the sample's generator.
      dropped_labels: int (d,) caption ids of the boxes that survived augmentation but were removed by
        the box cap (`data.max_boxes`); captions among them without a kept box are in the image, so they
        are neither positives nor negatives (module docstring). None = no box was removed.
    """
    K = self.max_slots
    box_labels = np.asarray(box_labels, np.int64).reshape(-1)
    dropped = np.asarray([] if dropped_labels is None else dropped_labels, np.int64).reshape(-1)
    for name, ids in (('box', box_labels), ('dropped box', dropped)):
      if ids.size and (ids.min() < 0 or ids.max() >= len(texts)):
        raise ValueError(f'{name} caption ids {ids.tolist()} out of range for {len(texts)} texts')

    # 1. Positives.
    positives = np.unique(box_labels)
    if positives.size > K:
      positives = np.sort(rng.choice(positives, size=K, replace=False))
    box_keep = np.isin(box_labels, positives)
    in_image = np.setdiff1d(dropped, box_labels)     # captions whose every box the cap removed

    # 2. In-sample negative draw (drawn here, as in the reference, before slots are filled).
    max_neg = min(len(texts) - in_image.size, K) - positives.size
    neg_count = min(max_neg, int(rng.integers(self.neg_samples[0], self.neg_samples[1] + 1)))
    candidates = np.setdiff1d(np.arange(len(texts)), np.concatenate([positives, in_image]))
    in_sample = rng.choice(candidates, size=neg_count, replace=False) if neg_count > 0 else np.zeros(0, int)

    # 3. Positive slots.
    slot_texts = [texts[int(p)] for p in positives]
    slot_ids = self.vocabulary.indices(slot_texts)
    present = set(slot_texts)

    # 4. Background.
    if self.background_text not in present:
      slot_texts.append(self.background_text)
      slot_ids.append(self.background_id)
      present.add(self.background_text)

    # 5. Adversarial rewrites of the positives.
    if len(slot_texts) < K:
      pool = []
      seen = set()
      for p in positives:
        for v in text_swaps.adversarial_variants(texts[int(p)], word_boundary=self.word_boundary):
          if v in self.vocabulary and v not in present and v not in seen:
            seen.add(v)
            pool.append(v)
      take = min(int(np.floor(self.adv_sample_ratio * positives.size)), K - len(slot_texts))
      if pool and take > 0:
        order = rng.permutation(len(pool))
        for j in order[:take]:
          slot_texts.append(pool[j])
          slot_ids.append(self.vocabulary.index(pool[j]))
          present.add(pool[j])

    # 6. In-sample negatives.
    for j in in_sample:
      if len(slot_texts) >= K:
        break
      s = texts[int(j)]
      if s in present:
        continue
      slot_texts.append(s)
      slot_ids.append(self.vocabulary.index(s))
      present.add(s)

    # 7. Global-pool padding (with replacement, no de-duplication).
    text_mask = [True] * len(slot_texts)
    missing = K - len(slot_texts)
    if missing > 0:
      if self.global_pool_ids.size:
        picks = rng.integers(0, self.global_pool_ids.size, size=missing)
        slot_ids.extend(int(self.global_pool_ids[j]) for j in picks)
        slot_texts.extend(self.global_pool[j] for j in picks)
        text_mask.extend([True] * missing)
      else:  # no pool at all: pad with masked background slots
        slot_ids.extend([self.background_id] * missing)
        slot_texts.extend([self.background_text] * missing)
        text_mask.extend([False] * missing)
    slot_ids = slot_ids[:K]
    slot_texts = slot_texts[:K]
    text_mask = np.asarray(text_mask[:K], bool)

    # Deviation 11.2: negatives equal to a positive caption (or to a capped-away one) are not trained.
    num_pos = int(positives.size)
    if self.mask_false_negatives and (num_pos or in_image.size):
      pos_keys = {texts[int(p)].strip().lower() for p in np.concatenate([positives, in_image])}
      for k in range(num_pos, K):
        if slot_texts[k].strip().lower() in pos_keys:
          text_mask[k] = False

    slot_of_caption = {int(p): k for k, p in enumerate(positives)}
    box_slots = np.asarray([slot_of_caption[int(c)] for c in box_labels[box_keep]], np.int32)
    return TextSlots(text_ids=np.asarray(slot_ids, np.int32), text_mask=text_mask, box_keep=box_keep,
                     box_slots=box_slots, num_positives=num_pos, texts=slot_texts)


def build_text_slots(box_labels, texts: Sequence[str], vocabulary: TextVocabulary, data_config,
                     rng: np.random.Generator) -> TextSlots:
  """One-shot convenience: `SlotSampler.from_config(vocabulary, data_config)(box_labels, texts, rng)`."""
  return SlotSampler.from_config(vocabulary, data_config)(box_labels, texts, rng)
