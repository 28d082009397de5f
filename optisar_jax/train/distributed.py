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
"""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger(__name__)

_initialized = False


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


def shutdown() -> None:
  """Leaves the multi-process job (a no-op when `initialize` did nothing)."""
  global _initialized
  if _initialized:
    jax.distributed.shutdown()
    _initialized = False


def process_index() -> int:
  """This process's index (0 on a single process)."""
  return jax.process_index()


def process_count() -> int:
  """Number of processes in the job."""
  return jax.process_count()


def is_main_process() -> bool:
  """True on process 0, the one that writes logs and JSON side files."""
  return jax.process_index() == 0
