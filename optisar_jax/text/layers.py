"""Building blocks shared by the text towers: self-attention, activations, layer norm.

All modules take (B, L, W) activations. Attention masks are boolean, True = may attend; they broadcast to
(B, heads, L_query, L_key).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'quick_gelu': quick_gelu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_fast': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The HF `hidden_act` name -> function ('gelu' is the exact erf form, as in torch)."""
  if name not in _ACTIVATIONS:
    raise ValueError(f'unsupported hidden_act {name!r}; known: {sorted(_ACTIVATIONS)}')
  return _ACTIVATIONS[name]


def layer_norm(width: int, epsilon: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # The two-pass variance matches torch.nn.LayerNorm to float32 rounding; the fast one does not.
  return nnx.LayerNorm(width, epsilon=epsilon, use_fast_variance=False, rngs=rngs)


def causal_mask(length: int) -> jax.Array:
  """(1, 1, L, L) bool, True on and below the diagonal."""
  return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def key_padding_mask(attention_mask: jax.Array) -> jax.Array:
  """(B, L) 0/1 or bool -> (B, 1, 1, L) bool."""
  return attention_mask.astype(bool)[:, None, None, :]


class SelfAttention(nnx.Module):
  """Multi-head self-attention with separate q/k/v/out projections (HF layout), (B,L,W) -> (B,L,W)."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, precision=None):
    if width % heads:
      raise ValueError(f'width {width} is not divisible by heads {heads}')
    self.heads = heads
    self.head_dim = width // heads
    make = lambda: nnx.Linear(width, width, precision=precision, rngs=rngs)
    self.query = make()
    self.key = make()
    self.value = make()
    self.out = make()

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    batch, length, width = x.shape
    split = lambda t: t.reshape(batch, length, self.heads, self.head_dim)
    q = split(self.query(x)) * (self.head_dim ** -0.5)
    k = split(self.key(x))
    v = split(self.value(x))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, precision=self.query.precision)
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    context = jnp.einsum('bhqk,bkhd->bqhd', weights, v, precision=self.query.precision)
    return self.out(context.reshape(batch, length, width))


class MLP(nnx.Module):
  """fc1 -> activation -> fc2, (B,L,W) -> (B,L,W)."""

  def __init__(self, width: int, hidden: int, act: str, *, rngs: nnx.Rngs, precision=None):
    self.fc1 = nnx.Linear(width, hidden, precision=precision, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width, precision=precision, rngs=rngs)
    self.act_name = act
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows divided by their L2 norm (float32)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
