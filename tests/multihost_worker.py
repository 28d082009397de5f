"""One process of the two-process test (tests/test_multihost.py); not a test module itself.

Usage: python tests/multihost_worker.py PORT PROCESS_ID NUM_PROCESSES WORKDIR

Each process has 2 CPU devices (set by the parent through XLA_FLAGS). It joins the job over gloo, builds a
global batch from its own rows, runs jitted reductions, saves and restores a checkpoint with a
per-process data state, and prints one JSON line with what it saw.
"""

import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from optisar_jax.runtime import checkpoint, distributed, sharding  # noqa: E402

GLOBAL_BATCH = 8


def global_rows() -> np.ndarray:
  """The global batch every process slices its rows from (process order = row order)."""
  return (np.arange(GLOBAL_BATCH * 3, dtype=np.float32).reshape(GLOBAL_BATCH, 3) - 5.0) / 3.0


def main(port: int, process_id: int, num_processes: int, workdir: str) -> None:
  joined = distributed.initialize(f'127.0.0.1:{port}', num_processes, process_id)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'shape': (-1, 1), 'axes': ('data', 'fsdp')}))
  local_rows = GLOBAL_BATCH // num_processes
  rows = global_rows()[process_id * local_rows:(process_id + 1) * local_rows]
  batch_sharding = sharding.batch_sharding(mesh)
  batch = sharding.global_batch_from_process_local({'x': rows}, batch_sharding)
  replicated = sharding.replicated(mesh)
  reduce = jax.jit(lambda b: {'sum_sq': jnp.sum(b['x'] ** 2), 'col_mean': jnp.mean(b['x'], axis=0)},
                   in_shardings=(batch_sharding,), out_shardings=replicated)
  result = jax.device_get(reduce(batch))

  # A checkpoint written by all processes together, with the one global input state; a process whose
  # state differs is refused (one line naming both states).
  ckpt = checkpoint.TrainCheckpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=2)
  weights = jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4), NamedSharding(mesh, P('data')))
  try:
    ckpt.save(2, {'w': weights}, {'next_step': 7 + process_id}, {'name': 'mh'})
    differing_refused = False
  except ValueError as err:
    differing_refused = 'differ between processes' in str(err)
  ckpt.save(1, {'w': weights}, {'next_step': 7}, {'name': 'mh'})
  ckpt.wait()
  abstract = {'w': jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P(None, 'data')))}
  restored, data_state = ckpt.restore(None, abstract)
  restored_ok = bool(np.array_equal(
      jax.device_get(jax.jit(lambda w: w, out_shardings=replicated)(restored['w'])),
      np.arange(32, dtype=np.float32).reshape(8, 4)))
  stop = checkpoint.PreemptionGuard().install().should_stop(0)
  ckpt.close()

  print(json.dumps({
      'joined': joined,
      'process_index': distributed.process_index(),
      'process_count': distributed.process_count(),
      'is_main': distributed.is_main_process(),
      'device_count': jax.device_count(),
      'local_device_count': jax.local_device_count(),
      'batch_shape': list(batch['x'].shape),
      'sum_sq': float(result['sum_sq']),
      'col_mean': [float(v) for v in result['col_mean']],
      'data_state': data_state,
      'restored_ok': restored_ok,
      'differing_refused': differing_refused,
      'should_stop': stop,
  }), flush=True)
  distributed.shutdown()


if __name__ == '__main__':
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
