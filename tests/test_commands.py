"""The user-facing commands, each run as a user would (a subprocess on a tiny trained run) and checked by
its output: scripts/infer.py, scripts/export.py (then the export loaded in a fresh process),
scripts/prepare_text_embeddings.py and the demo's evaluation-only rerun."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from processes import _env
from test_scripts import REPO, _run


@pytest.fixture(scope='module')
def loaded_grounder(trained_tiny):
  from optisar_jax import evaluation
  return evaluation.load_grounder(trained_tiny[0])


@pytest.mark.slow
def test_infer_prints_the_box_and_draws_it(trained_tiny, loaded_grounder, tmp_path):
  workdir, _ = trained_tiny
  image = np.random.default_rng(3).integers(0, 255, (90, 120, 3), np.uint8)
  Image.fromarray(image).save(tmp_path / 'scene.png')
  out = _run('scripts/infer.py', '--workdir', workdir, '--image', str(tmp_path / 'scene.png'),
             '--query', 'the ship in the upper left', '--query', 'the bridge', '--output', str(tmp_path / 'out.png'))
  assert out.returncode == 0, out.stderr[-2000:]
  answers = [json.loads(line) for line in out.stdout.strip().splitlines()]
  assert [a['query'] for a in answers] == ['the ship in the upper left', 'the bridge']
  # The same answers as the Grounder in this process, in COCO xywh original pixels.
  expected = loaded_grounder.ground(image, ['the ship in the upper left', 'the bridge'])
  for answer, (box, score) in zip(answers, expected):
    assert answer['score'] == pytest.approx(score, rel=1e-5, abs=1e-6)
    if box is None:
      assert answer['bbox'] is None
    else:
      x1, y1, x2, y2 = box
      np.testing.assert_allclose(answer['bbox'], [x1, y1, x2 - x1, y2 - y1], rtol=1e-5, atol=1e-3)
      assert 0 <= x1 <= x2 <= 120 and 0 <= y1 <= y2 <= 90
  picture = Image.open(tmp_path / 'out.png')
  assert picture.width >= 2 * 256            # two tiles side by side, each at least 256 px wide


@pytest.mark.slow
def test_export_command_then_a_fresh_process_reproduces_the_model(trained_tiny, loaded_grounder, tmp_path):
  workdir, config = trained_tiny
  out = _run('scripts/export.py', '--workdir', workdir, '--output', str(tmp_path / 'export'), '--platforms', 'cpu')
  assert out.returncode == 0, out.stderr[-2000:]
  image = np.random.default_rng(4).integers(0, 255, (70, 100, 3), np.uint8)
  np.save(tmp_path / 'image.npy', image)
  code = ('import json, sys, numpy as np\n'
          'from optisar_jax.export import load_export\n'
          f"e = load_export({str(tmp_path / 'export')!r})\n"
          f"answers = e.ground(np.load({str(tmp_path / 'image.npy')!r}), ['the bridge', 'a small boat'])\n"
          "print(json.dumps([[None if b is None else [float(v) for v in b], s] for b, s in answers]))\n"
          "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('optisar_jax.models', 'optisar_jax.train', 'flax')))))\n")
  fresh = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert fresh.returncode == 0, fresh.stderr[-2000:]
  lines = fresh.stdout.strip().splitlines()
  answers, loaded = json.loads(lines[-2]), json.loads(lines[-1])
  assert loaded == []                                  # no model or training code in that process
  expected = loaded_grounder.ground(image, ['the bridge', 'a small boat'])
  for (box, score), (e_box, e_score) in zip(answers, expected):
    assert score == pytest.approx(e_score, rel=1e-5, abs=1e-6)
    assert (box is None) == (e_box is None)
    if box is not None:
      np.testing.assert_allclose(box, e_box, rtol=1e-5, atol=1e-3)   # xyxy, original pixels


@pytest.mark.slow
def test_prepare_text_embeddings_command(synthetic_tfds, tmp_path):
  encoder = os.path.join(REPO, 'tests', 'fixtures', 'text', 'bert')          # a 32-d BERT
  out = _run('scripts/prepare_text_embeddings.py', '--config', 'configs/tiny.py', '--data_dir', synthetic_tfds[1],
             '--output', str(tmp_path / 'emb'), f'--config.text.encoder={encoder}')
  assert out.returncode == 0, out.stderr[-2000:]
  from optisar_jax.data import sources
  from optisar_jax.text.cache import EmbeddingCache
  from optisar_jax.config import load_config
  cache = EmbeddingCache.load(str(tmp_path / 'emb'))
  config = load_config('tiny', [f'data.data_dir={synthetic_tfds[1]}'])
  captions, names = sources.training_captions(sources.open_source(config, 'train', skip_images=True))
  assert cache.dim == 32 and f'wrote {tmp_path / "emb"}: {len(cache)} texts x 32' in out.stdout
  assert all(c in cache for c in captions) and all(n in cache for n in names) and 'background' in cache
  rows = cache.lookup(['background', captions[0]])
  np.testing.assert_allclose(np.linalg.norm(rows, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_demo_rerun_only_evaluates(tmp_path):
  """A finished demo run again: no training step, the same metrics file rewritten with the same numbers."""
  workdir = str(tmp_path / 'demo')
  # The synthetic data of the other tests (40 images, seed 3) on 2 CPU devices, as tests/test_recovery.py
  # trains it: the same train step, which the session's compilation cache then already holds.
  args = ('scripts/demo.py', '--workdir', workdir, '--config', 'configs/tiny.py', '--config.demo.num_images=40',
          '--config.demo.seed=3', '--config.train.num_steps=2', '--config.train.checkpoint_every=2',
          '--config.demo.num_examples_shown=4')

  def run_demo():
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(2), capture_output=True, text=True,
                          timeout=600)

  first = run_demo()
  assert first.returncode == 0, first.stderr[-2000:]
  with open(os.path.join(workdir, 'eval', 'test_metrics.json')) as f:
    metrics = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = f.read()
  second = run_demo()
  assert second.returncode == 0, second.stderr[-2000:]
  assert 'reusing the TFDS dataset' in second.stdout and 'writing' not in second.stdout.split('[demo] reusing')[0]
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert f.read() == logged                        # no step trained, nothing logged
  with open(os.path.join(workdir, 'eval', 'test_metrics.json')) as f:
    assert json.load(f) == metrics
  assert Image.open(os.path.join(workdir, 'eval', 'examples.png')).width > 0


@pytest.mark.slow
def test_evaluate_writes_the_learned_gates(trained_tiny, tmp_path):
  workdir, config = trained_tiny
  out = _run('scripts/evaluate.py', '--workdir', workdir, '--split', 'test', '--output', str(tmp_path / 'm.json'))
  assert out.returncode == 0, out.stderr[-2000:]
  with open(tmp_path / 'gates.json') as f:
    gates = json.load(f)
  from optisar_jax import evaluation
  params, _, _, _ = evaluation.restore_weights(config, workdir)
  assert gates == evaluation.gate_values(params)
  heads = config.model.tgdg.num_heads
  assert len(gates) == 3 and all(len(g['weight_gate']) == len(g['feature_gate']) == heads for g in gates.values())
  # Four steps from the (1, 0) initialisation move the gates a little, and only a little.
  assert all(abs(v - 1.0) < 0.1 for g in gates.values() for v in g['weight_gate'])
  # routing.json / routing.png: PL-MoE's top-1 expert of every patch of up to 32 images per modality
  with open(tmp_path / 'routing.json') as f:
    routed = json.load(f)
  split = evaluation.EvalSplit(config, 'test')
  domains = [e['domain'] for e in split.examples]
  expected = {'optical': min(32, domains.count(0)), 'sar': min(32, domains.count(1))}
  assert routed['images'] == expected and min(expected.values()) > 0
  assert routed['experts'] == config.model.moe.num_experts
  assert list(routed['counts']) == ['detector/layers/8/m/0/moe']
  for block, counts in routed['counts'].items():
    for domain in ('optical', 'sar'):
      assert len(counts[domain]) == routed['experts']
      assert sum(counts[domain]) == expected[domain] * routed['patches_per_image'][block]
  from PIL import Image
  assert Image.open(tmp_path / 'routing.png').size[0] > 300


@pytest.mark.slow
def test_periodic_validation_draws_answers_and_keeps_the_best(synthetic_tfds, tmp_path):
  from conftest import tiny_config
  from optisar_jax import evaluation
  from optisar_jax.train import loop, run_logging
  from optisar_jax import visualize
  workdir = str(tmp_path / 'run')
  config = tiny_config(synthetic_tfds[1], 'train.num_steps=4', 'train.checkpoint_every=4', 'train.eval_every_steps=2',
                       'data.eval_split=test', 'train.val_examples_shown=4')
  loop.train(config, workdir)
  rows = [r for r in run_logging.read_metrics(workdir) if 'val/meanIoU' in r]
  assert [r['step'] for r in rows] == [2, 4]
  for step in (2, 4):
    picture = np.asarray(Image.open(os.path.join(workdir, 'val', f'step_{step}.png')))
    colours = {tuple(p) for p in picture[:visualize.LINE_HEIGHT + 8].reshape(-1, 3)}
    assert visualize.GT_COLOUR in colours and visualize.PRED_COLOUR in colours      # the legend
    assert picture.shape[1] == 4 * (192 + 4) + 4                                    # 4 tiles of 192 px
  best = max(rows, key=lambda r: (r['val/meanIoU'], -r['step']))
  _, _, step, _ = evaluation.restore_weights(config, workdir, best=True)
  assert step == best['step']
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints_best'))) == [str(best['step'])]
