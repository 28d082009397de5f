"""scripts/train.py on two local processes (jax.distributed over gloo, 2 CPU devices each) gives the same
losses as one process with 4 devices and the same global batch."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return env


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(row['step'], row['loss'], row['cls'], row['box']) for row in map(json.loads, f) if 'loss' in row]


def test_two_processes_match_one_process(synthetic_tfds, tmp_path):
  data_dir = synthetic_tfds[1]
  common = ['scripts/train.py', '--config', 'configs/tiny.py', f'--config.data.data_dir={data_dir}',
            '--config.train.num_steps=2', '--config.train.checkpoint_every=2',
            '--config.model.tgdg.ssa_dropout=0.0', '--config.model.moe.noisy_gating=False']
  single = str(tmp_path / 'single')
  result = subprocess.run([sys.executable, *common, '--workdir', single], cwd=REPO, env=_env(4),
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  multi = str(tmp_path / 'multi')
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, *common, '--workdir', multi,
                             '--coordinator_address', f'127.0.0.1:{port}', '--num_processes', '2',
                             '--process_id', str(i)], cwd=REPO, env=_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=900) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  one, two = _losses(single), _losses(multi)
  assert [r[0] for r in one] == [r[0] for r in two] == [1, 2]
  np.testing.assert_allclose(np.array([r[1:] for r in two]), np.array([r[1:] for r in one]), rtol=2e-4)
  assert os.path.isdir(os.path.join(multi, 'checkpoints', '2'))
