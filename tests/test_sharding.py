"""Mesh construction, sharding rules, batch sharding, sharded init and a sharded jitted train step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from optisar_jax.config import load_config
from optisar_jax.runtime import sharding
from optisar_jax.train import ema, optimizer


def fixed_init(key, shape, dtype=jnp.float32):
  """Deterministic weights without RNG kernels (keeps the tests' compile time low)."""
  del key
  size = int(np.prod(shape))
  return jnp.asarray(np.sin(0.37 * np.arange(size) + size).reshape(shape) / np.sqrt(size / shape[-1]), dtype)


class Toy(nnx.Module):
  """Conv -> BatchNorm -> SiLU -> mean pool -> Linear, scaled by exp(logit_scale)."""

  def __init__(self, rngs):
    # No conv bias before BatchNorm (as in YOLO's Conv): its gradient is 0 up to rounding, which Adam would
    # amplify into layout-dependent updates.
    self.conv = nnx.Conv(3, 8, (3, 3), use_bias=False, kernel_init=fixed_init, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.lin = nnx.Linear(8, 4, kernel_init=fixed_init, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.array(0.5))

  def __call__(self, x):
    return self.lin(jax.nn.silu(self.bn(self.conv(x))).mean((1, 2))) * jnp.exp(self.logit_scale[...])


def mesh_config(shape, axes=('data', 'fsdp')):
  return ml_collections.ConfigDict({'shape': shape, 'axes': axes})


def test_make_mesh_resolves_minus_one():
  mesh = sharding.make_mesh(mesh_config((-1, 1)))
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  mesh = sharding.make_mesh(mesh_config((4, 2)))
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}
  mesh = sharding.make_mesh(mesh_config((2, -1)))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}


@pytest.mark.parametrize('shape, message', [
    ((3, 2), '6 devices but 8 are available'),
    ((16, 1), '16 devices but 8'),
    ((-1, 3), 'do not divide the 8 devices'),
    ((-1, -1), 'at most one degree may be -1'),
    ((8,), 'different lengths'),
    ((0, 8), 'positive'),
])
def test_make_mesh_bad_shapes(shape, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(mesh_config(shape))


def _abstract_train_state():
  model = nnx.eval_shape(lambda: Toy(nnx.Rngs(0)))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optimizer.make_optimizer(load_config('optsar_rsvg').optim, steps_per_epoch=10, total_steps=100,
                                params_tree=model)
  return jax.eval_shape(lambda p, r: {'step': jnp.zeros((), jnp.int32), 'params': p, 'rest': r,
                                      'opt_state': tx.init(p), 'ema': {'params': p, 'rest': r}},
                        params, rest)


def _specs_by_path(specs):
  return {sharding.path_to_str(path): spec for path, spec in
          jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]}


def test_fsdp_rules_give_expected_specs():
  mesh = sharding.make_mesh(mesh_config((4, 2)))
  specs = _specs_by_path(sharding.partition_specs(mesh, _abstract_train_state(), sharding.FSDP_RULES))
  assert specs['params/conv/kernel'] == P(None, None, None, 'fsdp')   # (3, 3, 3, 8): largest dim
  assert specs['params/lin/kernel'] == P('fsdp')                      # (8, 4)
  assert specs['params/lin/bias'] == P()
  assert specs['params/bn/scale'] == P()
  assert specs['rest/bn/mean'] == P()
  assert specs['step'] == P()
  assert specs['params/logit_scale'] == P()
  # Optimizer moments and the EMA follow their parameter.
  moments = [name for name in specs if name.endswith('mu/lin/kernel') or name.endswith('nu/lin/kernel')]
  assert len(moments) == 2 and all(specs[name] == P('fsdp') for name in moments)
  assert specs['ema/params/conv/kernel'] == P(None, None, None, 'fsdp')


def test_rules_first_match_wins_and_non_divisible_dims_fall_back():
  mesh = sharding.make_mesh(mesh_config((4, 2)))
  tree = {'a': {'kernel': jax.ShapeDtypeStruct((6, 8), jnp.float32)},
          'b': {'kernel': jax.ShapeDtypeStruct((8, 6), jnp.float32)},
          'c': {'kernel': jax.ShapeDtypeStruct((3, 5), jnp.float32)},
          'd': {'kernel': jax.ShapeDtypeStruct((16, 4), jnp.float32)}}
  rules = ((r'^a/', (None, ('data', 'fsdp'))),   # 8 % 8 == 0
           (r'^b/', (('data', 'fsdp'), 'fsdp')),  # 8 % 8 == 0, 6 % 2 == 0
           (r'^c/', ('data', 'fsdp')),            # neither divides: replicated
           (r'kernel', ('data',)),
           (r'^d/', ()))                          # never reached
  specs = _specs_by_path(sharding.partition_specs(mesh, tree, rules))
  assert specs == {'a/kernel': P(None, ('data', 'fsdp')), 'b/kernel': P(('data', 'fsdp'), 'fsdp'),
                   'c/kernel': P(), 'd/kernel': P('data')}
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sharding.partition_specs(mesh, tree, (('.*', ('model',)),))


