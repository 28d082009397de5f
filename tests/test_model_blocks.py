"""Layers and backbone blocks: inits, BatchNorm modes, SPPF, PSA attention layout, per-layer counts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from optisar_jax.models.blocks import C2PSA, SPPF, C3k2, PSAAttention
from optisar_jax.models.layers import (Conv, LayerOptions, conv2d, conv_within_patches, max_pool_same,
                                       torch_kernel_init)

OPTS = LayerOptions()


def normal(seed, shape):
  """Test inputs from numpy: eager jax.random would compile a threefry program per shape."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def n_params(module):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_torch_default_kernel_init_bounds():
  w = torch_kernel_init(jax.random.key(0), (3, 3, 64, 128))
  bound = 1 / math.sqrt(3 * 3 * 64)
  assert float(jnp.abs(w).max()) <= bound
  np.testing.assert_allclose(float(w.std()), bound / math.sqrt(3), rtol=0.02)   # U(-b, b) has std b/sqrt(3)


def test_conv_batchnorm_train_vs_eval_and_running_stats():
  conv = Conv(4, 8, 3, 2, opts=OPTS, rngs=nnx.Rngs(0))
  assert conv.bn.momentum == 0.97 and conv.bn.epsilon == 1e-3
  x = 3.0 + normal(1, (2, 8, 8, 4))
  y_train = conv(x)                                        # batch stats; updates the running ones
  assert y_train.shape == (2, 4, 4, 8)
  mean = conv.bn.mean[...]
  assert float(jnp.abs(mean).max()) > 0                    # moved away from the init 0
  conv_out = conv.conv(x)
  np.testing.assert_allclose(mean, 0.03 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  conv.eval()
  y_eval = conv(x)
  assert float(jnp.abs(y_eval - y_train).max()) > 1e-2
  conv.train()
  np.testing.assert_allclose(conv(x), y_train, atol=1e-5)


def test_max_pool_pads_with_minus_infinity():
  x = -1.0 - jnp.arange(25.0).reshape(1, 5, 5, 1)
  y = max_pool_same(x, 5)
  assert float(y[0, 0, 0, 0]) == -1.0                     # zero padding would give 0
  assert float(y[0, 4, 4, 0]) == -13.0                    # window rows/cols 2..4


def test_sppf_first_conv_is_linear_and_counts():
  sppf = SPPF(32, 32, opts=OPTS, rngs=nnx.Rngs(0))
  assert not sppf.cv1.act and sppf.cv2.act
  # 1x1 c1 -> c1/2 + BN, 1x1 4*c1/2 -> c2 + BN
  assert n_params(sppf) == 32 * 16 + 32 + 64 * 32 + 64


def test_psa_attention_head_major_layout():
  attn = PSAAttention(16, 2, opts=OPTS, rngs=nnx.Rngs(0))
  attn.eval()
  x = normal(3, (1, 3, 4, 16))
  qkv = np.asarray(attn.qkv(x)).reshape(12, 2, 16)       # per head [q(4), k(4), v(8)]
  heads = []
  for h in range(2):
    q, k, v = qkv[:, h, :4], qkv[:, h, 4:8], qkv[:, h, 8:]
    logits = q @ k.T * 4 ** -0.5
    a = np.exp(logits - logits.max(1, keepdims=True))
    heads.append((a / a.sum(1, keepdims=True)) @ v)
  v_all = np.concatenate([qkv[:, h, 8:] for h in range(2)], axis=1).reshape(1, 3, 4, 16)
  o = np.concatenate(heads, axis=1).reshape(1, 3, 4, 16) + np.asarray(attn.pe(jnp.asarray(v_all)))
  np.testing.assert_allclose(attn(x), attn.proj(jnp.asarray(o)), atol=1e-4)


def test_block_counts_match_architecture_table():
  abstract = lambda f: nnx.eval_shape(f)
  assert n_params(abstract(lambda: C3k2(128, 256, 1, c3k=True, e=0.25, opts=OPTS, rngs=nnx.Rngs(0)))) == 111_872
  assert n_params(abstract(lambda: C3k2(512, 512, 1, c3k=True, opts=OPTS, rngs=nnx.Rngs(0)))) == 1_380_352
  assert n_params(abstract(lambda: SPPF(512, 512, opts=OPTS, rngs=nnx.Rngs(0)))) == 656_896
  assert n_params(abstract(lambda: C2PSA(512, 512, 1, opts=OPTS, rngs=nnx.Rngs(0)))) == 990_976


def _lax_conv(x, kernel, groups=1):
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


def test_conv2d_fast_forms_equal_xla_convolution():
  """Conv2d's depthwise and 1x1 forms against XLA's convolution, values and kernel gradients."""
  x = normal(2, (2, 7, 5, 6))
  for conv, groups in ((conv2d(6, 6, 3, groups=6, use_bias=True, opts=OPTS, rngs=nnx.Rngs(0)), 6),
                       (conv2d(6, 4, 1, use_bias=True, opts=OPTS, rngs=nnx.Rngs(1)), 1)):
    kernel, bias = conv.kernel[...], conv.bias[...]
    np.testing.assert_allclose(conv(x), _lax_conv(x, kernel, groups) + bias, rtol=1e-5, atol=1e-6)
    fast = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(conv)['kernel'][...]
    slow = jax.grad(lambda k: jnp.sum(jnp.sin(_lax_conv(x, k, groups) + bias)))(kernel)
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)
  # strided convs keep XLA's convolution
  strided = conv2d(6, 6, 3, 2, groups=6, opts=OPTS, rngs=nnx.Rngs(2))
  np.testing.assert_allclose(strided(x), nnx.Conv.__call__(strided, x), rtol=1e-6)


