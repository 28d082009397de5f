"""Checkpoints across meshes, keep-N, atomicity, JSON side items, best checkpoint, preemption; run logs."""

import io
import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from optisar_jax.config import load_config
from optisar_jax.runtime import checkpoint, sharding
from optisar_jax.train import ema, optimizer, run_logging


def _mesh(shape):
  return sharding.make_mesh(ml_collections.ConfigDict({'shape': shape, 'axes': ('data', 'fsdp')}))


def _state():
  """A train-state-like tree: kernels that FSDP shards, a bias, a step counter and optimizer-like moments."""
  kernel = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) / 7.0
  return {'step': np.int32(5),
          'params': {'conv': {'kernel': kernel, 'bias': np.linspace(-1, 1, 16, dtype=np.float32)}},
          'opt_state': {'mu': {'conv': {'kernel': kernel * 0.5}}, 'count': np.int32(5)}}


def _place(tree, mesh, rules=sharding.FSDP_RULES):
  shardings = sharding.param_shardings(mesh, tree, rules)
  return jax.tree.map(jax.device_put, tree, shardings), shardings


def _abstract_for(mesh, rules=sharding.FSDP_RULES):
  abstract = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, _state()))
  return sharding.abstract_with_shardings(abstract, sharding.param_shardings(mesh, abstract, rules))


def _checkpointer(workdir, keep=3):
  config = load_config('optsar_rsvg')
  config.train.keep_checkpoints = keep
  return checkpoint.TrainCheckpointer.from_config(str(workdir), config), config


def test_save_on_4x2_restore_on_2x4_and_on_one_device(tmp_path):
  ckpt, config = _checkpointer(tmp_path)
  state, _ = _place(_state(), _mesh((4, 2)))
  assert state['params']['conv']['kernel'].sharding.spec == P(None, 'fsdp')
  data_state = {'epoch': 1, 'index': 1234, 'seed': 0}
  assert ckpt.save(5, state, data_state, config)
  ckpt.wait()

  fresh, _ = _checkpointer(tmp_path)
  assert fresh.latest_step() == 5
  mesh = _mesh((2, 4))
  restored, restored_data = fresh.restore(None, _abstract_for(mesh))
  assert restored_data == data_state
  assert restored['params']['conv']['kernel'].sharding == NamedSharding(mesh, P(None, 'fsdp'))
  assert len(restored['params']['conv']['kernel'].addressable_shards[0].data.reshape(-1)) == 8 * 4
  for a, b in zip(jax.tree.leaves(_state()), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(np.asarray(b), a)

  cpu = jax.devices()[0]
  abstract = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, _state()))
  single = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(cpu), abstract)
  restored, _ = fresh.restore(5, sharding.abstract_with_shardings(abstract, single))
  assert restored['params']['conv']['kernel'].devices() == {cpu}
  for a, b in zip(jax.tree.leaves(_state()), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(np.asarray(b), a)
  assert fresh.restore_config(5)['optim']['lr'] == config.optim.lr
  fresh.close()
  ckpt.close()


class TinyNet(nnx.Module):
  """Linear (kernel, bias) + BatchNorm + logit_scale, with fixed weights."""

  def __init__(self, rngs):
    init = lambda key, shape, dtype=jnp.float32: jnp.arange(np.prod(shape), dtype=dtype).reshape(shape) / 10
    self.lin = nnx.Linear(8, 16, kernel_init=init, rngs=rngs)
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.array(-1.0))


def test_nnx_train_state_moves_between_meshes(tmp_path):
  config = load_config('optsar_rsvg')
  tx = optimizer.make_optimizer(config.optim, steps_per_epoch=10, total_steps=100)

  def init_fn():
    _, params, rest = nnx.split(TinyNet(nnx.Rngs(0)), nnx.Param, ...)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'rest': rest, 'opt_state': tx.init(params),
            'ema': ema.init_ema({'params': params, 'rest': rest})}

  state, _ = sharding.place_state(jax.device_get(init_fn()), _mesh((4, 2)), sharding.FSDP_RULES)
  ckpt, _ = _checkpointer(tmp_path)
  ckpt.save(3, state, {'step': 3}, config)
  ckpt.wait()
  mesh = _mesh((2, 4))
  abstract = jax.eval_shape(init_fn)
  shardings = sharding.param_shardings(mesh, abstract, sharding.FSDP_RULES)
  target = sharding.abstract_with_shardings(abstract, shardings)
  restored, _ = ckpt.restore(3, target)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert restored['params']['lin']['kernel'][...].sharding == NamedSharding(mesh, P(None, 'fsdp'))
  for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  ckpt.close()


