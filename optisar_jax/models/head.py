"""Grounding head (docs/architecture.md section 7; reference `OptiSARNetPlusPlusDetect`, layer 23).

Per level i (strides 8/16/32) on the neck map x_i (B,H_i,W_i,c_i):
  box branch       Conv3x3 -> Conv3x3 -> conv1x1(+bias 1.0)      -> 4*reg_max DFL logits, side-major [l,t,r,b]
  class embedding  DWConv3x3 -> Conv1x1 -> DWConv3x3 -> Conv1x1 -> conv1x1(+bias 0) -> e_i (B,H,W,embed)
  contrastive      score = exp(lambda_i) <BN_i(e_i), t_hat_k> + beta_i          (region-text logits)
  region grid      conv1x1 -> ReLU -> conv1x1 on e_i -> r_i^2 logits (self-supervised auxiliary task)
Text prompts once: t_hat = L2norm(t + W3(SiLU(u1) * u2)), [u1, u2] = W12 t, W3 zero-initialised (identity).

Our addition: when the text width differs from `embed_dim`, a Linear text projection precedes the
refinement (the reference has text width = embed = 512 and no such layer). No SAVPE (visual prompts are
never used for grounding); the fixed DFL projection lives in box_ops, not here.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from optisar_jax.models.layers import Conv, LayerOptions, batch_norm, conv2d, constant_init, dw_conv, linear


def region_grid_size(level: int, num_regions: int) -> int:
  """Grid side r_i of the region head at level i. The reference evaluates
  max(2, int(sqrt(num_regions) / sqrt(stride / 8))) while its strides are still unset, i.e. with the
  default strides [8, 16, 32]: 16 regions give 4x4 at P3 and 2x2 at P4 and P5."""
  base = int(round(math.sqrt(num_regions)))
  if base * base != num_regions:
    raise ValueError(f'model.num_regions={num_regions} must be a perfect square')
  default_strides = (8, 16, 32)
  stride = default_strides[level] if level < 3 else default_strides[-1] * 2 ** (level - 2)
  return max(2, int(base / math.sqrt(stride / 8.0)))


class SwiGLURefinement(nnx.Module):
  """t_hat = L2norm(t + W3(SiLU(u1) * u2)), [u1, u2] = split(W12 t). (·, K, E) -> (·, K, E)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.w12 = linear(dim, hidden, rngs=rngs)
    self.w3 = linear(hidden // 2, dim, kernel_init=nnx.initializers.zeros_init(),
                     bias_init=nnx.initializers.zeros_init(), rngs=rngs)

  def __call__(self, t: jax.Array) -> jax.Array:
    u1, u2 = jnp.split(self.w12(t), 2, axis=-1)
    return l2_normalize(t + self.w3(nnx.silu(u1) * u2))


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class BNContrastiveHead(nnx.Module):
  """score[b,h,w,k] = exp(logit_scale) * <BN(e)[b,h,w,:], normalize(t[b,k,:])> + bias.

  e (B,H,W,E), prompts (1|B,K,E) -> (B,H,W,K) float32.
  """

  def __init__(self, embed_dim: int, *, logit_scale_init: float, bias_init: float, opts: LayerOptions,
               rngs: nnx.Rngs):
    self.norm = batch_norm(embed_dim, opts, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.full((1,), logit_scale_init))
    self.bias = nnx.Param(jnp.full((1,), bias_init))

  def __call__(self, e: jax.Array, prompts: jax.Array) -> jax.Array:
    e = self.norm(e).astype(jnp.float32)
    prompts = jnp.broadcast_to(l2_normalize(prompts), (e.shape[0],) + prompts.shape[1:])
    score = jnp.einsum('bhwc,bkc->bhwk', e, prompts)
    return score * jnp.exp(self.logit_scale[...]) + self.bias[...]


class SpatialGridHead(nnx.Module):
  """conv1x1(E -> hidden) -> ReLU -> conv1x1(hidden -> r^2): (B,H,W,E) -> (B,H,W,r^2)."""

  def __init__(self, embed_dim: int, grid_size: int, hidden: int, *, opts: LayerOptions, rngs: nnx.Rngs):
    self.grid_size = grid_size
    self.fc1 = conv2d(embed_dim, hidden, 1, use_bias=True, opts=opts, rngs=rngs)
    self.fc2 = conv2d(hidden, grid_size * grid_size, 1, use_bias=True, opts=opts, rngs=rngs)

  def __call__(self, e: jax.Array) -> jax.Array:
    return self.fc2(nnx.relu(self.fc1(e)))


