"""Detection loss: DFL interpolation, region labels, slot masking, global normalisation, sharding invariance."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from optisar_jax import config as config_lib
from optisar_jax.models import box_ops
from optisar_jax.train import losses

SIZES, STRIDES, REG_MAX, K = [(4, 4), (2, 2)], [8, 16], 16, 3


def _loss_config():
  return config_lib.load_config('optsar_rsvg').loss


def _toy(batch=8, seed=0):
  rng = np.random.default_rng(seed)
  num_anchors = sum(h * w for h, w in SIZES)
  outputs = {
      'box_logits': jnp.asarray(rng.normal(size=(batch, num_anchors, 4 * REG_MAX)), jnp.float32),
      'region_text_logits': jnp.asarray(rng.normal(size=(batch, num_anchors, K)) - 2.0, jnp.float32),
      'region_logits': (jnp.asarray(rng.normal(size=(batch, 4, 4, 16)), jnp.float32),
                        jnp.asarray(rng.normal(size=(batch, 2, 2, 4)), jnp.float32)),
      'moe_aux_loss': jnp.asarray(0.002, jnp.float32),
  }
  # Image 0: one box (second row padded); image 1: no box at all; the others: two boxes.
  boxes = np.zeros((batch, 2, 4), np.float32)
  boxes[:, 0] = [2.0, 3.0, 20.0, 25.0]
  boxes[2:, 1] = [10.0, 8.0, 30.0, 30.0]
  boxes[1] = 0.0
  mask = np.ones((batch, 2), bool)
  mask[0, 1] = mask[1, :] = False
  batch_dict = {
      'boxes': jnp.asarray(boxes),
      'box_slots': jnp.asarray(np.tile([[0, 1]], (batch, 1)), jnp.int32),
      'box_mask': jnp.asarray(mask),
      'text_mask': jnp.asarray(np.tile([[True, True, False]], (batch, 1))),
  }
  return outputs, batch_dict


def test_region_labels_16_4_4_grids():
  labels = losses.region_labels(8, 8, 4)
  assert labels[0, 0] == 0 and labels[7, 7] == 15 and labels[1, 1] == 0 and labels[2, 3] == 5
  labels = losses.region_labels(80, 80, 4)
  assert labels[0, 0] == 0 and labels[79, 79] == 15 and labels[20, 0] == 4 and labels[19, 79] == 3
  labels = losses.region_labels(40, 40, 2)
  assert labels[19, 19] == 0 and labels[20, 20] == 3 and labels[0, 39] == 1
  labels = losses.region_labels(5, 5, 2)                  # centre cell: floor(2.5 / 5 * 2) = 1
  assert labels[2, 2] == 3 and labels[1, 1] == 0
  assert sorted(np.unique(losses.region_labels(20, 20, 2)).tolist()) == [0, 1, 2, 3]


def test_region_loss_weighted_mean():
  logits = np.zeros((1, 2, 2, 4), np.float32)
  logits[0, 0, 0, 0] = math.log(3.0)                      # label of (0, 0) is 0: CE = log(6 / 3)
  fg = jnp.asarray([[True, False, False, False]])
  value = float(losses.region_loss((jnp.asarray(logits),), fg, 2.0))
  expected = (2 * math.log(2.0) + 3 * math.log(4.0)) / 5   # other cells uniform: CE = log(4); weights 2,1,1,1
  assert value == pytest.approx(expected, rel=1e-6)


def test_dfl_interpolation_value():
  logits = np.zeros((1, 4 * REG_MAX), np.float32)
  logits[0, 2::REG_MAX] = math.log(3.0)                   # bin 2 of every side: p2 = 3/18, others 1/18
  value = float(losses.dfl_loss(jnp.asarray(logits), jnp.full((1, 4), 2.25))[0])
  assert value == pytest.approx(0.75 * math.log(6.0) + 0.25 * math.log(18.0), rel=1e-6)
  # Targets beyond reg_max - 1 are clipped to 14.99: weight 0.01 on bin 14, 0.99 on bin 15.
  dist = box_ops.boxes_to_distances(jnp.zeros((1, 2)), jnp.asarray([[-20.0, -1.0, 30.0, 1.0]]), REG_MAX - 1 - 0.01)
  np.testing.assert_allclose(np.asarray(dist), [[14.99, 1.0, 14.99, 1.0]], rtol=1e-6)


_CFG = _loss_config()
_ANCHORS = box_ops.make_anchors(SIZES, STRIDES)
_loss = jax.jit(lambda o, b, m: losses.detection_loss(o, b, _ANCHORS, _CFG, num_slots_mask=m))
_ALL_SLOTS = jnp.ones((K,), bool)


def test_loss_finite_components_and_gradient():
  outputs, batch = _toy()
  total, comps = _loss(outputs, batch, _ALL_SLOTS)
  assert set(comps) == {'box', 'cls', 'dfl', 'region', 'moe'}
  assert all(np.isfinite(float(v)) for v in comps.values())
  assert float(total) == pytest.approx(sum(float(v) for v in comps.values()), rel=1e-6)
  assert float(comps['box']) > 0 and float(comps['dfl']) > 0
  assert float(comps['moe']) == pytest.approx(1.5 * 0.002)
  grads = jax.jit(jax.grad(lambda o: _loss(o, batch, _ALL_SLOTS)[0]))(outputs)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  # A slot with text_mask False contributes nothing: no gradient, and the loss ignores its logits.
  assert np.all(np.asarray(grads['region_text_logits'])[..., 2] == 0)
  changed = dict(outputs, region_text_logits=outputs['region_text_logits'].at[..., 2].set(50.0))
  assert float(_loss(changed, batch, _ALL_SLOTS)[0]) == pytest.approx(float(total), rel=1e-7)
  # num_slots_mask removes a further slot.
  masked, _ = _loss(outputs, batch, jnp.asarray([True, False, True]))
  assert float(masked) < float(total)


def test_no_gt_hand_value():
  outputs, batch = _toy()
  outputs = dict(outputs, region_text_logits=jnp.zeros_like(outputs['region_text_logits']),
                 region_logits=tuple(jnp.zeros_like(r) for r in outputs['region_logits']))
  batch = dict(batch, box_mask=jnp.zeros_like(batch['box_mask']))
  _, comps = _loss(outputs, batch, _ALL_SLOTS)
  assert float(comps['box']) == 0 and float(comps['dfl']) == 0
  # BCE(0, 0) = log 2 over 8 images x 20 anchors x 2 trained slots, S = 1; region: uniform logits.
  # float32 sum of 320 terms: its rounding (~1e-6 relative) depends on XLA's reduction order
  assert float(comps['cls']) == pytest.approx(0.5 * 8 * 20 * 2 * math.log(2.0), rel=1e-5)
  assert float(comps['region']) == pytest.approx((math.log(16.0) + math.log(4.0)) / 2, rel=1e-6)


def test_same_loss_under_sharding():
  outputs, batch = _toy(seed=1)
  ref_total, ref = _loss(outputs, batch, _ALL_SLOTS)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P('data'))) if x.ndim else x
  total, comps = _loss(jax.tree.map(shard, outputs), jax.tree.map(shard, batch), _ALL_SLOTS)
  assert float(total) == pytest.approx(float(ref_total), rel=1e-5)
  for name in ref:
    assert float(comps[name]) == pytest.approx(float(ref[name]), rel=1e-5, abs=1e-7)
