"""Optimizer recipe: parameter groups, lr / momentum schedules, decoupled decay, clipping; EMA ramp."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from optisar_jax.config import load_config
from optisar_jax.train import ema, optimizer
from optisar_jax.runtime.sharding import path_to_str


class LayerScale(nnx.Module):
  """A non-norm module whose parameter is also called 'scale' (must be decayed)."""

  def __init__(self, features):
    self.scale = nnx.Param(jnp.full((features,), 0.01))


def fixed_init(key, shape, dtype=jnp.float32):
  """Deterministic weights without RNG kernels (keeps the tests' compile time low)."""
  del key
  size = int(np.prod(shape))
  return jnp.asarray(np.sin(0.37 * np.arange(size) + size).reshape(shape) / np.sqrt(size / shape[-1]), dtype)


class Toy(nnx.Module):
  """Conv + BatchNorm + Linear + a contrastive-head-like logit_scale / bias."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), kernel_init=fixed_init, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.layer_scale = LayerScale(8)
    self.lin = nnx.Linear(8, 4, kernel_init=fixed_init, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.array(-1.0))
    self.head_bias = nnx.Param(jnp.array(-10.0))


@pytest.fixture(scope='module')
def toy():
  return Toy(nnx.Rngs(0))


def _config(**optim):
  config = load_config('optsar_rsvg')
  for key, value in optim.items():
    config.optim[key] = value
  return config


def _flat_groups(tree):
  return {path_to_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


EXPECTED_GROUPS = {
    'conv/kernel': 'decay', 'lin/kernel': 'decay', 'layer_scale/scale': 'decay',
    'conv/bias': 'bias', 'lin/bias': 'bias', 'bn/bias': 'bias', 'norm/bias': 'bias', 'head_bias': 'bias',
    'bn/scale': 'no_decay', 'norm/scale': 'no_decay', 'logit_scale': 'no_decay',
}


def test_param_groups_from_module():
  model = nnx.eval_shape(lambda: Toy(nnx.Rngs(0)))
  assert _flat_groups(optimizer.param_groups(model)) == EXPECTED_GROUPS


def test_param_groups_from_state_uses_name_rules():
  params = nnx.state(nnx.eval_shape(lambda: Toy(nnx.Rngs(0))), nnx.Param)
  groups = _flat_groups(optimizer.param_groups(params))
  # Without module types a leaf named 'scale' is taken for a norm weight.
  assert groups == {**EXPECTED_GROUPS, 'layer_scale/scale': 'no_decay'}


def test_schedule_values_at_known_steps():
  config = _config(warmup_bias_lr=0.1)
  steps_per_epoch, total = 10, optimizer.total_train_steps(config.train, 10)
  assert total == 3000
  s = optimizer.make_schedules(config.optim, steps_per_epoch=steps_per_epoch, total_steps=total)
  lr, lrf = config.optim.lr, config.optim.lrf
  lf = lambda e: 1 + (lrf - 1) * (1 - math.cos(math.pi * e / 300)) / 2
  numbers = optimizer.schedule_numbers(config.optim, steps_per_epoch=steps_per_epoch, total_steps=total)
  assert numbers['warmup_steps'] == 100  # max(round(3 * 10), 100)
  np.testing.assert_allclose(float(s.lr(0)), 0.0)
  np.testing.assert_allclose(float(s.bias_lr(0)), 0.1)
  np.testing.assert_allclose(float(s.lr(50)), 0.5 * lr * lf(5), rtol=1e-5)
  np.testing.assert_allclose(float(s.bias_lr(50)), 0.1 + 0.5 * (lr * lf(5) - 0.1), rtol=1e-5)
  np.testing.assert_allclose(float(s.lr(100)), lr * lf(10), rtol=1e-5)
  np.testing.assert_allclose(float(s.bias_lr(100)), lr * lf(10), rtol=1e-5)
  np.testing.assert_allclose(float(s.lr(1234)), lr * lf(123), rtol=1e-5)
  np.testing.assert_allclose(float(s.lr(2999)), lr * lf(299), rtol=1e-5)
  np.testing.assert_allclose(float(s.lr(3000)), lr * lrf, rtol=1e-5)
  # The reference's AdamW keeps b1 = 0.9 through the warmup (its warmup moves SGD's momentum only).
  np.testing.assert_allclose([float(s.momentum(t)) for t in (0, 50, 100, 500)], [0.9] * 4, rtol=1e-6)
  values = optimizer.schedule_values(s, 100)
  assert set(values) == {'lr', 'bias_lr', 'momentum'}


def test_b1_warmup_is_an_opt_in_switch():
  config = _config(warmup_b1=True)
  s = optimizer.make_schedules(config.optim, steps_per_epoch=10, total_steps=3000)
  np.testing.assert_allclose([float(s.momentum(t)) for t in (0, 50, 100, 500)], [0.8, 0.85, 0.9, 0.9],
                             rtol=1e-5)


def test_eps_is_the_reference_eps_at_our_loss_scale():
  """Adam on gradients g / 64 with eps / 64 makes exactly the reference's update on g with eps."""
  config = load_config('optsar_rsvg')
  assert config.optim.eps == pytest.approx(1e-8 / 64)
  g = np.array([3e-9, -2e-8, 5e-7, 1.0])
  ref = optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)
  ours = optax.scale_by_adam(b1=0.9, b2=0.999, eps=config.optim.eps)
  u_ref, _ = ref.update(jnp.asarray(g), ref.init(jnp.asarray(g)))
  u_ours, _ = ours.update(jnp.asarray(g / 64), ours.init(jnp.asarray(g)))
  np.testing.assert_allclose(u_ours, u_ref, rtol=1e-5)
  u_unscaled, _ = ref.update(jnp.asarray(g / 64), ref.init(jnp.asarray(g)))
  assert abs(float(u_unscaled[0]) - float(u_ref[0])) > 0.1   # eps 1e-8 at our scale damps small gradients


