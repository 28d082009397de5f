"""PL-MoE: patch rule and partition, sparse cosine gate, balance loss, gate noise, LoRA mixing, counts."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from optisar_jax.config import load_config
from optisar_jax.models.layers import LayerOptions
from optisar_jax.models.moe import (CosineTopKGate, PatchMoE, PLMoE, SharedLoRAExperts, balance_loss,
                                    partition_patches, patch_size_for, unpartition_patches)

OPTS = LayerOptions()


def normal(seed, shape):
  """Test inputs from numpy: eager jax.random would compile a threefry program per shape."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def small_moe_config(**changes):
  c = ml_collections.ConfigDict(dict(load_config('tiny').model.moe))
  c.update(changes)
  return c


def test_patch_size_rule():
  assert patch_size_for(20, 20, 2, 32) == 2       # 640 px input: 10 x 10 patches of P5
  assert patch_size_for(8, 20, 2, 32) == 2
  assert patch_size_for(80, 20, 2, 32) == 4
  assert patch_size_for(7, 20, 2, 32) == 1        # prime: only 1 divides
  assert patch_size_for(9, 2, 2, 32) == 3         # ideal 4 does not divide; 3 is searched before 5
  assert patch_size_for(36, 7, 2, 32) == 4        # ideal 5: both 4 and 6 divide, the smaller wins
  assert patch_size_for(640, 20, 2, 8) == 8       # ideal clamped to max_patch


def test_partition_inverse_divisible_and_padded():
  x = normal(0, (2, 6, 8, 3))
  p = partition_patches(x, 2, 4)
  assert p.shape == (2 * 3 * 2, 2, 4, 3)
  np.testing.assert_array_equal(p[1], x[0, 0:2, 4:8])      # patch order (b, row, col)
  np.testing.assert_array_equal(unpartition_patches(p, 2, 6, 8), x)
  y = normal(1, (2, 5, 7, 3))   # 5 x 7 with 2 x 3 patches: zero-padded to 6 x 9
  q = partition_patches(y, 2, 3)
  assert q.shape == (2 * 3 * 3, 2, 3, 3)
  np.testing.assert_array_equal(q[8][:1, :1], y[0, 4:5, 6:7])
  assert float(jnp.abs(q[8]).sum() - jnp.abs(y[0, 4, 6]).sum()) == 0.0   # rest of that patch is padding
  np.testing.assert_array_equal(unpartition_patches(q, 2, 5, 7), y)


def test_sparse_gate_top_k_rows_sum_to_one():
  gate = CosineTopKGate(16, 8, 2, proj_dim=8, noisy=True, rngs=nnx.Rngs(0))
  gate.eval()
  g = normal(1, (50, 16))
  gates, prob, dispatch = gate(g)
  np.testing.assert_array_equal((gates > 0).sum(-1), 2)
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(dispatch, (gates > 0).astype(jnp.float32))
  np.testing.assert_allclose(prob.sum(-1), 1.0, rtol=1e-6)
  # The two kept gates are the softmax of the two largest router logits.
  top = jnp.sort(prob, -1)[:, -2:]
  np.testing.assert_allclose(jnp.sort(gates, -1)[:, -2:], top / top.sum(-1, keepdims=True), rtol=1e-5)


def test_balance_loss_uniform_routing_is_coef_times_top_k():
  e, k, n = 8, 2, 40
  prob = jnp.full((n, e), 1.0 / e)
  dispatch = jnp.stack([jax.nn.one_hot(i % e, e) + jax.nn.one_hot((i + 1) % e, e) for i in range(n)])
  np.testing.assert_allclose(balance_loss(prob, dispatch, 1e-3), 1e-3 * k, rtol=1e-6)
  skewed = jnp.zeros((n, e)).at[:, :2].set(1.0)              # everything to experts 0, 1
  skewed_prob = jnp.zeros((n, e)).at[:, :2].set(0.5)
  np.testing.assert_allclose(balance_loss(skewed_prob, skewed, 1e-3), 1e-3 * e, rtol=1e-6)


