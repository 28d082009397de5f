"""Text vocabulary and per-sample slot construction (docs/training-and-data.md sections 3, 4.3, 11.2)."""

import json

import numpy as np
import pytest

from optisar_jax.config import load_config
from optisar_jax.data import vocabulary as V
from optisar_jax.data.negatives import SlotSampler, build_text_slots
from optisar_jax.data.text_swaps import adversarial_variants, flip_rewrite

CAPTIONS = ['the plane on the left', 'the large ship', 'a storage tank', 'the bridge at the top',
            'the vehicle near the road', 'a small harbor', 'the tennis court', 'a baseball diamond']
POOL = ['pool caption one', 'pool caption two', 'pool caption three']


def _vocab(extra=()):
  strings = set(CAPTIONS) | set(POOL) | {'background'} | set(extra)
  for c in list(strings):
    strings.update(adversarial_variants(c))
  return V.TextVocabulary(sorted(strings), global_pool=POOL)


def _sampler(vocab, K=8, neg=(0, 10), mask=True, **kw):
  return SlotSampler(vocab, max_slots=K, background_text='background', adv_sample_ratio=0.5, neg_samples=neg,
                     mask_false_negatives=mask, **kw)


# ------------------------------------------------------------------------------------------ vocabulary

def test_vocabulary_index_save_load(tmp_path):
  vocab = V.TextVocabulary(['b', 'a', 'b', 'c'], global_pool=['c'])
  assert vocab.strings == ('b', 'a', 'c') and len(vocab) == 3
  assert vocab.index('a') == 1 and vocab[2] == 'c' and 'a' in vocab and 'z' not in vocab
  with pytest.raises(KeyError, match='zebra'):
    vocab.index('zebra')
  path = tmp_path / 'vocab.json'
  vocab.save(str(path))
  assert V.TextVocabulary.load(str(path)) == vocab
  path.write_text('{not json')
  with pytest.raises(ValueError, match='vocab.json'):
    V.TextVocabulary.load(str(path))
  with pytest.raises(FileNotFoundError, match='missing.json'):
    V.TextVocabulary.load(str(tmp_path / 'missing.json'))


def test_global_negative_pool_order():
  caps = ['b ', 'a', 'c', 'a', ' b', 'd', '', 'c', 'a']
  assert V.global_negative_pool(caps, 3) == ['a', 'b', 'c']      # (-count, string); stripped; '' ignored
  assert V.global_negative_pool(caps, 10) == ['a', 'b', 'c', 'd']


def test_training_texts_contents():
  cfg = load_config('optsar_rsvg')
  caps = [' the plane on the left ', 'a bright tank', 'a bright tank']
  texts = V.training_texts(caps, ['optical ship', 'sar ship'], cfg.data)
  assert texts == sorted(texts) and len(texts) == len(set(texts))
  for s in ['the plane on the left', 'the plane on the right', 'a bright tank', 'a bleft tank', 'a dark tank',
            'background', 'optical ship', 'sar ship']:
    assert s in texts
  assert flip_rewrite('the plane on the left') in texts
  cfg.data.augment.rewrite_directions_on_flip = False
  cfg.data.negatives.word_boundary_swaps = True
  texts = V.training_texts(['a bright tank'], [], cfg.data)
  assert 'a bleft tank' not in texts and 'a dark tank' in texts
  del cfg.data.negatives['background_text']
  with pytest.raises(KeyError, match='data.negatives.background_text'):
    V.training_texts(caps, [], cfg.data)


def test_build_vocabulary_carries_pool():
  cfg = load_config('tiny')
  vocab = V.build_vocabulary(CAPTIONS + CAPTIONS[:2], ['optical ship'], cfg.data)
  assert vocab.global_pool == tuple(V.global_negative_pool(CAPTIONS + CAPTIONS[:2], 8))
  assert all(s in vocab for s in vocab.global_pool)


# ---------------------------------------------------------------------------------------- slot rules

def test_slot_order_and_counts():
  vocab = _vocab()
  texts = CAPTIONS[:6]   # ids 0..5
  labels = np.array([3, 0, 3, 1])                              # positives {0, 1, 3}
  slots = _sampler(vocab, K=10, neg=(2, 2))(labels, texts, np.random.default_rng(0))
  assert slots.text_ids.shape == (10,) and slots.text_ids.dtype == np.int32
  assert slots.num_positives == 3
  assert slots.texts[:3] == [texts[0], texts[1], texts[3]]     # ascending caption ids
  assert slots.texts[3] == 'background'
  adv_pool = {v for t in (texts[0], texts[1], texts[3]) for v in adversarial_variants(t)}
  assert slots.texts[4] in adv_pool                            # floor(0.5 * 3) = 1 adversarial
  assert slots.texts[5] not in adv_pool
  assert set(slots.texts[5:7]) <= {texts[2], texts[4], texts[5]}  # 2 in-sample negatives, no positives
  assert len(set(slots.texts[5:7])) == 2
  assert set(slots.texts[7:]) <= set(POOL)                     # padding from the global pool
  assert slots.box_keep.all()
  np.testing.assert_array_equal(slots.box_slots, [2, 0, 2, 1])
  np.testing.assert_array_equal(slots.text_ids, vocab.indices(slots.texts))
  assert slots.text_mask.all()


def test_single_positive_gets_no_adversarial_and_neg_cap():
  vocab = _vocab()
  texts = ['the plane on the left', 'a storage tank']
  for seed in range(20):
    slots = _sampler(vocab, K=6, neg=(0, 10))(np.array([0]), texts, np.random.default_rng(seed))
    assert slots.texts[:2] == ['the plane on the left', 'background']
    assert 'the plane on the right' not in slots.texts            # floor(0.5 * 1) = 0
    # in-sample negatives: at most min(|texts|, K) - |P| = 1
    assert slots.texts[2] in ('a storage tank', *POOL)
    assert set(slots.texts[3:]) <= set(POOL)


