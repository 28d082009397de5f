"""optisar_jax/models/precision.py: float32 weight gradients under bfloat16 compute (docs/scaling.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from optisar_jax.models import precision
from optisar_jax.models.layers import LayerOptions, conv2d, linear

# (H, W, k, stride, pad, cin, cout, groups): plain, stride 2 with odd and even sizes, 1x1, depthwise, grouped.
CASES = [(9, 10, 3, 1, 1, 4, 6, 1), (9, 9, 3, 2, 1, 4, 6, 1), (8, 10, 3, 2, 1, 4, 6, 1), (8, 8, 1, 1, 0, 4, 6, 1),
         (9, 8, 5, 1, 2, 6, 6, 6), (10, 10, 3, 2, 1, 6, 6, 6), (8, 9, 3, 1, 1, 6, 4, 2)]


def _plain_conv(x, w, s, p, g):
  return jax.lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      feature_group_count=g)


@pytest.mark.parametrize('h,w,k,s,p,cin,cout,g', CASES)
def test_conv_matches_xla_convolution_and_its_gradients_in_float32(h, w, k, s, p, cin, cout, g):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, h, w, cin))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (k, k, cin // g, cout))

  def loss(fn):
    return lambda x, kernel: jnp.sum(jnp.sin(fn(x, kernel)))

  ours = lambda x, kernel: precision.conv(x, kernel, strides=(s, s), padding=((p, p), (p, p)), groups=g,
                                          dtype=jnp.float32)
  np.testing.assert_allclose(ours(x, kernel), _plain_conv(x, kernel, s, p, g), rtol=1e-6, atol=1e-6)
  got = jax.grad(loss(ours), (0, 1))(x, kernel)
  want = jax.grad(loss(lambda a, b: _plain_conv(a, b, s, p, g)), (0, 1))(x, kernel)
  for a, b in zip(got, want):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_conv_gives_the_float32_accumulated_kernel_gradient():
  """Under bf16 compute the kernel gradient is float32 and equals the exact sum over the bf16 inputs to
  float32 rounding; the plain form's gradient is rounded to bf16 (8 bits), hundreds of times further."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 8))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8, 8))
  g = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 8)).astype(jnp.bfloat16)
  pad = ((1, 1), (1, 1))
  ours = jax.vjp(lambda w: precision.conv(x, w, strides=(2, 2), padding=pad, dtype=jnp.bfloat16), kernel)[1](g)[0]
  plain = jax.vjp(lambda w: _plain_conv(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), 2, 1, 1), kernel)[1](g)[0]
  assert ours.dtype == jnp.float32 and plain.dtype == jnp.float32
  # Exact: float64 sum over the bf16-rounded inputs.
  xb = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  gb = np.asarray(g.astype(jnp.float32), np.float64)
  padded = np.pad(xb, ((0, 0), (1, 1), (1, 1), (0, 0)))
  exact = np.zeros((3, 3, 8, 8))
  for i in range(3):
    for j in range(3):
      window = padded[:, i:i + 16:2, j:j + 16:2, :]                         # (4, 8, 8, Cin)
      exact[i, j] = np.einsum('bhwc,bhwo->co', window, gb)
  err_ours = np.abs(np.asarray(ours, np.float64) - exact).max()
  err_plain = np.abs(np.asarray(plain, np.float64) - exact).max()
  scale = np.abs(exact).max()
  assert err_ours <= 1e-5 * scale, (err_ours, scale)
  assert err_plain > 100 * err_ours, (err_plain, err_ours)


def test_einsum_dense_and_bias_add_gradients_equal_the_plain_forms():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 2, 5))
  b = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 5))
  plain = lambda x, b: jnp.sum(jnp.cos(jnp.einsum('pxyd,erd->pxyer', x, b)))
  ours = lambda x, b: jnp.sum(jnp.cos(precision.einsum('pxyd,erd->pxyer', x, b, dtype=jnp.float32)))
  for got, want in zip(jax.grad(ours, (0, 1))(x, b), jax.grad(plain, (0, 1))(x, b)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  kernel = jax.random.normal(jax.random.PRNGKey(2), (5, 7))
  bias = jnp.arange(7.0)
  got = jax.grad(lambda k, c: jnp.sum(jnp.sin(precision.bias_add(precision.dense(x, k, dtype=jnp.float32), c))),
                 (0, 1))(kernel, bias)
  want = jax.grad(lambda k, c: jnp.sum(jnp.sin(x @ k + c)), (0, 1))(kernel, bias)
  for a, b_ in zip(got, want):
    np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5)
  bf = jax.grad(lambda c: jnp.sum(precision.bias_add(x.astype(jnp.bfloat16) @ kernel.astype(jnp.bfloat16), c)
                                  .astype(jnp.float32)))(bias)
  assert bf.dtype == jnp.float32


def test_einsum_rejects_specs_it_cannot_transpose():
  x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
  with pytest.raises(ValueError, match='explicit indices'):
    precision.einsum('...c,cd->...d', x, w, dtype=jnp.float32)
  with pytest.raises(ValueError, match='summed within the weight'):
    precision.einsum('nc,cd->n', x, w, dtype=jnp.float32)


def test_layers_route_through_precision_only_when_asked():
  """conv2d / linear: with f32_weight_grads and bf16 compute, same forward as the plain layer to bf16
  rounding and float32 kernel gradients; the flag is off under float32 compute (nothing to keep)."""
  opts = LayerOptions(dtype=jnp.bfloat16, cpu_forms=False, f32_weight_grads=True)
  plain_opts = LayerOptions(dtype=jnp.bfloat16, cpu_forms=False)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  for make in (lambda o: conv2d(4, 6, 3, 2, opts=o, rngs=nnx.Rngs(0)),
               lambda o: conv2d(4, 4, 3, 1, groups=4, use_bias=True, opts=o, rngs=nnx.Rngs(0))):
    ours, plain = make(opts), make(plain_opts)
    np.testing.assert_allclose(ours(x).astype(jnp.float32), plain(x).astype(jnp.float32), rtol=2e-2, atol=2e-2)
    grads = nnx.grad(lambda m: jnp.sum(m(x).astype(jnp.float32) ** 2))(ours)
    assert grads.kernel[...].dtype == jnp.float32
  dense = linear(4, 3, dtype=jnp.bfloat16, f32_weight_grads=True, rngs=nnx.Rngs(0))
  plain_dense = linear(4, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(dense(x).astype(jnp.float32), plain_dense(x).astype(jnp.float32), rtol=2e-2,
                             atol=2e-2)
  import ml_collections
  cfg = ml_collections.ConfigDict({'compute_dtype': 'float32', 'weight_grad_dtype': 'float32'})
  assert precision.float32_weight_grads(cfg, jnp.float32) is False
  assert precision.float32_weight_grads(cfg, jnp.bfloat16) is True
  cfg.weight_grad_dtype = 'compute'
  assert precision.float32_weight_grads(cfg, jnp.bfloat16) is False
  cfg.weight_grad_dtype = 'bf16'
  with pytest.raises(ValueError, match='model.weight_grad_dtype'):
    precision.float32_weight_grads(cfg, jnp.bfloat16)
