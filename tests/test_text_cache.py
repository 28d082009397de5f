"""The frozen text-embedding cache and the offline preparation step (with a fake encoder and data)."""

import json
import os
import sys
import types

import ml_collections
import numpy as np
import pytest

from optisar_jax.text import cache as cache_lib
from optisar_jax.text.cache import EmbeddingCache, build_embedding_cache, write_embedding_cache

STRINGS = ['background', 'SAR ship', 'the ship on the left', 'The ship on the left', 'the  ship', 'café']


class FakeEncoder:
  """Deterministic stand-in for a TextEncoder: a hash of the string, normalised."""
  dim = 8
  identity = 'fake:enc:0123'

  def __init__(self):
    self.calls = []

  def encode(self, strings):
    self.calls.append(list(strings))
    out = np.stack([np.random.default_rng(abs(hash(s)) % 2**32).normal(size=self.dim) for s in strings])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_round_trip_and_lookup(tmp_path):
  encoder = FakeEncoder()
  directory = tmp_path / 'emb'
  cache = build_embedding_cache(encoder, STRINGS + ['SAR ship'], str(directory))
  assert sorted(os.listdir(tmp_path)) == ['emb']                       # written atomically, no leftovers
  assert sorted(os.listdir(directory)) == ['embeddings.npy', 'strings.json']
  assert encoder.calls == [STRINGS]                                     # duplicates encoded once
  loaded = EmbeddingCache.load(str(directory), expected_identity='fake:enc:0123')
  assert loaded.strings == STRINGS and loaded.encoder_identity == 'fake:enc:0123'
  assert loaded.matrix.dtype == np.float32 and loaded.matrix.shape == (6, 8) and loaded.dim == 8
  np.testing.assert_array_equal(loaded.matrix, cache.matrix)
  np.testing.assert_array_equal(loaded.lookup(['café', 'background']), loaded.matrix[[5, 0]])
  assert loaded.lookup([]).shape == (0, 8)
  assert loaded.index('The ship on the left') == 3 and 'the ship on the left' in loaded
  table = json.loads((directory / 'strings.json').read_text(encoding='utf-8'))
  assert table['strings'] == STRINGS and table['dim'] == 8 and table['count'] == 6
  # Rewriting replaces the directory as a whole.
  write_embedding_cache(str(directory), ['x'], np.ones((1, 3), np.float32), 'other')
  assert EmbeddingCache.load(str(directory)).strings == ['x']


def test_missing_string_and_identity_errors(tmp_path):
  directory = str(tmp_path / 'emb')
  build_embedding_cache(FakeEncoder(), STRINGS, directory)
  cache = EmbeddingCache.load(directory)
  with pytest.raises(KeyError, match=r"'the ship on the right' is not in the embedding cache .*emb"):
    cache.lookup(['SAR ship', 'the ship on the right'])
  with pytest.raises(KeyError, match="'sar ship'"):
    cache.index('sar ship')                                             # exact keys: case matters
  with pytest.raises(ValueError, match=r"strings\.json: made with encoder 'fake:enc:0123', expected 'x'"):
    EmbeddingCache.load(directory, expected_identity='x')


def test_malformed_cache_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='embedding cache directory not found'):
    EmbeddingCache.load(str(tmp_path / 'none'))
  directory = tmp_path / 'emb'
  build_embedding_cache(FakeEncoder(), STRINGS, str(directory))
  np.save(directory / 'embeddings.npy', np.zeros((5, 8), np.float32))
  with pytest.raises(ValueError, match=r'embeddings\.npy: expected float32 \(6, D\)'):
    EmbeddingCache.load(str(directory))
  (directory / 'strings.json').write_text('[1, 2')
  with pytest.raises(ValueError, match=r'strings\.json: malformed JSON'):
    EmbeddingCache.load(str(directory))
  (directory / 'embeddings.npy').unlink()
  with pytest.raises(FileNotFoundError, match=r'embeddings\.npy: embedding matrix not found'):
    EmbeddingCache.load(str(directory))
  with pytest.raises(ValueError, match='duplicate'):
    EmbeddingCache(['a', 'a'], np.zeros((2, 2)), 'x')


def test_prepare_text_embeddings_with_fake_data(tmp_path, monkeypatch):
  records = [
      {'objects': {'caption': np.array([b'the ship on the left', b'SAR ship']), 'category': np.array([1, 0])}},
      {'objects': {'caption': np.array([], dtype=object), 'category': np.array([], dtype=np.int64)}},
      {'objects': {'caption': np.array(['caf\u00e9 roof'.encode('utf-8')]), 'category': np.array([3])}},
  ]
  names = ['sar ship', 'optical ship', 'unused', 'building']
  captions, used = cache_lib.split_texts(records, names)
  assert captions == ['the ship on the left', 'SAR ship', 'café roof']
  assert used == ['sar ship', 'optical ship', 'building']

  seen = {}

  def fake_training_texts(captions, category_names, data_config):
    seen['args'] = (list(captions), list(category_names), data_config.name)
    return sorted(set(captions) | set(category_names) | {'background'})

  fake = types.ModuleType('optisar_jax.data.vocabulary')
  fake.training_texts = fake_training_texts
  import optisar_jax.data
  monkeypatch.setitem(sys.modules, 'optisar_jax.data.vocabulary', fake)
  monkeypatch.setattr(optisar_jax.data, 'vocabulary', fake, raising=False)
  monkeypatch.setattr(cache_lib, 'read_training_split', lambda config, data_dir: (captions, used))
  config = ml_collections.ConfigDict({'data': {'name': 'optsar_rsvg', 'train_split': 'train'},
                                      'text': {'encoder': '', 'encode_batch_size': 4}})
  with pytest.raises(ValueError, match='text.encoder'):
    cache_lib.prepare_text_embeddings(config, 'unused', str(tmp_path / 'out'))
  cache = cache_lib.prepare_text_embeddings(config, 'unused', str(tmp_path / 'out'), encoder=FakeEncoder())
  assert seen['args'] == (captions, used, 'optsar_rsvg')
  assert cache.strings == sorted(set(captions) | set(used) | {'background'})
  assert EmbeddingCache.load(str(tmp_path / 'out')).encoder_identity == 'fake:enc:0123'
