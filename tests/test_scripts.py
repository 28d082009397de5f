"""Command-line contract: one-line errors with non-zero exits, and the parameter count of scale m."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  flags = [f for f in env.pop('XLA_FLAGS', '').split()        # scripts see the real device count
           if not f.startswith('--xla_force_host_platform_device_count')]
  if flags:
    env['XLA_FLAGS'] = ' '.join(flags)
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=env)


def test_model_summary_prints_the_reference_parameter_count():
  result = _run('scripts/model_summary.py', '--config', 'configs/optsar_rsvg.py')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[-1] == 'total_params 28123336'
  assert 'trainable_params 28123320' in lines
  assert any(line.startswith('L8 ') and '2,908,099' in line for line in lines)   # PL-MoE
  assert any(line.startswith('L23 ') and '3,784,414' in line for line in lines)  # head without SAVPE


@pytest.mark.parametrize('args,needle', [
    (['--config', 'configs/tiny.py', '--workdir', 'unused', '--config.train.no_such_key=1'],
     "config key 'train.no_such_key' does not exist"),
    (['--config', 'configs/nope.py', '--workdir', 'unused'], 'configs/nope.py: config file not found'),
    (['--config', 'configs/tiny.py', '--workdir', 'unused', '--config.train.num_steps=ten'],
     "config key 'train.num_steps': cannot read 'ten'"),
    (['--config', 'configs/tiny.py', '--workdir', 'unused', '--config.model.tgdg.gate_init', 'open'],
     "config key 'model.tgdg.gate_init': cannot read 'open' (expected a tuple of numbers"),
    (['--config', 'configs/tiny.py', '--workdir', 'unused', '--config.data.data_dir=unbuilt/tfds'],
     "unbuilt/tfds: no built TFDS dataset 'optsar_rsvg'"),
])
def test_train_bad_input_is_one_line_and_nonzero(tmp_path, args, needle):
  args = [a.replace('unused', str(tmp_path / 'w')).replace('unbuilt', str(tmp_path / 'unbuilt')) for a in args]
  needle = needle.replace('unbuilt', str(tmp_path / 'unbuilt'))
  result = _run('scripts/train.py', *args)
  assert result.returncode != 0
  lines = [line for line in result.stderr.strip().splitlines() if line.startswith('error:')]
  assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'unbuilt').exists()       # nothing half-built is left behind


def test_evaluate_on_a_missing_workdir_is_one_line(tmp_path):
  result = _run('scripts/evaluate.py', '--workdir', str(tmp_path / 'missing'))
  assert result.returncode != 0
  assert 'config.json' in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.slow
def test_benchmark_input_against_workers():
  """`scripts/benchmark.py --what input --against_workers 1`: one JSON line; rounds of the config's worker
  count (0) alternate with 1 worker; every rate is the batch over the median round time."""
  out = _run('scripts/benchmark.py', '--what', 'input', '--config', 'configs/tiny.py', '--batch', '4',
             '--num_images', '12', '--warmup', '1', '--repeats', '2', '--against_workers', '1')
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert (result['what'], result['batch'], result['imgsz'], result['worker_count']) == ('input', 4, 64, 0)
  assert result['repeats'] == 2 and result['batches_per_round'] == 6 and result['hsv_on_device'] is True
  assert result['images_per_s'] == pytest.approx(4 / result['median_s'])
  one = result['by_workers']['1']
  assert result['peer'] == 'data.worker_count=1' and result['peer_median_s'] == one['median_s']
  assert result['ratio'] == pytest.approx(result['median_s'] / one['median_s'])
  assert one['images_per_s'] == pytest.approx(4 / one['median_s'])
  assert one['speedup'] == pytest.approx(result['median_s'] / one['median_s'])
  assert result['min_s'] <= result['median_s'] <= result['max_s']
