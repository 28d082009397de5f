"""CLIP text transformer in flax.nnx (HF CLIPTextModel / CLIPTextModelWithProjection / CLIPModel text half,
OpenCLIP TextTransformer, MobileCLIP2-B text tower).

token ids (B,L) -> token + position embeddings -> `layers` pre-LN causal blocks -> final LN -> the hidden
state at the end-of-text position (EOT pooling) -> optional bias-free projection -> (B,D), not normalised.

EOT position, as HF 5.x CLIPTextModel computes it from `eos_token_id` in the config:
  * eos_token_id == 2 (legacy configs): argmax of the token ids (EOT has the highest id in the CLIP vocab);
  * otherwise: the first position whose id equals eos_token_id (a list of ids: the first that is any of them).
OpenCLIP's `pool_type='argmax'` is the same position for its tokenizer (EOT = 49407, the highest id).
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
class CLIPTextConfig:
  """Shape and behaviour of a CLIP text tower (HF CLIPTextConfig field names)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  projection_dim: int | None = 512     # None = no projection (CLIPTextModel): output width = hidden_size
  eos_token_id: int | tuple[int, ...] = 49407
  pad_token_id: int = 0

  @property
  def output_dim(self) -> int:
    return self.projection_dim or self.hidden_size

  @classmethod
  def from_hf(cls, text_config: Any, projection_dim: int | None) -> 'CLIPTextConfig':
    """From a transformers CLIPTextConfig (defaults already filled in by transformers)."""
    eos = text_config.eos_token_id
    eos = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else int(eos)
    pad = getattr(text_config, 'pad_token_id', None)
    return cls(
        vocab_size=int(text_config.vocab_size),
        hidden_size=int(text_config.hidden_size),
        intermediate_size=int(text_config.intermediate_size),
        num_hidden_layers=int(text_config.num_hidden_layers),
        num_attention_heads=int(text_config.num_attention_heads),
        max_position_embeddings=int(text_config.max_position_embeddings),
        hidden_act=str(text_config.hidden_act),
        layer_norm_eps=float(text_config.layer_norm_eps),
        projection_dim=None if projection_dim is None else int(projection_dim),
        eos_token_id=eos,
        pad_token_id=0 if pad is None else int(pad))

  @classmethod
  def from_open_clip(cls, text_cfg: dict, embed_dim: int, quick_gelu: bool = False) -> 'CLIPTextConfig':
    """From an OpenCLIP model config's `text_cfg` (e.g. MobileCLIP2-B.json) and its `embed_dim`."""
    width = int(text_cfg.get('width', 512))
    return cls(
        vocab_size=int(text_cfg.get('vocab_size', 49408)),
        hidden_size=width,
        intermediate_size=int(width * float(text_cfg.get('mlp_ratio', 4.0))),
        num_hidden_layers=int(text_cfg.get('layers', 12)),
        num_attention_heads=int(text_cfg.get('heads', 8)),
        max_position_embeddings=int(text_cfg.get('context_length', 77)),
        hidden_act='quick_gelu' if quick_gelu else 'gelu',
        layer_norm_eps=1e-5,
        projection_dim=int(embed_dim),
        eos_token_id=int(text_cfg.get('vocab_size', 49408)) - 1,
        pad_token_id=int(text_cfg.get('pad_id', 0)))


def eot_positions(input_ids: jax.Array, eos_token_id: int | Sequence[int]) -> jax.Array:
  """(B,L) int ids -> (B,) int32 pooling positions, HF 5.x CLIPTextModel semantics (module docstring)."""
  if isinstance(eos_token_id, int) and eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
  ids = eos_token_id if isinstance(eos_token_id, (tuple, list)) else (eos_token_id,)
  hit = jnp.zeros(input_ids.shape, dtype=bool)
  for eos in ids:
    hit = hit | (input_ids == eos)
  return jnp.argmax(hit.astype(jnp.int32), axis=-1).astype(jnp.int32)


