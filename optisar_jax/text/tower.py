"""Text embeddings for the detector from per-slot text ids, in the two modes of config.text.mode.

* 'frozen':    (B,K) ids -> rows of the precomputed cache matrix (V,D).
* 'trainable': (B,K) ids -> rows of a token table (V,L) -> TextTower, a small CLIP-architecture tower
               trained with the detector, output L2-normalised (B,K,D).

The run keeps one replicated *text table* (`build_text_table`): (V,D) float32 embeddings (frozen) or
(V,L) int32 token ids (trainable); row i belongs to vocabulary string i. `text_embeddings_for_ids` (and
GroundingModel.embed_texts) turn (B,K) ids into (B,K,D) unit vectors.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optisar_jax.text import clip
from optisar_jax.text import layers
from optisar_jax.text import tokenization


def tower_config(tower: Any, dim: int) -> clip.CLIPTextConfig:
  """config.text.tower (vocab_size, context_length, width, layers, heads, mlp_ratio) + text.dim -> config."""
  return clip.CLIPTextConfig(
      vocab_size=int(tower.vocab_size),
      hidden_size=int(tower.width),
      intermediate_size=int(round(float(tower.mlp_ratio) * int(tower.width))),
      num_hidden_layers=int(tower.layers),
      num_attention_heads=int(tower.heads),
      max_position_embeddings=int(tower.context_length),
      hidden_act='gelu',
      layer_norm_eps=1e-5,
      projection_dim=int(dim),
      eos_token_id=tokenization.EOT_ID,
      pad_token_id=tokenization.PAD_ID)


class TextTower(nnx.Module):
  """Trainable CLIP-architecture tower: token ids (..., L) -> (..., dim) L2-normalised.

  Pools at the first [EOT] (`tokenization.tokenize` always writes one); causal attention, so the
  [PAD]s after it never matter.
  """

  def __init__(self, tower: Any, out_dim: int, *, rngs: nnx.Rngs):
    self.config = tower_config(tower, out_dim)
    self.transformer = clip.CLIPTextTransformer(self.config, rngs=rngs)

  @property
  def dim(self) -> int:
    return self.config.output_dim

  def __call__(self, token_ids: jax.Array) -> jax.Array:
    lead = token_ids.shape[:-1]
    flat = token_ids.reshape(-1, token_ids.shape[-1]).astype(jnp.int32)
    features = self.transformer(flat)
    return layers.l2_normalize(features).reshape(*lead, self.dim)


def text_embeddings_for_ids(text_table: jax.Array, text_ids: jax.Array, tower: TextTower | None = None
                            ) -> jax.Array:
  """(...) vocabulary ids -> (..., D) unit vectors.

  frozen (tower None): rows of the (V,D) float32 embedding table. trainable: the tower applied to the
  rows of the (V,L) int32 token table.
  """
  rows = jnp.take(text_table, text_ids, axis=0)
  if tower is None:
    return rows.astype(jnp.float32)
  return tower(rows)


def build_text_table(config: Any, strings: Sequence[str], *, cache: Any = None, tokenizer: Any = None
                     ) -> np.ndarray:
  """The run's text table, row i for vocabulary string i.

  text.mode 'frozen': float32 (V, text.dim) from `cache` (an EmbeddingCache; KeyError names a missing
  string). 'trainable': int32 (V, text.tower.context_length) token ids from the caption `tokenizer`.
  """
  mode = config.text.mode
  if mode == 'frozen':
    if cache is None:
      raise ValueError('text.mode=frozen needs the embedding cache (text.embeddings_dir)')
    if cache.dim != int(config.text.dim):
      raise ValueError(f'text.dim = {config.text.dim} but the embedding cache {cache.source} has '
                       f'{cache.dim}-d vectors')
    return cache.lookup(list(strings))
  if mode == 'trainable':
    if tokenizer is None:
      raise ValueError('text.mode=trainable needs the caption tokenizer')
    if tokenizer.get_vocab_size() > int(config.text.tower.vocab_size):
      raise ValueError(f'caption tokenizer has {tokenizer.get_vocab_size()} tokens > text.tower.vocab_size '
                       f'{config.text.tower.vocab_size}')
    return tokenization.tokenize(tokenizer, list(strings), int(config.text.tower.context_length))
  raise ValueError(f"config key 'text.mode': expected 'frozen' or 'trainable', got {mode!r}")
