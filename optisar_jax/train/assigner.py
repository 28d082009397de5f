"""Task-Aligned assigner (TOOD / Ultralytics `TaskAlignedAssigner`), with the reference's small-box rule.

For every image, each valid ground-truth box m (answering text slot k_m) is matched to anchors:

1. Candidates: anchors whose centre lies strictly inside the gt box (smallest of the four margins > eps).
   For this test only, a gt side shorter than `small_box_px` is replaced by `small_box_expand_px` around
   the same centre (width and height separately).
2. For candidates: overlap = max(CIoU(gt, predicted box), 0), s = predicted score of slot k_m,
   align = s^alpha * overlap^beta. Non-candidates have align = overlap = 0.
3. Per gt, the `topk` anchors with the largest align (over all anchors; ties -> lower anchor index) that are
   also candidates become positives.
4. An anchor positive for several gts is given to the gt with the largest overlap over ALL gts (argmax of
   the overlap column, as Ultralytics `select_highest_overlaps`; padded gts never win).
5. Targets: the assigned gt's box, one-hot of its slot scaled by
   align / max_align(gt) * max_overlap(gt) (maxima over that gt's positives); zero for background.

All inputs are treated as constants (stop_gradient). Static shapes: gts are padded to M with a mask.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optisar_jax.models import box_ops


class Assignment(NamedTuple):
  """Assigner output (a pytree).

  target_slots (B, A) int32: slot of the assigned gt (slot of gt 0 for background anchors).
  target_boxes (B, A, 4) float32: assigned gt box, xyxy pixels (gt 0's box for background anchors).
  target_scores (B, A, K) float32: one-hot slot x normalised align metric; all zero for background.
  fg_mask (B, A) bool: anchor has a gt.
  target_gt_idx (B, A) int32: index of the assigned gt in 0..M-1 (0 for background anchors).
  """
  target_slots: jax.Array
  target_boxes: jax.Array
  target_scores: jax.Array
  fg_mask: jax.Array
  target_gt_idx: jax.Array


@functools.partial(jax.jit, static_argnames=('small_box_px', 'small_box_expand_px', 'eps'))
def candidates_in_gts(anchor_points: jax.Array, gt_boxes: jax.Array, *, small_box_px: float = 8.0,
                      small_box_expand_px: float = 16.0, eps: float = 1e-9) -> jax.Array:
  """Which anchor centres lie strictly inside which gt boxes.

  Args:
    anchor_points: (A, 2) anchor centres in pixels.
    gt_boxes: (B, M, 4) xyxy pixels.

  Returns:
    (B, M, A) bool. Gt sides shorter than `small_box_px` are widened to `small_box_expand_px` (same centre)
    for this test only.
  """
  size = gt_boxes[..., 2:] - gt_boxes[..., :2]
  centre = (gt_boxes[..., 2:] + gt_boxes[..., :2]) / 2.0
  small = size < small_box_px                                            # (B, M, 2): width, height
  top_left = jnp.where(small, centre - 0.5 * small_box_expand_px, gt_boxes[..., :2])
  bottom_right = jnp.where(small, centre + 0.5 * small_box_expand_px, gt_boxes[..., 2:])
  points = anchor_points[None, None]                                     # (1, 1, A, 2)
  deltas = jnp.concatenate([points - top_left[..., None, :], bottom_right[..., None, :] - points], axis=-1)
  return jnp.min(deltas, axis=-1) > eps


@functools.partial(jax.jit, static_argnames=('topk', 'alpha', 'beta', 'eps', 'small_box_px',
                                             'small_box_expand_px'))
def task_aligned_assign(pred_scores: jax.Array, pred_boxes: jax.Array, anchor_points: jax.Array,
                        gt_boxes: jax.Array, gt_slots: jax.Array, gt_mask: jax.Array, *, topk: int = 10,
                        alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9, small_box_px: float = 8.0,
                        small_box_expand_px: float = 16.0) -> Assignment:
  """Assigns gts to anchors (see the module docstring).

  Args:
    pred_scores: (B, A, K) sigmoid match probabilities.
    pred_boxes: (B, A, 4) predicted xyxy boxes in pixels.
    anchor_points: (A, 2) anchor centres in pixels.
    gt_boxes: (B, M, 4) xyxy pixels (anything where padded).
    gt_slots: (B, M) int slot index of each gt (anything where padded).
    gt_mask: (B, M) bool, True for real gts.

  Returns:
    `Assignment`.
  """
  pred_scores, pred_boxes, anchor_points, gt_boxes = (
      jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
      for x in (pred_scores, pred_boxes, anchor_points, gt_boxes))
  _, num_anchors, num_slots = pred_scores.shape
  num_gts = gt_boxes.shape[1]
  gt_mask = jnp.asarray(gt_mask, bool)
  gt_slots = jnp.clip(jnp.asarray(gt_slots, jnp.int32), 0, num_slots - 1)

  in_gts = candidates_in_gts(anchor_points, gt_boxes, small_box_px=small_box_px,
                             small_box_expand_px=small_box_expand_px, eps=eps) & gt_mask[..., None]
  overlaps = jnp.clip(box_ops.ciou(gt_boxes[:, :, None, :], pred_boxes[:, None, :, :]), 0.0)
  overlaps = jnp.where(in_gts, overlaps, 0.0)                            # (B, M, A)
  slot_scores = jnp.take_along_axis(jnp.swapaxes(pred_scores, 1, 2), gt_slots[..., None], axis=1)
  align = jnp.where(in_gts, slot_scores ** alpha * overlaps ** beta, 0.0)

  k = min(topk, num_anchors)
  _, top_idx = jax.lax.top_k(align, k)                                   # (B, M, k)
  # Membership by comparison rather than scatter: elementwise, so it shards like its inputs.
  anchor_ids = jnp.arange(num_anchors, dtype=top_idx.dtype)
  in_topk = top_idx[..., 0:1] == anchor_ids
  for j in range(1, k):
    in_topk = in_topk | (top_idx[..., j:j + 1] == anchor_ids)
  mask_pos = in_topk & in_gts

  # One gt per anchor: where several claim it, the gt with the highest overlap wins.
  multi = jnp.sum(mask_pos, axis=1) > 1                                  # (B, A)
  best_gt = jnp.argmax(jnp.where(gt_mask[..., None], overlaps, -1.0), axis=1)
  is_best = jax.nn.one_hot(best_gt, num_gts, axis=1, dtype=bool)         # (B, M, A)
  mask_pos = jnp.where(multi[:, None, :], is_best, mask_pos)
  fg_mask = jnp.any(mask_pos, axis=1)
  target_gt_idx = jnp.argmax(mask_pos, axis=1).astype(jnp.int32)        # (B, A)

  target_slots = jnp.take_along_axis(gt_slots, target_gt_idx, axis=1)
  target_boxes = jnp.take_along_axis(gt_boxes, target_gt_idx[..., None], axis=1)
  one_hot = jax.nn.one_hot(target_slots, num_slots, dtype=jnp.float32) * fg_mask[..., None]

  align = jnp.where(mask_pos, align, 0.0)
  max_align = jnp.max(align, axis=-1, keepdims=True)                     # (B, M, 1)
  max_overlap = jnp.max(jnp.where(mask_pos, overlaps, 0.0), axis=-1, keepdims=True)
  norm = jnp.max(align * max_overlap / (max_align + eps), axis=1)        # (B, A)
  return Assignment(target_slots=target_slots, target_boxes=target_boxes,
                    target_scores=one_hot * norm[..., None], fg_mask=fg_mask, target_gt_idx=target_gt_idx)
