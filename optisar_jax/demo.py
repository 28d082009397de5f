"""The README demo: synthetic OptSAR-RSVG-format data -> TFDS -> training -> test metrics and pictures.

    run_demo(config, workdir)

WORKDIR/data/raw      the synthetic release (scripts/make_synthetic_dataset.py layout), made if absent
WORKDIR/data/tfds     its TFDS build (ArrayRecord)
WORKDIR/...           the training run (checkpoints, metrics.jsonl, text/); a second call resumes it
WORKDIR/eval/         test_metrics.json, test_predictions.json, examples.png
"""

from __future__ import annotations

import io
import os
import time

import ml_collections

from optisar_jax import evaluation
from optisar_jax import metrics as metrics_lib
from optisar_jax import visualize
from optisar_jax.runtime import paths


def run_demo(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the whole demo; returns the test metrics."""
  from optisar_jax.data import build_tfds, make_synthetic_dataset
  from optisar_jax.train import loop

  start = time.perf_counter()
  raw_dir = os.path.join(workdir, 'data', 'raw')
  tfds_dir = os.path.join(workdir, 'data', 'tfds')
  if not os.path.isfile(os.path.join(raw_dir, 'test.json')):
    print(f'[demo] writing {config.demo.num_images} synthetic images to {raw_dir}', flush=True)
    make_synthetic_dataset(raw_dir, format='optsar', num_images=int(config.demo.num_images),
                           seed=int(config.demo.seed), overwrite=True)
  built = os.path.isfile(os.path.join(tfds_dir, 'optsar_rsvg', '1.0.0', 'dataset_info.json'))
  print(f'[demo] {"reusing" if built else "building"} the TFDS dataset in {tfds_dir}', flush=True)
  build_tfds('optsar_rsvg', raw_dir, tfds_dir)
  config.data.data_dir = tfds_dir
  print(f'[demo] training {config.model.scale!r} at {config.data.imgsz} px in {workdir}', flush=True)
  loop.train(config, workdir)
  print('[demo] evaluating the test split', flush=True)
  grounder = evaluation.load_grounder(workdir, overrides=[f'data.data_dir={tfds_dir}'])
  test_split = evaluation.EvalSplit(grounder.config, 'test')
  metrics, results, examples = evaluation.evaluate_split(grounder, grounder.config, test_split)
  eval_dir = os.path.join(workdir, 'eval')
  evaluation.write_outputs(metrics, results, output=os.path.join(eval_dir, 'test_metrics.json'),
                           predictions_out=os.path.join(eval_dir, 'test_predictions.json'))
  write_examples(os.path.join(eval_dir, 'examples.png'), results, examples,
                 int(config.demo.num_examples_shown), canvas_of=test_split.canvas)
  print(metrics_lib.format_metrics_table(metrics))
  print(f'[demo] done in {(time.perf_counter() - start) / 60:.1f} min; wrote {eval_dir}/test_metrics.json '
        'and examples.png', flush=True)
  return metrics


def write_examples(path: str, results, examples, count: int, canvas_of=None) -> None:
  """The demo's examples.png: `visualize.examples_grid`, written atomically (local or gs:// path)."""
  buffer = io.BytesIO()
  visualize.examples_grid(results, examples, count, canvas_of=canvas_of).save(buffer, format='PNG')
  paths.write_bytes_atomic(path, buffer.getvalue())
