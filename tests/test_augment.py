"""Letterbox, mosaic, random affine, HSV and flips (docs/training-and-data.md 6.2, 7.2, deviation 11.1)."""

import dataclasses

import numpy as np
import pytest

from optisar_jax.config import load_config
from optisar_jax.data import augment as A


def _object_image(h, w, box, color=(255, 255, 255)):
  image = np.zeros((h, w, 3), np.uint8)
  x0, y0, x1, y1 = box
  image[y0:y1, x0:x1] = color
  return image


def _cfg(**kw):
  base = A.AugmentConfig(imgsz=64, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, fliplr=0.0)
  return dataclasses.replace(base, **kw)


@pytest.mark.parametrize('h, w', [(480, 640), (640, 480), (300, 500), (1000, 333), (64, 64), (20, 30)])
def test_letterbox_params_map_boxes_back(h, w):
  S = 64
  box = np.array([[w // 4, h // 4, 3 * w // 4, 3 * h // 4]], np.float32)
  image = _object_image(h, w, box[0].astype(int))
  canvas, params = A.letterbox(image, S)
  assert canvas.shape == (S, S, 3) and canvas.dtype == np.uint8
  r = min(S / h, S / w)
  assert params.ratio == pytest.approx(r)
  new_w, new_h = round(w * r), round(h * r)
  assert params.left == round((S - new_w) / 2 - 0.1) and params.top == round((S - new_h) / 2 - 0.1)
  on_canvas = A.boxes_to_letterbox(box, params)
  np.testing.assert_allclose(A.boxes_from_letterbox(on_canvas, params, (h, w)), box, rtol=0, atol=1e-3)
  x0, y0, x1, y1 = np.round(on_canvas[0]).astype(int)
  assert canvas[y0 + 1:y1 - 1, x0 + 1:x1 - 1].min() > 200        # the object is where the box says
  # padding is 114 outside the resized image
  if params.left > 0:
    assert (canvas[:, :params.left - 1] == 114).all()
  if params.top > 0:
    assert (canvas[:params.top - 1] == 114).all()


def _single(h=80, w=120, box=(30, 20, 70, 50), caption='the plane on the left'):
  image = _object_image(h, w, box)
  return A.Sample(image, np.array([box], np.float32), np.array([0]), [caption], domain=0)


def test_affine_box_follows_object_and_stays_inside():
  cfg = _cfg(scale=0.5, translate=0.2)
  kept = 0
  for seed in range(30):
    out = A.augment_sample([_single()], np.random.default_rng(seed), cfg)
    assert out.image.shape == (64, 64, 3)
    assert ((out.boxes >= 0) & (out.boxes <= 64)).all()
    for x0, y0, x1, y1 in out.boxes:
      kept += 1
      assert x1 - x0 > 2 and y1 - y0 > 2
      inner = out.image[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
      if inner.size:
        assert inner.mean() > 200
      bright = np.argwhere(out.image[..., 0] > 128)
      assert bright[:, 1].min() >= x0 - 1 and bright[:, 1].max() <= x1 and bright[:, 0].min() >= y0 - 1
  assert kept > 10


@pytest.mark.parametrize('extra', [dict(degrees=20.0, shear=5.0), dict(perspective=0.002)])
def test_rotation_shear_perspective_use_the_general_warp(extra):
  cfg = _cfg(scale=0.2, translate=0.05, **extra)
  for seed in range(10):
    out = A.augment_sample([_single()], np.random.default_rng(seed), cfg)
    assert ((out.boxes >= 0) & (out.boxes <= 64)).all()
    bright = np.argwhere(out.image[..., 0] > 160)
    if len(out.boxes) and len(bright):
      x0, y0, x1, y1 = out.boxes[0]
      assert x0 - 1 <= bright[:, 1].min() and bright[:, 1].max() <= x1 + 1
      assert y0 - 1 <= bright[:, 0].min() and bright[:, 0].max() <= y1 + 1


def test_box_filter_drops_tiny_boxes():
  before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 400, 10]], np.float64)
  after = np.array([[0, 0, 10, 10], [0, 0, 1.5, 10], [0, 0, 300, 2.5]], np.float64)
  keep = A.box_candidates(before, after, _cfg())
  np.testing.assert_array_equal(keep, [True, False, False])


def test_mosaic_tiles_keep_their_colours_and_captions():
  colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
  captions = [['red'], ['green'], ['blue', 'red'], ['yellow']]
  samples = []
  for color, caps in zip(colors, captions):
    image = _object_image(60, 90, (20, 15, 70, 45), color)
    boxes = np.array([[20, 15, 70, 45]] * len(caps), np.float32)
    samples.append(A.Sample(image, boxes, np.arange(len(caps)), caps, domain=1))
  cfg = _cfg(scale=0.3, translate=0.1)
  seen = 0
  for seed in range(20):
    out = A.augment_sample(samples, np.random.default_rng(seed), cfg)
    assert out.texts == ['red', 'green', 'blue', 'yellow']       # merged, identical strings share an id
    assert out.domain == 1
    assert ((out.boxes >= 0) & (out.boxes <= 64)).all()
    for (x0, y0, x1, y1), label in zip(out.boxes, out.labels):
      inner = out.image[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
      if inner.size == 0:
        continue
      seen += 1
      mean = inner.reshape(-1, 3).mean(0)
      if label in (1, 3):
        assert np.abs(mean - colors[label]).max() < 40
      else:   # 'red' belongs to tiles 0 and 2 (blue tile's second caption): red or blue
        assert np.abs(mean - colors[0]).max() < 40 or np.abs(mean - colors[2]).max() < 40
  assert seen > 20


def test_horizontal_flip_mirrors_boxes_and_rewrites_captions():
  sample = _single(h=64, w=64, box=(4, 10, 20, 30))
  out = A.augment_sample([sample], np.random.default_rng(0), _cfg(scale=0.0, translate=0.0, fliplr=1.0))
  np.testing.assert_allclose(out.boxes, [[44, 10, 60, 30]], atol=1e-4)
  assert out.texts == ['the plane on the right']
  assert out.image[20, 50, 0] == 255 and out.image[20, 10, 0] == 0
  same = A.augment_sample([sample], np.random.default_rng(0),
                          _cfg(scale=0.0, translate=0.0, fliplr=1.0, rewrite_directions_on_flip=False))
  assert same.texts == ['the plane on the left']
  up = A.augment_sample([_single(h=64, w=64, box=(4, 10, 20, 30), caption='the upper ship')],
                        np.random.default_rng(0), _cfg(scale=0.0, translate=0.0, flipud=1.0))
  np.testing.assert_allclose(up.boxes, [[4, 34, 20, 54]], atol=1e-4)
  assert up.texts == ['the lower ship']


def test_hsv_jitter_matches_hsv_arithmetic():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  np.testing.assert_allclose(np.asarray(A.hsv_jitter(image, (1.0, 1.0, 1.0))), image, atol=1)
  out = np.asarray(A.hsv_jitter(image, (1.0, 1.0, 0.5))).astype(float)
  # value gain only: every channel scales by 0.5
  assert np.abs(out - image * 0.5).mean() < 1.0
  grey = np.full((4, 4, 3), 100, np.uint8)
  assert np.abs(np.asarray(A.hsv_jitter(grey, (1.01, 1.7, 1.0))).astype(int) - 100).max() <= 3  # no chroma (LUT interpolation)


def test_augment_config_from_config_and_disabled_path():
  cfg = load_config('tiny')
  aug = A.AugmentConfig.from_config(cfg.data)
  assert aug.imgsz == 64 and aug.mosaic == 1.0 and aug.pad_value == 114
  out = A.letterbox_sample(_single(), 64)
  canvas, params = A.letterbox(_single().image, 64)
  np.testing.assert_array_equal(out.image, canvas)
  np.testing.assert_allclose(out.boxes, A.boxes_to_letterbox(_single().boxes, params))
  del cfg.data.augment['fliplr']
  with pytest.raises(KeyError, match='data.augment.fliplr'):
    A.AugmentConfig.from_config(cfg.data)


@pytest.mark.parametrize('hue_gain', [0.985, 1.0, 1.015, 1.999, 2.5, -0.3])
def test_hsv_table_equals_the_plain_modulo_form(hue_gain):
  """The fast modulo of hsv_table gives bit-identical tables to np.mod (its exactness argument)."""
  h, sat, v = A._lut_grid()
  gh, gs, gv = np.float32(hue_gain), np.float32(1.3), np.float32(0.7)
  hh = np.mod(h * gh, np.float32(6.0))
  new_v = np.minimum(v * gv, np.float32(1.0))
  new_c = np.minimum(sat * gs, np.float32(1.0)) * new_v
  expected = np.stack([new_v - np.clip(np.minimum(k, np.float32(4.0) - k), 0.0, 1.0) * new_c
                       for k in (np.mod(hh + np.float32(n), np.float32(6.0)) for n in (5.0, 3.0, 1.0))], axis=1)
  np.testing.assert_array_equal(A.hsv_table((hue_gain, 1.3, 0.7)), expected.ravel())


# ----------------------------------------------------------------------------- data.resize = 'opencv'

def test_opencv_resize_hand_computed():
  """cv2.resize INTER_LINEAR: src = (dst + 0.5) * in / out - 0.5, clamped to the edge pixels."""
  row = np.array([[0, 100]], np.uint8)[..., None]                     # (1, 2, 1)
  # Upscale x2: src = -0.25 -> 0 (clamped), 0.25, 0.75, 1.25 -> 1 (clamped).
  assert A.resize_bilinear(row, (4, 1))[0, :, 0].tolist() == [0, 25, 75, 100]
  # Reduction x2 takes 2 taps per output (no antialiasing): src = 0.5 and 2.5.
  row4 = np.array([[0, 40, 80, 120]], np.uint8)[..., None]
  assert A.resize_bilinear(row4, (2, 1))[0, :, 0].tolist() == [20, 100]
  # Reduction x4: src = 1.5 -> (40 + 80) / 2; Pillow's antialiased bilinear averages all four.
  assert A.resize_bilinear(row4, (1, 1))[0, 0, 0] == 60
  # 2-D: [[0, 100], [200, 40]] to 3 x 3; centre src = (0.5, 0.5) -> (0 + 100 + 200 + 40) / 4 = 85; the
  # middle of the top row src = (0.5, 0) -> 50; corners copy the corner pixels.
  img = np.array([[0, 100], [200, 40]], np.uint8)[..., None]
  out = A.resize_bilinear(np.repeat(img, 3, axis=2), (3, 3))
  assert out[..., 0].tolist() == [[0, 50, 100], [100, 85, 70], [200, 120, 40]]
  assert (out[..., 0] == out[..., 2]).all()


def test_opencv_letterbox_differs_from_pillow_only_by_antialiasing():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(120, 90, 3), dtype=np.uint8)
  canvas, params = A.letterbox(image, 60, resize='opencv')
  new_h, new_w = 60, 45
  assert (params.left, params.top) == (round(15 / 2 - 0.1), 0)
  inner = canvas[:, params.left:params.left + new_w]
  np.testing.assert_array_equal(inner, A.resize_bilinear(image, (new_w, new_h)))
  assert (canvas[:, :params.left] == 114).all() and (canvas[:, params.left + new_w:] == 114).all()
  # Every output pixel is the mean of 2 x 2 source pixels (exact factor 2): noise survives at full
  # strength, where Pillow's antialiased filter smooths it.
  pil, _ = A.letterbox(image, 60)
  assert inner.std() > pil[:, params.left:params.left + new_w].std() + 5
  with pytest.raises(ValueError, match='data.resize'):
    A.letterbox(image, 60, resize='cv2')


def test_warp_bilinear_matches_opencv_semantics():
  image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4
  fill = (114, 114, 114)
  np.testing.assert_array_equal(A.warp_bilinear(image, np.eye(3), 4, fill), np.concatenate(
      [image[:, :4]], axis=1))
  # Shift right by half a pixel: output X samples source X - 0.5; X = 0 mixes the border (fill) and x = 0.
  M = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  out = A.warp_bilinear(image, M, 4, fill).astype(int)
  np.testing.assert_array_equal(out[:, 0], np.floor((114 + image[:4, 0].astype(int)) / 2 + 0.5))
  np.testing.assert_array_equal(out[:, 2], np.floor((image[:4, 1].astype(int) + image[:4, 2]) / 2 + 0.5))
  # The general (non-separable) path gives the same numbers for an axis-aligned map.
  tilt = M.copy()
  tilt[0, 1] = 1e-12
  np.testing.assert_array_equal(A.warp_bilinear(image, tilt, 4, fill), out)


@pytest.mark.parametrize('extra', [dict(), dict(degrees=15.0), dict(mosaic=1.0)])
def test_opencv_augmentation_keeps_objects_under_their_boxes(extra):
  cfg = _cfg(scale=0.3, translate=0.1, fliplr=0.5, resize='opencv', **{k: v for k, v in extra.items()
                                                                       if k != 'mosaic'})
  for seed in range(8):
    samples = [_single()] * (4 if extra.get('mosaic') else 1)
    out = A.augment_sample(samples, np.random.default_rng(seed), cfg)
    assert out.image.shape == (64, 64, 3) and out.image.dtype == np.uint8
    for x0, y0, x1, y1 in out.boxes:
      inner = out.image[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]
      if inner.size:
        assert inner.mean() > 150
  assert A.AugmentConfig.from_config(load_config('tiny').data).resize == 'pil'