class CLIPBlock(nnx.Module):
  """Pre-LN residual block: x + attn(ln1(x)); x + mlp(ln2(x)). (B,L,W) -> (B,L,W)."""

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, precision=None):
    width = config.hidden_size
    self.layer_norm1 = layers.layer_norm(width, config.layer_norm_eps, rngs)
    self.self_attn = layers.SelfAttention(width, config.num_attention_heads, rngs=rngs, precision=precision)
    self.layer_norm2 = layers.layer_norm(width, config.layer_norm_eps, rngs)
    self.mlp = layers.MLP(width, config.intermediate_size, config.hidden_act, rngs=rngs, precision=precision)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class CLIPTextTransformer(nnx.Module):
  """CLIP text tower. `__call__(input_ids (B,L), attention_mask (B,L) | None) -> (B, output_dim)`.

  L may be anything up to max_position_embeddings (positions 0..L-1 are used). With the causal mask the
  output at the EOT position does not depend on anything to its right, so right padding never changes it.
  """

  def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, precision=None):
    self.config = config
    width = config.hidden_size
    self.token_embedding = nnx.Embed(config.vocab_size, width,
                                     embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
    self.position_embedding = nnx.Param(
        nnx.initializers.normal(0.01)(rngs.params(), (config.max_position_embeddings, width)))
    self.blocks = nnx.List([CLIPBlock(config, rngs=rngs, precision=precision)
                            for _ in range(config.num_hidden_layers)])
    self.final_layer_norm = layers.layer_norm(width, config.layer_norm_eps, rngs)
    if config.projection_dim:
      self.text_projection = nnx.Linear(width, config.projection_dim, use_bias=False, precision=precision,
                                        kernel_init=nnx.initializers.normal(width ** -0.5), rngs=rngs)
    else:
      self.text_projection = None

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """(B,L) -> (B,L,W) after the final layer norm."""
    length = input_ids.shape[1]
    if length > self.config.max_position_embeddings:
      raise ValueError(f'sequence length {length} > max_position_embeddings '
                       f'{self.config.max_position_embeddings}')
    x = self.token_embedding(input_ids) + self.position_embedding[...][:length][None]
    mask = layers.causal_mask(length)
    if attention_mask is not None:
      mask = mask & layers.key_padding_mask(attention_mask)
    for block in self.blocks:
      x = block(x, mask)
    return self.final_layer_norm(x)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               pool_positions: jax.Array | None = None) -> jax.Array:
    """(B,L) ids -> (B, output_dim) pooled (and projected) features, not normalised.

    pool_positions (B,) overrides the EOT rule (e.g. when the caller already knows each sequence's length).
    """
    hidden = self.hidden_states(input_ids, attention_mask)
    if pool_positions is None:
      pool_positions = eot_positions(input_ids, self.config.eos_token_id)
    pooled = jnp.take_along_axis(hidden, pool_positions[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    if self.text_projection is not None:
      pooled = self.text_projection(pooled)
    return pooled


# ---------------------------------------------------------------------------------- weight loading


def hf_prefix(names: Sequence[str]) -> str:
  """The key prefix in front of `embeddings.token_embedding.weight` ('' or 'text_model.')."""
  for name in names:
    if name.endswith('embeddings.token_embedding.weight'):
      return name[:-len('embeddings.token_embedding.weight')]
  raise KeyError('embeddings.token_embedding.weight')


def hf_state_to_params(state: dict[str, np.ndarray], config: CLIPTextConfig) -> dict[str, np.ndarray]:
  """HF CLIP state dict (torch layout) -> {our param path: array}, paths as in `assign_params`.

  Raises KeyError naming the first missing tensor.
  """
  prefix = hf_prefix(list(state))
  take = lambda name: state[prefix + name]
  out = {
      'token_embedding.embedding': take('embeddings.token_embedding.weight'),
      'position_embedding': take('embeddings.position_embedding.weight'),
      'final_layer_norm.scale': take('final_layer_norm.weight'),
      'final_layer_norm.bias': take('final_layer_norm.bias'),
  }
  for i in range(config.num_hidden_layers):
    src = f'encoder.layers.{i}.'
    dst = f'blocks.{i}.'
    for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj'), ('out', 'out_proj')):
      out[dst + f'self_attn.{ours}.kernel'] = take(src + f'self_attn.{theirs}.weight').T
      out[dst + f'self_attn.{ours}.bias'] = take(src + f'self_attn.{theirs}.bias')
    for ln in ('layer_norm1', 'layer_norm2'):
      out[dst + f'{ln}.scale'] = take(src + f'{ln}.weight')
      out[dst + f'{ln}.bias'] = take(src + f'{ln}.bias')
    for fc in ('fc1', 'fc2'):
      out[dst + f'mlp.{fc}.kernel'] = take(src + f'mlp.{fc}.weight').T
      out[dst + f'mlp.{fc}.bias'] = take(src + f'mlp.{fc}.bias')
  if config.projection_dim:
    # CLIPModel / CLIPTextModelWithProjection keep the projection outside the `text_model.` prefix.
    if 'text_projection.weight' not in state:
      raise KeyError('text_projection.weight')
    out['text_projection.kernel'] = state['text_projection.weight'].T
  return out
