"""Tokenizers: the CLIP BPE tokenizer built from OpenCLIP's vocabulary file, HF tokenizers of pretrained
encoders, and the small caption tokenizer of the trainable tower.

Caption tokenizer (text.mode = 'trainable'): a lower-casing BPE model trained on the training captions with
the `tokenizers` library. Special tokens: [PAD] = 0, [EOT] = 1, [UNK] = 2. `tokenize` appends [EOT] after
the (truncated) tokens and right-pads with [PAD], so a sequence of context length L holds at most L-1
caption tokens; the tower pools at the [EOT] position.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, trainers

from optisar_jax.runtime import paths

PAD_TOKEN = '[PAD]'
EOT_TOKEN = '[EOT]'
UNK_TOKEN = '[UNK]'
PAD_ID, EOT_ID, UNK_ID = 0, 1, 2

CLIP_BOS = '<|startoftext|>'
CLIP_EOS = '<|endoftext|>'


# ------------------------------------------------------------------------------- CLIP BPE vocabulary


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP reversible byte -> printable unicode character table (256 entries)."""
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(
      range(ord('®'), ord('ÿ') + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_from_bpe(bpe_path: str, max_merges: int | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """OpenCLIP `bpe_simple_vocab_16e6.txt.gz` -> (vocab token->id, merges), ids exactly as OpenCLIP's
  SimpleTokenizer assigns them: 256 byte chars, the same with '</w>', one token per merge, then
  <|startoftext|>, <|endoftext|> (49406, 49407 for the full file).

  The file's first line is a header; OpenCLIP keeps merges[1 : 49152-256-2+1]. max_merges truncates further
  (small test vocabularies).
  """
  if not paths.isfile(bpe_path):
    raise FileNotFoundError(f'{bpe_path}: BPE vocabulary file not found')
  try:
    data = paths.path(bpe_path).read_bytes()
    lines = (gzip.decompress(data) if os.fspath(bpe_path).endswith('.gz') else data).decode('utf-8').split('\n')
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ValueError(f'{bpe_path}: unreadable BPE vocabulary ({e})') from None
  lines = lines[1:49152 - 256 - 2 + 1]
  if max_merges is not None:
    lines = lines[:max_merges]
  merges = []
  for number, line in enumerate(lines, start=2):
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f'{bpe_path}: line {number} is not a merge "a b": {line!r}')
    merges.append((parts[0], parts[1]))
  tokens = list(bytes_to_unicode().values())
  tokens = tokens + [t + '</w>' for t in tokens]
  tokens += [a + b for a, b in merges]
  tokens += [CLIP_BOS, CLIP_EOS]
  vocab = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  if len(vocab) != len(tokens):
    raise ValueError(f'{bpe_path}: merges produce duplicate tokens')
  return vocab, merges


def build_clip_tokenizer(bpe_path: str, max_merges: int | None = None, model_max_length: int = 77):
  """A transformers CLIPTokenizer (tokenizers backend) equal to OpenCLIP's tokenizer for that BPE file.

  Its pad token is <|endoftext|>; padding after the EOT never reaches the EOT output of a causal tower.
  Save it with `.save_pretrained(dir)`.
  """
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  vocab, merges = clip_vocab_from_bpe(bpe_path, max_merges)
  tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
  if tokenizer.convert_tokens_to_ids(CLIP_EOS) != len(vocab) - 1:
    raise ValueError(f'{bpe_path}: built an inconsistent CLIP tokenizer')
  return tokenizer


# ---------------------------------------------------------------------------------- HF tokenizers


def load_hf_tokenizer(model_dir: str):
  """transformers.AutoTokenizer from a local directory; one-line error naming the directory."""
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  names = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'vocab.txt')
  if not any(os.path.isfile(os.path.join(model_dir, n)) for n in names):
    raise FileNotFoundError(f'{model_dir}/tokenizer.json: tokenizer files not found '
                            '(expected tokenizer.json or vocab.json+merges.txt or vocab.txt)')
  try:
    return AutoTokenizer.from_pretrained(model_dir)
  except (OSError, ValueError, json.JSONDecodeError, TypeError) as e:
    raise ValueError(f'{model_dir}/tokenizer.json: cannot load tokenizer ({type(e).__name__}: {e})') from None


def hf_token_ids(tokenizer, strings: Sequence[str], max_length: int) -> list[list[int]]:
  """Token ids with the model's special tokens, truncated to max_length (specials kept), unpadded."""
  encoded = tokenizer(list(strings), add_special_tokens=True, truncation=True, max_length=max_length,
                      padding=False)
  return [list(ids) for ids in encoded['input_ids']]


# ------------------------------------------------------------------------------- caption tokenizer


def build_caption_tokenizer(captions: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
  """Trains a lower-casing BPE tokenizer on the captions (deterministic for the same set of captions).

  Returns a `tokenizers.Tokenizer` with [PAD]=0, [EOT]=1, [UNK]=2 and at most vocab_size tokens.
  """
  texts = sorted({str(c).strip() for c in captions if str(c).strip()})
  if not texts:
    raise ValueError('build_caption_tokenizer: no non-empty captions')
  if vocab_size < 3 + 1:
    raise ValueError(f'build_caption_tokenizer: vocab_size {vocab_size} is too small')
  tokenizer = tokenizers.Tokenizer(models.BPE(unk_token=UNK_TOKEN))
  tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOT_TOKEN, UNK_TOKEN],
                                min_frequency=1, show_progress=False)
  tokenizer.train_from_iterator(texts, trainer=trainer)
  for token, expected in ((PAD_TOKEN, PAD_ID), (EOT_TOKEN, EOT_ID), (UNK_TOKEN, UNK_ID)):
    if tokenizer.token_to_id(token) != expected:
      raise RuntimeError(f'caption tokenizer: {token} got id {tokenizer.token_to_id(token)}, not {expected}')
  return tokenizer