def test_more_positives_than_slots():
  vocab = _vocab()
  texts = CAPTIONS[:6]
  labels = np.array([0, 1, 2, 3, 4, 5, 5, 0])
  slots = _sampler(vocab, K=4)(labels, texts, np.random.default_rng(3))
  assert slots.num_positives == 4 and len(slots.texts) == 4       # truncated to K, background dropped
  kept_captions = slots.texts
  assert kept_captions == [t for t in texts if t in kept_captions]   # ascending
  kept = [texts[c] for c in labels[slots.box_keep]]
  assert all(k in kept_captions for k in kept)
  dropped = [texts[c] for c in labels[~slots.box_keep]]
  assert all(d not in kept_captions for d in dropped)
  assert [kept_captions[s] for s in slots.box_slots] == kept


def test_no_boxes_and_padding():
  vocab = _vocab()
  slots = _sampler(vocab, K=5, neg=(0, 0))(np.zeros(0, int), ['a storage tank'], np.random.default_rng(0))
  assert slots.num_positives == 0 and slots.texts[0] == 'background'
  assert set(slots.texts[1:]) <= set(POOL) and len(slots.texts) == 5
  assert slots.box_slots.shape == (0,)


def test_false_negative_mask():
  vocab = _vocab(extra=['POOL caption one '])
  sampler = _sampler(vocab, K=12, neg=(0, 0), global_pool=['POOL caption one '])
  slots = sampler(np.array([0]), ['pool caption one'], np.random.default_rng(0))
  assert slots.texts[0] == 'pool caption one' and slots.text_mask[0]
  assert slots.texts[1] == 'background' and slots.text_mask[1]
  assert all(t == 'POOL caption one ' for t in slots.texts[2:])
  assert not slots.text_mask[2:].any()                          # equal up to case and whitespace
  off = _sampler(vocab, K=12, neg=(0, 0), global_pool=['POOL caption one '], mask=False)
  assert off(np.array([0]), ['pool caption one'], np.random.default_rng(0)).text_mask.all()


def test_deterministic_for_a_generator_and_config_entry_point():
  cfg = load_config('optsar_rsvg')
  vocab = _vocab()
  texts, labels = CAPTIONS, np.array([0, 2, 5, 7])
  a = build_text_slots(labels, texts, vocab, cfg.data, np.random.default_rng(7))
  b = build_text_slots(labels, texts, vocab, cfg.data, np.random.default_rng(7))
  assert a.texts == b.texts and len(a.texts) == cfg.data.max_text_slots
  with pytest.raises(KeyError, match='not in the vocabulary'):
    build_text_slots(np.array([0]), ['an unknown caption'], vocab, cfg.data, np.random.default_rng(0))


def test_vocabulary_json_is_plain(tmp_path):
  vocab = V.TextVocabulary(['the ship', 'le navire à gauche', 'background'], global_pool=['the ship'])
  data = vocab.to_json_dict()
  assert data == {'format': 'optisar_jax.TextVocabulary/1',
                  'strings': ['the ship', 'le navire à gauche', 'background'], 'global_pool': ['the ship']}
  assert json.loads(json.dumps(data)) == data               # plain JSON types only
  vocab.save(str(tmp_path / 'v.json'))
  assert json.loads((tmp_path / 'v.json').read_text(encoding='utf-8')) == data   # what is on disk


def test_caption_removed_by_the_box_cap_is_neither_positive_nor_negative():
  """Caption 2 lost every box to `data.max_boxes`: its object is in the image, so it must not be drawn as
  an in-sample negative; without `dropped_labels` (the leak) it is drawn."""
  vocab = _vocab()
  texts = CAPTIONS[:4]
  kept, dropped = np.array([0, 0, 1]), np.array([2, 2, 0])
  leaked = fixed = 0
  for seed in range(40):
    sampler = _sampler(vocab, K=8, neg=(3, 3))
    before = sampler(kept, texts, np.random.default_rng(seed))
    after = sampler(kept, texts, np.random.default_rng(seed), dropped_labels=dropped)
    leaked += texts[2] in before.texts
    fixed += texts[2] in after.texts
    assert after.num_positives == 2 and after.texts[:2] == [texts[0], texts[1]]
    assert after.box_slots.tolist() == [0, 0, 1]
    assert texts[3] in after.texts           # the only other caption: min(4 - 1, 8) - 2 = 1 negative
  assert leaked == 40 and fixed == 0


def test_capped_caption_in_the_pool_is_masked():
  vocab = V.TextVocabulary(sorted(set(CAPTIONS) | {'background'}), global_pool=[CAPTIONS[2]])
  slots = _sampler(vocab, K=6, neg=(0, 0))(np.array([0]), CAPTIONS[:3], np.random.default_rng(0),
                                           dropped_labels=np.array([2]))
  assert slots.texts == [CAPTIONS[0], 'background'] + [CAPTIONS[2]] * 4
  assert slots.text_mask.tolist() == [True, True, False, False, False, False]
  unmasked = _sampler(vocab, K=6, neg=(0, 0), mask=False)(
      np.array([0]), CAPTIONS[:3], np.random.default_rng(0), dropped_labels=np.array([2]))
  assert unmasked.text_mask.all()
  with pytest.raises(ValueError, match='dropped box caption ids'):
    _sampler(vocab)(np.array([0]), CAPTIONS[:3], np.random.default_rng(0), dropped_labels=np.array([5]))
