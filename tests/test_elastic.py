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


NUM_STEPS = 10      # the SIGTERM test's stop lands about 2 steps after the signal: room to spare


def _keep_checkpoints_up_to(workdir, step):
  """Removes the checkpoints after `step` and the metrics log: the run dir of a run stopped at `step`."""
  directory = os.path.join(workdir, 'checkpoints')
  for name in os.listdir(directory):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(directory, name))
  os.remove(os.path.join(workdir, 'metrics.jsonl'))


def _config(data_dir):
  return tiny_config(data_dir, f'train.num_steps={NUM_STEPS}', 'train.checkpoint_every=2', 'train.log_every=1',
                     'train.keep_checkpoints=5')


@pytest.fixture(scope='module')
def uninterrupted(synthetic_tfds, tmp_path_factory):
  """The tiny config trained NUM_STEPS steps in one go on 8 devices (a checkpoint every 2 steps): the
  reference losses."""
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
  # run writes: tests/test_recovery.py), without the later ones and without its log.
  shutil.copytree(uninterrupted, workdir)
  _keep_checkpoints_up_to(workdir, 4)
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
  assert sorted(resumed) == list(range(3, NUM_STEPS + 1))          # steps 3-4 are trained again
  for step in range(3, NUM_STEPS + 1):
    assert resumed[step]['loss'] == straight[step]['loss'], step  # bitwise: same weights, same batches


def test_checkpoint_without_input_state_resumes_the_data_at_its_step(synthetic_tfds, uninterrupted, tmp_path):
  from optisar_jax.runtime import checkpoint as checkpoint_lib
  from optisar_jax.train import loop
  workdir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted, workdir)
  config = _config(synthetic_tfds[1])
  _keep_checkpoints_up_to(workdir, 4)
  # Rewrite checkpoint 4 without its input state (as a converted checkpoint or older code has it).
  import jax
  from optisar_jax.runtime import sharding as sharding_lib
  from optisar_jax.train import optimizer as optimizer_lib
  from optisar_jax.train import step as step_lib
  mesh = sharding_lib.make_mesh(config.mesh)
  setup = step_lib.setup_training(config, mesh, (('.*', ()),), make_tx=lambda model: optimizer_lib.make_optimizer(
      config.optim, steps_per_epoch=1, total_steps=NUM_STEPS, params_tree=model))
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
  assert sorted(resumed) == list(range(5, NUM_STEPS + 1))
  for step in range(5, NUM_STEPS + 1):
    assert resumed[step]['loss'] == straight[step]['loss'], step  # the batches of steps 5-10, not 1-6


def test_two_processes_resume_a_one_process_checkpoint_then_stop_on_sigterm_and_one_process_resumes(
    synthetic_tfds, uninterrupted, tmp_path):
  """Both directions of an elastic restart in one run, as pods restart:

  * one -> two: the 1-process run's checkpoint 2 (8 devices) is resumed by 2 processes (2 CPU devices
    each). Step 3 sees the same weights and the same global batch, so its loss equals the uninterrupted
    run's to 1e-5: only the order of float32 sums differs.
  * SIGTERM to both processes mid-run, as a preempted pod slice gets it: all processes stop at the same
    step k and save it (JAX's preemption sync point).
  * two -> one: resumed by 1 process (8 devices: twice the 2 x 2 devices that wrote it), step k+1 sees the
    same weights and global batch as the 2-process run's own continuation (the original topology; a
    resume on the same topology is bitwise, tests/test_recovery.py), so the losses agree to 5e-5.

  Later steps are not compared across topologies: AdamW moves each weight by about +-lr whatever its
  gradient's size, so a near-zero gradient element whose sign flips under reordering flips its update.
  """
  import signal
  from processes import finish_processes, start_processes
  from test_recovery import checkpoint_steps, wait_for_step
  multi = str(tmp_path / 'multi')
  shutil.copytree(uninterrupted, multi)
  _keep_checkpoints_up_to(multi, 2)
  # No periodic checkpoint: the only new one is the SIGTERM's.
  common = ['scripts/train.py', '--config', 'configs/tiny.py', f'--config.data.data_dir={synthetic_tfds[1]}',
            f'--config.train.num_steps={NUM_STEPS}', '--config.train.checkpoint_every=100',
            '--config.train.log_every=1']
  procs = start_processes([[*common, '--workdir', multi]] * 2, tmp_path)
  try:
    wait_for_step(multi, 3, procs)
    for proc in procs:
      proc.send_signal(signal.SIGTERM)
  finally:
    logs = finish_processes(procs, tmp_path)
  assert 'resumed from' in logs[0] and 'at step 2' in logs[0], logs[0][-2000:]
  saved = checkpoint_steps(multi)
  assert len(saved) == 2 and saved[0] == 2 and 3 <= saved[1] < NUM_STEPS, (saved, logs[0][-2000:])
  k = saved[1]
  assert f'stopped at step {k} of {NUM_STEPS}' in logs[0]
  straight, two = _rows(uninterrupted), _rows(multi)
  assert sorted(two) == list(range(3, k + 1))
  # one -> two: bounds derived in tests/test_train_loop.py for the same weights and batch summed in
  # another order (1e-5 is the figure for the loss; 5e-5 the derived one for each component).
  np.testing.assert_allclose(two[3]['loss'], straight[3]['loss'], rtol=1e-5)
  for key in ('box', 'cls', 'dfl', 'region', 'moe'):
    np.testing.assert_allclose(two[3][key], straight[3][key], rtol=5e-5, atol=1e-7, err_msg=key)

  single = str(tmp_path / 'single')
  shutil.copytree(multi, single)
  run_processes([[*common, '--workdir', multi]] * 2, tmp_path)      # the original topology continues
  two = _rows(multi)
  one = subprocess.run([sys.executable, *common, '--workdir', single], cwd=REPO, env=_env(8),
                       capture_output=True, text=True, timeout=900)
  assert one.returncode == 0, one.stderr[-3000:]
  assert 'resumed from' in one.stdout and f'at step {k}' in one.stdout
  resumed = _rows(single)
  assert sorted(resumed) == sorted(two) == list(range(3, NUM_STEPS + 1))
  np.testing.assert_allclose(resumed[k + 1]['loss'], two[k + 1]['loss'], rtol=5e-5)
