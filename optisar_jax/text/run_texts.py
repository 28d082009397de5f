"""The texts of a run: its vocabulary, its text table, and how unseen queries are embedded.

A run's vocabulary (every training caption, their flip rewrites and adversarial variants, "background",
the category names, the global negative pool) is computed once from the training split and stored in
WORKDIR/text/vocabulary.json, so a resumed run, the evaluator and the exporter see the same ids. In
`trainable` text mode the caption tokenizer is stored beside it (WORKDIR/text/tokenizer.json). In
`frozen` mode the text table comes from the embedding cache of `text.embeddings_dir`
(scripts/prepare_text_embeddings.py), and evaluation embeds queries that are not in the cache with the
encoder named by `text.encoder`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from optisar_jax.data.vocabulary import TextVocabulary, build_vocabulary
from optisar_jax.runtime import paths

TEXT_SUBDIR = 'text'
VOCABULARY_FILE = 'vocabulary.json'
TOKENIZER_FILE = 'tokenizer.json'


@dataclasses.dataclass
class RunTexts:
  """vocabulary; table (V,D) float32 (frozen) or (V,L) int32 (trainable); tokenizer or cache."""
  vocabulary: TextVocabulary
  table: np.ndarray
  tokenizer: Any = None
  cache: Any = None


def text_dir(workdir: str) -> str:
  """WORKDIR/text (absolute when local; a URL such as gs://bucket/run/text when remote)."""
  return str(paths.path(workdir) / TEXT_SUBDIR)


def prepare_run_texts(config: ml_collections.ConfigDict, workdir: str,
                      open_caption_source: Callable[[], Any]) -> RunTexts:
  """The run's texts, built from the training split on the first start and reloaded afterwards."""
  directory = text_dir(workdir)
  vocab_path = paths.path(directory) / VOCABULARY_FILE
  tokenizer_path = paths.path(directory) / TOKENIZER_FILE
  main = jax.process_index() == 0
  captions = None
  if paths.isfile(vocab_path):
    vocabulary = TextVocabulary.load(vocab_path)
  else:
    from optisar_jax.data.sources import training_captions
    captions, category_names = training_captions(open_caption_source())
    vocabulary = build_vocabulary(captions, category_names, config.data)
    if main:
      vocabulary.save(vocab_path)
  strings = list(vocabulary)
  if config.text.mode == 'trainable':
    from optisar_jax.text import tokenization
    if paths.isfile(tokenizer_path):
      tokenizer = tokenization.load_caption_tokenizer(tokenizer_path)
    else:
      tokenizer = tokenization.build_caption_tokenizer(strings, int(config.text.tower.vocab_size))
      if main:
        tokenization.save_caption_tokenizer(tokenizer, tokenizer_path)
    return _with_table(config, vocabulary, tokenizer=tokenizer)
  return _with_table(config, vocabulary, cache=_load_cache(config))


def _load_cache(config):
  from optisar_jax.text.cache import EmbeddingCache
  if not config.text.embeddings_dir:
    raise ValueError("config key 'text.embeddings_dir' is empty: text.mode=frozen needs the embedding cache "
                     'written by scripts/prepare_text_embeddings.py')
  return EmbeddingCache.load(config.text.embeddings_dir)


def _with_table(config, vocabulary, *, tokenizer=None, cache=None) -> RunTexts:
  from optisar_jax.text.tower import build_text_table
  table = build_text_table(config, list(vocabulary), cache=cache, tokenizer=tokenizer)
  return RunTexts(vocabulary=vocabulary, table=np.asarray(table), tokenizer=tokenizer, cache=cache)


def load_run_texts(config: ml_collections.ConfigDict, workdir: str) -> RunTexts:
  """The texts of a trained run (for evaluation, inference and export)."""
  directory = text_dir(workdir)
  vocabulary = TextVocabulary.load(paths.path(directory) / VOCABULARY_FILE)
  if config.text.mode == 'trainable':
    from optisar_jax.text import tokenization
    tokenizer = tokenization.load_caption_tokenizer(paths.path(directory) / TOKENIZER_FILE)
    return _with_table(config, vocabulary, tokenizer=tokenizer)
  return _with_table(config, vocabulary, cache=_load_cache(config))


class QueryEmbedder:
  """Embeds free-text queries the way the run embeds its training texts.

  frozen: cache rows where the string is cached, else the encoder of `text.encoder` (loaded on first
  need). trainable: the caption tokenizer + the run's trained tower (weights passed in).
  Returns float32 (N, D) unit vectors.
  """

  def __init__(self, config: ml_collections.ConfigDict, texts: RunTexts, embed_tokens: Callable | None = None):
    self.config = config
    self.texts = texts
    self.embed_tokens = embed_tokens
    self._encoder = None
    self._warned_unknown = False

  def _warn_unknown(self, strings: Sequence[str], tokens: np.ndarray) -> None:
    """Warns once when a query holds text the trainable tower's tokenizer cannot spell (it becomes [UNK],
    which the tower never learned to read)."""
    from optisar_jax.text import tokenization
    if self._warned_unknown:
      return
    unknown = [s for s, row in zip(strings, tokens) if (row == tokenization.UNK_ID).any()]
    if unknown:
      self._warned_unknown = True
      logging.warning('%d quer%s contain text the trained tokenizer does not know and is read as [UNK], '
                      'e.g. %r (warned once)', len(unknown), 'y' if len(unknown) == 1 else 'ies', unknown[0])

  def __call__(self, strings: Sequence[str]) -> np.ndarray:
    strings = [s.strip() for s in strings]
    if self.config.text.mode == 'trainable':
      from optisar_jax.text import tokenization
      if not strings:
        return np.zeros((0, int(self.config.text.dim)), np.float32)
      tokens = tokenization.tokenize(self.texts.tokenizer, strings, int(self.config.text.tower.context_length))
      self._warn_unknown(strings, tokens)
      return np.asarray(self.embed_tokens(tokens), np.float32)
    out = np.zeros((len(strings), int(self.config.text.dim)), np.float32)
    missing = []
    for i, s in enumerate(strings):
      if s in self.texts.cache:
        out[i] = self.texts.cache.lookup([s])[0]
      else:
        missing.append(i)
    if missing:
      if self._encoder is None:
        if not self.config.text.encoder:
          raise KeyError(f'query {strings[missing[0]]!r} is not in the embedding cache and '
                         "config key 'text.encoder' names no encoder to embed it")
        from optisar_jax.text.loading import load_text_encoder
        self._encoder = load_text_encoder(self.config.text.encoder)
      out[missing] = self._encoder.encode([strings[i] for i in missing])
    return out
