"""The run's text vocabulary: every string a training text slot can hold, and its integer id.

The training pipeline ships text-slot ids (not embeddings); the trainer looks the embeddings up in a
table built in the same order (frozen encoder cache) or embeds the strings itself (trainable tower).

* `training_texts(captions, category_names, data_config)`: the reference's text set T (section 3) plus
  what optisar-jax adds: every stripped training caption, its direction-rewritten forms when flips
  rewrite captions (deviation 11.1), the background text, the category names and the global negative
  pool; then ONE pass of adversarial variants (section 4.2) of all of those. Sorted.
* `global_negative_pool(captions, size)`: the `size` most frequent stripped training captions, ordered by
  (-count, string) (section 3), used to pad the slots.
* `TextVocabulary`: ordered unique strings <-> ids, with the global pool carried along, saved as JSON.
"""

from __future__ import annotations

import collections
from typing import Iterable, Sequence

from optisar_jax.data import text_swaps
from optisar_jax.runtime import paths


def config_value(config, dotted: str, prefix: str = 'data'):
  """`config.a.b` for dotted 'a.b'; KeyError naming the full key when it is missing."""
  node = config
  for part in dotted.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      raise KeyError(f"config key '{prefix + '.' if prefix else ''}{dotted}' does not exist") from None
  return node


class TextVocabulary:
  """Ordered unique strings <-> integer ids (0..len-1).

  Attributes:
    strings: the strings in id order (a tuple).
    global_pool: the global negative pool (strings, all in the vocabulary), in pool order.
  """

  def __init__(self, strings: Iterable[str], global_pool: Sequence[str] = ()):
    ordered = []
    index = {}
    for s in strings:
      if not isinstance(s, str):
        raise TypeError(f'TextVocabulary: entries must be str, got {type(s).__name__}: {s!r}')
      if s not in index:
        index[s] = len(ordered)
        ordered.append(s)
    self.strings: tuple[str, ...] = tuple(ordered)
    self._index = index
    missing = [s for s in global_pool if s not in index]
    if missing:
      raise ValueError(f'TextVocabulary: global pool strings not in the vocabulary: {missing[:3]!r}')
    self.global_pool: tuple[str, ...] = tuple(global_pool)

  def __len__(self) -> int:
    return len(self.strings)

  def __contains__(self, s) -> bool:
    return s in self._index

  def __getitem__(self, i: int) -> str:
    return self.strings[i]

  def __iter__(self):
    return iter(self.strings)

  def __eq__(self, other) -> bool:
    return (isinstance(other, TextVocabulary) and self.strings == other.strings
            and self.global_pool == other.global_pool)

  def __repr__(self) -> str:
    return f'TextVocabulary({len(self)} strings, global_pool={len(self.global_pool)})'

  def index(self, s: str) -> int:
    """Id of `s`; KeyError naming the string when it is not in the vocabulary."""
    try:
      return self._index[s]
    except KeyError:
      raise KeyError(f'text not in the vocabulary: {s!r}') from None

  def get(self, s: str, default=None):
    """Id of `s`, or `default` when absent."""
    return self._index.get(s, default)

  def indices(self, strings: Iterable[str]) -> list[int]:
    """Ids of several strings (KeyError naming the first missing one)."""
    return [self.index(s) for s in strings]

  def global_pool_ids(self) -> list[int]:
    """Ids of the global negative pool, in pool order."""
    return [self._index[s] for s in self.global_pool]

  def to_json_dict(self) -> dict:
    return {'format': 'optisar_jax.TextVocabulary/1', 'strings': list(self.strings),
            'global_pool': list(self.global_pool)}

  def save(self, path: str) -> None:
    """Writes JSON to `path`, local or remote, atomically (`optisar_jax.runtime.paths`)."""
    paths.write_json_atomic(path, self.to_json_dict(), indent=None)

  @classmethod
  def load(cls, path: str) -> 'TextVocabulary':
    """Reads a file written by `save` (local or remote); errors name the file."""
    data = paths.read_json(path, 'vocabulary file')
    if isinstance(data, list):
      data = {'strings': data}
    if not isinstance(data, dict) or not isinstance(data.get('strings'), list):
      raise ValueError(f"{path}: vocabulary JSON needs a 'strings' list")
    try:
      return cls(data['strings'], data.get('global_pool', ()))
    except (TypeError, ValueError) as err:
      raise ValueError(f'{path}: {err}') from None


def global_negative_pool(captions: Iterable[str], size: int) -> list[str]:
  """The `size` most frequent stripped, non-empty captions, ordered by (-count, string).

  `captions` holds one entry per training annotation (repetitions count).
  """
  counts = collections.Counter(c.strip() for c in captions)
  counts.pop('', None)
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  return [s for s, _ in ranked[:max(int(size), 0)]]


def flip_forms(caption: str, horizontal: bool, vertical: bool) -> list[str]:
  """`caption` and every form the training flips can turn it into."""
  forms = [caption]
  if horizontal:
    forms.append(text_swaps.flip_rewrite(caption, horizontal=True))
  if vertical:
    forms += [text_swaps.flip_rewrite(f, horizontal=False) for f in list(forms)]
  return forms


def training_texts(captions: Iterable[str], category_names: Iterable[str], data_config) -> list[str]:
  """Every text the training pipeline can place in a slot, sorted.

  Args:
    captions: the training annotations' captions (one per annotation; stripped here).
    category_names: the dataset's category names.
    data_config: the `data` ConfigDict (reads negatives.background_text, negatives.global_pool_size,
      negatives.word_boundary_swaps, augment.rewrite_directions_on_flip, augment.flipud).
  """
  captions = [c.strip() for c in captions]
  base = {c for c in captions if c}
  rewrite = bool(config_value(data_config, 'augment.rewrite_directions_on_flip'))
  if rewrite:
    # Horizontal rewrites always (so fliplr can be changed without rebuilding the vocabulary); vertical
    # ones (and their combinations) only when vertical flips are configured.
    vertical = float(config_value(data_config, 'augment.flipud')) > 0
    for c in list(base):
      base.update(flip_forms(c, True, vertical))
  base.add(str(config_value(data_config, 'negatives.background_text')))
  base.update(n for n in category_names if n)
  base.update(global_negative_pool(captions, int(config_value(data_config, 'negatives.global_pool_size'))))
  word_boundary = bool(config_value(data_config, 'negatives.word_boundary_swaps'))
  texts = set(base)
  for s in base:
    texts.update(text_swaps.adversarial_variants(s, word_boundary=word_boundary))
  return sorted(texts)


def build_vocabulary(captions: Sequence[str], category_names: Iterable[str], data_config) -> TextVocabulary:
  """`TextVocabulary(training_texts(...))` carrying the global negative pool of these captions."""
  captions = list(captions)
  pool = global_negative_pool(captions, int(config_value(data_config, 'negatives.global_pool_size')))
  return TextVocabulary(training_texts(captions, category_names, data_config), global_pool=pool)


def source_captions(source) -> list[str]:
  """All annotation captions of a record source (one per annotation, stripped), in record order.

  Reads every record; with a TFDS data source that decodes every image, so prefer captions from the
  annotation files when they are at hand.
  """
  out = []
  for i in range(len(source)):
    for c in source[i]['objects']['caption']:
      out.append((c.decode('utf-8') if isinstance(c, bytes) else str(c)).strip())
  return out
