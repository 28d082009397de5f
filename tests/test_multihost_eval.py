"""scripts/evaluate.py on two local processes (jax.distributed over gloo, 2 CPU devices each) writes
metrics bitwise identical to one process's: each process decodes and runs only its own devices' blocks,
and the answers are gathered at the end (optisar_jax/evaluation.py)."""

import json
import os
import subprocess
import sys

import pytest

from processes import REPO, _env, run_processes


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(trained_tiny, tmp_path):
  # A copy of the trained run whose evaluation packs 1 image and 3 query slots per device, so the small
  # synthetic test split fills several steps of 4 devices and both processes get blocks to run.
  import shutil
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained_tiny[0], workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  config['eval'].update(batch_size=1, query_slots=3)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  common = [sys.executable, 'scripts/evaluate.py', '--workdir', workdir, '--split', 'test']
  one_out = str(tmp_path / 'one.json')
  one = subprocess.run(common + ['--output', one_out, '--predictions_out', str(tmp_path / 'one_preds.json')],
                       cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  two_out = str(tmp_path / 'two.json')
  logs = run_processes([common[1:] + ['--output', two_out, '--predictions_out', str(tmp_path / 'two_preds.json')]] * 2,
                       tmp_path)
  with open(one_out) as f:
    metrics_one = json.load(f)
  with open(two_out) as f:
    metrics_two = json.load(f)
  assert metrics_one['all']['n'] > 0
  # 4 devices either way (the packing, and so every block, is the same); bitwise equal numbers.
  assert json.dumps(metrics_two, sort_keys=True) == json.dumps(metrics_one, sort_keys=True)
  with open(tmp_path / 'one_preds.json') as f:
    preds_one = f.read()
  with open(tmp_path / 'two_preds.json') as f:
    assert f.read() == preds_one
  # Each process decoded only the image slots of its own 2 devices' blocks (an image split over two blocks
  # counts twice); together that is the one-process run's count, and neither did it alone.
  import re
  decoded = [int(re.search(r'process %d: decoded (\d+) image slots' % i, log).group(1)) for i, log in enumerate(logs)]
  total = sum(decoded)
  assert all(0 < d < total for d in decoded), decoded
  assert total >= metrics_one['all']['n'] // 5       # at least one slot per image of the split
  # Process 0 writes the files; process 1 writes nothing.
  assert 'wrote' in logs[0] and 'wrote' not in logs[1]