def test_batch_sharding_gives_every_device_a_slice():
  mesh = sharding.make_mesh(mesh_config((4, 2)))
  batch_sharding = sharding.batch_sharding(mesh)
  assert batch_sharding.spec == P(('data', 'fsdp'))
  batch = sharding.global_batch_from_process_local(
      {'image': np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}, batch_sharding)
  shards = batch['image'].addressable_shards
  assert len(shards) == 8 and all(shard.data.shape == (2, 3) for shard in shards)
  assert len({tuple(np.asarray(shard.data)[:, 0]) for shard in shards}) == 8
  np.testing.assert_array_equal(batch['image'], np.arange(48).reshape(16, 3))
  assert sharding.local_batch_size(16, mesh) == 16
  with pytest.raises(ValueError, match='not divisible'):
    sharding.local_batch_size(12, mesh)


def test_place_state_places_leaves_per_rules():
  mesh = sharding.make_mesh(mesh_config((4, 2)))
  state, shardings = sharding.place_state(jax.device_get(nnx.state(Toy(nnx.Rngs(0)))), mesh,
                                          sharding.FSDP_RULES)
  assert state['conv']['kernel'][...].sharding.spec == P(None, None, None, 'fsdp')
  assert state['lin']['kernel'][...].sharding.spec == P('fsdp')
  assert state['bn']['mean'][...].sharding.is_fully_replicated
  assert shardings['lin']['kernel'].get_value() == NamedSharding(mesh, P('fsdp'))
  np.testing.assert_allclose(state['lin']['kernel'][...], fixed_init(None, (8, 4)))
  # jnp.array(0.5) is weakly typed; the placed state is not (host copies carry no weak type), so a train
  # step compiles once.
  assert not state['logit_scale'][...].weak_type


def _train(mesh, rules, steps=3):
  """Runs `steps` jitted train steps of the toy model on `mesh`; returns (losses, final state)."""
  config = load_config('optsar_rsvg')
  config.optim.warmup_epochs = 0.0  # non-zero lr from the first step
  model = nnx.eval_shape(lambda: Toy(nnx.Rngs(0)))
  graphdef = nnx.split(model, nnx.Param, ...)[0]
  tx = optimizer.make_optimizer(config.optim, steps_per_epoch=10, total_steps=100, params_tree=model)

  def init_fn():
    _, params, rest = nnx.split(Toy(nnx.Rngs(0)), nnx.Param, ...)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'rest': rest, 'opt_state': tx.init(params),
            'ema': ema.init_ema({'params': params, 'rest': rest})}

  def train_step(state, batch):
    def loss_fn(params, rest):
      # copy=True: fresh Variables in this trace, so BatchNorm may update its statistics.
      model = nnx.merge(graphdef, params, rest, copy=True)
      model.train()
      prediction = model(batch['image'])
      loss = jnp.mean((prediction - batch['target']) ** 2)
      return loss, nnx.state(model, nnx.BatchStat)

    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'], state['rest'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    step = state['step'] + 1
    new_ema = ema.update_ema(state['ema'], {'params': params, 'rest': rest}, step=step, decay=0.9, tau=1.0)
    return {'step': step, 'params': params, 'rest': rest, 'opt_state': opt_state, 'ema': new_ema}, loss

  state, state_shardings = sharding.place_state(jax.device_get(init_fn()), mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh)
  step_fn = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                    out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  rng = np.random.default_rng(0)
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(steps):
      batch = {'image': rng.normal(size=(16, 6, 6, 3)).astype(np.float32),
               'target': rng.normal(size=(16, 4)).astype(np.float32)}
      state, loss = step_fn(state, sharding.global_batch_from_process_local(batch, batch_sharding))
      losses.append(float(loss))
  return losses, state


def test_sharded_train_step_matches_single_device():
  one = jax.make_mesh((1, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                      devices=jax.devices()[:1])
  losses_1, state_1 = _train(one, sharding.REPLICATED_RULES)
  mesh = sharding.make_mesh(mesh_config((4, 2)))
  losses_8, state_8 = _train(mesh, sharding.FSDP_RULES)
  assert state_8['params']['lin']['kernel'][...].sharding.spec == P('fsdp')
  assert len(state_8['params']['lin']['kernel'][...].addressable_shards) == 8
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-6, atol=1e-6)
  assert losses_1[-1] != losses_1[0]
  flat_1 = jax.tree_util.tree_leaves(jax.device_get(state_1))
  flat_8 = jax.tree_util.tree_leaves(jax.device_get(state_8))
  assert len(flat_1) == len(flat_8)
  for a, b in zip(flat_1, flat_8):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
