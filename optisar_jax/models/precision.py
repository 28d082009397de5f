"""Float32 weight gradients under bfloat16 compute.

Training keeps float32 master weights and, on GPU and TPU, computes in bfloat16 (`model.compute_dtype`).
Written plainly (cast the weight to bfloat16, then convolve or multiply), the weight gradient is the
output of a bfloat16 convolution or matmul; under data parallelism XLA's SPMD partitioner sums it across
devices right where it is produced, so the cross-device gradient sum runs in bfloat16 (docs/scaling.md:
51.5 MB of bf16 gradient all-reduce per step at scale m). Casting the gradient back up afterwards does not
help: the partitioner moves the partial sum through the cast.

The ops here take the float32 weight itself. Forward and input gradient run in the compute dtype as
before; the weight gradient is produced directly in float32 (`preferred_element_type`, the MXU/tensor-core
accumulator), so the all-reduce the partitioner places after it is float32 and nothing is rounded to
bfloat16 before the sum. Same FLOPs, same forward numbers; the gradient is the float32-accumulated one.

    conv(x, kernel, strides=(1, 1), padding=((1, 1), (1, 1)), groups=1, dtype=jnp.bfloat16)
    einsum('pxyd,erd->pxyer', x, weight, dtype=jnp.bfloat16)
    dense(x, kernel, dtype)            # (..., din) @ (din, dout)
    bias_add(y, bias)                  # y + bias, bias gradient summed in float32

Selected by `model.weight_grad_dtype` ('float32', the default; 'compute' keeps the plain form, whose
gradient sums run in the compute dtype: half the bytes, for bandwidth-bound multi-slice runs).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _forward_conv(x, kernel, strides, padding, groups):
  return jax.lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                      dimension_numbers=_DIMS, feature_group_count=groups)


def kernel_gradient(x: jax.Array, g: jax.Array, kernel_shape: Sequence[int], strides: Sequence[int],
                    padding: Sequence[Sequence[int]], groups: int, out_dtype: Any = jnp.float32) -> jax.Array:
  """d loss / d kernel of an NHWC x HWIO convolution (no dilation), produced in `out_dtype`.

  x (B,H,W,Cin), g (B,OH,OW,Cout) the output cotangent -> (kh,kw,Cin/groups,Cout). It is itself a
  convolution: the image batch is the contraction, x's channels play the batch, g is the kernel dilated
  by the forward stride, and the output's spatial extent is the kernel's (high padding chosen so):
  dw[i,j,c,o] = sum_{b,y,x} x[b, y*s + i - p, x*s + j - p, c] * g[b,y,x,o].
  """
  pads = []
  for size, k, out, stride, (lo, _) in zip(x.shape[1:3], kernel_shape[:2], g.shape[1:3], strides, padding):
    pads.append((lo, k - size - lo + (out - 1) * stride))
  return jax.lax.conv_general_dilated(
      x, g, window_strides=(1, 1), padding=pads, rhs_dilation=tuple(strides),
      dimension_numbers=('CHWN', 'IHWO', 'HWNC'), feature_group_count=1, batch_group_count=groups,
      preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, groups):
  return _forward_conv(x, kernel.astype(x.dtype), strides, padding, groups)


def _conv_fwd(x, kernel, strides, padding, groups):
  kernel_c = kernel.astype(x.dtype)
  return _forward_conv(x, kernel_c, strides, padding, groups), (x, kernel_c, jnp.zeros((0,), kernel.dtype))


def _conv_bwd(strides, padding, groups, residuals, g):
  x, kernel_c, kernel_dtype = residuals
  _, input_vjp = jax.vjp(lambda a: _forward_conv(a, kernel_c, strides, padding, groups), x)
  (dx,) = input_vjp(g.astype(x.dtype))
  dw = kernel_gradient(x, g.astype(x.dtype), kernel_c.shape, strides, padding, groups, jnp.float32)
  return dx, dw.astype(kernel_dtype.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int], padding: Sequence[Sequence[int]],
         groups: int = 1, dtype: Any) -> jax.Array:
  """NHWC x HWIO convolution computed in `dtype`, the kernel's gradient accumulated and returned in the
  kernel's own (float32) dtype. x (B,H,W,Cin), kernel (kh,kw,Cin/groups,Cout) -> (B,OH,OW,Cout) in dtype."""
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(x.astype(dtype), kernel, strides, padding, int(groups))


def _split_spec(spec: str) -> tuple[str, str, str]:
  if '...' in spec or '->' not in spec:
    raise ValueError(f'precision.einsum: spec {spec!r} needs explicit indices and an output (no ...)')
  inputs, out = spec.split('->')
  lhs, rhs = inputs.split(',')
  for name in rhs:
    if name not in lhs + out:
      raise ValueError(f'precision.einsum: weight index {name!r} of {spec!r} is summed within the weight')
  return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum(spec, x, weight):
  return jnp.einsum(spec, x, weight.astype(x.dtype))


def _einsum_fwd(spec, x, weight):
  weight_c = weight.astype(x.dtype)
  return jnp.einsum(spec, x, weight_c), (x, weight_c, jnp.zeros((0,), weight.dtype))


def _einsum_bwd(spec, residuals, g):
  x, weight_c, weight_dtype = residuals
  lhs, rhs, out = _split_spec(spec)
  g = g.astype(x.dtype)
  _, input_vjp = jax.vjp(lambda a: jnp.einsum(spec, a, weight_c), x)
  (dx,) = input_vjp(g)
  dw = jnp.einsum(f'{lhs},{out}->{rhs}', x, g, preferred_element_type=jnp.float32)
  return dx, dw.astype(weight_dtype.dtype)


_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def einsum(spec: str, x: jax.Array, weight: jax.Array, *, dtype: Any) -> jax.Array:
  """jnp.einsum(spec, x, weight) in `dtype` (activation first, weight second, explicit indices), the
  weight's gradient accumulated and returned in the weight's own dtype."""
  _split_spec(spec)
  return _einsum(spec, x.astype(dtype), weight)


def dense(x: jax.Array, kernel: jax.Array, *, dtype: Any) -> jax.Array:
  """(..., din) @ kernel (din, dout) in `dtype`, kernel gradient in the kernel's dtype."""
  lead = x.shape[:-1]
  y = einsum('nc,cd->nd', x.reshape(-1, x.shape[-1]), kernel, dtype=dtype)
  return y.reshape(*lead, kernel.shape[-1])


@jax.custom_vjp
def _bias_add(y, bias):
  return y + bias.astype(y.dtype)


def _bias_add_fwd(y, bias):
  return y + bias.astype(y.dtype), jnp.zeros((0,), bias.dtype)


def _bias_add_bwd(bias_dtype, g):
  axes = tuple(range(g.ndim - 1))
  return g, jnp.sum(g, axis=axes, dtype=jnp.float32).astype(bias_dtype.dtype)


_bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


def bias_add(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y (..., C) + bias (C,) in y's dtype; the bias gradient is summed in float32."""
  return _bias_add(y, bias)


def float32_weight_grads(model_config, compute_dtype) -> bool:
  """Whether the layers use these ops: `model.weight_grad_dtype` 'float32' (default) and a compute dtype
  narrower than the float32 weights. 'compute' keeps the plain casts."""
  choice = str(model_config.get('weight_grad_dtype', 'float32'))
  if choice not in ('float32', 'compute'):
    raise ValueError(f"config key 'model.weight_grad_dtype': {choice!r} is not one of 'float32', 'compute'")
  return choice == 'float32' and np.dtype(compute_dtype) != np.dtype(jnp.float32)