def test_num_steps_sets_total_and_epochs():
  config = _config(warmup_epochs=1.0)
  config.train.num_steps = 250
  total = optimizer.total_train_steps(config.train, 100)
  s = optimizer.make_schedules(config.optim, steps_per_epoch=100, total_steps=total)
  numbers = optimizer.schedule_numbers(config.optim, steps_per_epoch=100, total_steps=total)
  assert total == 250 and numbers['epochs'] == 2.5
  np.testing.assert_allclose(float(s.lr(250)), config.optim.lr * config.optim.lrf, rtol=1e-5)
  assert numbers['warmup_steps'] == 100
  config.optim.warmup_epochs = 0.0
  assert optimizer.warmup_steps(config.optim, 100) == 0


def test_reference_clip_norm_rescaled_to_global_mean_loss():
  assert load_config('optsar_rsvg').optim.clip_norm == pytest.approx(10.0 / 64)


def test_decoupled_decay_only_on_decay_group(toy):
  config = _config(warmup_epochs=0.0, clip_norm=0.0)
  model = toy
  tx = optimizer.make_optimizer(config.optim, steps_per_epoch=10, total_steps=100, params_tree=model)
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zero, state, params)
  lr, wd = config.optim.lr, config.optim.weight_decay
  groups = _flat_groups(optimizer.param_groups(model))
  for name, update in _flat_groups(updates).items():
    value = _flat_groups(params)[name]
    expected = -lr * wd * value if groups[name] == 'decay' else jnp.zeros_like(value)
    np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-12, err_msg=name)


def test_momentum_warmup_and_clipping_inside_one_transformation():
  config = _config(clip_norm=0.5, warmup_b1=True)
  params = {'w': jnp.zeros((4,))}
  tx = optimizer.make_optimizer(config.optim, steps_per_epoch=10, total_steps=3000, params_tree=params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  g1 = {'w': jnp.array([30.0, 40.0, 0.0, 0.0])}       # norm 50 -> clipped to 0.5
  _, state = update(g1, state, params)
  adam = state[1]
  np.testing.assert_allclose(float(adam.hyperparams['b1']), 0.8, rtol=1e-5)
  np.testing.assert_allclose(adam.inner_state.mu['w'], 0.2 * np.array([0.3, 0.4, 0, 0]), rtol=1e-5)
  g2 = {'w': jnp.array([0.0, 0.0, 0.1, 0.0])}         # under the threshold: unchanged
  _, state = update(g2, state, params)
  b1 = 0.8 + 0.1 / 100  # momentum(1) with n_w = 100
  np.testing.assert_allclose(float(state[1].hyperparams['b1']), b1, rtol=1e-5)
  np.testing.assert_allclose(state[1].inner_state.mu['w'],
                             b1 * 0.2 * np.array([0.3, 0.4, 0, 0]) + (1 - b1) * np.array([0, 0, 0.1, 0]),
                             rtol=1e-5)


def test_schedule_numbers_are_arguments_of_one_program(toy):
  """Two runs that differ in lr, schedule length, warmup and bias warmup lower to the same program when
  the numbers are passed in (train/optimizer.py, "Numbers as arguments"), and that program gives each run
  the updates of its own fixed transformation (where the numbers are constants) to float32 rounding.

  Not bitwise: with constants XLA folds the schedule's arithmetic (cosine, powers, divisions) at compile
  time, with arguments it runs it, and the two may round differently. The learning rate's relative error
  carries over to Adam's update (lr times the normalised moment). Measured on this toy: bitwise equal with
  XLA:CPU's default emitters, up to 2.8e-7 relative with the loop emitters the suite compiles with
  (tests/conftest.py); the README's demo saw learning rates differ by up to 3e-6. Measured mutations of
  the numbers: one warmup step more moves the updates by 1e-2 (first run) and 1.8 (second), an lr 0.1 %
  off by 1e-3, so 1e-5 catches them; a 0.1 % change of the warmup momentum moves them by only 4e-7, which
  test_momentum_warmup_and_clipping_inside_one_transformation checks instead."""
  params = nnx.state(toy, nnx.Param)
  grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape), params)
  runs = [(_config(), 10, 100), (_config(lr=0.01, warmup_bias_lr=0.1, warmup_epochs=0.5, warmup_min_steps=3,
                                          lrf=0.2), 7, 3000)]
  recipes = [optimizer.make_recipe(c.optim, steps_per_epoch=spe, total_steps=total, params_tree=toy)
             for c, spe, total in runs]
  assert recipes[0].numbers['warmup_steps'] == 100 and recipes[1].numbers['warmup_steps'] == 4

  def steps(recipe, numbers, n=5):
    tx = recipe.transformation(numbers)
    state, p, out = tx.init(params), params, []
    for _ in range(n):
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
      out.append(updates)
    return out

  shared = jax.jit(lambda numbers: steps(recipes[0], numbers))
  texts = [shared.lower(r.numbers).as_text() for r in recipes]
  assert texts[0] == texts[1]
  for recipe in recipes:
    fixed = jax.jit(lambda: steps(recipe, recipe.numbers))()
    for a, b in zip(jax.tree.leaves(shared(recipe.numbers)), jax.tree.leaves(fixed)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=0)
  first, second = shared(recipes[0].numbers), shared(recipes[1].numbers)
  assert not np.array_equal(first[-1]['lin']['kernel'][...], second[-1]['lin']['kernel'][...])


