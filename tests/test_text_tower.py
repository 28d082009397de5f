"""Caption tokenizer, the trainable text tower, text tables for both text modes, the CLIP BPE builder."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from optisar_jax.text import tokenization
from optisar_jax.text.cache import EmbeddingCache
from optisar_jax.text.tower import TextTower, build_text_table, text_embeddings_for_ids

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'text')
CAPTIONS = ['the ship on the left', 'The large storage tank', 'a bridge over the river', 'SAR ship',
            'the small vehicle near the top right corner', 'two aircraft parked at the terminal', 'background']


def _config(mode='trainable', dim=16):
  c = ml_collections.ConfigDict()
  c.text = ml_collections.ConfigDict()
  c.text.mode = mode
  c.text.dim = dim
  c.text.tower = ml_collections.ConfigDict(dict(vocab_size=96, context_length=12, width=32, layers=1, heads=4,
                                                mlp_ratio=4))
  return c


def _random_tower(config):
  """A TextTower with numpy-random weights: no PRNG-init compilation (slow on a busy 2-core CPU)."""
  abstract = nnx.eval_shape(lambda: TextTower(config.text.tower, out_dim=config.text.dim, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.1, x.shape).astype(x.dtype)), state)
  return nnx.merge(graphdef, state)


def test_caption_tokenizer_build_save_load(tmp_path):
  tokenizer = tokenization.build_caption_tokenizer(CAPTIONS, vocab_size=96)
  assert tokenizer.get_vocab_size() <= 96
  assert [tokenizer.token_to_id(t) for t in ('[PAD]', '[EOT]', '[UNK]')] == [0, 1, 2]
  again = tokenization.build_caption_tokenizer(list(reversed(CAPTIONS)) + CAPTIONS, vocab_size=96)
  assert again.to_str() == tokenizer.to_str()                      # deterministic for the same caption set
  path = str(tmp_path / 'tok' / 'tokenizer.json')
  tokenization.save_caption_tokenizer(tokenizer, path)
  loaded = tokenization.load_caption_tokenizer(path)
  assert os.listdir(tmp_path / 'tok') == ['tokenizer.json']
  ids = tokenization.tokenize(loaded, ['The ship', 'THE SHIP', CAPTIONS[4] * 3, ''], context_length=8)
  assert ids.dtype == np.int32 and ids.shape == (4, 8)
  np.testing.assert_array_equal(ids[0], ids[1])                   # lower-cased
  np.testing.assert_array_equal(ids, tokenization.tokenize(tokenizer, ['The ship', 'THE SHIP', CAPTIONS[4] * 3, ''], 8))
  n = int(np.argmax(ids[0] == tokenization.EOT_ID))
  assert n > 0 and (ids[0, n + 1:] == tokenization.PAD_ID).all()
  assert ids[2, -1] == tokenization.EOT_ID and (ids[2, :-1] > 2).all()  # truncated, EOT kept
  assert list(ids[3]) == [1] + [0] * 7
  with pytest.raises(FileNotFoundError, match='missing.json: caption tokenizer not found'):
    tokenization.load_caption_tokenizer(str(tmp_path / 'missing.json'))
  (tmp_path / 'bad.json').write_text('{"model": ')
  with pytest.raises(ValueError, match='bad.json: malformed tokenizer JSON'):
    tokenization.load_caption_tokenizer(str(tmp_path / 'bad.json'))


def test_tower_forward_backward_and_padding():
  config = _config()
  tower = _random_tower(config)
  tokenizer = tokenization.build_caption_tokenizer(CAPTIONS, vocab_size=96)
  table = build_text_table(config, CAPTIONS, tokenizer=tokenizer)
  assert table.shape == (len(CAPTIONS), 12) and table.dtype == np.int32
  ids = jnp.array([[0, 3, 3], [6, 1, 2]], dtype=jnp.int32)                     # (B,K)
  targets = jax.random.normal(jax.random.key(1), (len(CAPTIONS), 16))

  @nnx.jit
  def forward(model, token_table, text_ids, all_tokens):
    return text_embeddings_for_ids(token_table, text_ids, model), model(all_tokens)

  @nnx.jit
  def train_step(model, optimizer, tokens):
    def loss_fn(m):
      return -jnp.sum(m(tokens) * targets)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads

  scrambled = np.array(table)
  for row in scrambled:                   # anything after [EOT] is invisible (causal attention, EOT pooling)
    eot = int(np.argmax(row == tokenization.EOT_ID))
    row[eot + 1:] = 5
  out, plain = forward(tower, jnp.asarray(table), ids, jnp.asarray(table))
  assert out.shape == (2, 3, 16)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(out[0, 1], out[0, 2])
  _, moved = forward(tower, jnp.asarray(table), ids, jnp.asarray(scrambled))
  np.testing.assert_allclose(moved, plain, atol=1e-6)

  optimizer = nnx.Optimizer(tower, optax.adam(1e-2), wrt=nnx.Param)
  loss0, grads = train_step(tower, optimizer, jnp.asarray(table))
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  loss1, _ = train_step(tower, optimizer, jnp.asarray(table))
  assert float(loss1) < float(loss0)


def test_frozen_text_table_and_modes():
  strings = ['a', 'b', 'c']
  matrix = np.eye(3, 4, dtype=np.float32)
  cache = EmbeddingCache(['c', 'a', 'b'], matrix, 'enc:x:1')
  config = _config('frozen', dim=4)
  table = build_text_table(config, strings, cache=cache)
  np.testing.assert_array_equal(table, matrix[[1, 2, 0]])
  out = text_embeddings_for_ids(jnp.asarray(table), jnp.array([[2, 0]]))
  np.testing.assert_array_equal(out, matrix[[0, 1]][None])
  with pytest.raises(KeyError, match="'d'"):
    build_text_table(config, ['a', 'd'], cache=cache)
  with pytest.raises(ValueError, match='text.dim = 8'):
    build_text_table(_config('frozen', dim=8), strings, cache=cache)
  with pytest.raises(ValueError, match="text.mode"):
    build_text_table(_config('other'), strings, cache=cache)
  small = tokenization.build_caption_tokenizer(CAPTIONS, vocab_size=200)
  config = _config()
  config.text.tower.vocab_size = 20
  with pytest.raises(ValueError, match='vocab_size'):
    build_text_table(config, strings, tokenizer=small)


def test_clip_bpe_builder_matches_open_clip_ids():
  vocab, merges = tokenization.clip_vocab_from_bpe(os.path.join(FIXTURES, 'bpe_tiny.txt.gz'))
  assert len(merges) == 600 and len(vocab) == 512 + 600 + 2
  assert vocab['<|startoftext|>'] == 1112 and vocab['<|endoftext|>'] == 1113
  tokenizer = tokenization.build_clip_tokenizer(os.path.join(FIXTURES, 'bpe_tiny.txt.gz'))
  reference = np.load(os.path.join(FIXTURES, 'openclip_reference.npz'))
  ids = tokenization.hf_token_ids(tokenizer, [str(reference['strings'][0])], 24)[0]
  assert ids == [int(t) for t in reference['token_ids'][0][:len(ids)]]


def test_query_with_unknown_text_warns_once(caplog):
  """A query the trainable tower's tokenizer cannot spell is read as [UNK]: the embedder says so, once."""
  from optisar_jax.config import load_config
  from optisar_jax.data.vocabulary import TextVocabulary
  from optisar_jax.text import run_texts, tokenization
  config = load_config('tiny')
  tokenizer = tokenization.build_caption_tokenizer(['the ship on the left', 'a bridge'], 64)
  texts = run_texts.RunTexts(vocabulary=TextVocabulary(['a bridge']), table=None, tokenizer=tokenizer)
  seen = []
  embedder = run_texts.QueryEmbedder(config, texts, embed_tokens=lambda t: seen.append(t) or np.zeros((len(t), 4)))
  with caplog.at_level('WARNING'):
    embedder(['the ship on the left'])
    assert not [r for r in caplog.records if '[UNK]' in r.getMessage()]
    embedder(['the ship on the left', 'ζ unknown ζ'])
    embedder(['ζζ'])
  warnings = [r for r in caplog.records if '[UNK]' in r.getMessage()]
  assert len(warnings) == 1 and 'ζ unknown ζ' in warnings[0].getMessage()
  assert (seen[1][1] == tokenization.UNK_ID).any()
