"""Two local processes (2 CPU devices each, gloo) form one 4-device job; plus single-process no-op start-up.

The two-process test kills its workers after 120 s, so a hang cannot block CI.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from optisar_jax.runtime import distributed

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multihost_worker.py')
TIMEOUT_S = 120


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _worker_env() -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + ['--xla_force_host_platform_device_count=2'])
  env['JAX_PLATFORMS'] = 'cpu'
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(name, None)
  return env


def test_two_processes_build_one_global_batch(tmp_path):
  port, env = _free_port(), _worker_env()
  workers = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), '2', str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
  outputs = []
  try:
    for worker in workers:
      outputs.append(worker.communicate(timeout=TIMEOUT_S))
  except subprocess.TimeoutExpired:
    for worker in workers:
      worker.kill()
      worker.communicate()
    pytest.fail(f'two-process run did not finish in {TIMEOUT_S} s')
  for worker, (out, err) in zip(workers, outputs):
    assert worker.returncode == 0, f'worker failed:\n{err[-4000:]}'
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]

  sys.path.insert(0, os.path.dirname(WORKER))
  from multihost_worker import global_rows  # noqa: E402 (the same rows the workers slice)
  rows = global_rows()
  for i, result in enumerate(results):
    assert result['joined'] and result['process_index'] == i and result['process_count'] == 2
    assert result['is_main'] == (i == 0)
    assert result['device_count'] == 4 and result['local_device_count'] == 2
    assert result['batch_shape'] == [8, 3]
    np.testing.assert_allclose(result['sum_sq'], np.sum(rows ** 2), rtol=1e-6)
    np.testing.assert_allclose(result['col_mean'], rows.mean(0), rtol=1e-6, atol=1e-7)
    assert result['data_state'] == {'next_step': 7} and result['differing_refused']
    assert result['restored_ok'] and result['should_stop'] is False


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_JOB_ID',
               'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  assert distributed.initialize(num_processes=1) is False
  assert distributed.process_count() == 1 and distributed.process_index() == 0
  assert distributed.is_main_process()


def test_initialize_rejects_partial_arguments(monkeypatch):
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.delenv('JAX_PROCESS_ID', raising=False)
  with pytest.raises(ValueError, match='coordinator_address, num_processes and process_id together'):
    distributed.initialize()
