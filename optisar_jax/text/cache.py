"""Frozen text-embedding cache (text.mode = 'frozen'): every training text encoded once, offline.

A cache directory holds
  strings.json     {"encoder_identity": str, "dim": D, "count": N, "strings": [N exact strings]}
  embeddings.npy   float32 (N, D), row i = L2-normalised encoding of strings[i]
and is written to a temporary sibling directory that is renamed into place at the end, so a directory
that exists is complete. A remote cache directory (`gs://...`) is built in a local temporary directory
and uploaded with strings.json last (`optisar_jax.runtime.paths.publish_dir`); `load` checks that the
matrix has one row per string. Keys are exact strings (case and inner spacing matter), as in the reference.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable, Sequence

import numpy as np

from optisar_jax.runtime import paths
from optisar_jax.text.files import read_json_object

STRINGS_FILE = 'strings.json'
EMBEDDINGS_FILE = 'embeddings.npy'


class EmbeddingCache:
  """String -> row of a float32 (N, D) matrix. Build with `write_embedding_cache` or `EmbeddingCache.load`."""

  def __init__(self, strings: Sequence[str], matrix: np.ndarray, encoder_identity: str, source: str = ''):
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(strings):
      raise ValueError(f'{source or "EmbeddingCache"}: {len(strings)} strings but embeddings of shape '
                       f'{matrix.shape}')
    self.strings = list(strings)
    self.matrix = matrix
    self.encoder_identity = str(encoder_identity)
    self.source = source
    self._rows = {}
    for row, s in enumerate(self.strings):
      if s in self._rows:
        raise ValueError(f'{source or "EmbeddingCache"}: duplicate string {s!r}')
      self._rows[s] = row

  def __len__(self) -> int:
    return len(self.strings)

  def __contains__(self, s: str) -> bool:
    return s in self._rows

  @property
  def dim(self) -> int:
    return int(self.matrix.shape[1])

  def index(self, s: str) -> int:
    """Row of `s`; KeyError naming the string (and the cache directory) if absent."""
    try:
      return self._rows[s]
    except KeyError:
      where = f' {self.source}' if self.source else ''
      raise KeyError(f'text {s!r} is not in the embedding cache{where}; rerun '
                     'scripts/prepare_text_embeddings.py for this data and encoder') from None

  def indices(self, strings: Iterable[str]) -> np.ndarray:
    """int32 (n,) rows of the strings."""
    return np.asarray([self.index(s) for s in strings], dtype=np.int32)

  def lookup(self, strings: Iterable[str]) -> np.ndarray:
    """float32 (n, D) embeddings of the strings, in order."""
    return self.matrix[self.indices(strings)].reshape(-1, self.dim)

  def save(self, directory: str) -> None:
    write_embedding_cache(directory, self.strings, self.matrix, self.encoder_identity)

  @classmethod
  def load(cls, directory: str, expected_identity: str | None = None) -> 'EmbeddingCache':
    """Reads a cache directory; errors name the file. expected_identity: the encoder it must come from."""
    strings_path = paths.path(directory) / STRINGS_FILE
    matrix_path = paths.path(directory) / EMBEDDINGS_FILE
    if not paths.isdir(directory):
      raise FileNotFoundError(f'{directory}: embedding cache directory not found')
    if not strings_path.is_file():
      raise FileNotFoundError(f'{strings_path}: caption table not found')
    if not matrix_path.is_file():
      raise FileNotFoundError(f'{matrix_path}: embedding matrix not found')
    table = read_json_object(strings_path, 'caption table')
    if (not isinstance(table.get('strings'), list)
        or not all(isinstance(s, str) for s in table['strings'])
        or not isinstance(table.get('encoder_identity'), str)):
      raise ValueError(f'{strings_path}: expected {{"encoder_identity": str, "strings": [str, ...]}}')
    try:
      with matrix_path.open('rb') as f:
        matrix = np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise ValueError(f'{matrix_path}: unreadable .npy ({e})') from None
    if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[0] != len(table['strings']):
      raise ValueError(f'{matrix_path}: expected float32 ({len(table["strings"])}, D), got {matrix.dtype} '
                       f'{matrix.shape}')
    if expected_identity is not None and table['encoder_identity'] != expected_identity:
      raise ValueError(f'{strings_path}: made with encoder {table["encoder_identity"]!r}, expected '
                       f'{expected_identity!r}')
    return cls(table['strings'], matrix, table['encoder_identity'], source=directory)


def write_embedding_cache(directory: str, strings: Sequence[str], matrix: np.ndarray,
                          encoder_identity: str) -> None:
  """Writes strings.json + embeddings.npy into `directory` (local or remote), replacing it: built in a
  temporary directory, then renamed into place (local) or uploaded with strings.json last (remote)."""
  strings = [str(s) for s in strings]
  matrix = np.asarray(matrix, dtype=np.float32)
  EmbeddingCache(strings, matrix, encoder_identity)        # validates shape and uniqueness
  tmp = paths.staging_dir(directory, prefix='.' + paths.path(directory).name + '.')
  try:
    with open(os.path.join(tmp, STRINGS_FILE), 'w', encoding='utf-8') as f:
      json.dump({'encoder_identity': encoder_identity, 'dim': int(matrix.shape[1]), 'count': len(strings),
                 'strings': strings}, f, ensure_ascii=False, indent=0)
    np.save(os.path.join(tmp, EMBEDDINGS_FILE), matrix, allow_pickle=False)
    paths.publish_dir(tmp, directory, last=[STRINGS_FILE])
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp)


def build_embedding_cache(encoder: Any, strings: Sequence[str], directory: str) -> EmbeddingCache:
  """Encodes the (unique) strings with `encoder.encode` and writes the cache; returns it."""
  strings = list(dict.fromkeys(str(s) for s in strings))
  matrix = encoder.encode(strings) if strings else np.zeros((0, encoder.dim), np.float32)
  write_embedding_cache(directory, strings, matrix, encoder.identity)
  return EmbeddingCache.load(directory)


# ------------------------------------------------------------------------------- training texts


def split_texts(records: Iterable[dict], category_names: Sequence[str]) -> tuple[list[str], list[str]]:
  """TFDS records -> (captions of all objects, names of the categories that occur), captions decoded
  from bytes, in record order (duplicates kept; `training_texts` dedupes)."""
  captions = []
  used = set()
  for record in records:
    objects = record['objects']
    for caption in np.asarray(objects['caption']).reshape(-1):
      captions.append(caption.decode('utf-8') if isinstance(caption, bytes) else str(caption))
    for category in np.asarray(objects['category']).reshape(-1):
      used.add(int(category))
  names = [category_names[i] for i in sorted(used)]
  return captions, names


def read_training_split(config: Any, data_dir: str) -> tuple[list[str], list[str]]:
  """(captions, category names) of config.data.train_split, read with tfds.data_source (images left
  encoded). The same reading as a training run's vocabulary (`optisar_jax.text.run_texts`), so the cache
  holds every string the run can ask for: all category names, used by an annotation or not."""
  from optisar_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.open_source(config, config.data.train_split, skip_images=True, data_dir=data_dir)
  return sources.training_captions(source)


def prepare_text_embeddings(config: Any, data_dir: str, output_dir: str, encoder: Any = None) -> EmbeddingCache:
  """The offline step behind scripts/prepare_text_embeddings.py.

  Training texts = `optisar_jax.data.vocabulary.training_texts(captions, category_names, config.data)`
  (captions, category names, "background" and adversarial variants; sorted unique), encoded with
  `load_text_encoder(config.text.encoder)` (or `encoder`), written to output_dir.
  """
  from optisar_jax.data import vocabulary  # pylint: disable=g-import-not-at-top
  from optisar_jax.text import loading  # pylint: disable=g-import-not-at-top
  if encoder is None:
    if not config.text.encoder:
      raise ValueError('text.encoder: empty; set it to an HF-format encoder directory or hf://repo')
    encoder = loading.load_text_encoder(config.text.encoder, batch_size=int(config.text.encode_batch_size))
  captions, category_names = read_training_split(config, data_dir)
  texts = vocabulary.training_texts(captions, category_names, config.data)
  return build_embedding_cache(encoder, texts, output_dir)