def save_caption_tokenizer(tokenizer: tokenizers.Tokenizer, path: str) -> None:
  """Writes the tokenizer JSON to `path` (local or remote) atomically (`optisar_jax.runtime.paths`)."""
  paths.write_text_atomic(path, tokenizer.to_str(pretty=True))


def load_caption_tokenizer(path: str) -> tokenizers.Tokenizer:
  """Reads a tokenizer JSON written by `save_caption_tokenizer` (local or remote); one-line errors
  naming the file."""
  if not paths.isfile(path):
    raise FileNotFoundError(f'{path}: caption tokenizer not found')
  try:
    tokenizer = tokenizers.Tokenizer.from_str(paths.path(path).read_text(encoding='utf-8'))
  except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
    raise ValueError(f'{path}: malformed tokenizer JSON ({e})') from None
  if tokenizer.token_to_id(EOT_TOKEN) != EOT_ID or tokenizer.token_to_id(PAD_TOKEN) != PAD_ID:
    raise ValueError(f'{path}: not a caption tokenizer ([PAD]=0 and [EOT]=1 expected)')
  return tokenizer


def tokenize(tokenizer: tokenizers.Tokenizer, strings: Sequence[str], context_length: int) -> np.ndarray:
  """Strings -> int32 (N, context_length): tokens[:L-1] + [EOT], right-padded with [PAD]."""
  if context_length < 2:
    raise ValueError(f'context_length must be >= 2, got {context_length}')
  out = np.full((len(strings), context_length), PAD_ID, dtype=np.int32)
  encodings = tokenizer.encode_batch([str(s) for s in strings], add_special_tokens=False)
  for row, encoding in enumerate(encodings):
    ids = encoding.ids[:context_length - 1]
    out[row, :len(ids)] = ids
    out[row, len(ids)] = EOT_ID
  return out
