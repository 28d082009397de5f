"""The Ultralytics peer: importable without torch, a clear ImportError naming the `bench` extra without it.

The smoke tests at the end run only where torch and ultralytics are installed (`pip install -e '.[bench]'`).
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from optisar_jax import peers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_BENCH = all(importlib.util.find_spec(m) is not None for m in ('torch', 'ultralytics'))


def test_import_pulls_in_neither_torch_nor_ultralytics():
  code = ('import sys; import optisar_jax.peers; '
          'print(sorted(m for m in ("torch", "ultralytics") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


@pytest.mark.parametrize('missing', ['torch', 'ultralytics'])
def test_builders_raise_one_line_import_error_naming_the_extra(monkeypatch, missing):
  monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` fail, installed or not
  for call in (lambda: peers.build_ultralytics_peer('m', 640, 1, 2, 'forward'),
               lambda: peers.peer_parameter_count('m')):
    with pytest.raises(ImportError) as info:
      call()
    message = str(info.value)
    assert "pip install -e '.[bench]'" in message
    assert missing in message
    assert '\n' not in message


def test_peer_yaml_names_and_validation():
  assert peers.peer_yaml('m') == 'yoloe-11m.yaml'
  assert peers.peer_yaml('x', family='yolo') == 'yolo11x.yaml'
  with pytest.raises(ValueError, match='scale'):
    peers.peer_yaml('q')
  with pytest.raises(ValueError, match='family'):
    peers.peer_yaml('m', family='rtdetr')


def test_bad_arguments_fail_before_any_import(monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ValueError, match='mode'):
    peers.build_ultralytics_peer('m', 640, 1, 2, 'evaluate')
  with pytest.raises(ValueError, match='imgsz'):
    peers.build_ultralytics_peer('m', 100, 1, 2, 'forward')


@pytest.mark.skipif(not HAVE_BENCH, reason="needs the bench extra (pip install -e '.[bench]')")
def test_peer_forward_scores_every_anchor_against_every_prompt():
  run = peers.build_ultralytics_peer('n', 64, 2, 1, 'forward', num_prompts=3)
  # 64 px at strides 8, 16, 32: 8*8 + 4*4 + 2*2 = 84 anchors; 4 box numbers + 3 prompt scores each
  assert run() == (2, 4 + 3, 84)
  assert run() == (2, 7, 84)


@pytest.mark.skipif(not HAVE_BENCH, reason="needs the bench extra (pip install -e '.[bench]')")
def test_peer_train_step_returns_its_loss_and_updates_the_weights():
  run = peers.build_ultralytics_peer('n', 64, 2, 1, 'train_step', num_prompts=3)
  losses = [run() for _ in range(4)]
  # Measured with ultralytics 8.4.190: 0.014, 0.015, 0.036, 4.6 (the assigner finds more positives as the
  # random head moves, so the loss of random targets rises at first).
  assert all(np.isfinite(losses)) and all(loss > 0 for loss in losses)
  assert len(set(losses)) == 4                         # every step changed the weights the next one sees


@pytest.mark.skipif(not HAVE_BENCH, reason="needs the bench extra (pip install -e '.[bench]')")
def test_peer_parameter_count_yoloe_11n():
  assert 4_000_000 < peers.peer_parameter_count('n') < 6_000_000  # 5,005,286 with ultralytics 8.4.190
