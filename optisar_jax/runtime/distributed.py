"""Multi-process (multi-host) start-up and process queries.

`initialize()` must run before anything touches a JAX device. Its inputs, in order of precedence:

1. the arguments (`scripts/train.py --coordinator_address HOST:PORT --num_processes N --process_id I`);
2. the environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (and
   `JAX_LOCAL_DEVICE_IDS`, read by JAX itself);
3. JAX's cluster auto-detection, used when none of the above is given but the environment shows a
   multi-process SLURM, Open MPI or multi-host Cloud TPU job, or when `cluster_detection_method` is named
   (e.g. 'k8s', 'mpi4py');
4. otherwise nothing happens: a single process sees all local devices.

On CPU, cross-process collectives go through gloo (`jax_cpu_collectives_implementation`), which is how
multi-host training is tested on one machine: two processes, 2 CPU devices each, one global mesh of 4.

Processes drift apart wherever they do different amounts of work: compiling (one process may hit the
persistent compilation cache while another compiles for minutes), building the model, opening data. A
collective tolerates little drift: gloo builds its communicators at the first collective of a device set
and gives the other processes 30 s to show up, then fails with `Gloo context initialization failed:
DEADLINE_EXCEEDED`. So every large compilation goes through `compile_together` (compile, then wait on
a coordination-service `barrier`, whose timeout is ours to choose), and the end of a job goes through
`barrier` before `shutdown`, so that no process waits for a late one inside JAX's own shutdown barrier.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any

import jax

from optisar_jax.runtime import compile_options

logger = logging.getLogger(__name__)

_initialized = False
_barrier_ids = itertools.count()

# Long enough for the slowest process to compile a large model from scratch on a loaded machine.
DEFAULT_BARRIER_TIMEOUT_S = 3600


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError as error:
    raise ValueError(f'environment variable {name}={value!r} is not an integer') from error


def _multiprocess_cluster_detected() -> bool:
  """Whether the environment is a multi-process job that JAX's auto-detection understands."""
  env = os.environ

  def count(name):
    try:
      return int(env.get(name, '1'))
    except ValueError:
      return 1

  if 'SLURM_JOB_ID' in env and count('SLURM_NTASKS') > 1:
    return True
  if count('OMPI_COMM_WORLD_SIZE') > 1:
    return True
  if ',' in env.get('TPU_WORKER_HOSTNAMES', '') or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True
  return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None,
               cluster_detection_method: str | None = None, initialization_timeout: int = 300) -> bool:
  """Joins the multi-process job described by the arguments / environment; returns whether it did.

  A no-op (returning False) for a single process. Calling it twice is harmless.
  """
  global _initialized
  if _initialized:
    return True
  coordinator_address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  num_processes = num_processes if num_processes is not None else _env_int('JAX_NUM_PROCESSES')
  process_id = process_id if process_id is not None else _env_int('JAX_PROCESS_ID')
  explicit = coordinator_address is not None or num_processes is not None or process_id is not None
  if explicit and num_processes == 1 and coordinator_address is None:
    return False
  if not explicit and cluster_detection_method is None and not _multiprocess_cluster_detected():
    return False
  if explicit and (coordinator_address is None or num_processes is None or process_id is None):
    raise ValueError('multi-process launch needs coordinator_address, num_processes and process_id together '
                     f'(got {coordinator_address!r}, {num_processes!r}, {process_id!r}); pass them as '
                     'flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID')
  # Only affects the CPU backend; on GPU/TPU hosts it is inert.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             cluster_detection_method=cluster_detection_method,
                             initialization_timeout=initialization_timeout)
  _initialized = True
  logger.info('process %d of %d, %d local / %d global devices', jax.process_index(), jax.process_count(),
              jax.local_device_count(), jax.device_count())
  return True


def barrier(name: str, timeout_s: int = DEFAULT_BARRIER_TIMEOUT_S) -> None:
  """Waits until every process has called `barrier` with this name (in the same order on all processes).

  A coordination-service barrier (no device collective, so no gloo communicator is involved); a no-op
  for a single process. Raises when a process does not arrive within `timeout_s`.
  """
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp  # its barrier_sync_fn wraps the distributed client's wait_at_barrier
  key = f'optisar_jax.{name}.{next(_barrier_ids)}'
  ocp.multihost.get_barrier_sync_fn()(key=key, timeout_ms=int(timeout_s * 1000))


def compile_together(jitted, *args: Any, name: str, timeout_s: int = DEFAULT_BARRIER_TIMEOUT_S):
  """`jitted.lower(*args).compile()`, returned once EVERY process has compiled it.

  Call the returned `jax.stages.Compiled` instead of `jitted` (same shardings, same donation): its first
  collective then finds all processes ready. Single process: just the compilation. The trace runs with
  `compile_options.fewer_gc_passes()`.
  """
  with compile_options.fewer_gc_passes():
    lowered = jitted.lower(*args)
  compiled = lowered.compile()
  barrier(f'{name}.compiled', timeout_s)
  return compiled


def shutdown() -> None:
  """Leaves the multi-process job (a no-op when `initialize` did nothing), after a `barrier`, so that
  all processes reach JAX's shutdown barrier (whose timeout is 5 minutes) at about the same time."""
  global _initialized
  if _initialized:
    barrier('shutdown')
    jax.distributed.shutdown()
    _initialized = False
_barrier_ids = itertools.count()

# Long enough for the slowest process to compile a large model from scratch on a loaded machine.
DEFAULT_BARRIER_TIMEOUT_S = 3600


def process_index() -> int:
  """This process's index (0 on a single process)."""
  return jax.process_index()


def process_count() -> int:
  """Number of processes in the job."""
  return jax.process_count()


def is_main_process() -> bool:
  """True on process 0, the one that writes logs and JSON side files."""
  return jax.process_index() == 0
