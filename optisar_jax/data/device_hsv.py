"""The HSV colour jitter of the training augmentation, applied inside the train step on the accelerator.

The reference (and `augment.hsv_jitter`, the host form) multiplies each pixel's hue (modulo 180 in
OpenCV units, 6 sectors here), saturation and value by per-image gains drawn with the rest of the
augmentation. On the host this is the most expensive step of the input at 640 px: PIL's 3D colour
table costs about 10 ms of one core per image, 60 % of the whole per-image input
(docs/benchmarks.md, "Input pipeline"). With `data.augment.hsv_on_device` the pipeline draws the same
gains from the same random stream, leaves the pixels alone and ships the gains in the batch
(`hsv_gains`, float32 (B, 3)); the train step applies them here, a few dozen elementwise operations per
pixel, negligible beside the model's ~250 GFLOP per image.

The arithmetic is the host colour table's own (`augment.hsv_table`), evaluated at every pixel instead of
at the 33^3 grid points PIL interpolates between, then rounded to whole 0..255 levels as the host's
uint8 image is. The two forms differ by the table's interpolation error (a quarter of a level on
average, up to 18 levels where a hue crosses a table cell, for the recipe's extreme gains; measured in
tests/test_device_hsv.py). The hue, saturation and value gains of a whole batch are data, so one
compiled step serves every batch; HSV and the flips commute, so applying the colour after the flips
gives the reference's order's result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optisar_jax.data.vocabulary import config_value


def enabled(data_config) -> bool:
  """True when the train step must apply HSV gains: augmentation on, `data.augment.hsv_on_device` set and
  at least one of `data.augment.hsv_{h,s,v}` nonzero (a static property of the config)."""
  value = lambda key: config_value(data_config, 'augment.' + key)
  return bool(value('enabled') and value('hsv_on_device')
              and (value('hsv_h') or value('hsv_s') or value('hsv_v')))


def apply_hsv_gains(images: jax.Array, gains: jax.Array) -> jax.Array:
  """Images (B, H, W, 3) RGB in 0..255 (uint8 or float), gains (B, 3) (hue, saturation, value
  multipliers) -> float32 (B, H, W, 3), whole numbers in 0..255.

  Gains of exactly 1 return the input levels (the round trip's float32 error is far below half a level).
  """
  x = images.astype(jnp.float32)
  g = gains.astype(jnp.float32)[:, None, None, :]
  r, gg, b = x[..., 0], x[..., 1], x[..., 2]
  v = jnp.maximum(jnp.maximum(r, gg), b)
  c = v - jnp.minimum(jnp.minimum(r, gg), b)
  inv_c = 1.0 / jnp.maximum(c, 1e-12)
  h = jnp.where(v == r, (gg - b) * inv_c, jnp.where(v == gg, (b - r) * inv_c + 2.0, (r - gg) * inv_c + 4.0))
  sat = jnp.where(v > 0, c / jnp.maximum(v, 1e-12), 0.0)
  h = jnp.mod(jnp.mod(h, 6.0) * g[..., 0], 6.0)          # OpenCV: hue * gain modulo 180 (= 6 sectors)
  new_v = jnp.minimum(v / 255.0 * g[..., 2], 1.0)
  new_c = jnp.minimum(sat * g[..., 1], 1.0) * new_v       # chroma = V' * min(S * gain, 1)
  channels = []
  for n in (5.0, 3.0, 1.0):                               # HSV -> R, G, B
    k = jnp.mod(h + n, 6.0)
    w = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
    channels.append(new_v - w * new_c)
  out = jnp.stack(channels, axis=-1)
  return jnp.clip(jnp.round(out * 255.0), 0.0, 255.0)
