"""The training objective of OptiSAR-Net++ (Ultralytics `v8DetectionLoss` + region and MoE terms).

    total = box + cls + dfl + region + moe, each component already multiplied by its config weight:

* box    = loss.box * sum_fg w_a (1 - CIoU(pred_a, target_a)) / S          (boxes in grid units)
* dfl    = loss.dfl * sum_fg w_a DFL_a / S, DFL_a = mean over the 4 sides of the two-bin interpolated CE,
           targets clipped to [0, reg_max - 1 - 0.01]
* cls    = loss.cls * sum_{b,a,k} BCEWithLogits(logit, target) / S over the slots that are trained
           (`batch['text_mask']`, and `num_slots_mask` when given)
* region = loss.region * mean over levels of the weighted mean over (B, H, W) of CE(region logits, positional
           label); weight `loss.region_fg_weight` on assigner foreground anchors, 1 elsewhere
* moe    = loss.moe * outputs['moe_aux_loss']

S = max(sum of all target scores, 1), w_a = sum_k target_a,k. Every sum (and the region means) runs over the
GLOBAL batch, once: call the loss inside `jax.jit` on the global, sharded batch and the result is the same for
any device count (deviation 11.4 of docs/training-and-data.md: the reference multiplies per-device losses by the
per-device batch size and the world size; we do not).

Anchors are passed in, computed once from the static feature sizes:

    anchors = box_ops.make_anchors(feature_sizes, strides)
    total, components = detection_loss(outputs, batch, anchors, config.loss)
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optisar_jax.models import box_ops
from optisar_jax.train import assigner

COMPONENTS = ('box', 'cls', 'dfl', 'region', 'moe')


def region_labels(height: int, width: int, grid: int) -> np.ndarray:
  """Positional region labels of an (height, width) map split into a grid x grid partition.

  Returns:
    (height, width) int32: row * grid + col with row = min(floor((h + 0.5) / height * grid), grid - 1) and
    col likewise (a static constant).
  """
  rows = np.minimum(np.floor((np.arange(height) + 0.5) / height * grid), grid - 1).astype(np.int32)
  cols = np.minimum(np.floor((np.arange(width) + 0.5) / width * grid), grid - 1).astype(np.int32)
  return rows[:, None] * grid + cols[None, :]


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise, numerically stable binary cross-entropy on logits."""
  return jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def dfl_loss(box_logits: jax.Array, target_distances: jax.Array) -> jax.Array:
  """Distribution Focal Loss per anchor.

  Args:
    box_logits: (..., 4 * R) side-major logits.
    target_distances: (..., 4) ltrb targets in grid units, already within [0, R - 1).

  Returns:
    (...) mean over the 4 sides of CE(bins, l) (l + 1 - d) + CE(bins, l + 1) (d - l), l = floor(d).
  """
  num_bins = box_logits.shape[-1] // 4
  log_probs = jax.nn.log_softmax(box_logits.reshape(box_logits.shape[:-1] + (4, num_bins)), axis=-1)
  left = jnp.floor(target_distances)
  weight_left = left + 1.0 - target_distances
  left_idx = jnp.clip(left.astype(jnp.int32), 0, num_bins - 1)
  right_idx = jnp.clip(left_idx + 1, 0, num_bins - 1)
  ce_left = -jnp.take_along_axis(log_probs, left_idx[..., None], axis=-1)[..., 0]
  ce_right = -jnp.take_along_axis(log_probs, right_idx[..., None], axis=-1)[..., 0]
  return jnp.mean(ce_left * weight_left + ce_right * (1.0 - weight_left), axis=-1)


def region_loss(region_logits: Sequence[jax.Array], fg_mask: jax.Array, fg_weight: float) -> jax.Array:
  """Self-supervised region loss, averaged over levels.

  Args:
    region_logits: per level (B, H_i, W_i, r_i^2); levels in anchor order.
    fg_mask: (B, A) assigner foreground, A = sum H_i W_i.
    fg_weight: weight of foreground locations (1 elsewhere).

  Returns:
    scalar: mean over levels of sum(w * CE) / sum(w) over (B, H_i, W_i).
  """
  per_level, offset = [], 0
  for logits in region_logits:
    batch, height, width, classes = logits.shape
    grid = math.isqrt(classes)
    if grid * grid != classes:
      raise ValueError(f'region logits with {classes} classes: not a square grid')
    labels = jnp.asarray(region_labels(height, width, grid))
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(log_probs, jnp.broadcast_to(labels, (batch, height, width))[..., None], axis=-1)
    fg = fg_mask[:, offset:offset + height * width].reshape(batch, height, width)
    weight = jnp.where(fg, fg_weight, 1.0)
    per_level.append(jnp.sum(weight * ce[..., 0]) / jnp.sum(weight))
    offset += height * width
  if offset != fg_mask.shape[1]:
    raise ValueError(f'region logits cover {offset} locations, the assigner {fg_mask.shape[1]} anchors')
  return jnp.mean(jnp.stack(per_level))


