"""Task-aligned assigner: candidates (incl. the small-box rule), top-k, one gt per anchor, soft targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optisar_jax.models import box_ops
from optisar_jax.train import assigner


def _grid_points(size=8, stride=8):
  points, strides = box_ops.make_anchors([(size, size)], [stride])
  return points * strides                                 # pixels: 4, 12, 20, ...


def test_candidates_strictly_inside():
  points = _grid_points()
  inside = np.asarray(assigner.candidates_in_gts(points, jnp.asarray([[[20.0, 20.0, 36.0, 36.0]]])))
  # Anchors at 20 and 36 lie on the border (excluded); only (28, 28) is strictly inside.
  assert inside.shape == (1, 1, 64)
  assert np.flatnonzero(inside[0, 0]).tolist() == [3 * 8 + 3]


def test_small_box_rule():
  points = _grid_points()
  tiny = jnp.asarray([[[21.0, 21.0, 25.0, 25.0]]])        # 4 x 4 px around (23, 23): no anchor inside
  assert not np.any(assigner.candidates_in_gts(points, tiny, small_box_px=0.0))
  # Widened to 16 x 16 around (23, 23) = [15, 31]^2 -> anchors at 20 and 28 in x and y.
  inside = np.asarray(assigner.candidates_in_gts(points, tiny))[0, 0]
  assert np.flatnonzero(inside).tolist() == [2 * 8 + 2, 2 * 8 + 3, 3 * 8 + 2, 3 * 8 + 3]
  # Only the narrow side is widened: 4 px wide, 64 px tall -> x in [15, 31], y in (0, 64).
  thin = jnp.asarray([[[21.0, 0.0, 25.0, 64.0]]])
  inside = np.asarray(assigner.candidates_in_gts(points, thin))[0, 0].reshape(8, 8)
  assert inside[:, 2].all() and inside[:, 3].all() and inside.sum() == 16


def test_topk_selection_and_soft_targets():
  points = _grid_points()
  gt = jnp.asarray([[[0.0, 0.0, 64.0, 64.0]]])            # every anchor is a candidate
  pred_boxes = jnp.broadcast_to(gt[:, 0][:, None], (1, 64, 4))   # CIoU = 1 everywhere
  scores = np.zeros((1, 64, 2), np.float32)
  scores[0, :, 1] = np.linspace(0.01, 0.5, 64)           # slot 1 increasing with the anchor index
  scores[0, 10, 1] = 0.81                                 # the best
  scores[0, 5, 0] = 0.99                                  # another slot: must not matter
  out = assigner.task_aligned_assign(jnp.asarray(scores), pred_boxes, points, gt, jnp.asarray([[1]]),
                                     jnp.asarray([[True]]), topk=3)
  fg = np.asarray(out.fg_mask)[0]
  assert np.flatnonzero(fg).tolist() == [10, 62, 63]
  target = np.asarray(out.target_scores)[0]
  assert np.all(target[:, 0] == 0)
  # align = s^0.5 (overlap 1); normalised by the best align, times the best overlap (1).
  np.testing.assert_allclose(target[[10, 62, 63], 1], np.sqrt(scores[0, [10, 62, 63], 1] / 0.81), rtol=1e-5)
  assert np.all(np.asarray(out.target_slots)[0][fg] == 1)
  np.testing.assert_allclose(np.asarray(out.target_boxes)[0, 10], [0, 0, 64, 64])


def test_normalisation_uses_best_overlap():
  points = jnp.asarray([[10.0, 10.0], [30.0, 10.0]])
  gt = jnp.asarray([[[0.0, 0.0, 40.0, 20.0]]])
  good, worse = [0.0, 0.0, 40.0, 20.0], [2.0, 0.0, 40.0, 18.0]
  pred = jnp.asarray([[worse, good]])
  scores = jnp.asarray([[[0.25], [0.64]]])
  out = assigner.task_aligned_assign(scores, pred, points, gt, jnp.asarray([[0]]), jnp.asarray([[True]]))
  c = float(box_ops.ciou(gt[0, 0], jnp.asarray(worse)))
  align_worse, align_best = 0.5 * c ** 6, 0.8
  np.testing.assert_allclose(np.asarray(out.target_scores)[0, :, 0], [align_worse / align_best, 1.0], rtol=1e-4)


def test_one_gt_per_anchor_max_iou():
  points = jnp.asarray([[10.0, 10.0], [30.0, 10.0], [50.0, 10.0]])
  gts = jnp.asarray([[[0.0, 0.0, 40.0, 20.0], [20.0, 0.0, 60.0, 20.0]]])
  pred = jnp.asarray([[[0.0, 0.0, 40.0, 20.0], [22.0, 0.0, 60.0, 20.0], [20.0, 0.0, 60.0, 20.0]]])
  scores = jnp.full((1, 3, 2), 0.5)
  out = assigner.task_aligned_assign(scores, pred, points, gts, jnp.asarray([[0, 1]]),
                                     jnp.asarray([[True, True]]), topk=3)
  # Anchor 1 lies in both gts; its box overlaps gt 1 far more.
  assert np.asarray(out.fg_mask)[0].tolist() == [True, True, True]
  assert np.asarray(out.target_gt_idx)[0].tolist() == [0, 1, 1]
  assert np.asarray(out.target_slots)[0].tolist() == [0, 1, 1]
  target = np.asarray(out.target_scores)[0]
  assert target[1, 0] == 0 and target[1, 1] > 0


def test_no_gt_gives_zero_targets_and_padding_is_ignored():
  points = _grid_points()
  gts = jnp.asarray([[[0.0, 0.0, 64.0, 64.0]], [[0.0, 0.0, 32.0, 32.0]]])
  pred = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 64.0, 64.0]), (2, 64, 4))
  out = assigner.task_aligned_assign(jnp.full((2, 64, 3), 0.5), pred, points, gts, jnp.zeros((2, 1), jnp.int32),
                                     jnp.asarray([[False], [False]]))
  assert not np.any(out.fg_mask)
  assert np.all(np.asarray(out.target_scores) == 0)


def test_padded_gt_never_wins():
  points = jnp.asarray([[10.0, 10.0]])
  gts = jnp.asarray([[[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 20.0, 20.0]]])
  pred = jnp.asarray([[[0.0, 0.0, 20.0, 20.0]]])
  out = assigner.task_aligned_assign(jnp.full((1, 1, 3), 0.5), pred, points, gts, jnp.asarray([[0, 1, 2]]),
                                     jnp.asarray([[False, True, True]]))
  assert bool(out.fg_mask[0, 0]) and int(out.target_gt_idx[0, 0]) == 1
  assert float(out.target_scores[0, 0, 1]) == pytest.approx(1.0, abs=1e-5)


def _loop_reference(scores, pred, points, gts, slots, mask, topk, alpha=0.5, beta=6.0):
  """Straightforward per-gt / per-anchor loops over the same rules (numpy)."""
  batch, num_anchors, num_slots = scores.shape
  num_gts = gts.shape[1]
  overlaps_all = np.asarray(jax.jit(box_ops.ciou)(jnp.asarray(gts)[:, :, None], jnp.asarray(pred)[:, None]))
  fg = np.zeros((batch, num_anchors), bool)
  target = np.zeros((batch, num_anchors, num_slots))
  for b in range(batch):
    pos = np.zeros((num_gts, num_anchors), bool)
    overlaps = np.zeros((num_gts, num_anchors))
    align = np.zeros((num_gts, num_anchors))
    for m in range(num_gts):
      if not mask[b, m]:
        continue
      x1, y1, x2, y2 = gts[b, m]
      if x2 - x1 < 8:
        x1, x2 = (x1 + x2) / 2 - 8, (x1 + x2) / 2 + 8
      if y2 - y1 < 8:
        y1, y2 = (y1 + y2) / 2 - 8, (y1 + y2) / 2 + 8
      for a, (px, py) in enumerate(points):
        if min(px - x1, py - y1, x2 - px, y2 - py) > 1e-9:
          overlaps[m, a] = max(overlaps_all[b, m, a], 0.0)
          align[m, a] = scores[b, a, slots[b, m]] ** alpha * overlaps[m, a] ** beta
          pos[m, a] = True
      top = np.argsort(-align[m], kind='stable')[:topk]
      keep = np.zeros(num_anchors, bool)
      keep[top] = True
      pos[m] &= keep
    for a in range(num_anchors):
      if pos[:, a].sum() > 1:
        best = np.argmax(np.where(mask[b], overlaps[:, a], -1.0))
        pos[:, a] = np.arange(num_gts) == best
    for a in range(num_anchors):
      if pos[:, a].any():
        m = int(np.argmax(pos[:, a]))
        fg[b, a] = True
        best_align = max(align[m][pos[m]])
        best_overlap = max(overlaps[m][pos[m]])
        target[b, a, slots[b, m]] = align[m, a] * best_overlap / (best_align + 1e-9)
  return fg, target


def test_matches_loop_reference_on_random_data():
  rng = np.random.default_rng(0)
  points = np.asarray(_grid_points())
  batch, num_gts, num_slots = 2, 4, 3
  centres = rng.uniform(8, 56, size=(batch, num_gts, 2))
  sizes = rng.uniform(4, 40, size=(batch, num_gts, 2))
  gts = np.concatenate([centres - sizes / 2, centres + sizes / 2], -1).astype(np.float32)
  pred_centres = points[None] + rng.normal(scale=4, size=(batch, 64, 2))
  pred_sizes = rng.uniform(6, 30, size=(batch, 64, 2))
  pred = np.concatenate([pred_centres - pred_sizes / 2, pred_centres + pred_sizes / 2], -1).astype(np.float32)
  scores = rng.uniform(0.01, 1, size=(batch, 64, num_slots)).astype(np.float32)
  slots = rng.integers(0, num_slots, size=(batch, num_gts)).astype(np.int32)
  mask = np.array([[True, True, True, False], [True, True, False, True]])
  out = assigner.task_aligned_assign(jnp.asarray(scores), jnp.asarray(pred), jnp.asarray(points), jnp.asarray(gts),
                                     jnp.asarray(slots), jnp.asarray(mask), topk=5)
  fg, target = _loop_reference(scores, pred, points, gts, slots, mask, topk=5)
  assert fg.sum() > 8
  np.testing.assert_array_equal(np.asarray(out.fg_mask), fg)
  np.testing.assert_allclose(np.asarray(out.target_scores), target, rtol=1e-4, atol=1e-7)