def test_keep_n_and_dangling_tmp_dir_is_ignored(tmp_path):
  ckpt, config = _checkpointer(tmp_path, keep=2)
  state, _ = _place(_state(), _mesh((8, 1)), sharding.REPLICATED_RULES)
  for step in (1, 2, 3, 4):
    ckpt.save(step, state, {'step': step}, config)
  assert not ckpt.save(4, state, {'step': 4}, config, force=True)  # already saved: skipped
  ckpt.wait()
  assert ckpt.all_steps() == [3, 4]
  ckpt.close()
  # A save killed half-way leaves Orbax's tmp directory behind (the rename never happened).
  directory = os.path.join(tmp_path, checkpoint.CHECKPOINT_SUBDIR)
  dangling = os.path.join(directory, '9.orbax-checkpoint-tmp-1234')
  os.makedirs(os.path.join(dangling, 'state'))
  with open(os.path.join(dangling, 'state', 'partial'), 'w') as f:
    f.write('half written')
  reopened, _ = _checkpointer(tmp_path, keep=2)
  assert reopened.latest_step() == 4
  assert reopened.all_steps() == [3, 4]
  _, data_state = reopened.restore(None, _abstract_for(_mesh((8, 1)), sharding.REPLICATED_RULES))
  assert data_state == {'step': 4}
  assert not os.path.exists(dangling)  # cleaned up when the manager opened the directory
  reopened.close()


def test_small_replicated_arrays_are_written_whole_and_large_ones_by_every_replica(tmp_path):
  """Replica-parallel writes (runtime/checkpoint.py MIN_REPLICA_SLICE_BYTES): a replicated array whose
  per-replica piece is under 256 KiB is written whole by one replica, with no on-device slicing; a larger
  one is still split over the replicas. Slicing shows as compiled slice programs during the save."""
  compiles = []

  def listen(event, seconds, **kwargs):
    del seconds, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(event)

  mesh = _mesh((8, 1))
  replicated = NamedSharding(mesh, P())
  small = {f'bias{i}': jax.device_put(np.full((16 * (i + 1),), i, np.float32), replicated) for i in range(6)}
  small['kernel'] = jax.device_put(np.ones((3, 3, 64, 64), np.float32), replicated)      # 147 KB: 18 KB a piece
  # 8 replicas x 256 KiB: pieces of exactly the threshold, split along the first axis.
  large = {'kernel': jax.device_put(np.arange(8 * 65536, dtype=np.float32).reshape(8 * 64, 1024), replicated)}
  config = load_config('tiny', [])
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    counts = {}
    for name, tree in (('small', small), ('large', large)):
      ckpt = checkpoint.TrainCheckpointer(str(tmp_path / name), async_save=False)
      compiles.clear()
      ckpt.save(1, tree, None, config)
      ckpt.wait()
      counts[name] = len(compiles)
      restored, _ = ckpt.restore(1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree))
      for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
      ckpt.close()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert counts == {'small': 0, 'large': 8}, counts     # the large one: a slice program per device
  # Orbax's layout is unchanged: the per-process array metadata is still written.
  assert (tmp_path / 'small' / '1' / 'state' / 'array_metadatas').is_dir()


def test_bytes_data_state_and_config_round_trip(tmp_path):
  ckpt, config = _checkpointer(tmp_path)
  state, _ = _place(_state(), _mesh((8, 1)), sharding.REPLICATED_RULES)
  grain_state = json.dumps({'next_index': 17, 'worker_count': 0}).encode()
  ckpt.save(7, state, grain_state, config)
  ckpt.wait()
  _, data_state = ckpt.restore(7, _abstract_for(_mesh((8, 1)), sharding.REPLICATED_RULES))
  assert data_state == grain_state
  saved = ckpt.restore_config()
  assert saved == json.loads(config.to_json_best_effort())
  assert tuple(saved['mesh']['axes']) == ('data', 'fsdp')
  ckpt.close()


