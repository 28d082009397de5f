"""Running the project's scripts as several local processes joined by jax.distributed over gloo (2 CPU
devices each by default), the way the multi-host tests do."""

import os
import socket
import subprocess
import sys

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


def start_processes(commands, tmp_path, *, devices: int = 2):
  """Starts one command per process (each a list of arguments after the interpreter), joined by
  jax.distributed over gloo on a fresh local port, `devices` CPU devices each. Output goes to files
  (tmp_path/process<i>.log), not pipes: an undrained pipe would stall a process that writes a lot.
  Returns the processes; `finish_processes` waits for them."""
  port = _free_port()
  n = len(commands)
  procs = []
  for i, command in enumerate(commands):
    with open(tmp_path / f'process{i}.log', 'w') as log:
      procs.append(subprocess.Popen([sys.executable, *command, '--coordinator_address', f'127.0.0.1:{port}',
                                     '--num_processes', str(n), '--process_id', str(i)],
                                    cwd=REPO, env=_env(devices), stdout=log, stderr=subprocess.STDOUT,
                                    text=True))
  return procs


def finish_processes(procs, tmp_path, *, timeout: int = 900) -> list[str]:
  """Waits for `start_processes`' processes (killing them all after `timeout` s); returns each one's
  output and asserts that every process exited 0."""
  try:
    for proc in procs:
      proc.wait(timeout=timeout)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  texts = [(tmp_path / f'process{i}.log').read_text() for i in range(len(procs))]
  for i, proc in enumerate(procs):
    assert proc.returncode == 0, texts[i][-3000:]
  return texts


def run_processes(commands, tmp_path, *, devices: int = 2, timeout: int = 900) -> list[str]:
  """`start_processes` then `finish_processes`: each process's output; every process must exit 0."""
  return finish_processes(start_processes(commands, tmp_path, devices=devices), tmp_path, timeout=timeout)
