"""PL-MoE: the patch-level shared-LoRA mixture of experts of backbone layer 8 (docs/architecture.md section 5).

Paper name: PL-MoE (reference class `PLoRA_MoE`). Data flow for an input (B,H,W,c1):

  PLMoE (CSP)      y = Conv1x1(c1 -> 2c)(x) = [y0, y1];  y_{j+1} = DAAMBlock(y_j);  out = Conv1x1((2+n)c -> c2)
  DAAMBlock        a = DAA(BN1 x) * ls_daa;  m, aux = PatchMoE(BN2(x + a));  out = x + m * ls_moe
                   (the final residual adds to x, not to x + a: a reference quirk kept on purpose)
  PatchMoE         partition into patches (P, ph, pw, c) -> cosine top-k gate on the patch means
                   -> shared convs with per-patch mixed LoRA deltas -> un-partition
  aux              loss_coef * E * sum_e f_e P_e (Switch-Transformer load balance), summed over blocks

Each patch is processed as an isolated tiny image: the experts' 3x3 convs zero-pad at patch borders.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from optisar_jax.models import precision
from optisar_jax.models.layers import (Conv, LayerOptions, batch_norm, constant_init, conv2d, conv_within_patches,
                                       linear, normal_init, require_rngs, uniform_init)

# Patches of at most this many pixels convolve as one matmul (`conv_within_patches`); larger ones as a
# batched convolution. The matmul holds (ph*pw)^2 taps where at most 9*ph*pw exist: 16 pixels (4x4)
# is still cheaper than XLA's convolution over tiny images.
MATMUL_PATCH_PIXELS = 16


# ---------------------------------------------------------------------------------- patch partition

def patch_size_for(size: int, target_patches: int, min_patch: int, max_patch: int) -> int:
  """The reference rule: the divisor of `size` nearest to clamp(size // target_patches, min, max),
  searching ideal - d before ideal + d for d = 0, 1, ...; 1 when nothing closer divides.

  20 -> 2 (10 patches per side at 640 px input, P5 = 20).
  """
  ideal = max(min_patch, min(max_patch, size // target_patches))
  for delta in range(ideal):
    if ideal - delta >= 1 and size % (ideal - delta) == 0:
      return ideal - delta
    if ideal + delta <= size and size % (ideal + delta) == 0:
      return ideal + delta
  return 1


def partition_patches(x: jax.Array, patch_h: int, patch_w: int) -> jax.Array:
  """(B,H,W,C) -> (B*nh*nw, ph, pw, C), patches in (b, row, col) order.

  H and W that are not multiples of the patch are zero-padded at the bottom/right first.
  """
  b, h, w, c = x.shape
  pad_h, pad_w = (-h) % patch_h, (-w) % patch_w
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  nh, nw = (h + pad_h) // patch_h, (w + pad_w) // patch_w
  x = x.reshape(b, nh, patch_h, nw, patch_w, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * nh * nw, patch_h, patch_w, c)


def unpartition_patches(patches: jax.Array, batch: int, height: int, width: int) -> jax.Array:
  """Inverse of `partition_patches`: (B*nh*nw, ph, pw, C) -> (B,H,W,C), padding cropped away."""
  _, ph, pw, c = patches.shape
  nh, nw = -(-height // ph), -(-width // pw)
  x = patches.reshape(batch, nh, nw, ph, pw, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, nh * ph, nw * pw, c)[:, :height, :width]


# -------------------------------------------------------------------------------------------- gate

def router_width(c: int, gate_dim: int = 0) -> int:
  """Width of the cosine router's projection for a block of c channels: `model.moe.gate_dim` when > 0,
  else the reference's min(c // 2, 256) (64 at scale n, 128 at s/m/l, 192 at x)."""
  if gate_dim < 0:
    raise ValueError(f"config key 'model.moe.gate_dim': {gate_dim} must be >= 0 (0 = min(c // 2, 256))")
  return int(gate_dim) if gate_dim > 0 else min(c // 2, 256)


class CosineTopKGate(nnx.Module):
  """Cosine router with noisy top-k selection (noise only in train mode).

  logits = normalize(Linear(g)) . normalize_columns(S) * exp(min(tau, ln 100)) [+ eps * (softplus(g W_noise)
  + 0.01) in training]; router_prob = softmax(logits); gates = softmax over the top-k logits, zero elsewhere.
  g: (P, C) patch means -> gates (P,E), router_prob (P,E), dispatch mask (P,E).
  """

  def __init__(self, dim: int, num_experts: int, top_k: int, *, proj_dim: int, noisy: bool,
               rngs: nnx.Rngs):
    self.num_experts = num_experts
    self.top_k = top_k
    self.noisy = noisy
    self.projector = linear(dim, proj_dim, rngs=rngs)
    self.sim_matrix = nnx.Param(normal_init(0.01)(rngs.params(), (proj_dim, num_experts)))
    self.temperature = nnx.Param(jnp.full((1,), math.log(2.0)))   # logit scale 2 at init
    self.clamp_max = math.log(100.0)
    self.w_noise = nnx.Param(jnp.zeros((dim, num_experts))) if noisy else None
    self.deterministic = False

  def __call__(self, g: jax.Array, *, rngs: nnx.Rngs | None = None):
    g = g.astype(jnp.float32)
    proj = self.projector(g)
    proj = proj / jnp.maximum(jnp.linalg.norm(proj, axis=-1, keepdims=True), 1e-12)
    sim = self.sim_matrix[...]
    sim = sim / jnp.maximum(jnp.linalg.norm(sim, axis=0, keepdims=True), 1e-12)
    logits = proj @ sim * jnp.exp(jnp.minimum(self.temperature[...], self.clamp_max))
    if self.noisy and not self.deterministic:
      key = require_rngs(rngs, 'PL-MoE gate noise').noise()
      noise_std = jax.nn.softplus(g @ self.w_noise[...]) + 1e-2
      logits = logits + jax.random.normal(key, logits.shape) * noise_std
    router_prob = jax.nn.softmax(logits, axis=-1)
    top_logits, top_idx = jax.lax.top_k(logits, self.top_k)
    one_hot = jax.nn.one_hot(top_idx, self.num_experts, dtype=logits.dtype)     # (P,k,E)
    gates = jnp.einsum('pk,pke->pe', jax.nn.softmax(top_logits, axis=-1), one_hot)
    dispatch = one_hot.sum(axis=1)
    return gates, router_prob, dispatch


def balance_loss(router_prob: jax.Array, dispatch: jax.Array, loss_coef: float, *, groups: int = 1
                 ) -> jax.Array:
  """coef * E * sum_e f_e P_e; f_e = share of patches dispatched to e (no gradient), P_e = mean router
  probability. Uniform routing gives coef * top_k, the minimum.

  router_prob, dispatch: (P, E), patches in image-major order. With `groups` > 1 the patches split into
  that many consecutive groups (of whole images), the loss is computed per group and averaged: the
  reference computes it per GPU (8 images) and averages over GPUs through the gradient all-reduce.
  """
  num_experts = router_prob.shape[-1]
  router_prob = router_prob.reshape(groups, -1, num_experts)
  dispatch = dispatch.reshape(groups, -1, num_experts)
  f = jax.lax.stop_gradient(dispatch.mean(axis=1))
  p = router_prob.mean(axis=1)
  return loss_coef * num_experts * jnp.mean(jnp.sum(f * p, axis=-1))


# ----------------------------------------------------------------------------------------- experts

class SharedLoRAExperts(nnx.Module):
  """Shared convs with per-expert full LoRA deltas mixed by the sparse gates (double LoRA).

  h = SiLU(BN(conv3x3(c -> c_mid)(p)));  h += s * M1_n h;  o = BN(conv3x3(c_mid -> c)(h));  o += s * M2_n o,
  M_n = sum_e G[n,e] A_e B_e. patches (P, ph, pw, c), gates (P, E) -> (P, ph, pw, c).
  """

  def __init__(self, c: int, num_experts: int, rank: int, *, expansion: float = 0.5,
               lora_scale_init: float = 0.1, opts: LayerOptions, rngs: nnx.Rngs):
    c_mid = int(c * expansion)
    self.conv1 = Conv(c, c_mid, 3, opts=opts, rngs=rngs)
    self.conv2 = Conv(c_mid, c, 3, act=False, opts=opts, rngs=rngs)
    # torch kaiming_uniform_(a=sqrt(5)) on an (E, C, r) tensor: fan_in = C * r.
    self.lora1_a = nnx.Param(uniform_init(1 / math.sqrt(c_mid * rank))(rngs.params(), (num_experts, c_mid, rank)))
    self.lora1_b = nnx.Param(jnp.zeros((num_experts, rank, c_mid)))
    self.lora2_a = nnx.Param(uniform_init(1 / math.sqrt(c * rank))(rngs.params(), (num_experts, c, rank)))
    self.lora2_b = nnx.Param(jnp.zeros((num_experts, rank, c)))
    self.lora_scale = nnx.Param(jnp.full((1,), lora_scale_init))
    self.f32_weight_grads = opts.f32_weight_grads

  def _lora(self, x: jax.Array, gates: jax.Array, a: nnx.Param, b: nnx.Param) -> jax.Array:
    """x + s * M_p x per pixel, M_p = sum_e G[p,e] A_e B_e (C,C), kept low rank: every pixel is projected
    by each expert's B_e (rank r), scaled by the patch's gates and mapped back by A_e; the (C,C) deltas
    and their per-patch mixtures are never formed (the same sum in another order)."""
    dtype = x.dtype
    if self.f32_weight_grads:   # float32 gradients for A, B and s (layers.LayerOptions.f32_weight_grads)
      low = precision.einsum('pxyd,erd->pxyer', x, b[...], dtype=dtype)      # (P,ph,pw,E,r)
      low = low * gates.astype(dtype)[:, None, None, :, None]
      mixed = precision.einsum('pxyer,ecr->pxyc', low, a[...], dtype=dtype)
      return x + (self.lora_scale[...] * mixed.astype(jnp.float32)).astype(dtype)
    low = jnp.einsum('pxyd,erd->pxyer', x, b[...].astype(dtype))            # (P,ph,pw,E,r)
    low = low * gates.astype(dtype)[:, None, None, :, None]
    mixed = jnp.einsum('pxyer,ecr->pxyc', low, a[...].astype(dtype))
    return x + self.lora_scale[...].astype(dtype) * mixed

  def _conv(self, conv: Conv, patches: jax.Array, batch: int) -> jax.Array:
    """Conv+BN(+SiLU) of every patch on its own (zero padding at patch borders). The BatchNorm sees the
    patches as (batch, patches per image, ph, pw, C), so its statistic groups are groups of images."""
    _, ph, pw, _ = patches.shape
    if ph * pw <= MATMUL_PATCH_PIXELS:
      y = conv_within_patches(patches, conv.conv.kernel[...], conv.conv.dtype or patches.dtype,
                              self.f32_weight_grads)
    else:
      y = conv.conv(patches)
    return conv.normalize(y.reshape(batch, -1, *y.shape[1:])).reshape(y.shape)

  def __call__(self, patches: jax.Array, gates: jax.Array, batch: int) -> jax.Array:
    """patches (P = batch * patches per image, ph, pw, c) in image-major order, gates (P, E)."""
    h = self._lora(self._conv(self.conv1, patches, batch), gates, self.lora1_a, self.lora1_b)
    return self._lora(self._conv(self.conv2, h, batch), gates, self.lora2_a, self.lora2_b)


class PatchMoE(nnx.Module):
  """Patch-level MoE (reference `PatchSharedLoRAMoE`): (B,H,W,c) -> ((B,H,W,c), aux scalar)."""

  def __init__(self, c: int, moe_config, *, opts: LayerOptions, rngs: nnx.Rngs):
    self.target_patches = int(moe_config.target_patches)
    self.min_patch = int(moe_config.min_patch)
    self.max_patch = int(moe_config.max_patch)
    self.loss_coef = float(moe_config.loss_coef)
    self.gate = CosineTopKGate(c, int(moe_config.num_experts), int(moe_config.top_k),
                               proj_dim=router_width(c, int(moe_config.gate_dim)),
                               noisy=bool(moe_config.noisy_gating),
                               rngs=rngs)
    self.experts = SharedLoRAExperts(c, int(moe_config.num_experts), int(moe_config.rank),
                                     lora_scale_init=float(moe_config.lora_scale_init), opts=opts, rngs=rngs)
    self.group_size = opts.bn_group_size
    # Set on a merged copy by optisar_jax/routing.py (never in training or the exported predict): the call
    # then also records each patch's top-1 expert, (B, nh, nw) int32, as the nnx.Intermediate `routing`.
    self.record_routing = False

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    b, h, w, _ = x.shape
    ph = patch_size_for(h, self.target_patches, self.min_patch, self.max_patch)
    pw = patch_size_for(w, self.target_patches, self.min_patch, self.max_patch)
    patches = partition_patches(x, ph, pw)
    gates, router_prob, dispatch = self.gate(patches.mean(axis=(1, 2)), rngs=rngs)
    if self.record_routing:
      grid = (b, -(-h // ph), -(-w // pw))
      self.sow(nnx.Intermediate, 'routing', jnp.argmax(gates, axis=-1).astype(jnp.int32).reshape(grid))
    out = unpartition_patches(self.experts(patches, gates, b), b, h, w)
    # Groups of whole images, as BatchNorm's; a symbolic batch (jax.export of inference, where the loss is
    # unused) is one group.
    groups = b // self.group_size if isinstance(b, int) and 0 < self.group_size < b else 1
    return out, balance_loss(router_prob, dispatch, self.loss_coef, groups=groups)


# --------------------------------------------------------------------------------------------- DAA

class DualAdaptiveAttention(nnx.Module):
  """DAA(u) = u * ca * sa; ca = sigmoid(MLP(GAP u)) per channel, sa = sigmoid(conv(ReLU(BN(conv u))))
  per pixel (reduction r). (B,H,W,c) -> (B,H,W,c)."""

  def __init__(self, c: int, reduction: int, *, opts: LayerOptions, rngs: nnx.Rngs):
    mid = c // reduction
    self.fc1 = linear(c, mid, dtype=opts.dtype, f32_weight_grads=opts.f32_weight_grads, rngs=rngs)
    self.fc2 = linear(mid, c, dtype=opts.dtype, f32_weight_grads=opts.f32_weight_grads, rngs=rngs)
    self.sa_conv1 = conv2d(c, mid, 1, use_bias=True, opts=opts, rngs=rngs)
    self.sa_bn = batch_norm(mid, opts, rngs=rngs)
    self.sa_conv2 = conv2d(mid, 1, 1, use_bias=True, opts=opts, rngs=rngs)

  def __call__(self, u: jax.Array) -> jax.Array:
    ca = nnx.sigmoid(self.fc2(nnx.relu(self.fc1(u.mean(axis=(1, 2))))))          # (B,c)
    sa = nnx.sigmoid(self.sa_conv2(nnx.relu(self.sa_bn(self.sa_conv1(u)))))       # (B,H,W,1)
    return u * ca[:, None, None, :] * sa


class DAAMBlock(nnx.Module):
  """DAAM + shared-LoRA patch MoE block (reference `DAAM_SharedLoRA_MoE_Block`, layer_scale=True).

  (B,H,W,c) -> ((B,H,W,c), aux).
  """

  def __init__(self, c: int, moe_config, *, opts: LayerOptions, rngs: nnx.Rngs):
    self.use_daa = bool(moe_config.use_daa)
    self.norm1 = batch_norm(c, opts, rngs=rngs)
    self.norm2 = batch_norm(c, opts, rngs=rngs)
    self.daa = (DualAdaptiveAttention(c, int(moe_config.daa_reduction), opts=opts, rngs=rngs)
                if self.use_daa else None)
    self.moe = PatchMoE(c, moe_config, opts=opts, rngs=rngs)
    self.layer_scale_daa = nnx.Param(constant_init(moe_config.layer_scale_init)(None, (c,)))
    self.layer_scale_moe = nnx.Param(constant_init(moe_config.layer_scale_init)(None, (c,)))

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    residual = x
    if self.use_daa:
      x = residual + self.daa(self.norm1(x)) * self.layer_scale_daa[...].astype(x.dtype)
      moe_in = self.norm2(x)
    else:
      moe_in = self.norm1(x)
    m, aux = self.moe(moe_in, rngs=rngs)
    return residual + m * self.layer_scale_moe[...].astype(m.dtype), aux


class PLMoE(nnx.Module):
  """PL-MoE layer (reference `PLoRA_MoE`): CSP wrapper around n DAAM blocks.

  (B,H,W,c1) -> ((B,H,W,c2), aux = sum of the blocks' balance losses), hidden c = int(c2 * e).
  """

  def __init__(self, c1: int, c2: int, n: int, moe_config, *, e: float = 0.5, opts: LayerOptions,
               rngs: nnx.Rngs):
    self.c = int(c2 * e)
    self.cv1 = Conv(c1, 2 * self.c, 1, opts=opts, rngs=rngs)
    self.cv2 = Conv((2 + n) * self.c, c2, 1, opts=opts, rngs=rngs)
    self.m = nnx.List([DAAMBlock(self.c, moe_config, opts=opts, rngs=rngs) for _ in range(n)])

  def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
    y = self.cv1(x)
    ys = [y[..., :self.c], y[..., self.c:]]
    aux = jnp.zeros((), jnp.float32)
    for block in self.m:
      out, block_aux = block(ys[-1], rngs=rngs)
      ys.append(out)
      aux = aux + block_aux
    return self.cv2(jnp.concatenate(ys, axis=-1)), aux
