"""Recovery paths of scripts/train.py, driven the way a scheduler and a user drive them, in subprocesses:
a real SIGTERM mid-run, after which the same command continues with bit-identical losses; and a
non-finite loss under `train.nonfinite = 'stop'` (a one-line error naming the step, nothing saved from
it) and `'skip'` (the step changes no weight). The loop's side: optisar_jax/train/loop.py, the stop
signal: optisar_jax/runtime/checkpoint.py (PreemptionGuard)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from processes import REPO, _env

pytestmark = pytest.mark.slow


def rows(workdir):
  """{step: metrics row} from WORKDIR/metrics.jsonl (a resumed run's rows replace the earlier ones)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    found = [json.loads(line) for line in f if line.strip()]
  return {r['step']: r for r in found if 'loss' in r}


def checkpoint_steps(workdir):
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def wait_for_step(workdir, step, procs, timeout=600):
  """Polls WORKDIR/metrics.jsonl until it has a row of `step` or later; fails if a process ends first."""
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if os.path.exists(path) and any(s >= step for s in rows(workdir)):
      return
    ended = [p for p in procs if p.poll() is not None]
    assert not ended, f'the run ended (exit {ended[0].returncode}) before step {step}'
    time.sleep(0.05)
  pytest.fail(f'no step {step} in {path} after {timeout} s')


def train_command(data_dir, workdir, *overrides):
  return ['scripts/train.py', '--config', 'configs/tiny.py', f'--config.data.data_dir={data_dir}',
          '--config.train.log_every=1', '--workdir', workdir, *[f'--config.{o}' for o in overrides]]


# 2 devices: the 24-step runs take 141 s of the suite this way and 225 s with the 8 devices of the
# in-process tests (whose compiled step they would share), measured 2026-12-05 on the 2-core machine.
DEVICES = 2


def run(command, devices=DEVICES, timeout=900):
  return subprocess.run([sys.executable, *command], cwd=REPO, env=_env(devices), capture_output=True,
                        text=True, timeout=timeout)


def test_sigterm_mid_run_then_the_same_command_continues_bitwise(synthetic_tfds, tmp_path):
  data_dir = synthetic_tfds[1]
  settings = ('train.num_steps=24', 'train.checkpoint_every=100')    # no periodic checkpoint to fall back on
  straight = str(tmp_path / 'straight')
  done = run(train_command(data_dir, straight, *settings))
  assert done.returncode == 0, done.stderr[-3000:]

  stopped = str(tmp_path / 'stopped')
  command = train_command(data_dir, stopped, *settings)
  with open(tmp_path / 'stopped.log', 'w') as log:
    proc = subprocess.Popen([sys.executable, *command], cwd=REPO, env=_env(DEVICES), stdout=log,
                            stderr=subprocess.STDOUT, text=True)
  try:
    wait_for_step(stopped, 3, [proc])
    proc.send_signal(signal.SIGTERM)                                 # what a preempting scheduler sends
    proc.wait(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
  output = (tmp_path / 'stopped.log').read_text()
  assert proc.returncode == 0, output[-3000:]
  saved = checkpoint_steps(stopped)
  assert len(saved) == 1 and 3 <= saved[0] < 24, (saved, output[-2000:])
  k = saved[0]
  assert f'stopped at step {k} of 24' in output and f'train.py: stopped at step {k}' in output
  assert sorted(rows(stopped)) == list(range(1, k + 1))

  again = run(command)                                                # the same command, unchanged
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'at step {k}' in again.stdout and 'train.py: done at step 24' in again.stdout
  first, second = rows(straight), rows(stopped)
  assert sorted(first) == sorted(second) == list(range(1, 25))
  for step in range(1, 25):
    for key in ('loss', 'box', 'cls', 'dfl', 'region', 'moe', 'grad_norm'):
      assert second[step][key] == first[step][key], (step, key)       # bitwise, before and after the stop
  import jax
  from conftest import tiny_config
  from optisar_jax import evaluation
  config = tiny_config(data_dir, *settings)
  for use_ema in (False, True):                                        # the final weights, bitwise
    pa, ra, step_a, _ = evaluation.restore_weights(config, straight, use_ema=use_ema)
    pb, rb, step_b, _ = evaluation.restore_weights(config, stopped, use_ema=use_ema)
    assert step_a == step_b == 24
    for x, y in zip(jax.tree.leaves((pa, ra)), jax.tree.leaves((pb, rb))):
      np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_nonfinite_stop_is_one_line_naming_the_step_and_saves_nothing_after_it(synthetic_tfds, tmp_path):
  # A learning rate of 1e30 moves every weight by about 1e30 in step 1; step 2's BatchNorm variances then
  # overflow float32, so its loss is NaN. Step 1 itself is finite (the initial weights are sane).
  workdir = str(tmp_path / 'run')
  result = run(train_command(synthetic_tfds[1], workdir, 'optim.lr=1e30', 'train.num_steps=4',
                             'train.checkpoint_every=1', 'train.keep_checkpoints=5'))
  assert result.returncode != 0
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and errors[0].startswith('error: non-finite loss at step 2 '), result.stderr[-3000:]
  assert 'nonfinite=skip' in errors[0] and 'Traceback' not in result.stderr
  assert checkpoint_steps(workdir) == [1]                             # step 2's state is never saved
  logged = rows(workdir)
  assert sorted(logged) == [1] and np.isfinite(logged[1]['loss'])


def test_nonfinite_skip_leaves_every_weight_and_moment_as_it_was(synthetic_tfds, tmp_path):
  import jax
  from conftest import tiny_config
  from optisar_jax.runtime import checkpoint as checkpoint_lib
  from optisar_jax.runtime import sharding as sharding_lib
  from optisar_jax.train import optimizer as optimizer_lib
  from optisar_jax.train import step as step_lib

  workdir = str(tmp_path / 'run')
  # As above, step 2 is the first non-finite step (steps with NaN run ~15x slower on a CPU: one is enough).
  overrides = ('optim.lr=1e30', 'train.nonfinite=skip', 'train.num_steps=2', 'train.checkpoint_every=1',
               'train.keep_checkpoints=5')
  result = run(train_command(synthetic_tfds[1], workdir, *overrides))
  assert result.returncode == 0, result.stderr[-3000:]
  logged = rows(workdir)
  assert np.isfinite(logged[1]['loss']) and logged[2]['loss'] is None     # metrics.jsonl writes NaN as null
  assert 'skipped_steps' not in logged[1] and logged[2]['skipped_steps'] == 1
  assert checkpoint_steps(workdir) == [1, 2]
  assert 'train.py: done at step 2 (loss nan' in result.stdout

  config = tiny_config(synthetic_tfds[1], *overrides)
  mesh = sharding_lib.make_mesh(config.mesh)
  setup = step_lib.setup_training(config, mesh, (('.*', ()),), make_tx=lambda model: optimizer_lib.make_optimizer(
      config.optim, steps_per_epoch=1, total_steps=2, params_tree=model))
  abstract = sharding_lib.abstract_with_shardings(jax.eval_shape(lambda: setup.state), setup.shardings)
  checkpointer = checkpoint_lib.TrainCheckpointer.from_config(workdir, config, async_save=False)
  states = {s: jax.device_get(checkpointer.restore(s, abstract)[0]) for s in (1, 2)}
  checkpointer.close()
  assert [int(states[s]['step']) for s in (1, 2)] == [1, 2]         # the step counter still advances
  leaves = {s: jax.tree_util.tree_flatten_with_path({k: states[s][k] for k in ('params', 'rest', 'opt_state')})[0]
            for s in (1, 2)}
  floats = counters = 0
  for (path, before), (_, after) in zip(leaves[1], leaves[2]):
    before, after = np.asarray(before), np.asarray(after)
    if np.issubdtype(before.dtype, np.integer):
      counters += int(np.all(after == before + 1))   # schedule counters advance like the step
      continue
    floats += 1
    np.testing.assert_array_equal(after, before, err_msg=jax.tree_util.keystr(path))
  assert counters >= 1
  assert floats > 100                                # weights, BatchNorm statistics and Adam moments
  # step 1's update was applied: the weights are the blown-up ones, finite, and far from the initial ones
  kernel = max((a for a in map(np.asarray, jax.tree.leaves(states[1]['params'])) if a.dtype.kind == 'f'),
               key=lambda a: a.size)
  assert np.all(np.isfinite(kernel)) and np.abs(kernel).max() > 1e20
