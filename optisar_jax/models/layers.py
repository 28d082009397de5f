"""Basic layers shared by every block: Conv(+BN+SiLU), BatchNorm defaults, PyTorch-default inits.

All maps are NHWC. Parameters are float32; arithmetic runs in `LayerOptions.dtype` (the config's
`model.compute_dtype`). Inits reproduce PyTorch's defaults (docs/architecture.md section 0) so that the
reference weights can be ported and the training dynamics start where the reference starts:

* conv / linear weight ~ U(+-1/sqrt(fan_in)) = variance_scaling(1/3, 'fan_in', 'uniform'),
  fan_in = (c_in / groups) * k * k;
* bias ~ U(+-1/sqrt(fan_in));
* BatchNorm: eps 1e-3, flax momentum 0.97 (torch 0.03), scale 1, bias 0, mean 0, var 1;
* LayerNorm: eps 1e-5.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optisar_jax.models import precision

def _random(key, shape, dtype, kind: str, a: float, b: float) -> jax.Array:
  """U(a, b) (kind 'uniform') or N(a, b^2) (kind 'normal') drawn from `key`.

  Eagerly (a concrete key) the numbers come from numpy seeded by the key's data: drawing with
  jax.random would compile one threefry program per distinct parameter shape (about a hundred per
  model, seconds each on a CPU). Traced (under jit / eval_shape) it is plain jax.random. Both are
  deterministic functions of the key.
  """
  if isinstance(key, jax.core.Tracer):
    if kind == 'uniform':
      return jax.random.uniform(key, shape, dtype, a, b)
    return a + b * jax.random.normal(key, shape, dtype)
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  rng = np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())
  values = rng.uniform(a, b, shape) if kind == 'uniform' else rng.normal(a, b, shape)
  return jnp.asarray(values, dtype)


def uniform_init(bound: float) -> Callable[..., jax.Array]:
  """U(+-bound)."""
  def init(key, shape, dtype=jnp.float32):
    return _random(key, shape, dtype, 'uniform', -bound, bound)

  return init


def normal_init(std: float) -> Callable[..., jax.Array]:
  """N(0, std^2)."""
  def init(key, shape, dtype=jnp.float32):
    return _random(key, shape, dtype, 'normal', 0.0, std)

  return init


def torch_kernel_init(key, shape, dtype=jnp.float32) -> jax.Array:
  """PyTorch's default weight init U(+-1/sqrt(fan_in)) (kaiming_uniform_ with a = sqrt(5); the same as
  variance_scaling(1/3, 'fan_in', 'uniform')). Flax kernels are (..., in, out): fan_in = prod(shape[:-1])."""
  fan_in = math.prod(shape[:-1])
  return _random(key, shape, dtype, 'uniform', -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))


def torch_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """U(+-1/sqrt(fan_in)): PyTorch's default bias init for Conv2d and Linear."""
  return uniform_init(1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


def constant_init(value: float) -> Callable[..., jax.Array]:
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, value, dtype)

  return init