def test_conv_within_patches_equals_zero_padded_convolution_of_each_patch():
  kernel = normal(3, (3, 3, 4, 5))
  for ph, pw in ((2, 2), (1, 3), (4, 4)):
    patches = normal(4, (6, ph, pw, 4))
    np.testing.assert_allclose(conv_within_patches(patches, kernel, jnp.float32), _lax_conv(patches, kernel),
                               rtol=1e-5, atol=1e-5)


def test_batchnorm_groups_normalise_each_group_of_images_on_its_own():
  """model.bn_group_size: groups of consecutive images get their own statistics (= nnx.BatchNorm on each
  group), the running statistics move to the mean over groups, and a batch that does not split into
  groups is a one-line error naming the key."""
  from flax import nnx as nnx_
  from optisar_jax.models.layers import batch_norm
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3, 3, 5)) * jnp.arange(1, 9.0)[:, None, None, None]
  grouped = batch_norm(5, LayerOptions(bn_group_size=4), rngs=nnx_.Rngs(0))
  y = grouped(x)
  for g in range(2):
    plain = nnx_.BatchNorm(5, momentum=0.97, epsilon=1e-3, rngs=nnx_.Rngs(0))
    np.testing.assert_allclose(y[4 * g:4 * g + 4], plain(x[4 * g:4 * g + 4]), rtol=1e-5, atol=1e-5)
  group_means = x.reshape(2, 4, 3, 3, 5).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(grouped.mean[...], 0.03 * group_means.mean(axis=0), rtol=1e-5, atol=1e-6)
  whole = batch_norm(5, LayerOptions(bn_group_size=0), rngs=nnx_.Rngs(0))
  everything = nnx_.BatchNorm(5, momentum=0.97, epsilon=1e-3, rngs=nnx_.Rngs(0))
  np.testing.assert_allclose(whole(x), everything(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grouped(x[:3]), whole(x[:3]), rtol=1e-5, atol=1e-5)   # smaller than a group
  with pytest.raises(ValueError, match='model.bn_group_size'):
    grouped(x[:6])
