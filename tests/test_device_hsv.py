"""The HSV jitter applied by the train step (data/device_hsv.py; docs/training-and-data.md 6.2)."""

import colorsys
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from optisar_jax import compile_report, grounding
from optisar_jax.config import load_config
from optisar_jax.data import augment as A
from optisar_jax.data import device_hsv
from optisar_jax.train import step as step_lib

# (hue, saturation, value) gains: the recipe's extremes and a hue gain far enough from 1 to wrap around red.
GAINS = np.array([[1.015, 1.7, 1.4], [0.985, 0.3, 0.6], [1.3, 1.0, 1.0]], np.float32)


def _images(n, size=24, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _exact(image, gains):
  """The HSV gain transform in float64 with the standard library (hue modulo one turn, saturation and
  value clipped at 1), rounded to whole levels."""
  out = np.empty(image.shape, np.float64)
  for index in np.ndindex(image.shape[:2]):
    h, s, v = colorsys.rgb_to_hsv(*(image[index] / 255.0))
    rgb = colorsys.hsv_to_rgb((h * gains[0]) % 1.0, min(s * gains[1], 1.0), min(v * gains[2], 1.0))
    out[index] = np.round(np.array(rgb) * 255.0)
  return out


def test_device_hsv_is_the_exact_hsv_transform():
  """Against float64 colorsys on 3 x 576 random pixels. Measured 2026-12-06: 99.94 %, 99.94 % and 98.8 %
  of the values equal (the third with the hue gain 1.3), the rest one level apart: float32 rounding
  landing on the other side of a half level."""
  images = _images(3)
  out = np.asarray(device_hsv.apply_hsv_gains(jnp.asarray(images), jnp.asarray(GAINS)))
  assert out.dtype == np.float32 and out.shape == images.shape
  for i in range(3):
    diff = np.abs(out[i] - _exact(images[i], GAINS[i]))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.97, i


def test_unit_gains_return_the_image_levels():
  images = _images(2, seed=1)
  out = device_hsv.apply_hsv_gains(jnp.asarray(images), jnp.ones((2, 3)))
  np.testing.assert_array_equal(np.asarray(out), images.astype(np.float32))


def test_device_form_and_host_colour_table_differ_by_the_tables_interpolation():
  """The host form (Pillow's 33^3 colour table, trilinear) approximates the same transform. Measured
  2026-12-06 on these random pixels with the recipe's extreme gains (the first two rows): mean 0.24 and
  0.03 of a level, at most 18 and 2 levels, 5.1 % and 0.06 % of the values more than 1 level apart. (With
  the hue gain 1.3, outside the recipe, the table interpolates across the red hue's wrap-around and is off
  by up to 168 levels; the device form has no table.)"""
  images = _images(2, size=48, seed=2)
  device = np.asarray(device_hsv.apply_hsv_gains(jnp.asarray(images), jnp.asarray(GAINS[:2])))
  host = np.stack([np.asarray(A.hsv_jitter(images[i], GAINS[i])) for i in range(2)]).astype(np.float32)
  diff = np.abs(device - host)
  assert diff.mean() < 0.3 and diff.max() <= 24 and (diff > 1).mean() < 0.06


def _object_sample():
  image = np.zeros((64, 64, 3), np.uint8)
  image[:] = (30, 90, 160)
  image[10:40, 20:50] = (200, 60, 40)
  return A.Sample(image, np.array([[20, 10, 50, 40]], np.float32), np.array([0]), ['the red roof'])


def test_augment_sample_leaves_the_colour_to_the_step_with_the_same_gains():
  """hsv_on_device: the same random stream, the pixels of an augmentation without HSV, and the gains
  that the host form applies."""
  recipe = A.AugmentConfig(imgsz=64, fliplr=0.5, hsv_h=0.015, hsv_s=0.7, hsv_v=0.4)
  for seed in range(4):
    rngs = [np.random.default_rng(seed) for _ in range(3)]
    host = A.augment_sample([_object_sample()], rngs[0], recipe)
    deferred = A.augment_sample([_object_sample()], rngs[1], dataclasses.replace(recipe, hsv_on_device=True))
    plain = A.augment_sample([_object_sample()], rngs[2],
                             dataclasses.replace(recipe, hsv_h=0.0, hsv_s=0.0, hsv_v=0.0))
    # The pipeline draws the text slots from the same generator next: all three must leave it alike.
    assert len({tuple(r.integers(0, 2**31, 4)) for r in rngs}) == 1, seed
    assert host.hsv_gains is None and plain.hsv_gains is None
    assert deferred.hsv_gains.dtype == np.float32 and deferred.hsv_gains.shape == (3,)
    assert np.all(np.abs(deferred.hsv_gains - 1) <= np.float32([0.015, 0.7, 0.4]))
    np.testing.assert_array_equal(deferred.image, plain.image)
    np.testing.assert_array_equal(deferred.boxes, host.boxes)
    assert deferred.texts == host.texts
    applied = np.asarray(device_hsv.apply_hsv_gains(jnp.asarray(deferred.image[None]),
                                                    jnp.asarray(deferred.hsv_gains[None])))[0]
    # Flat colours, so the table's interpolation error is small here: within 2 levels.
    assert np.abs(applied - host.image).max() <= 2, seed


def test_the_step_applies_the_gains_exactly_when_the_config_says():
  config = load_config('tiny')
  assert device_hsv.enabled(config.data)
  for key, value in (('hsv_on_device', False), ('enabled', False)):
    other = load_config('tiny')
    other.data.augment[key] = value
    assert not device_hsv.enabled(other.data), key
  other = load_config('tiny')
  other.data.augment.hsv_h = other.data.augment.hsv_s = other.data.augment.hsv_v = 0.0
  assert not device_hsv.enabled(other.data)
  del other.data.augment['hsv_on_device']
  with pytest.raises(KeyError, match="'data.augment.hsv_on_device' does not exist"):
    device_hsv.enabled(other.data)

  batch = {'image': jnp.asarray(_images(3, seed=3)), 'hsv_gains': jnp.asarray(GAINS)}
  jittered = step_lib.model_images(batch, jnp.float32, hsv_on_device=True)
  expected = device_hsv.apply_hsv_gains(batch['image'], batch['hsv_gains']) / 255.0
  np.testing.assert_array_equal(np.asarray(jittered), np.asarray(expected))
  plain = step_lib.model_images(batch, jnp.float32, hsv_on_device=False)
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(batch['image'].astype(jnp.float32) / 255.0))
  assert np.abs(np.asarray(jittered) - np.asarray(plain)).max() > 0.1
  with pytest.raises(KeyError, match='hsv_gains'):
    step_lib.model_images({'image': batch['image']}, jnp.float32, hsv_on_device=True)



@pytest.mark.slow
def test_the_train_steps_loss_applies_the_gains(monkeypatch):
  """The wiring: `make_loss_and_grads` hands the batch's gains to `apply_hsv_gains` when the config says so
  and not otherwise (traced with jax.eval_shape on abstract arguments; nothing is compiled, but the two
  traces of the model take 10-25 s)."""
  calls = []
  real = device_hsv.apply_hsv_gains
  monkeypatch.setattr(device_hsv, 'apply_hsv_gains',
                      lambda images, gains: calls.append(gains.shape) or real(images, gains))
  for on in (True, False):
    config = load_config('tiny')
    config.data.augment.hsv_on_device = on
    model = grounding.abstract_model(config)
    train_def, _ = grounding.graphdefs_of(model)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    state = {'params': params, 'rest': rest, 'step': jax.ShapeDtypeStruct((), jnp.int32)}
    batch_size = int(config.train.batch_size)
    calls.clear()
    jax.eval_shape(step_lib.make_loss_and_grads(config, train_def), state,
                   compile_report._abstract_batch(config, batch_size, None),
                   compile_report._text_table(config, 16, None), jax.ShapeDtypeStruct((2,), jnp.uint32))
    assert calls == ([(batch_size, 3)] if on else []), on