@dataclasses.dataclass(frozen=True)
class LayerOptions:
  """What every layer needs besides its shape.

  dtype: compute dtype (`model.compute_dtype`, resolved by `optisar_jax.platform`).
  cpu_forms: use the XLA:CPU-tuned forms of `Conv2d` (`model.cpu_forms`).
  bn_group_size: BatchNorm statistics per group of this many images (`model.bn_group_size`; 0 = whole batch).
  f32_weight_grads: weights enter convs and matmuls through `precision` (float32 weight gradients, hence
    float32 cross-device gradient sums, under a narrower compute dtype; `model.weight_grad_dtype`).
  """
  dtype: Any = jnp.float32
  bn_momentum: float = 0.97
  bn_epsilon: float = 1e-3
  cpu_forms: bool = True
  bn_group_size: int = 0
  f32_weight_grads: bool = False

  @classmethod
  def from_config(cls, model_config) -> 'LayerOptions':
    from optisar_jax import platform
    dtype = jnp.dtype(platform.compute_dtype(model_config))
    group = int(model_config.get('bn_group_size', 0))
    if group < 0:
      raise ValueError(f"config key 'model.bn_group_size': {group} must be >= 0")
    return cls(dtype=dtype, bn_momentum=float(model_config.bn_momentum),
               bn_epsilon=float(model_config.bn_epsilon),
               cpu_forms=platform.cpu_forms(model_config), bn_group_size=group,
               f32_weight_grads=precision.float32_weight_grads(model_config, dtype))


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` over the last axis (same variables: scale, bias, mean, var) with group statistics.

  Train mode: mean and (biased) variance over every axis but the last, computed per group of
  `group_size` consecutive rows of the leading (image) axis, the reference's per-GPU BatchNorm over 8
  images, made independent of the device count: a group is a fixed set of images wherever it runs, and
  when the per-device batch is a multiple of the group no statistic crosses devices. The running
  statistics move towards the mean over groups of the group statistics (over the whole batch for
  `group_size` 0). A batch smaller than one group forms one group; a larger batch must be a multiple of
  it. Inputs whose leading axis is not the image axis (PL-MoE patches) are reshaped by the caller to
  (B, ...) first.

  The statistics and the normalisation are computed in float32 and the result cast to `dtype`, so under
  bfloat16 compute the gradients of scale and bias (and their cross-device sums) stay float32.
  (B,...,C) -> (B,...,C).
  """

  def __init__(self, num_features: int, *, group_size: int = 0, **kwargs):
    super().__init__(num_features, **kwargs)
    self.group_size = int(group_size)

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if mask is not None:
      raise ValueError('BatchNorm: masks are not supported')
    running = self.use_running_average if use_running_average is None else use_running_average
    xf = x.astype(jnp.float32)
    scale = self.scale[...].astype(jnp.float32)
    bias = self.bias[...].astype(jnp.float32)
    if running:
      inv = jax.lax.rsqrt(self.var[...] + self.epsilon) * scale
      y = (xf - self.mean[...]) * inv + bias
      return y.astype(self.dtype or x.dtype)
    n = x.shape[0]
    group = self.group_size if 0 < self.group_size < n else n
    if n % group:
      raise ValueError(f'BatchNorm: a batch of {n} images does not split into groups of '
                       f'model.bn_group_size = {self.group_size}')
    xg = xf.reshape(n // group, group, *x.shape[1:])                       # (G, g, ..., C)
    axes = tuple(range(1, xg.ndim - 1))
    mean = xg.mean(axis=axes, keepdims=True)
    var = jnp.maximum((xg * xg).mean(axis=axes, keepdims=True) - mean * mean, 0.0)
    y = (xg - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    group_mean = mean.reshape(n // group, -1).mean(axis=0)
    group_var = var.reshape(n // group, -1).mean(axis=0)
    m = self.momentum
    # set_value, not `self.mean[...] = `: the indexed form compares the new value's sharding with the
    # old one's, and asking a tracer for its sharding builds an error message that walks the whole
    # jaxpr (20 ms a call, 7 of the 16 s it took to trace the tiny train step).
    self.mean.set_value(jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * group_mean))
    self.var.set_value(jax.lax.stop_gradient(m * self.var[...] + (1 - m) * group_var))
    return y.reshape(x.shape).astype(self.dtype or x.dtype)


def batch_norm(channels: int, opts: LayerOptions, *, rngs: nnx.Rngs) -> BatchNorm:
  """BatchNorm over the last axis; group statistics in model.train(), running ones in model.eval()."""
  return BatchNorm(channels, group_size=opts.bn_group_size, momentum=opts.bn_momentum,
                   epsilon=opts.bn_epsilon, dtype=opts.dtype, rngs=rngs)


def layer_norm(channels: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Kept in float32: LayerNorm statistics of small vectors are fragile in bfloat16.
  return nnx.LayerNorm(channels, epsilon=1e-5, rngs=rngs)


def conv2d(c1: int, c2: int, k: int = 1, s: int = 1, *, groups: int = 1, use_bias: bool = False,
           bias_init: Callable | None = None, opts: LayerOptions, rngs: nnx.Rngs) -> 'Conv2d':
  """Plain 2-D convolution with PyTorch padding k//2 on both sides (not 'SAME', which pads stride-2
  convolutions asymmetrically) and PyTorch default inits."""
  pad = k // 2
  fan_in = (c1 // groups) * k * k
  conv = Conv2d(c1, c2, (k, k), (s, s), padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                use_bias=use_bias, kernel_init=torch_kernel_init,
                bias_init=bias_init if bias_init is not None else torch_bias_init(fan_in),
                dtype=opts.dtype, rngs=rngs)
  conv.cpu_forms = opts.cpu_forms
  conv.f32_weight_grads = opts.f32_weight_grads
  return conv


def project(x: jax.Array, kernel: jax.Array, dtype: Any, f32_weight_grads: bool) -> jax.Array:
  """x (..., cin) @ kernel (cin, cout) in `dtype`; through `precision.dense` (float32 kernel gradient) when
  `f32_weight_grads`."""
  if f32_weight_grads:
    return precision.dense(x, kernel, dtype=dtype)
  return jnp.einsum('...c,cd->...d', x.astype(dtype), kernel.astype(dtype))


class Linear(nnx.Linear):
  """`nnx.Linear` whose kernel and bias gradients stay float32 under bfloat16 compute when
  `f32_weight_grads` is set (`precision`); otherwise exactly `nnx.Linear`. (..., din) -> (..., dout)."""

  f32_weight_grads: bool = False

  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.f32_weight_grads or self.dtype is None:
      return super().__call__(x)
    y = precision.dense(x, self.kernel[...], dtype=self.dtype)
    return y if self.bias is None else precision.bias_add(y, self.bias[...])


def linear(din: int, dout: int, *, use_bias: bool = True, kernel_init: Callable | None = None,
           bias_init: Callable | None = None, dtype: Any = jnp.float32, f32_weight_grads: bool = False,
           rngs: nnx.Rngs) -> Linear:
  """nn.Linear with PyTorch default inits (overridable for the few zero-initialised layers)."""
  layer = Linear(din, dout, use_bias=use_bias,
                 kernel_init=kernel_init if kernel_init is not None else torch_kernel_init,
                 bias_init=bias_init if bias_init is not None else torch_bias_init(din),
                 dtype=dtype, rngs=rngs)
  layer.f32_weight_grads = bool(f32_weight_grads)
  return layer


class Conv2d(nnx.Conv):
  """`nnx.Conv` (same parameters, same numbers up to summation order) with two faster forms that XLA's CPU
  convolution lacks, chosen from the static shape when `cpu_forms` is set (`model.cpu_forms`: on the CPU
  backend only by default; GPU and TPU compile the plain convolution):

  * 1x1, stride 1, ungrouped: a matmul over the channel axis (the convolution ran 1.2-2.6x slower for
    the 1x1 shapes of scale m, e.g. 80x80x256 -> 128: 7.3 ms vs 2.8 ms);
  * depthwise (groups = in = out channels), stride 1, padding k//2: `depthwise_conv` (85 ms -> ~5 ms at
    80x80x256).
  """

  @staticmethod
  def _ones(v) -> bool:
    return all(int(d) == 1 for d in (v if isinstance(v, (tuple, list)) else (v,)))

  def _undilated(self) -> bool:
    return self._ones(self.input_dilation) and self._ones(self.kernel_dilation)

  def _plain(self) -> bool:
    return self._ones(self.strides) and self._undilated() and self.mask is None

  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    pointwise = (kh, kw) == (1, 1) and self.feature_group_count == 1
    depthwise = (kh == kw and kh % 2 == 1 and self.feature_group_count == self.in_features == self.out_features
                 and self.feature_group_count > 1
                 and tuple(map(tuple, self.padding)) == ((kh // 2, kh // 2),) * 2)
    kernel = self.kernel[...]
    bias = self.bias[...] if self.bias is not None else None
    dtype = self.dtype or jnp.result_type(x, kernel, *(() if bias is None else (bias,)))
    f32_grads = getattr(self, 'f32_weight_grads', False) and self.mask is None
    if not getattr(self, 'cpu_forms', True) or not self._plain() or not (pointwise or depthwise):
      if not f32_grads or isinstance(self.padding, str) or not self._undilated():
        return super().__call__(x)
      y = precision.conv(x, kernel, strides=self.strides, padding=self.padding,
                         groups=self.feature_group_count, dtype=dtype)
      return y if bias is None else precision.bias_add(y, bias)
    if pointwise and f32_grads:
      y = precision.dense(x, kernel[0, 0], dtype=dtype)
      return y if bias is None else precision.bias_add(y, bias)
    if pointwise:
      y = jnp.einsum('...c,cd->...d', x.astype(dtype), kernel[0, 0].astype(dtype), precision=self.precision)
    else:
      y = depthwise_conv(x, kernel, dtype)
    return y if bias is None else y + bias.astype(dtype)


def depthwise_conv(x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
  """Depthwise k x k convolution, stride 1, zero padding k//2: (B,H,W,C), kernel (k,k,1,C) -> (B,H,W,C).

  Written as k*k shifted multiply-adds, which XLA fuses into one elementwise loop (forward and
  backward). Equal to `lax.conv_general_dilated(..., feature_group_count=C)` up to summation order; on
  a CPU the grouped convolution ran at well under 1 GFLOP/s (scale m, 80x80x256: 85 ms vs ~5 ms).
  """
  k = kernel.shape[0]
  pad = k // 2
  _, h, w, _ = x.shape
  x = x.astype(dtype)
  kernel = kernel.astype(dtype)
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      term = padded[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def conv_within_patches(patches: jax.Array, kernel: jax.Array, dtype: Any, f32_weight_grads: bool = False
                        ) -> jax.Array:
  """k x k convolution (stride 1, zero padding k//2) of every patch on its own, as ONE matmul.

  patches (P,ph,pw,Cin), kernel (k,k,Cin,Cout) -> (P,ph,pw,Cout). Output pixel o reads input pixel q of
  the same patch through tap q - o + k//2 when that tap exists: the taps are laid out once into a
  (ph*pw*Cin, ph*pw*Cout) matrix (static index map, zeros elsewhere). Equal to the padded convolution
  up to summation order; meant for the PL-MoE's tiny patches (2x2 at 640 px), where XLA's convolution
  over a batch of 2x2 images is slow.
  """
  num, ph, pw, cin = patches.shape
  k, cout = kernel.shape[0], kernel.shape[-1]
  pad = k // 2
  if not f32_weight_grads:
    kernel = kernel.astype(dtype)
  zero = jnp.zeros((cin, cout), kernel.dtype)
  rows = []
  for qi in range(ph):
    for qj in range(pw):
      row = []
      for oi in range(ph):
        for oj in range(pw):
          ti, tj = qi - oi + pad, qj - oj + pad
          row.append(kernel[ti, tj] if 0 <= ti < k and 0 <= tj < k else zero)
      rows.append(jnp.stack(row, axis=1))                                  # (Cin, ph*pw, Cout)
  matrix = jnp.stack(rows).reshape(ph * pw * cin, ph * pw * cout)
  out = project(patches.reshape(num, ph * pw * cin), matrix, dtype, f32_weight_grads)
  return out.reshape(num, ph, pw, cout)


class Conv(nnx.Module):
  """Ultralytics `Conv`: conv (no bias) -> BatchNorm -> SiLU (or identity when act=False).

  (B,H,W,c1) -> (B,H/s,W/s,c2).
  """

  def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, *, groups: int = 1, act: bool = True,
               opts: LayerOptions, rngs: nnx.Rngs):
    self.conv = conv2d(c1, c2, k, s, groups=groups, opts=opts, rngs=rngs)
    self.bn = batch_norm(c2, opts, rngs=rngs)
    self.act = act

  def normalize(self, y: jax.Array) -> jax.Array:
    """BatchNorm and activation of a conv output: the second half of `__call__`."""
    y = self.bn(y)
    return nnx.silu(y) if self.act else y

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.normalize(self.conv(x))


def dw_conv(c: int, k: int, *, act: bool = True, opts: LayerOptions, rngs: nnx.Rngs) -> Conv:
  """Ultralytics `DWConv(c, c, k)`: a Conv with groups = c."""
  return Conv(c, c, k, 1, groups=c, act=act, opts=opts, rngs=rngs)


def upsample2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling of (B,H,W,C)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def max_pool_same(x: jax.Array, k: int) -> jax.Array:
  """MaxPool(k, stride 1, padding k//2); the padding acts as -inf, as in torch."""
  pad = k // 2
  return nnx.max_pool(x, (k, k), strides=(1, 1), padding=((pad, pad), (pad, pad)))


def require_rngs(rngs: nnx.Rngs | None, layer: str) -> nnx.Rngs:
  """Stochastic layers in train mode draw from the call-time `rngs`; fail loudly when there is none."""
  if rngs is None:
    raise ValueError(f'{layer} is stochastic in train mode and needs rngs: call the model with '
                     'rngs=nnx.Rngs(...) or switch it to model.eval()')
  return rngs
