"""TGDF-SSA: SSA shuffles and pairing, dropout mode, guide projection, dual gates and their gradients."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from optisar_jax.config import load_config
from optisar_jax.models.fusion import (GatedMaxSigmoidAttn, SpatialShuffleAttention, TGDFSSA,
                                       ssa_indices)
from optisar_jax.models.layers import LayerOptions

OPTS = LayerOptions()


def normal(seed, shape):
  """Test inputs from numpy: eager jax.random would compile a threefry program per shape."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def tgdg_config(**changes):
  c = ml_collections.ConfigDict(dict(load_config('tiny').model.tgdg))
  c.update(changes)
  return c


def ssa_reference(x, groups, weight_avg, bias_avg, weight_max, bias_max):
  """SSA written with the explicit index formulas of docs/architecture.md section 6 (numpy, NHWC)."""
  b, h, w, c = x.shape
  cg, half = c // groups, c // groups // 2
  y = np.zeros_like(x)
  for g in range(groups):
    old = x[..., g * cg:(g + 1) * cg]
    new = np.stack([old[..., (k % 2) * half + k // 2] for k in range(cg)], -1)
    a = new[..., :half].mean(axis=(1, 2))
    m = new[..., half:].max(axis=(1, 2))
    att = 1 / (1 + np.exp(-np.concatenate([weight_max * m + bias_max, weight_avg * a + bias_avg], -1)))
    y[..., g * cg:(g + 1) * cg] = new * att[:, None, None]
  return np.stack([y[..., (k % 2) * (c // 2) + k // 2] for k in range(c)], -1)


def test_ssa_indices_follow_the_shuffles():
  # C = 8, G = 2 (C_g = 4, h = 2): group shuffle s = [0, 2, 1, 3] per group -> positions carry x channels
  # [0, 2, 1, 3, 4, 6, 5, 7]; the final shuffle reads positions [0, 4, 1, 5, 2, 6, 3, 7].
  source, pooled, att_of = ssa_indices(8, 2)
  np.testing.assert_array_equal(source, [0, 4, 2, 6, 1, 5, 3, 7])
  # position (g, k) pools position (g, (k + 2) mod 4): x channels [1, 3, 0, 2] in group 0
  np.testing.assert_array_equal(pooled, [1, 3, 0, 2, 5, 7, 4, 6])
  np.testing.assert_array_equal(att_of[source], [0, 4, 1, 5, 2, 6, 3, 7])


def test_tgdf_ssa_takes_the_shuffle_into_its_conv():
  """TGDFSSA.visual's first conv reads the scaled, unshuffled map with permuted kernel rows: the same
  as cv1(SSA(x)) on the shuffled map."""
  layer = TGDFSSA(16, 16, 1, 12, tgdg_config(embed_channels=16, ssa_groups=2), opts=OPTS, rngs=nnx.Rngs(0))
  layer.eval()
  rng = np.random.default_rng(4)
  for name in ('weight_avg', 'bias_avg', 'weight_max', 'bias_max'):
    getattr(layer.ssa, name)[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
  layer.cv1.bn.mean[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
  x = normal(5, (2, 6, 6, 16))
  y = layer.cv1(layer.ssa(x))                                # the shuffled map through the conv as is
  ys = [y[..., :8], y[..., 8:], layer.m[0](y[..., 8:])]
  kernel = layer.cv2.conv.kernel[...][0, 0]
  partial, _, xp = layer.visual(x)
  np.testing.assert_allclose(partial, jnp.concatenate(ys, axis=-1) @ kernel[:24], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(xp, layer.attn.proj_conv(ys[-1]), rtol=1e-5, atol=1e-5)


def test_ssa_matches_index_formulas():
  ssa = SpatialShuffleAttention(24, 3, dropout=0.01)
  ssa.eval()
  rng = np.random.default_rng(0)
  for name in ('weight_avg', 'bias_avg', 'weight_max', 'bias_max'):
    getattr(ssa, name)[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
  x = rng.normal(size=(2, 3, 5, 24)).astype(np.float32)
  expected = ssa_reference(
      x, 3, *(np.asarray(getattr(ssa, n)[...]) for n in ('weight_avg', 'bias_avg', 'weight_max', 'bias_max')))
  np.testing.assert_allclose(ssa(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_ssa_at_init_and_dropout_only_in_training():
  ssa = SpatialShuffleAttention(16, 2, dropout=0.5)
  x = normal(0, (2, 3, 3, 16))
  with pytest.raises(ValueError, match='rngs'):
    ssa(x)
  a, b = ssa(x, rngs=nnx.Rngs(1)), ssa(x, rngs=nnx.Rngs(2))
  assert float(jnp.abs(a - b).max()) > 0
  ssa.eval()
  y = ssa(x)
  # w = 0, b = 1 at init: every attention weight is sigmoid(1); y is a permutation of x scaled by it.
  np.testing.assert_allclose(jnp.sort(y.ravel()), jnp.sort(x.ravel()) * jax.nn.sigmoid(1.0), rtol=1e-5)


def test_gated_max_sigmoid_formula_and_batch1_guides():
  attn = GatedMaxSigmoidAttn(8, 12, embed_channels=16, num_heads=4, guide_hidden=24, gate_init=(0.7, 0.4),
                             opts=OPTS, rngs=nnx.Rngs(0))
  attn.eval()
  x = normal(1, (2, 3, 3, 8))
  text = normal(2, (1, 5, 12))
  out = attn(x, text)
  np.testing.assert_allclose(out, attn(x, jnp.repeat(text, 2, axis=0)), atol=1e-6)   # batch-1 guides repeat
  g = attn.gl(text)[0]                                      # (K, heads, 4)
  e = attn.ec(x).reshape(2, 3, 3, 4, 4)
  s = jnp.einsum('bhwmc,kmc->bhwmk', e, g).max(-1) / math.sqrt(4)
  expected = attn.proj_conv(x).reshape(2, 3, 3, 4, 2) * (1 + 0.4 * 0.7 * (jax.nn.sigmoid(s) - 1))[..., None]
  np.testing.assert_allclose(out, expected.reshape(2, 3, 3, 8), atol=1e-5)


def _attn_grads(layer, x, text):
  """Gradients of sum(out^2) wrt the parameters of the text-attention branch."""
  graphdef, attn_params, rest = nnx.split(layer, nnx.All(nnx.Param, nnx.PathContains('attn')), ...)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p, rest)(x, text) ** 2)

  return jax.jit(jax.grad(loss))(attn_params)


def _abs_sum(tree):
  return sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(tree))


@pytest.mark.parametrize('gate_init', [(0.0, 0.0), (1.0, 0.0)])
def test_text_gates_dead_with_reference_init_live_with_ours(gate_init):
  """Reference (0, 0): the output depends on the gates only through fg * wg, so the gates, the guide
  MLP, tau, beta and the ec conv get exactly zero gradient, now and after any update. Ours (1, 0): the
  feature gate gets a gradient at once; after one step on it the guide MLP gets one too."""
  layer = TGDFSSA(16, 16, 1, 12, tgdg_config(gate_init=gate_init, embed_channels=16, ssa_groups=2,
                                             guide_hidden=16), opts=OPTS, rngs=nnx.Rngs(0))
  layer.eval()
  x = normal(1, (2, 4, 4, 16))
  text = normal(2, (2, 3, 12))
  grads = _attn_grads(layer, x, text)
  assert _abs_sum(grads['attn']['gl']) == 0.0                  # fg = 0 in both: nothing reaches the MLP yet
  fg_grad = grads['attn']['feature_gate'][...]
  if gate_init == (0.0, 0.0):
    for name in ('feature_gate', 'weight_gate', 'temperature', 'bias', 'ec'):
      assert _abs_sum(grads['attn'][name]) == 0.0, name
  else:
    assert float(jnp.abs(fg_grad).min()) > 0.0
  layer.attn.feature_gate[...] = layer.attn.feature_gate[...] - 0.1 * fg_grad      # one SGD step
  guide_grad = _abs_sum(_attn_grads(layer, x, text)['attn']['gl'])
  assert (guide_grad == 0.0) if gate_init == (0.0, 0.0) else (guide_grad > 0.0)


def test_tgdf_ssa_reference_count():
  m = load_config('optsar_rsvg').model
  for c1, c2, expected in ((1024, 256, 1_299_277), (768, 512, 3_217_725), (1024, 512, 3_348_813)):
    layer = nnx.eval_shape(lambda: TGDFSSA(c1, c2, 2, 512, m.tgdg, opts=OPTS, rngs=nnx.Rngs(0)))
    assert sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(layer, nnx.Param))) == expected
    assert sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(layer.attn.gl, nnx.Param))) == 395_520