def detection_loss(outputs: Mapping[str, Any], batch: Mapping[str, Any],
                   anchors: tuple[jax.Array, jax.Array], loss_config: Any, *,
                   num_slots_mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The full training loss of one (global) batch.

  Args:
    outputs: model outputs (docs/internals.md): `box_logits` (B, A, 4R), `region_text_logits` (B, A, K),
      `region_logits` tuple of (B, H_i, W_i, r_i^2), `moe_aux_loss` scalar (optional).
    batch: `boxes` (B, M, 4) xyxy canvas pixels, `box_slots` (B, M), `box_mask` (B, M) bool, and optionally
      `text_mask` (B, K) bool (False = the slot is not trained).
    anchors: (points (A, 2) grid units, stride (A, 1)) from `box_ops.make_anchors`.
    loss_config: the `loss` config section (box, cls, dfl, region, moe, assigner_topk, assigner_alpha,
      assigner_beta, small_box_px, small_box_expand_px, region_fg_weight); a dict works too.
    num_slots_mask: optional (B, K) or (K,) bool, ANDed with `text_mask` (e.g. to ignore slots padded to a
      fixed K).

  Returns:
    (total, components): scalars; components = {box, cls, dfl, region, moe}, each weighted, summing to total.
  """
  points, stride = anchors
  box_logits = jnp.asarray(outputs['box_logits'], jnp.float32)
  slot_logits = jnp.asarray(outputs['region_text_logits'], jnp.float32)
  num_anchors = box_logits.shape[1]
  if points.shape[0] != num_anchors or slot_logits.shape[1] != num_anchors:
    raise ValueError(f'detection_loss: {points.shape[0]} anchors, box logits for {num_anchors}, '
                     f'slot logits for {slot_logits.shape[1]}')
  reg_max = box_logits.shape[-1] // 4

  pred_grid = box_ops.distances_to_boxes(box_ops.dfl_expectation(box_logits), points)   # (B, A, 4)
  assignment = assigner.task_aligned_assign(
      jax.nn.sigmoid(slot_logits), pred_grid * stride, points * stride,
      jnp.asarray(batch['boxes'], jnp.float32), batch['box_slots'], batch['box_mask'],
      topk=int(loss_config['assigner_topk']), alpha=float(loss_config['assigner_alpha']),
      beta=float(loss_config['assigner_beta']), small_box_px=float(loss_config['small_box_px']),
      small_box_expand_px=float(loss_config['small_box_expand_px']))
  target_scores = assignment.target_scores
  fg = assignment.fg_mask
  score_sum = jnp.maximum(jnp.sum(target_scores), 1.0)
  anchor_weight = jnp.where(fg, jnp.sum(target_scores, axis=-1), 0.0)                # (B, A)

  target_grid = assignment.target_boxes / stride
  iou = box_ops.ciou(pred_grid, target_grid)
  box = jnp.sum(jnp.where(fg, (1.0 - iou) * anchor_weight, 0.0)) / score_sum

  target_dist = box_ops.boxes_to_distances(points, target_grid, reg_max - 1 - 0.01)
  dfl = jnp.sum(jnp.where(fg, dfl_loss(box_logits, target_dist) * anchor_weight, 0.0)) / score_sum

  slot_mask = jnp.ones((slot_logits.shape[0], slot_logits.shape[2]), bool)             # (B, K)
  if batch.get('text_mask') is not None:
    slot_mask = slot_mask & jnp.asarray(batch['text_mask'], bool)
  if num_slots_mask is not None:
    slot_mask = slot_mask & jnp.asarray(num_slots_mask, bool)
  bce = bce_with_logits(slot_logits, target_scores)
  cls = jnp.sum(jnp.where(slot_mask[:, None, :], bce, 0.0)) / score_sum

  region = region_loss(outputs['region_logits'], fg, float(loss_config['region_fg_weight']))
  moe = jnp.asarray(outputs.get('moe_aux_loss', 0.0), jnp.float32)

  components = {
      'box': float(loss_config['box']) * box,
      'cls': float(loss_config['cls']) * cls,
      'dfl': float(loss_config['dfl']) * dfl,
      'region': float(loss_config['region']) * region,
      'moe': float(loss_config['moe']) * moe,
  }
  total = sum(components[name] for name in COMPONENTS)
  return total, components
