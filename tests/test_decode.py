"""The top-1 grounding decode (argmax over anchors, sigmoid, DFL expectation, anchor + stride, undoing the
letterbox) against an independent numpy reference on hand-built outputs whose answer is known by
construction (optisar_jax/evaluation.py `_decode_top1`, data/augment.py `boxes_from_letterbox`)."""

import jax.numpy as jnp
import numpy as np
import pytest

from optisar_jax import evaluation
from optisar_jax.data import augment
from optisar_jax.models import box_ops

IMGSZ, STRIDES, R = 64, (8, 16, 32), 16          # levels of 8x8, 4x4 and 2x2 anchors: A = 84


def _numpy_anchor(index):
  """(x, y) centre in grid units and stride of anchor `index`, from the level layout alone."""
  for stride in STRIDES:
    side = IMGSZ // stride
    if index < side * side:
      row, col = divmod(index, side)
      return (col + 0.5, row + 0.5), stride
    index -= side * side
  raise IndexError(index)


def _side_logits(bins_and_weights):
  """Logits over R bins whose softmax puts the given probabilities on the given bins (others ~0)."""
  logits = np.full(R, -60.0)
  for b, p in bins_and_weights:
    logits[b] = np.log(p)
  return logits


def test_top1_decode_matches_a_numpy_reference():
  points, strides = box_ops.make_anchors([(IMGSZ // s, IMGSZ // s) for s in STRIDES], STRIDES)
  A = points.shape[0]
  assert A == 64 + 16 + 4
  rng = np.random.default_rng(0)
  scores = rng.normal(-4.0, 1.0, (2, A))
  box_logits = rng.normal(0.0, 1.0, (2, A, 4 * R))
  # Query 0: the winner is anchor 70 (4x4 level, row 1, col 2: centre (2.5, 1.5), stride 16), logit 1.5;
  # a runner-up (anchor 3) and the lowest score (anchor 80) carry different boxes.
  # Query 1: anchors 5 and 66 tie at the top: the first index wins.
  scores[0, 70], scores[0, 3], scores[0, 80] = 1.5, 1.0, -30.0
  scores[1, 5], scores[1, 66] = 2.0, 2.0
  # DFL distributions with known expectations (l, t, r, b) in grid units.
  sides = {70: [[(3, 1.0)], [(1, 0.5), (3, 0.5)], [(4, 0.25), (8, 0.75)], [(1, 1.0)]],    # 3, 2, 7, 1
           5: [[(2, 1.0)], [(2, 1.0)], [(5, 1.0)], [(6, 1.0)]]}                          # 2, 2, 5, 6
  for q, anchor in ((0, 70), (1, 5)):
    box_logits[q, anchor] = np.concatenate([_side_logits(s) for s in sides[anchor]])
  expected = []
  for q, anchor, (l, t, r, b) in ((0, 70, (3, 2, 7, 1)), (1, 5, (2, 2, 5, 6))):
    (x, y), stride = _numpy_anchor(anchor)
    expected.append(np.array([x - l, y - t, x + r, y + b]) * stride)
  expected = np.stack(expected)
  np.testing.assert_allclose(expected[0], [-8.0, -8.0, 152.0, 40.0])   # (2.5-3, 1.5-2, 2.5+7, 1.5+1) * 16
  out = {'region_text_logits': jnp.asarray(scores, jnp.float32), 'box_logits': jnp.asarray(box_logits, jnp.float32)}
  boxes, top = evaluation._decode_top1(out, points, strides)
  np.testing.assert_allclose(np.asarray(boxes), expected, atol=1e-3)
  np.testing.assert_allclose(np.asarray(top), 1 / (1 + np.exp(-np.array([1.5, 2.0]))), rtol=1e-6)


def _unletterbox(box, params, orig_size):
  """What evaluation does with a canvas box (augment.boxes_from_letterbox)."""
  return augment.boxes_from_letterbox(np.asarray(box, np.float32), params, orig_size)[0]


def test_unletterbox_undoes_the_letterbox_and_clips():
  # A 100 x 200 (H x W) image on a 64 canvas: ratio 0.32, resized to 64 x 32, 16 px bars above and below.
  params, (new_w, new_h) = augment.letterbox_params(100, 200, IMGSZ)
  assert (params.ratio, params.left, params.top, new_w, new_h) == (0.32, 0, 16, 64, 32)
  box = _unletterbox([10.0, 20.0, 30.0, 40.0], params, (100, 200))
  np.testing.assert_allclose(box, [31.25, 12.5, 93.75, 75.0])
  # Parts outside the image (in the bars or past its edge) are clipped to it.
  np.testing.assert_allclose(_unletterbox([-8.0, 0.0, 70.0, 60.0], params, (100, 200)),
                             [0.0, 0.0, 200.0, 100.0])
  # And it inverts the forward mapping of the augmentation code.
  original = np.array([[12.0, 30.0, 150.0, 90.0]])
  canvas = augment.boxes_to_letterbox(original, params)[0]
  np.testing.assert_allclose(_unletterbox(canvas, params, (100, 200)), original[0], atol=1e-4)


@pytest.mark.parametrize('bad_index', [0, 83])
def test_the_winner_is_not_an_extreme_anchor_by_accident(bad_index):
  """The argmax must follow the scores, wherever they put the maximum (not the first or last anchor)."""
  points, strides = box_ops.make_anchors([(IMGSZ // s, IMGSZ // s) for s in STRIDES], STRIDES)
  scores = np.full((1, 84), -5.0)
  scores[0, 40] = 3.0
  scores[0, bad_index] = 2.9
  logits = np.zeros((1, 84, 4 * R))
  boxes, _ = evaluation._decode_top1({'region_text_logits': jnp.asarray(scores, jnp.float32),
                                      'box_logits': jnp.asarray(logits, jnp.float32)}, points, strides)
  (x, y), stride = _numpy_anchor(40)
  d = (R - 1) / 2                                   # uniform bins: expectation 7.5
  np.testing.assert_allclose(np.asarray(boxes)[0], np.array([x - d, y - d, x + d, y + d]) * stride, atol=1e-4)
