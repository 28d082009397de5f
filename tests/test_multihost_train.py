"""scripts/train.py on two local processes (jax.distributed over gloo, 2 CPU devices each) gives the same
losses as one process with the same global batch."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=' '.join(flags + [f'--xla_force_host_platform_device_count={devices}']))
  return env


def run_processes(commands, tmp_path, *, devices: int = 2, timeout: int = 900) -> list[str]:
  """Runs one command per process (each a list of arguments after the interpreter), joined by
  jax.distributed over gloo on a fresh local port, `devices` CPU devices each; returns each process's
  output and asserts that every process exited 0. Output goes to files, not pipes: an undrained pipe
  would stall a process that writes a lot."""
  port = _free_port()
  n = len(commands)
  logs = [open(tmp_path / f'process{i}.log', 'w') for i in range(n)]
  procs = [subprocess.Popen([sys.executable, *command, '--coordinator_address', f'127.0.0.1:{port}',
                             '--num_processes', str(n), '--process_id', str(i)],
                            cwd=REPO, env=_env(devices), stdout=logs[i], stderr=subprocess.STDOUT, text=True)
           for i, command in enumerate(commands)]
  try:
    for proc in procs:
      proc.wait(timeout=timeout)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
    for log in logs:
      log.close()
  texts = [(tmp_path / f'process{i}.log').read_text() for i in range(n)]
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, texts[i][-3000:]
  return texts


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(row['step'], row['loss'], row['cls'], row['box']) for row in map(json.loads, f) if 'loss' in row]


def test_two_processes_match_one_process(trained_tiny, synthetic_tfds, tmp_path):
  """Same config as the in-process `trained_tiny` run (8 devices, one process, global batch 8): here 2
  processes x 2 devices, each feeding its 4 rows of every global batch.

  On this machine the two processes are minutes apart after compiling (process 0 reads the train step
  from the persistent cache, process 1 compiles it), which is what `distributed.compile_together` and
  the barrier before `shutdown` are for: without them gloo's 30 s rendezvous fails.
  """
  straight, _ = trained_tiny
  data_dir = synthetic_tfds[1]
  common = ['scripts/train.py', '--config', 'configs/tiny.py', f'--config.data.data_dir={data_dir}',
            '--config.train.num_steps=4', '--config.train.checkpoint_every=4']
  multi = str(tmp_path / 'multi')
  run_processes([[*common, '--workdir', multi]] * 2, tmp_path)
  one, two = _losses(straight), _losses(multi)
  assert [r[0] for r in one] == [r[0] for r in two] == [1, 2, 3, 4]
  # Steps 1-2 see the same weights and the same global batch: equal up to float32 reduction order.
  # Later steps drift a little, as between 1 and 8 devices (test_train_loop): the gradients agree to
  # ~1 % because the assigner's top-k and the MoE routing are discrete; stated tolerance 3 %.
  two, one = np.array([r[1:] for r in two]), np.array([r[1:] for r in one])
  np.testing.assert_allclose(two[:2], one[:2], rtol=1e-3)
  np.testing.assert_allclose(two[2:], one[2:], rtol=3e-2)
  assert os.path.isdir(os.path.join(multi, 'checkpoints', '4'))
