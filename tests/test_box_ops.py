"""Anchors, DFL decoding, top-1, IoU/CIoU and letterbox undo, against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optisar_jax.models import box_ops


def test_make_anchors_two_levels():
  points, stride = box_ops.make_anchors([(2, 3), (1, 1)], [8, 16])
  expected = [[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [0.5, 1.5], [1.5, 1.5], [2.5, 1.5], [0.5, 0.5]]
  np.testing.assert_array_equal(np.asarray(points), expected)
  np.testing.assert_array_equal(np.asarray(stride)[:, 0], [8] * 6 + [16])
  assert points.dtype == jnp.float32 and stride.shape == (7, 1)


def test_dfl_expectation_one_hot_and_uniform():
  bins = 16
  logits = np.full((1, 2, 4 * bins), -1e4, np.float32)
  for side, j in enumerate([0, 3, 7, 15]):
    logits[0, 0, side * bins + j] = 0.0
  logits[0, 1] = 0.0                                  # uniform -> expectation 7.5
  dist = np.asarray(jax.jit(box_ops.dfl_expectation)(jnp.asarray(logits)))
  np.testing.assert_allclose(dist[0, 0], [0, 3, 7, 15], atol=1e-5)
  np.testing.assert_allclose(dist[0, 1], [7.5] * 4, atol=1e-5)


def test_decode_boxes_pixels():
  points, stride = box_ops.make_anchors([(2, 2)], [8])
  bins = 4
  logits = np.full((1, 4, 4 * bins), -1e4, np.float32)
  for side, j in enumerate([1, 0, 2, 3]):            # l, t, r, b at anchor (1.5, 0.5)
    logits[0, 1, side * bins + j] = 0.0
  boxes = np.asarray(jax.jit(box_ops.decode_boxes)(jnp.asarray(logits), points, stride))
  np.testing.assert_allclose(boxes[0, 1], [(1.5 - 1) * 8, (0.5 - 0) * 8, (1.5 + 2) * 8, (0.5 + 3) * 8], atol=1e-4)


def test_iou_and_ciou_hand_values():
  gt = jnp.asarray([[0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 3.0, 3.0], [0.0, 0.0, 3.0, 3.0]])
  pred = jnp.asarray([[1.0, 1.0, 5.0, 3.0], [0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 3.0, 3.0], [9.0, 9.0, 10.0, 10.0]])
  iou, ciou = jax.jit(lambda a, b: (box_ops.box_iou(a, b), box_ops.ciou(a, b)))(gt, pred)
  # Same aspect ratio (v = 0): IoU = 3/13, rho^2 = 2, c^2 = 5^2 + 3^2.
  assert float(iou[0]) == pytest.approx(3 / 13, abs=1e-6)
  assert float(ciou[0]) == pytest.approx(3 / 13 - 2 / 34, abs=1e-6)
  # Different aspect: IoU = 0.5, rho^2 = 1, c^2 = 20, v = 4/pi^2 (atan 2 - atan 1)^2.
  v = 4 / math.pi ** 2 * (math.atan(2.0) - math.atan(1.0)) ** 2
  alpha = v / (v - 0.5 + 1)
  assert float(iou[1]) == pytest.approx(0.5, abs=1e-6)
  assert float(ciou[1]) == pytest.approx(0.5 - 1 / 20 - alpha * v, abs=1e-6)
  # Identical boxes: CIoU = IoU = 1; disjoint boxes: negative CIoU.
  assert float(ciou[2]) == pytest.approx(1.0, abs=1e-6) and float(iou[3]) == 0 and float(ciou[3]) < 0


def test_ciou_broadcasts_and_alpha_has_no_gradient():
  out = jax.jit(box_ops.ciou)(jnp.zeros((3, 1, 4)) + jnp.asarray([0.0, 0.0, 3.0, 3.0]), jnp.ones((1, 5, 4)))
  assert out.shape == (3, 5)
  gt = jnp.asarray([0.0, 0.0, 2.0, 2.0])
  pred = jnp.asarray([0.5, -0.5, 4.0, 2.0])
  grad = jax.jit(jax.grad(lambda p: box_ops.ciou(gt, p)))(pred)

  # An independent CIoU whose alpha is a constant (computed once, in numpy, at `pred`): its gradient is
  # what CIoU's gradient must be when alpha carries none.
  def terms(p):
    iw = jnp.maximum(jnp.minimum(gt[2], p[2]) - jnp.maximum(gt[0], p[0]), 0.0)
    ih = jnp.maximum(jnp.minimum(gt[3], p[3]) - jnp.maximum(gt[1], p[1]), 0.0)
    inter = iw * ih
    w1, h1, w2, h2 = gt[2] - gt[0], gt[3] - gt[1], p[2] - p[0], p[3] - p[1]
    iou = inter / (w1 * h1 + w2 * h2 - inter + box_ops.CIOU_EPS)
    cw = jnp.maximum(gt[2], p[2]) - jnp.minimum(gt[0], p[0])
    ch = jnp.maximum(gt[3], p[3]) - jnp.minimum(gt[1], p[1])
    rho2 = ((p[0] + p[2] - gt[0] - gt[2]) ** 2 + (p[1] + p[3] - gt[1] - gt[3]) ** 2) / 4
    v = 4 / np.pi ** 2 * (jnp.arctan(w2 / h2) - jnp.arctan(w1 / h1)) ** 2
    return iou, rho2 / (cw ** 2 + ch ** 2 + box_ops.CIOU_EPS), v

  iou0, _, v0 = (float(x) for x in terms(pred))
  alpha = v0 / (v0 - iou0 + 1.0 + box_ops.CIOU_EPS)
  assert alpha > 0.01                               # the alpha term matters at this box

  def reference(p):
    iou, dist, v = terms(p)
    return iou - dist - alpha * v

  assert float(box_ops.ciou(gt, pred)) == pytest.approx(float(reference(pred)), abs=1e-6)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.grad(reference)(pred)), rtol=1e-4, atol=1e-6)