def test_gate_noise_only_in_train_mode():
  gate = CosineTopKGate(16, 8, 2, proj_dim=8, noisy=True, rngs=nnx.Rngs(0))
  g = normal(1, (64, 16))
  with pytest.raises(ValueError, match='rngs'):
    gate(g)
  train_a = gate(g, rngs=nnx.Rngs(1))[1]
  train_b = gate(g, rngs=nnx.Rngs(2))[1]
  assert float(jnp.abs(train_a - train_b).max()) > 1e-3
  gate.eval()
  eval_a, eval_b = gate(g, rngs=nnx.Rngs(1))[1], gate(g)[1]
  np.testing.assert_array_equal(eval_a, eval_b)


def test_shared_lora_mixing_equals_explicit_per_expert_sum():
  experts = SharedLoRAExperts(8, 4, 6, opts=OPTS, rngs=nnx.Rngs(0))
  experts.eval()
  key = jax.random.key(5)
  # B is zero at init (deltas vanish); give it values so that the mixing is actually exercised.
  experts.lora1_b[...] = 0.3 * normal(54, experts.lora1_b.shape)
  experts.lora2_b[...] = 0.3 * normal(55, experts.lora2_b.shape)
  patches = normal(6, (5, 2, 2, 8))
  gates = jax.nn.softmax(normal(7, (5, 4)), -1)
  s = float(experts.lora_scale[0])

  def lora(x, a, b):
    out = np.array(x)
    for n in range(x.shape[0]):
      m = sum(float(gates[n, e]) * (np.asarray(a[e]) @ np.asarray(b[e])) for e in range(4))
      out[n] = x[n] + s * np.einsum('cd,xyd->xyc', m, x[n])
    return jnp.asarray(out)

  h = lora(experts.conv1(patches), experts.lora1_a[...], experts.lora1_b[...])
  expected = lora(experts.conv2(h), experts.lora2_a[...], experts.lora2_b[...])
  np.testing.assert_allclose(experts(patches, gates, 1), expected, atol=1e-4)


def test_plmoe_forward_and_reference_count():
  cfg = small_moe_config()
  layer = PLMoE(16, 16, 1, cfg, opts=OPTS, rngs=nnx.Rngs(0))
  x = normal(0, (2, 4, 6, 16))
  y, aux = nnx.jit(lambda m, v, r: m(v, rngs=r))(layer, x, nnx.Rngs(1))
  assert y.shape == x.shape and bool(jnp.isfinite(y).all())
  coef, k, e = cfg.loss_coef, cfg.top_k, cfg.num_experts
  assert coef * k - 1e-7 <= float(aux) <= coef * e + 1e-7
  # Reference count of layer 8 at scale m (docs/architecture.md section 5).
  m_cfg = load_config('optsar_rsvg').model.moe
  abstract = nnx.eval_shape(lambda: PLMoE(512, 512, 1, m_cfg, opts=OPTS, rngs=nnx.Rngs(0)))
  assert sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == 2_908_099
  lora = abstract.m[0].moe.experts
  assert sum(math.prod(getattr(lora, n).shape) for n in ('lora1_a', 'lora1_b', 'lora2_a', 'lora2_b')) == 1_572_864


def test_patch_moe_uses_patch_rule_at_trace_time():
  cfg = small_moe_config(target_patches=2, min_patch=2)
  moe = PatchMoE(8, cfg, opts=OPTS, rngs=nnx.Rngs(0))
  moe.eval()
  x = normal(0, (1, 8, 8, 8))
  out, aux = moe(x)
  assert out.shape == x.shape
  # Patches are isolated: changing one 4x4 patch leaves the outputs of the other three unchanged.
  x2 = x.at[0, :4, :4].add(1.0)
  out2, _ = moe(x2)
  np.testing.assert_allclose(out2[0, 4:, :], out[0, 4:, :], atol=1e-6)
  np.testing.assert_allclose(out2[0, :4, 4:], out[0, :4, 4:], atol=1e-6)
  assert float(jnp.abs(out2[0, :4, :4] - out[0, :4, :4]).max()) > 0
