"""Restarts the way pods restart: on another process count, from a damaged newest checkpoint, from a
checkpoint without input state (optisar_jax/runtime/checkpoint.py, optisar_jax/train/loop.py)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_config
from processes import REPO, _env, run_processes


pytestmark = pytest.mark.slow      # trains the tiny model or runs processes: minutes on a 2-core CPU

def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r['step']: r for r in rows if 'loss' in r}      # a resumed run's rows replace the earlier ones


def _config(data_dir):
  return tiny_config(data_dir, 'train.num_steps=6', 'train.checkpoint_every=2', 'train.log_every=1',
                     'train.keep_checkpoints=5')


@pytest.fixture(scope='module')
def uninterrupted(synthetic_tfds, tmp_path_factory):
  """The tiny config trained 6 steps in one go (checkpoints at 2, 4, 6): the reference losses."""
  from optisar_jax.train import loop
  workdir = str(tmp_path_factory.mktemp('elastic') / 'straight')
  loop.train(_config(synthetic_tfds[1]), workdir)
  return workdir


def test_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_exactly(synthetic_tfds, uninterrupted,
                                                                           tmp_path, capsys):
  from optisar_jax.train import loop
  workdir = str(tmp_path / 'run')
  config = _config(synthetic_tfds[1])
  # A run preempted after step 4: the uninterrupted run's checkpoints 2 and 4 (bitwise what the stopped
  # run writes: tests/test_recovery.py), without step 6 and without its log.
  shutil.copytree(uninterrupted, workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
  os.remove(os.path.join(workdir, 'metrics.jsonl'))
  newest = os.path.join(workdir, 'checkpoints', '4')
  # A failing disk / an interrupted copy: the state's array data files cut to half their size (cutting only
  # the largest file of the checkpoint is not always fatal: it may be one the restore does not read).
  data_files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(newest, 'state'))
                for f in names if os.path.basename(d) == 'd']
  assert data_files
  for path in data_files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  capsys.readouterr()
  loop.train(config, workdir)
  out = capsys.readouterr().out
  lines = [line for line in out.splitlines() if 'is damaged' in line]
  assert len(lines) == 1 and newest in lines[0] and 'checkpoints_damaged' in lines[0], out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints_damaged', '4'))     # kept, not deleted
  assert 'resumed from' in out and 'at step 2' in out
  straight, resumed = _rows(uninterrupted), _rows(workdir)
  assert sorted(resumed) == [3, 4, 5, 6]                           # steps 3-4 are trained again
  for step in (3, 4, 5, 6):
    assert resumed[step]['loss'] == straight[step]['loss'], step  # bitwise: same weights, same batches


def test_checkpoint_without_input_state_resumes_the_data_at_its_step(synthetic_tfds, uninterrupted, tmp_path):
  from optisar_jax.runtime import checkpoint as checkpoint_lib
  from optisar_jax.train import loop
  workdir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted, workdir)
  config = _config(synthetic_tfds[1])
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '6'))
  os.remove(os.path.join(workdir, 'metrics.jsonl'))
  # Rewrite checkpoint 4 without its input state (as a converted checkpoint or older code has it).
  import jax
  from optisar_jax.runtime import sharding as sharding_lib
  from optisar_jax.train import optimizer as optimizer_lib
  from optisar_jax.train import step as step_lib
  mesh = sharding_lib.make_mesh(config.mesh)
  setup = step_lib.setup_training(config, mesh, (('.*', ()),), make_tx=lambda model: optimizer_lib.make_optimizer(
      config.optim, steps_per_epoch=1, total_steps=6, params_tree=model))
  abstract = sharding_lib.abstract_with_shardings(jax.eval_shape(lambda: setup.state), setup.shardings)
  checkpointer = checkpoint_lib.TrainCheckpointer.from_config(workdir, config, async_save=False)
  state, data_state = checkpointer.restore(4, abstract)
  assert data_state['next_step'] == 4
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  checkpointer.close()
  checkpointer = checkpoint_lib.TrainCheckpointer.from_config(workdir, config, async_save=False)
  checkpointer.save(4, state, None, config, force=True)
  checkpointer.close()
  loop.train(config, workdir)
  straight, resumed = _rows(uninterrupted), _rows(workdir)
  assert sorted(resumed) == [5, 6]
  for step in (5, 6):
    assert resumed[step]['loss'] == straight[step]['loss'], step  # the batches of steps 5 and 6, not 1 and 2


def test_two_process_run_stopped_by_sigterm_resumes_on_one_process(synthetic_tfds, uninterrupted, tmp_path):
  """A 2-process run (2 CPU devices each) gets SIGTERM on both processes mid-run, as a preempted pod
  slice does; all processes stop at the same step k and save it (JAX's preemption sync point). Resumed by
  1 process (8 devices: twice the 2 x 2 devices that wrote it), step k+1 sees the same weights and the
  same global batch as the 2-process run's own step k+1 (the 2-process resume: a resume on the same
  topology is bitwise, tests/test_recovery.py), so the losses agree to float32 reduction order (the 5e-5
  bound of step 1 below)."""
  import signal
  from processes import finish_processes, start_processes
  from test_recovery import checkpoint_steps, wait_for_step
  common = ['scripts/train.py', '--config', 'configs/tiny.py', f'--config.data.data_dir={synthetic_tfds[1]}',
            '--config.train.num_steps=10', '--config.train.checkpoint_every=100', '--config.train.log_every=1']
  multi = str(tmp_path / 'multi')
  procs = start_processes([[*common, '--workdir', multi]] * 2, tmp_path)
  try:
    wait_for_step(multi, 2, procs)
    for proc in procs:
      proc.send_signal(signal.SIGTERM)
  finally:
    logs = finish_processes(procs, tmp_path)
  saved = checkpoint_steps(multi)
  assert len(saved) == 1 and 2 <= saved[0] < 10, (saved, logs[0][-2000:])
  k = saved[0]
  assert f'stopped at step {k} of 10' in logs[0]
  # Step 1 of the 2 processes (4 rows of the global batch each) against 1 process of 8 devices (the
  # `uninterrupted` run; a loss is taken before its step's update, so the run lengths do not matter): the
  # same weights and batch, so only the order of float32 sums differs (bounds derived in
  # tests/test_train_loop.py: 5e-5 for the loss and its components, 5e-4 for the gradient norm). Later
  # steps are not compared across topologies: AdamW moves each weight by about +-lr whatever its
  # gradient's size, so a near-zero gradient element whose sign flips under reordering flips its update.
  first, one = _rows(multi)[1], _rows(uninterrupted)[1]
  for key in ('loss', 'box', 'cls', 'dfl', 'region', 'moe'):
    np.testing.assert_allclose(first[key], one[key], rtol=5e-5, atol=1e-7, err_msg=key)
  np.testing.assert_allclose(first['grad_norm'], one['grad_norm'], rtol=5e-4)
  single = str(tmp_path / 'single')
  shutil.copytree(multi, single)
  run_processes([[*common, '--workdir', multi]] * 2, tmp_path)      # the original topology continues
  two = _rows(multi)
  one = subprocess.run([sys.executable, *common, '--workdir', single], cwd=REPO, env=_env(8),
                       capture_output=True, text=True, timeout=900)
  assert one.returncode == 0, one.stderr[-3000:]
  assert 'resumed from' in one.stdout and f'at step {k}' in one.stdout
  resumed = _rows(single)
  assert sorted(resumed) == sorted(two) == list(range(1, 11))
  np.testing.assert_allclose(resumed[k + 1]['loss'], two[k + 1]['loss'], rtol=5e-5)


def test_one_process_checkpoint_resumes_on_two_processes(synthetic_tfds, uninterrupted, tmp_path):
  """Written by 1 process (8 devices), resumed by 2 processes (2 CPU devices each) from step 2: step 3
  sees the same weights and global batch, so its loss equals the uninterrupted run's to 1e-5."""
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(uninterrupted, resumed)
  for step in ('4', '6'):
    shutil.rmtree(os.path.join(resumed, 'checkpoints', step))
  os.remove(os.path.join(resumed, 'metrics.jsonl'))
  common = ['scripts/train.py', '--config', 'configs/tiny.py', f'--config.data.data_dir={synthetic_tfds[1]}',
            '--config.train.num_steps=6', '--config.train.checkpoint_every=2', '--config.train.log_every=1',
            '--config.train.keep_checkpoints=5', '--workdir', resumed]
  logs = run_processes([common] * 2, tmp_path)
  assert 'resumed from' in logs[0] and 'at step 2' in logs[0]
  straight, again = _rows(uninterrupted), _rows(resumed)
  assert sorted(again) == [3, 4, 5, 6]
  np.testing.assert_allclose(again[3]['loss'], straight[3]['loss'], rtol=1e-5)
