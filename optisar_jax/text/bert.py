"""BERT-family encoder in flax.nnx (HF BertModel; sentence-transformers models such as all-MiniLM-L6-v2).

token ids (B,L), token types (B,L) -> word + position + token-type embeddings -> LayerNorm -> `layers`
post-LN blocks (x = LN(x + attn(x)); x = LN(x + mlp(x))) -> last hidden state (B,L,W) -> masked mean over
the real tokens (sentence-transformers `pooling_mode_mean_tokens`) -> (B,W), not normalised.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optisar_jax.text import layers


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape of a BERT encoder (HF BertConfig field names)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0

  @property
  def output_dim(self) -> int:
    return self.hidden_size

  @classmethod
  def from_hf(cls, config: Any) -> 'BertConfig':
    """From a transformers BertConfig (only absolute position embeddings are supported)."""
    kind = getattr(config, 'position_embedding_type', 'absolute') or 'absolute'
    if kind != 'absolute':
      raise ValueError(f'position_embedding_type {kind!r} is not supported (only "absolute")')
    pad = getattr(config, 'pad_token_id', None)
    return cls(
        vocab_size=int(config.vocab_size),
        hidden_size=int(config.hidden_size),
        intermediate_size=int(config.intermediate_size),
        num_hidden_layers=int(config.num_hidden_layers),
        num_attention_heads=int(config.num_attention_heads),
        max_position_embeddings=int(config.max_position_embeddings),
        type_vocab_size=int(config.type_vocab_size),
        hidden_act=str(config.hidden_act),
        layer_norm_eps=float(config.layer_norm_eps),
        pad_token_id=0 if pad is None else int(pad))


class BertLayer(nnx.Module):
  """Post-LN block, (B,L,W) -> (B,L,W)."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, precision=None):
    width = config.hidden_size
    self.attention = layers.SelfAttention(width, config.num_attention_heads, rngs=rngs, precision=precision)
    self.attention_norm = layers.layer_norm(width, config.layer_norm_eps, rngs)
    self.mlp = layers.MLP(width, config.intermediate_size, config.hidden_act, rngs=rngs, precision=precision)
    self.output_norm = layers.layer_norm(width, config.layer_norm_eps, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attention_norm(x + self.attention(x, mask))
    return self.output_norm(x + self.mlp(x))


class BertEncoder(nnx.Module):
  """`__call__(input_ids (B,L), attention_mask (B,L), token_type_ids (B,L) | None) -> (B,W)` mean-pooled."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, precision=None):
    self.config = config
    width = config.hidden_size
    init = nnx.initializers.normal(0.02)
    self.word_embeddings = nnx.Embed(config.vocab_size, width, embedding_init=init, rngs=rngs)
    self.position_embeddings = nnx.Embed(config.max_position_embeddings, width, embedding_init=init, rngs=rngs)
    self.token_type_embeddings = nnx.Embed(config.type_vocab_size, width, embedding_init=init, rngs=rngs)
    self.embedding_norm = layers.layer_norm(width, config.layer_norm_eps, rngs)
    self.layers = nnx.List([BertLayer(config, rngs=rngs, precision=precision)
                            for _ in range(config.num_hidden_layers)])

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array,
                    token_type_ids: jax.Array | None = None) -> jax.Array:
    """(B,L) -> (B,L,W) last hidden state."""
    length = input_ids.shape[1]
    if length > self.config.max_position_embeddings:
      raise ValueError(f'sequence length {length} > max_position_embeddings '
                       f'{self.config.max_position_embeddings}')
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(length)[None])
         + self.token_type_embeddings(token_type_ids))
    x = self.embedding_norm(x)
    mask = layers.key_padding_mask(attention_mask)
    for layer in self.layers:
      x = layer(x, mask)
    return x

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)
    weights = attention_mask.astype(hidden.dtype)[..., None]
    # sentence-transformers: sum(h * m) / clamp(sum(m), 1e-9)
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


# ---------------------------------------------------------------------------------- weight loading

_LEGACY_NAMES = (('.gamma', '.weight'), ('.beta', '.bias'))


def _canonical(name: str) -> str:
  for old, new in _LEGACY_NAMES:
    if name.endswith(old) and 'LayerNorm' in name:
      return name[:-len(old)] + new
  return name


def hf_prefix(names: Sequence[str]) -> str:
  """The prefix in front of `embeddings.word_embeddings.weight` ('' for BertModel, 'bert.' for heads)."""
  for name in names:
    if name.endswith('embeddings.word_embeddings.weight'):
      return name[:-len('embeddings.word_embeddings.weight')]
  raise KeyError('embeddings.word_embeddings.weight')


def hf_state_to_params(state: dict[str, np.ndarray], config: BertConfig) -> dict[str, np.ndarray]:
  """HF BERT state dict (torch layout) -> {our param path: array}. Raises KeyError naming a missing tensor."""
  state = {_canonical(k): v for k, v in state.items()}
  prefix = hf_prefix(list(state))
  take = lambda name: state[prefix + name]
  out = {
      'word_embeddings.embedding': take('embeddings.word_embeddings.weight'),
      'position_embeddings.embedding': take('embeddings.position_embeddings.weight'),
      'token_type_embeddings.embedding': take('embeddings.token_type_embeddings.weight'),
      'embedding_norm.scale': take('embeddings.LayerNorm.weight'),
      'embedding_norm.bias': take('embeddings.LayerNorm.bias'),
  }
  for i in range(config.num_hidden_layers):
    src = f'encoder.layer.{i}.'
    dst = f'layers.{i}.'
    for ours, theirs in (('query', 'attention.self.query'), ('key', 'attention.self.key'),
                         ('value', 'attention.self.value'), ('out', 'attention.output.dense')):
      out[dst + f'attention.{ours}.kernel'] = take(src + theirs + '.weight').T
      out[dst + f'attention.{ours}.bias'] = take(src + theirs + '.bias')
    out[dst + 'attention_norm.scale'] = take(src + 'attention.output.LayerNorm.weight')
    out[dst + 'attention_norm.bias'] = take(src + 'attention.output.LayerNorm.bias')
    out[dst + 'mlp.fc1.kernel'] = take(src + 'intermediate.dense.weight').T
    out[dst + 'mlp.fc1.bias'] = take(src + 'intermediate.dense.bias')
    out[dst + 'mlp.fc2.kernel'] = take(src + 'output.dense.weight').T
    out[dst + 'mlp.fc2.bias'] = take(src + 'output.dense.bias')
    out[dst + 'output_norm.scale'] = take(src + 'output.LayerNorm.weight')
    out[dst + 'output_norm.bias'] = take(src + 'output.LayerNorm.bias')
  return out
