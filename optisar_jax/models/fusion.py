"""TGDF-SSA: text-guided dual-gated fusion with spatial shuffle attention (docs/architecture.md section 6).

Paper name: TGDF-SSA (reference class `TGDG_SSA`), neck layers 16, 19 and 22. For x (B,H,W,c1) and a text
guide T (1 or B, K, D):

  x  = SSA(x)                                     spatial-shuffle channel attention
  [y0, y1] = Conv1x1(c1 -> 2c)(x);  y_{j+1} = Bottleneck(y_j) (n times)
  y_att = GatedMaxSigmoidAttn(y_last, T)          text-guided, per-head dual gates
  out = Conv1x1((3+n)c -> c2)(concat[y0, y1, ..., y_att])

`visual(x)` computes everything up to the text (the CSP branches' share of the output conv, and the
attention block's projections), `fuse(visual, text)` the rest; `__call__` is `fuse(visual(x), text)`, so
training and evaluation run the same arithmetic whether or not queries share one image's `visual`.

Gate init (`model.tgdg.gate_init` = (weight_gate, feature_gate)): the reference (0, 0) leaves both gates,
the guide MLP, the temperature, the bias and the embedding conv without gradient forever; our default
(1, 0) starts from the same function (out = conv branch) but lets the text guidance learn.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optisar_jax.models.blocks import Bottleneck
from optisar_jax.models.layers import Conv, LayerOptions, layer_norm, linear, project, require_rngs


@functools.lru_cache(maxsize=None)
def ssa_indices(c: int, groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Static channel maps of SSA on C channels in G groups (C_g = C/G, h = C_g/2), as flat channel numbers.

  The group shuffle puts x[g C_g + s(k)] at position n = (g, k), s(k) = (k mod 2) h + k // 2; the
  attention at (g, k) pools position (g, (k + h) mod C_g) (max for k < h, mean for k >= h); the final
  shuffle puts position S(m) = (m mod 2) C/2 + m // 2 into output channel m. Returns

    source (C,):  the channel of x that output channel m carries: out[m] = x[source[m]] * att[S(m)];
    pooled (C,):  the channel of x whose pooled statistic drives attention position n;
    att_of (C,):  the attention position that scales channel c of x (att_of[source[m]] = S(m)).
  """
  cg = c // groups
  k = np.arange(cg)
  shuffle = (k % 2) * (cg // 2) + k // 2                                  # s(k)
  base = np.repeat(np.arange(groups) * cg, cg)
  position = base + np.tile(shuffle, groups)                              # x channel at position n
  pooled = base + np.tile(shuffle[(k + cg // 2) % cg], groups)
  m = np.arange(c)
  final = (m % 2) * (c // 2) + m // 2                                     # S(m)
  source = position[final]
  att_of = np.empty(c, np.int32)
  att_of[source] = final
  return source, pooled, att_of


class SpatialShuffleAttention(nnx.Module):
  """SSA (C channels, G groups). Per group of C_g = C/G channels, after a 2-way shuffle: the first half
  is scaled by sigmoid(weight_max * GMP(second half) + bias_max), the second by
  sigmoid(weight_avg * GAP(first half) + bias_avg) (the reference's pairing); parameters (C_g/2,) are
  shared by all groups; attention dropout (train mode only); a final 2-way shuffle over all C channels.
  (B,H,W,C) -> (B,H,W,C).

  The parameter names are the reference's (`weight_avg`, `bias_avg`, `weight_max`, `bias_max`): the
  optimizer's groups are decided by name, and a name containing 'bias' is not weight-decayed
  (train/optimizer.py, docs/architecture.md).

  The two shuffles only move channels, so `scale(x)` computes the same thing without moving the map:
  SSA(x)[..., m] = (x * scale(x)[:, None, None])[..., source[m]] (`ssa_indices`), and a 1x1 conv that
  follows SSA can take the permutation into its kernel's rows instead (TGDFSSA does).
  """

  def __init__(self, c: int, groups: int, *, dropout: float):
    if c % (2 * groups):
      raise ValueError(f'SSA: {c} channels are not divisible by 2 * groups = {2 * groups}')
    self.groups = groups
    self.half = c // groups // 2
    self.weight_avg = nnx.Param(jnp.zeros((self.half,)))
    self.bias_avg = nnx.Param(jnp.ones((self.half,)))
    self.weight_max = nnx.Param(jnp.zeros((self.half,)))
    self.bias_max = nnx.Param(jnp.ones((self.half,)))
    self.dropout = dropout
    self.deterministic = False

  def scale(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    """The attention of every channel of x, in x's own channel order: (B,H,W,C) -> (B,C) float32."""
    b, c = x.shape[0], x.shape[-1]
    _, pooled, att_of = ssa_indices(c, self.groups)
    xf = x.astype(jnp.float32)
    first_half = (np.arange(c) % (2 * self.half)) < self.half             # positions scaled by a max
    stat = jnp.where(first_half, xf.max(axis=(1, 2))[:, pooled], xf.mean(axis=(1, 2))[:, pooled])
    stat = stat.reshape(b, self.groups, 2 * self.half)                      # (B,G,C_g): position (g, k)
    att = jax.nn.sigmoid(jnp.concatenate(
        [self.weight_max[...] * stat[..., :self.half] + self.bias_max[...],
         self.weight_avg[...] * stat[..., self.half:] + self.bias_avg[...]], axis=-1))
    if self.dropout > 0 and not self.deterministic:
      key = require_rngs(rngs, 'SSA attention dropout').dropout()
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, att.shape)
      att = jnp.where(keep, att / (1.0 - self.dropout), 0.0)
    return att.reshape(b, c)[:, att_of]

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    source, _, _ = ssa_indices(x.shape[-1], self.groups)
    return jnp.take(x * self.scale(x, rngs=rngs)[:, None, None].astype(x.dtype), source, axis=-1)


class EnhancedGuideProjection(nnx.Module):
  """Guide MLP: t (1|B, K, D) -> Linear(D -> hidden) -> LN -> GELU -> Linear(-> ec) -> LN -> (·, K, nh, ec/nh)."""

  def __init__(self, text_dim: int, hidden: int, embed_channels: int, num_heads: int, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.fc1 = linear(text_dim, hidden, rngs=rngs)
    self.ln1 = layer_norm(hidden, rngs=rngs)
    self.fc2 = linear(hidden, embed_channels, rngs=rngs)
    self.ln2 = layer_norm(embed_channels, rngs=rngs)

  def __call__(self, text: jax.Array) -> jax.Array:
    g = self.ln2(self.fc2(nnx.gelu(self.ln1(self.fc1(text.astype(jnp.float32))), approximate=False)))
    return g.reshape(*g.shape[:-1], self.num_heads, -1)          # head-major split of the ec channels


class GatedMaxSigmoidAttn(nnx.Module):
  """Dual-gated max-sigmoid attention (reference `MaxSigmoidAttnBlock_DualGate_v2`), c -> c.

  s[b,h,w,m] = max_k <e[b,h,w,m,:], g[b,k,m,:]> / tau + beta[m];  A = 1 + wg[m] (sigmoid(s) - 1);
  xp = Conv3x3+BN(x);  out = xp + fg[m] (xp * A - xp), head m owning channels [m c/nh, (m+1) c/nh).
  x (B,H,W,c), text (1|B, K, D) -> (B,H,W,c).
  """

  def __init__(self, c: int, text_dim: int, *, embed_channels: int, num_heads: int, guide_hidden: int,
               gate_init: tuple[float, float], opts: LayerOptions, rngs: nnx.Rngs):
    self.num_heads = num_heads
    head_channels = embed_channels // num_heads
    self.ec = Conv(c, embed_channels, 1, act=False, opts=opts, rngs=rngs) if c != embed_channels else None
    self.gl = EnhancedGuideProjection(text_dim, guide_hidden, embed_channels, num_heads, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((num_heads,)))
    self.temperature = nnx.Param(jnp.full((1,), math.sqrt(head_channels)))
    self.weight_gate = nnx.Param(jnp.full((num_heads,), float(gate_init[0])))
    self.feature_gate = nnx.Param(jnp.full((num_heads,), float(gate_init[1])))
    self.proj_conv = Conv(c, c, 3, act=False, opts=opts, rngs=rngs)

  def visual(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The text-independent half: (embed (B,H,W,ec) = ec(x) or x, xp (B,H,W,c) = Conv3x3+BN(x))."""
    embed = self.ec(x) if self.ec is not None else x
    return embed, self.proj_conv(x)

  def fuse(self, embed: jax.Array, xp: jax.Array, text: jax.Array) -> jax.Array:
    """The text-dependent half: gates `xp` by the max-sigmoid scores of `embed` against the guide."""
    b, h, w, c = xp.shape
    guide = self.gl(text)                                                   # (1|B, K, nh, hc)
    guide = jnp.broadcast_to(guide, (b,) + guide.shape[1:])
    embed = embed.reshape(b, h, w, self.num_heads, -1).astype(jnp.float32)
    scores = jnp.einsum('bhwmc,bkmc->bhwmk', embed, guide).max(axis=-1)      # max over ALL K prompts
    scores = scores / self.temperature[...] + self.bias[...]
    attn = 1.0 + self.weight_gate[...] * (jax.nn.sigmoid(scores) - 1.0)      # (B,H,W,nh)
    xp_heads = xp.reshape(b, h, w, self.num_heads, -1)
    xa = xp_heads * attn[..., None].astype(xp.dtype)
    # The gate multiplies in float32 (fused, no extra traffic) so its gradient is summed in float32.
    gated = (self.feature_gate[...][:, None] * (xa - xp_heads).astype(jnp.float32)).astype(xp.dtype)
    return (xp_heads + gated).reshape(b, h, w, c)

  def __call__(self, x: jax.Array, text: jax.Array) -> jax.Array:
    return self.fuse(*self.visual(x), text)


def _kernel_matrix(conv: Conv) -> tuple[jax.Array, Any]:
  """A 1x1 Conv's kernel as a (C_in, C_out) matrix (its float32 parameter) and the conv's compute dtype."""
  return conv.conv.kernel[...][0, 0], conv.conv.dtype or jnp.float32


def _project(conv: Conv, x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
  """x (..., cin) @ rows of `conv`'s kernel matrix, with the conv's weight-gradient precision."""
  return project(x, kernel, dtype, getattr(conv.conv, 'f32_weight_grads', False))


class TGDFSSA(nnx.Module):
  """TGDF-SSA layer: (B,H,W,c1), text (1|B,K,D) -> (B,H,W,c2), hidden c = int(c2 * e), n bottlenecks."""

  def __init__(self, c1: int, c2: int, n: int, text_dim: int, tgdg_config, *, e: float = 0.5,
               opts: LayerOptions, rngs: nnx.Rngs):
    self.c = int(c2 * e)
    self.ssa = SpatialShuffleAttention(c1, int(tgdg_config.ssa_groups), dropout=float(tgdg_config.ssa_dropout))
    self.cv1 = Conv(c1, 2 * self.c, 1, opts=opts, rngs=rngs)
    self.m = nnx.List([Bottleneck(self.c, self.c, e=0.5, opts=opts, rngs=rngs) for _ in range(n)])
    self.attn = GatedMaxSigmoidAttn(
        self.c, text_dim, embed_channels=int(tgdg_config.embed_channels),
        num_heads=int(tgdg_config.num_heads), guide_hidden=int(tgdg_config.guide_hidden),
        gate_init=tuple(tgdg_config.gate_init), opts=opts, rngs=rngs)
    self.cv2 = Conv((3 + n) * self.c, c2, 1, opts=opts, rngs=rngs)

  def visual(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Everything that does not see the text, computed once per image when several queries share it
    (`OptiSARNet.image_context`, evaluation): (partial, embed, xp).

    partial (B,H,W,c2): the output conv's 1x1 kernel applied to the CSP branches y0..y_{n+1} only (the
    conv is linear in its input channels, so the text branch's share is added in `fuse`); embed and xp:
    the attention block's two projections of y_{n+1}.
    """
    # cv1(SSA(x)) with SSA's channel permutation taken into cv1's kernel rows: sum_m x[source[m]] a[m] K[m]
    # = sum_c (x a)[c] K[inverse[c]], so the map is only scaled, never shuffled.
    source, _, _ = ssa_indices(x.shape[-1], self.ssa.groups)
    kernel, dtype = _kernel_matrix(self.cv1)
    scaled = x * self.ssa.scale(x, rngs=rngs)[:, None, None].astype(x.dtype)
    y = self.cv1.normalize(_project(self.cv1, scaled, kernel[np.argsort(source)], dtype))
    ys = [y[..., :self.c], y[..., self.c:]]
    for block in self.m:
      ys.append(block(ys[-1]))
    kernel, dtype = _kernel_matrix(self.cv2)
    visual_channels = (2 + len(self.m)) * self.c
    partial = _project(self.cv2, jnp.concatenate(ys, axis=-1), kernel[:visual_channels], dtype)
    return (partial, *self.attn.visual(ys[-1]))

  def fuse(self, visual: tuple[jax.Array, jax.Array, jax.Array], text: jax.Array) -> jax.Array:
    """The rest, given `visual(x)`: the text-gated attention branch, its share of the output conv, and
    the output conv's BatchNorm and SiLU."""
    partial, embed, xp = visual
    kernel, dtype = _kernel_matrix(self.cv2)
    y_att = self.attn.fuse(embed, xp, text).astype(dtype)
    out = partial + _project(self.cv2, y_att, kernel[(2 + len(self.m)) * self.c:], dtype)
    return self.cv2.normalize(out)

  def __call__(self, x: jax.Array, text: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.fuse(self.visual(x, rngs=rngs), text)