def test_best_checkpoint_keeps_only_the_best(tmp_path):
  ckpt, config = _checkpointer(tmp_path)
  state, _ = _place(_state(), _mesh((8, 1)), sharding.REPLICATED_RULES)
  assert ckpt.best_value() is None
  assert ckpt.save_best(10, state, 50.0, {'step': 10}, config)
  assert not ckpt.save_best(20, state, 40.0, {'step': 20}, config)
  assert ckpt.save_best(30, state, 60.0, {'step': 30}, config)
  ckpt.wait()
  assert ckpt.best_step() == 30 and ckpt.best_value() == 60.0
  assert sorted(os.listdir(os.path.join(tmp_path, checkpoint.BEST_SUBDIR))) == ['30']
  _, data_state = ckpt.restore_best(_abstract_for(_mesh((8, 1)), sharding.REPLICATED_RULES))
  assert data_state == {'step': 30}
  assert ckpt.latest_step() is None  # the regular directory is separate
  ckpt.close()


def test_no_best_directory_until_something_is_validated(tmp_path):
  ckpt, config = _checkpointer(tmp_path)
  state, _ = _place(_state(), _mesh((4, 2)))
  assert ckpt.save(5, state, {'next_step': 5}, config)
  ckpt.wait()
  assert not os.path.exists(tmp_path / 'checkpoints_best') and ckpt.best_step() is None
  with pytest.raises(FileNotFoundError, match='checkpoints_best: no best checkpoint'):
    ckpt.restore_subtree({'step': jax.ShapeDtypeStruct((), jnp.int32)}, best=True)
  assert ckpt.save_best(5, state, 10.0, {'next_step': 5}, config)
  ckpt.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints_best')) == ['5']
  assert _checkpointer(tmp_path)[0].best_step() == 5


def test_preemption_guard_turns_sigterm_into_a_flag():
  previous = signal.getsignal(signal.SIGTERM)
  with checkpoint.PreemptionGuard() as guard:
    assert not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.stop_requested and guard.should_stop(1)
  assert signal.getsignal(signal.SIGTERM) == previous


def test_metrics_writer_and_progress_printer(tmp_path):
  with run_logging.MetricsWriter(str(tmp_path)) as writer:
    writer.write(1, {'loss': jnp.float32(2.5), 'box': np.float32(1.0), 'cls': 0.5, 'lr': 1e-3})
    writer.write(2, {'loss': float('nan'), 'box': 1.0, 'cls': 0.5})
  with run_logging.MetricsWriter(str(tmp_path)) as writer:  # a resumed run appends
    writer.write(3, {'loss': 2.0, 'box': 0.9, 'cls': 0.4})
  records = run_logging.read_metrics(str(tmp_path))
  assert [r['step'] for r in records] == [1, 2, 3]
  assert records[0] == {'step': 1, 'loss': 2.5, 'box': 1.0, 'cls': 0.5, 'lr': 1e-3}
  assert records[1]['loss'] is None
  assert any(name.startswith('events.out.tfevents')
             for name in os.listdir(os.path.join(tmp_path, run_logging.TENSORBOARD_SUBDIR)))
  silent = run_logging.MetricsWriter(str(tmp_path / 'off'), enabled=False)
  silent.write(1, {'loss': 1.0})
  assert not os.path.exists(tmp_path / 'off' / run_logging.METRICS_FILE)

  stream = io.StringIO()
  printer = run_logging.ProgressPrinter(100, steps_per_epoch=10, global_batch_size=8, stream=stream)
  printer.line(10, {'loss': 1.0}, now=0.0)
  text = printer.line(20, {'loss': 0.5, 'box': 0.25}, now=2.0)
  assert text.startswith('20/100  epoch 2/10  loss 0.5 box 0.25')   # step 20 ends epoch 2
  assert '40.0 img/s' in text and 'ETA 00:16' in text
  printer(30, {'loss': 0.4})
  assert stream.getvalue().endswith('\n') and '\r' not in stream.getvalue()
  tty = io.StringIO()
  run_logging.ProgressPrinter(100, stream=tty, tty=True)(1, {'loss': 1.0})
  assert tty.getvalue().startswith('\r')
  with pytest.raises(ValueError, match='only scalars'):
    run_logging.to_python_scalars({'loss': np.ones(3)})