def test_works_with_nnx_optimizer(toy):
  config = _config()
  model = nnx.clone(toy)
  tx = optimizer.make_optimizer(config.optim, steps_per_epoch=10, total_steps=100, params_tree=model)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  before = np.asarray(model.lin.kernel[...])

  @nnx.jit
  def apply(model, opt, grads):
    opt.update(model, grads)

  for _ in range(2):
    apply(model, opt, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
  assert int(opt.step[...]) == 2
  assert not np.allclose(model.lin.kernel[...], before)  # the second step has lr > 0


def test_ema_ramp_values():
  np.testing.assert_allclose(float(ema.ema_decay(0, 0.9999, 2000.0)), 0.0)
  np.testing.assert_allclose(float(ema.ema_decay(2000, 0.9999, 2000.0)), 0.9999 * (1 - math.exp(-1)),
                             rtol=1e-5)
  np.testing.assert_allclose(float(ema.ema_decay(100000, 0.9999, 2000.0)), 0.9999, rtol=1e-5)


def test_ema_update_covers_params_and_batch_stats(toy):
  model = toy
  _, params, rest = nnx.split(model, nnx.Param, ...)
  live = {'params': params, 'rest': rest, 'count': jnp.array(7, jnp.int32)}
  averaged = ema.init_ema(live)
  moved = jax.tree.map(lambda x: x + 1.0 if jnp.issubdtype(x.dtype, jnp.floating) else x + 1, live)
  step_fn = jax.jit(lambda e, s, t: ema.update_ema(e, s, step=t, decay=0.9, tau=2.0))
  out = step_fn(averaged, moved, 1)
  d = 0.9 * (1 - math.exp(-0.5))
  np.testing.assert_allclose(out['params']['lin']['kernel'][...], params['lin']['kernel'][...] + (1 - d),
                             rtol=1e-5)
  np.testing.assert_allclose(out['rest']['bn']['var'][...], rest['bn']['var'][...] + (1 - d), rtol=1e-5)
  assert int(out['count']) == 8  # non-float leaves follow the live state
  # init_ema makes new buffers: live and EMA can be donated together.
  assert (averaged['params']['lin']['kernel'][...].unsafe_buffer_pointer()
          != params['lin']['kernel'][...].unsafe_buffer_pointer())


def _due_steps(total_steps, steps_per_epoch, **train):
  config = load_config('optsar_rsvg')
  for key, value in train.items():
    config.train[key] = value
  return [s for s in range(1, total_steps + 1)
          if optimizer.validation_due(s, steps_per_epoch, total_steps, config.train)]


def test_validation_cadence_of_the_reference():
  """300 epochs of 10 steps: epochs 20, 40, ..., 280, then each of 296..300 (the reference's
  `(epoch + 1) % 20 == 0 or final or epochs - epoch <= 5`, 0-based epoch)."""
  assert load_config('optsar_rsvg').train.eval_last_epochs == 5
  due = _due_steps(3000, 10)
  expected_epochs = [e for e in range(1, 301) if e % 20 == 0 or 300 - (e - 1) <= 5]
  assert expected_epochs[-6:] == [280, 296, 297, 298, 299, 300]
  assert due == [10 * e for e in expected_epochs]


def test_validation_cadence_switches():
  assert _due_steps(3000, 10, eval_last_epochs=0) == [200 * k for k in range(1, 16)]
  assert _due_steps(50, 10, eval_every_steps=7, eval_last_epochs=2) == [7, 14, 21, 28, 35, 40, 42, 49, 50]
  assert _due_steps(50, 10, eval_every_steps=0, eval_every_epochs=0) == []   # validation off
  # A fractional run (train.num_steps = 55): epoch ends within 2 epochs (20 steps) of the end, and the end.
  assert _due_steps(55, 10, eval_every_epochs=100, eval_last_epochs=2) == [40, 50, 55]
  with pytest.raises(ValueError, match='train.eval_last_epochs'):
    _due_steps(10, 10, eval_last_epochs=-1)
