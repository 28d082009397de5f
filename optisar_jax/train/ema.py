"""Exponential moving average of the model's float state (parameters and BatchNorm running statistics).

As the reference's ModelEMA (docs/training-and-data.md section 6.1): after optimizer step t (t = 1 after the
first update)

    d_t = decay * (1 - exp(-t / tau))            (0.9999 and 2000 in the recipe)
    ema = d_t * ema + (1 - d_t) * state          for every floating-point leaf

so the average follows the weights closely early on and slows down to `decay`. Leaves that are not
floating point (counters, RNG keys) take the live state's value. Checkpoints, validation and exported
weights use the EMA. All functions are pure and jittable over any pytree (nnx States, dicts).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_decay(step, decay: float, tau: float) -> jax.Array:
  """d_t = decay * (1 - exp(-t / tau)) for t = `step` optimizer steps taken."""
  return decay * (1.0 - jnp.exp(-jnp.asarray(step, jnp.float32) / tau))


def _is_float(x) -> bool:
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)


def init_ema(state) -> Any:
  """A copy of `state` (new buffers, so the EMA and the live state can both be donated to a jitted step)."""
  return jax.tree.map(lambda x: jnp.copy(x) if _is_float(x) else x, state)


def update_ema(ema, state, *, step, decay: float, tau: float) -> Any:
  """The EMA after optimizer step `step` (the count after the update, so 1 after the first update).

  Float leaves are averaged in (at least) float32 and cast back to the EMA's dtype; other leaves follow
  `state`.
  """
  d = ema_decay(step, decay, tau)

  def average(ema_leaf, leaf):
    if not _is_float(leaf):
      return leaf
    compute = jnp.promote_types(ema_leaf.dtype, jnp.float32)
    weight = d.astype(compute)
    mixed = weight * ema_leaf.astype(compute) + (1.0 - weight) * leaf.astype(compute)
    return mixed.astype(ema_leaf.dtype)

  return jax.tree.map(average, ema, state)