class BoxBranch(nnx.Module):
  """cv2_i: Conv3x3(c -> c2) -> Conv3x3(c2 -> c2) -> conv1x1(c2 -> 4 reg_max, bias 1.0)."""

  def __init__(self, c: int, hidden: int, reg_max: int, *, opts: LayerOptions, rngs: nnx.Rngs):
    self.conv1 = Conv(c, hidden, 3, opts=opts, rngs=rngs)
    self.conv2 = Conv(hidden, hidden, 3, opts=opts, rngs=rngs)
    self.pred = conv2d(hidden, 4 * reg_max, 1, use_bias=True, bias_init=constant_init(1.0), opts=opts,
                       rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.pred(self.conv2(self.conv1(x)))


class ClassEmbeddingBranch(nnx.Module):
  """cv3_i (non-legacy): DWConv3x3 -> Conv1x1(c -> c3) -> DWConv3x3 -> Conv1x1 -> conv1x1(c3 -> E, bias 0)."""

  def __init__(self, c: int, hidden: int, embed_dim: int, *, opts: LayerOptions, rngs: nnx.Rngs):
    self.dw1 = dw_conv(c, 3, opts=opts, rngs=rngs)
    self.pw1 = Conv(c, hidden, 1, opts=opts, rngs=rngs)
    self.dw2 = dw_conv(hidden, 3, opts=opts, rngs=rngs)
    self.pw2 = Conv(hidden, hidden, 1, opts=opts, rngs=rngs)
    self.pred = conv2d(hidden, embed_dim, 1, use_bias=True, bias_init=constant_init(0.0), opts=opts, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.pred(self.pw2(self.dw2(self.pw1(self.dw1(x)))))


class GroundingHead(nnx.Module):
  """The OptiSAR-Net++ head over the three neck maps.

  `refine_text(t (1|B,K,D)) -> t_hat (1|B,K,E)`;
  `__call__(maps, t_hat) -> (box_logits (B,A,4 reg_max), region_text_logits (B,A,K), region_logits tuple of
  (B,H_i,W_i,r_i^2))`, anchors A = sum H_i W_i in level order P3 -> P5, row-major inside a level.
  """

  def __init__(self, in_channels: Sequence[int], text_dim: int, model_config, *, opts: LayerOptions,
               rngs: nnx.Rngs):
    embed_dim = int(model_config.embed_dim)
    reg_max = int(model_config.reg_max)
    nc = int(model_config.bias_init_nc)
    imgsz = float(model_config.bias_init_imgsz)
    strides = tuple(model_config.strides)
    box_hidden = max(16, in_channels[0] // 4, reg_max * 4)
    cls_hidden = max(in_channels[0], min(nc, 100))
    if cls_hidden > embed_dim:
      raise ValueError(f'head: class-branch width {cls_hidden} exceeds model.embed_dim={embed_dim}')
    self.reg_max = reg_max
    self.text_proj = linear(text_dim, embed_dim, rngs=rngs) if text_dim != embed_dim else None
    self.refine = SwiGLURefinement(embed_dim, int(model_config.swiglu_hidden), rngs=rngs)
    self.box = nnx.List([BoxBranch(c, box_hidden, reg_max, opts=opts, rngs=rngs) for c in in_channels])
    self.cls = nnx.List([ClassEmbeddingBranch(c, cls_hidden, embed_dim, opts=opts, rngs=rngs)
                         for c in in_channels])
    self.contrast = nnx.List([
        BNContrastiveHead(embed_dim, logit_scale_init=float(model_config.logit_scale_init),
                          bias_init=math.log(5.0 / nc / (imgsz / s) ** 2), opts=opts, rngs=rngs)
        for s in strides])
    self.region = nnx.List([
        SpatialGridHead(embed_dim, region_grid_size(i, int(model_config.num_regions)),
                        int(model_config.region_hidden), opts=opts, rngs=rngs)
        for i in range(len(in_channels))])

  def refine_text(self, text: jax.Array) -> jax.Array:
    t = text.astype(jnp.float32)
    if self.text_proj is not None:
      t = self.text_proj(t)
    return self.refine(t)

  def __call__(self, maps: Sequence[jax.Array], prompts: jax.Array):
    b = maps[0].shape[0]
    boxes, scores, regions = [], [], []
    for x, box, cls, contrast, region in zip(maps, self.box, self.cls, self.contrast, self.region):
      boxes.append(box(x).astype(jnp.float32).reshape(b, -1, 4 * self.reg_max))
      e = cls(x)
      s = contrast(e, prompts)
      scores.append(s.reshape(b, -1, s.shape[-1]))
      regions.append(region(e).astype(jnp.float32))
    return jnp.concatenate(boxes, axis=1), jnp.concatenate(scores, axis=1), tuple(regions)
