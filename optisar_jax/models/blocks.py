"""YOLO11 backbone/neck blocks (docs/architecture.md section 4): Bottleneck, C3k, C3k2, SPPF, C2PSA.

All take and return NHWC maps; channel splits and concats follow the reference order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from optisar_jax.models.layers import Conv, LayerOptions, dw_conv, max_pool_same


class Bottleneck(nnx.Module):
  """h = Conv_k1(c1 -> c2*e) -> Conv_k2(-> c2); out = x + h when shortcut and c1 == c2.

  (B,H,W,c1) -> (B,H,W,c2).
  """

  def __init__(self, c1: int, c2: int, *, shortcut: bool = True, k: tuple[int, int] = (3, 3),
               e: float = 0.5, opts: LayerOptions, rngs: nnx.Rngs):
    hidden = int(c2 * e)
    self.cv1 = Conv(c1, hidden, k[0], opts=opts, rngs=rngs)
    self.cv2 = Conv(hidden, c2, k[1], opts=opts, rngs=rngs)
    self.add = shortcut and c1 == c2

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.cv2(self.cv1(x))
    return x + h if self.add else h


class C3k(nnx.Module):
  """CSP block with 3 convs: concat[Bottlenecks(cv1 x), cv2 x] -> cv3. (B,H,W,c1) -> (B,H,W,c2)."""

  def __init__(self, c1: int, c2: int, n: int = 2, *, e: float = 0.5, k: int = 3, opts: LayerOptions,
               rngs: nnx.Rngs):
    hidden = int(c2 * e)
    self.cv1 = Conv(c1, hidden, 1, opts=opts, rngs=rngs)
    self.cv2 = Conv(c1, hidden, 1, opts=opts, rngs=rngs)
    self.cv3 = Conv(2 * hidden, c2, 1, opts=opts, rngs=rngs)
    self.m = nnx.List([Bottleneck(hidden, hidden, k=(k, k), e=1.0, opts=opts, rngs=rngs)
                       for _ in range(n)])

  def __call__(self, x: jax.Array) -> jax.Array:
    a = self.cv1(x)
    for block in self.m:
      a = block(a)
    return self.cv3(jnp.concatenate([a, self.cv2(x)], axis=-1))


class C3k2(nnx.Module):
  """YOLO11 C3k2 (C2f layout): y = cv1(x) split in [y0, y1]; y_{j+1} = inner(y_j);
  out = cv2(concat[y0, y1, ..., y_{n+1}]). inner = C3k(c, c, 2) if c3k else Bottleneck(c, c, e=0.5).

  (B,H,W,c1) -> (B,H,W,c2), hidden c = int(c2 * e).
  """

  def __init__(self, c1: int, c2: int, n: int = 1, *, c3k: bool = False, e: float = 0.5,
               opts: LayerOptions, rngs: nnx.Rngs):
    self.c = int(c2 * e)
    self.cv1 = Conv(c1, 2 * self.c, 1, opts=opts, rngs=rngs)
    self.cv2 = Conv((2 + n) * self.c, c2, 1, opts=opts, rngs=rngs)
    self.m = nnx.List([
        C3k(self.c, self.c, 2, opts=opts, rngs=rngs) if c3k
        else Bottleneck(self.c, self.c, e=0.5, opts=opts, rngs=rngs)
        for _ in range(n)])

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.cv1(x)
    ys = [y[..., :self.c], y[..., self.c:]]
    for block in self.m:
      ys.append(block(ys[-1]))
    return self.cv2(jnp.concatenate(ys, axis=-1))


class SPPF(nnx.Module):
  """Spatial pyramid pooling (fast). The reference's cv1 has NO activation (unlike stock YOLO11).

  z0 = cv1(x); z_{i+1} = MaxPool5(z_i); out = cv2(concat[z0..z3]). (B,H,W,c1) -> (B,H,W,c2).
  """

  def __init__(self, c1: int, c2: int, k: int = 5, *, opts: LayerOptions, rngs: nnx.Rngs):
    hidden = c1 // 2
    self.k = k
    self.cv1 = Conv(c1, hidden, 1, act=False, opts=opts, rngs=rngs)
    self.cv2 = Conv(4 * hidden, c2, 1, opts=opts, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    zs = [self.cv1(x)]
    for _ in range(3):
      zs.append(max_pool_same(zs[-1], self.k))
    return self.cv2(jnp.concatenate(zs, axis=-1))


class PSAAttention(nnx.Module):
  """Multi-head self-attention over the H*W tokens, with a depthwise positional encoding of V.

  qkv = Conv1x1(c -> heads*(2*key_dim + head_dim)), head-major: per head [q(key_dim), k(key_dim), v(head_dim)].
  out = proj(concat_heads(softmax(q k^T * key_dim^-0.5) v) + pe(V)). (B,H,W,c) -> (B,H,W,c).
  """

  def __init__(self, c: int, num_heads: int, *, attn_ratio: float = 0.5, opts: LayerOptions,
               rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim = c // num_heads
    self.key_dim = int(self.head_dim * attn_ratio)
    self.scale = self.key_dim ** -0.5
    self.qkv = Conv(c, c + 2 * self.key_dim * num_heads, 1, act=False, opts=opts, rngs=rngs)
    self.proj = Conv(c, c, 1, act=False, opts=opts, rngs=rngs)
    self.pe = dw_conv(c, 3, act=False, opts=opts, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    qkv = self.qkv(x).reshape(b, h * w, self.num_heads, 2 * self.key_dim + self.head_dim)
    q = qkv[..., :self.key_dim]
    k = qkv[..., self.key_dim:2 * self.key_dim]
    v = qkv[..., 2 * self.key_dim:]                                      # (B,N,heads,head_dim)
    logits = jnp.einsum('bnhd,bmhd->bhnm', q, k).astype(jnp.float32) * self.scale
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)               # softmax over keys m
    out = jnp.einsum('bhnm,bmhd->bnhd', attn, v).reshape(b, h, w, c)     # channel = head*head_dim + d
    return self.proj(out + self.pe(v.reshape(b, h, w, c)))


class PSABlock(nnx.Module):
  """b = b + Attn(b); b = b + FFN(b), FFN = Conv1x1(c -> 2c, SiLU) -> Conv1x1(2c -> c). Shape-preserving."""

  def __init__(self, c: int, num_heads: int, *, opts: LayerOptions, rngs: nnx.Rngs):
    self.attn = PSAAttention(c, num_heads, opts=opts, rngs=rngs)
    self.ffn1 = Conv(c, 2 * c, 1, opts=opts, rngs=rngs)
    self.ffn2 = Conv(2 * c, c, 1, act=False, opts=opts, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(x)
    return x + self.ffn2(self.ffn1(x))


class C2PSA(nnx.Module):
  """CSP wrapper around n PSABlocks: [a, b] = split(cv1 x); out = cv2(concat[a, PSA^n(b)]).

  (B,H,W,c1) -> (B,H,W,c2), c = int(c2 * e), heads = c // 64 (at least 1, so that the tiny widths
  still build; the reference would fail there).
  """

  def __init__(self, c1: int, c2: int, n: int = 1, *, e: float = 0.5, opts: LayerOptions, rngs: nnx.Rngs):
    self.c = int(c2 * e)
    heads = max(1, self.c // 64)
    self.cv1 = Conv(c1, 2 * self.c, 1, opts=opts, rngs=rngs)
    self.cv2 = Conv(2 * self.c, c2, 1, opts=opts, rngs=rngs)
    self.m = nnx.List([PSABlock(self.c, heads, opts=opts, rngs=rngs) for _ in range(n)])

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.cv1(x)
    a, b = y[..., :self.c], y[..., self.c:]
    for block in self.m:
      b = block(b)
    return self.cv2(jnp.concatenate([a, b], axis=-1))

