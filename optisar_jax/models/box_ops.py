"""Box utilities shared by the head, the loss and evaluation: anchors, DFL decoding, IoU/CIoU, conversions.

Conventions (docs/architecture.md section 7):

* Anchors are cell centres in *grid units*, (w + 0.5, h + 0.5), levels concatenated P3 -> P5, each level
  row-major (index h * W + w). `make_anchors` returns them with a per-anchor stride column, so that
  `points * stride` is the anchor centre in pixels of the letterboxed canvas.
* Box regression logits are side-major: (..., A, 4 * R) = [l(R), t(R), r(R), b(R)]; the DFL expectation of
  each side is a distance in grid units in [0, R - 1].
* Boxes are xyxy unless a name says otherwise. Everything is plain jnp, jit-friendly, static shapes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

CIOU_EPS = 1e-7


def make_anchors(feature_sizes: Sequence[tuple[int, int]],
                 strides: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """Anchor centres of all levels.

  Args:
    feature_sizes: per level (H_i, W_i), static ints.
    strides: per level output stride s_i (pixels per cell).

  Returns:
    points (A, 2) float32: (x, y) = (w + 0.5, h + 0.5) in grid units, A = sum H_i * W_i, levels concatenated,
      row-major inside a level.
    stride (A, 1) float32: the stride of each anchor's level.
  """
  if len(feature_sizes) != len(strides):
    raise ValueError(f'make_anchors: {len(feature_sizes)} feature sizes but {len(strides)} strides')
  points, stride_cols = [], []
  for (height, width), stride in zip(feature_sizes, strides):
    xs = jnp.arange(width, dtype=jnp.float32) + 0.5
    ys = jnp.arange(height, dtype=jnp.float32) + 0.5
    grid_y, grid_x = jnp.meshgrid(ys, xs, indexing='ij')
    points.append(jnp.stack([grid_x, grid_y], axis=-1).reshape(-1, 2))
    stride_cols.append(jnp.full((height * width, 1), float(stride), dtype=jnp.float32))
  return jnp.concatenate(points, axis=0), jnp.concatenate(stride_cols, axis=0)


def dfl_expectation(box_logits: jax.Array) -> jax.Array:
  """Distribution Focal Loss decoding: per side, the softmax expectation over R bins.

  Args:
    box_logits: (..., A, 4 * R), side-major [l, t, r, b].

  Returns:
    (..., A, 4) distances (l, t, r, b) in grid units, each in [0, R - 1].
  """
  num_bins = box_logits.shape[-1] // 4
  if num_bins * 4 != box_logits.shape[-1]:
    raise ValueError(f'dfl_expectation: last axis {box_logits.shape[-1]} is not 4 * reg_max')
  logits = box_logits.reshape(box_logits.shape[:-1] + (4, num_bins)).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  return probs @ jnp.arange(num_bins, dtype=jnp.float32)


def distances_to_boxes(distances: jax.Array, points: jax.Array) -> jax.Array:
  """(..., A, 4) ltrb distances around (A, 2) points -> (..., A, 4) xyxy boxes, in the points' units."""
  left_top, right_bottom = distances[..., :2], distances[..., 2:]
  return jnp.concatenate([points - left_top, points + right_bottom], axis=-1)


def boxes_to_distances(points: jax.Array, boxes: jax.Array, max_distance: float) -> jax.Array:
  """(..., A, 4) xyxy boxes and (A, 2) points -> ltrb distances clipped to [0, max_distance] (same units)."""
  distances = jnp.concatenate([points - boxes[..., :2], boxes[..., 2:] - points], axis=-1)
  return jnp.clip(distances, 0.0, max_distance)


def decode_boxes(box_logits: jax.Array, points: jax.Array, stride: jax.Array) -> jax.Array:
  """DFL logits -> boxes.

  Args:
    box_logits: (..., A, 4 * R).
    points: (A, 2) anchor centres in grid units (from `make_anchors`).
    stride: (A, 1) per-anchor stride.

  Returns:
    (..., A, 4) xyxy boxes in pixels of the letterboxed canvas.
  """
  return distances_to_boxes(dfl_expectation(box_logits), points) * stride


def _iou_terms(box1: jax.Array, box2: jax.Array, eps: float):
  b1_x1, b1_y1, b1_x2, b1_y2 = (box1[..., i] for i in range(4))
  b2_x1, b2_y1, b2_x2, b2_y2 = (box2[..., i] for i in range(4))
  w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
  w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps
  inter = (jnp.clip(jnp.minimum(b1_x2, b2_x2) - jnp.maximum(b1_x1, b2_x1), 0.0)
           * jnp.clip(jnp.minimum(b1_y2, b2_y2) - jnp.maximum(b1_y1, b2_y1), 0.0))
  union = w1 * h1 + w2 * h2 - inter + eps
  return inter / union, (b1_x1, b1_y1, b1_x2, b1_y2, w1, h1), (b2_x1, b2_y1, b2_x2, b2_y2, w2, h2)


def box_iou(box1: jax.Array, box2: jax.Array, eps: float = CIOU_EPS) -> jax.Array:
  """Elementwise IoU of broadcastable (..., 4) xyxy boxes -> (...). Ultralytics `bbox_iou` conventions
  (eps added to the heights and to the union)."""
  iou, _, _ = _iou_terms(box1, box2, eps)
  return iou


def ciou(box1: jax.Array, box2: jax.Array, eps: float = CIOU_EPS) -> jax.Array:
  """Elementwise Complete IoU of broadcastable (..., 4) xyxy boxes -> (...), as Ultralytics
  `bbox_iou(..., xywh=False, CIoU=True)`:

    CIoU = IoU - rho^2 / c^2 - alpha * v,  v = 4 / pi^2 * (atan(w2 / h2) - atan(w1 / h1))^2,
    alpha = v / (v - IoU + 1 + eps) with no gradient, c = diagonal of the enclosing box.
  """
  iou, (b1_x1, b1_y1, b1_x2, b1_y2, w1, h1), (b2_x1, b2_y1, b2_x2, b2_y2, w2, h2) = _iou_terms(box1, box2, eps)
  enclose_w = jnp.maximum(b1_x2, b2_x2) - jnp.minimum(b1_x1, b2_x1)
  enclose_h = jnp.maximum(b1_y2, b2_y2) - jnp.minimum(b1_y1, b2_y1)
  diag2 = enclose_w ** 2 + enclose_h ** 2 + eps
  rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4.0
  v = (4.0 / math.pi ** 2) * (jnp.arctan(w2 / h2) - jnp.arctan(w1 / h1)) ** 2
  alpha = jax.lax.stop_gradient(v / (v - iou + (1.0 + eps)))
  return iou - (rho2 / diag2 + v * alpha)


