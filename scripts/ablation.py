"""Ablation of the deliberate deviations on the synthetic demo data: our default, the reference preset, and
each deviation switched back to the reference one at a time, over several seeds; writes a markdown table.

  python scripts/ablation.py --workdir runs/ablation [--config configs/demo.py] [--seeds 0,1] [--config.a.b=v]

The deviations are the keys in which configs/optsar_rsvg_reference.py differs from configs/optsar_rsvg.py
(the table of docs/architecture.md section 10); each variant applies the preset's values of its keys on
top of --config. One synthetic dataset (WORKDIR/data) serves every run; run i trains in
WORKDIR/runs/<variant>/seed<k> (resumed or only re-evaluated when run again) and is evaluated on the test
split. WORKDIR/ablation.md gets the table after every run (unfinished variants say 'pending'): per
variant, the mean and the range over seeds of Pr@0.5, meanIoU and cumIoU (all queries). With the demo
config at half its training (--config.train.epochs=13) a run takes about 4-5 minutes on a 2-core CPU, so
the 16 runs take over an hour; docs/architecture.md section 11 has the table. `--config configs/tiny.py
--config.train.num_steps=2` checks the plumbing in a few minutes.
"""

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from optisar_jax import cli
from optisar_jax.runtime import paths

METRICS = ('Pr@0.5', 'meanIoU', 'cumIoU')


def _flat(config, prefix=''):
  out = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = tuple(value) if isinstance(value, list) else value
  return out


def deviations() -> dict:
  """{key: the reference's value} for every key the reference preset changes."""
  from optisar_jax.config import load_config
  default = _flat(load_config(os.path.join(REPO, 'configs', 'optsar_rsvg.py')))
  preset = _flat(load_config(os.path.join(REPO, 'configs', 'optsar_rsvg_reference.py')))
  return {key: preset[key] for key in sorted(default) if default[key] != preset[key]}


def variants(reference: dict) -> list[tuple[str, dict]]:
  """(name, {key: value}) of every run: default, reference, and one deviation reverted at a time."""
  out = [('default', {}), ('reference', dict(reference))]
  out += [(f'{key}={value!r}', {key: value}) for key, value in reference.items()]
  return out


def _set(config, key: str, value) -> None:
  *parents, leaf = key.split('.')
  node = config
  for name in parents:
    node = node[name]
  node[leaf] = value


def run_one(base_config, changes: dict, seed: int, workdir: str, tfds_dir: str) -> dict:
  """Trains (or resumes) one variant and returns its test metrics (all queries)."""
  from optisar_jax import evaluation
  from optisar_jax.train import loop
  metrics_path = os.path.join(workdir, 'test_metrics.json')
  if os.path.isfile(metrics_path):
    with open(metrics_path) as f:
      return json.load(f)
  config = base_config.copy_and_resolve_references()
  for key, value in changes.items():
    _set(config, key, value)
  config.seed = seed
  config.data.data_dir = tfds_dir
  loop.train(config, workdir)
  grounder = evaluation.load_grounder(workdir, overrides=[f'data.data_dir={tfds_dir}'])
  metrics, _, _ = evaluation.evaluate_split(grounder, grounder.config, 'test', progress=False)
  result = {name: metrics['all'][name] for name in METRICS}
  paths.write_json_atomic(metrics_path, result)
  return result


def table(rows: list[tuple[str, list[dict]]], seeds: list[int]) -> str:
  """Markdown: variant, then per metric 'mean (min-max)' over the seeds."""
  lines = [f'| variant (seeds {",".join(map(str, seeds))}) | ' + ' | '.join(METRICS) + ' |',
           '|---|' + '---:|' * len(METRICS)]
  for name, results in rows:
    cells = []
    if not results:
      lines.append(f'| `{name}` | ' + ' | '.join(['pending'] * len(METRICS)) + ' |')
      continue
    for metric in METRICS:
      values = [r[metric] for r in results if r[metric] is not None]
      cells.append(f'{sum(values) / len(values):.2f} ({min(values):.2f}-{max(values):.2f})' if values else 'n/a')
    if len(results) < len(seeds):
      cells[-1] += f' [{len(results)} of {len(seeds)} seeds]'

    lines.append(f'| `{name}` | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/ablation', help='data, runs and ablation.md go here')
  parser.add_argument('--config', default=os.path.join(REPO, 'configs', 'demo.py'), help='base config file')
  parser.add_argument('--seeds', default='0,1', help='comma-separated training seeds (config key seed)')
  args, config = cli.parse_with_config(parser)
  seeds = [int(s) for s in args.seeds.split(',') if s]
  if len(seeds) < 1:
    sys.exit('ablation: --seeds needs at least one seed')
  from optisar_jax.data import build_tfds, make_synthetic_dataset
  raw_dir = os.path.join(args.workdir, 'data', 'raw')
  tfds_dir = os.path.join(args.workdir, 'data', 'tfds')
  if not os.path.isfile(os.path.join(raw_dir, 'test.json')):
    make_synthetic_dataset(raw_dir, format='optsar', num_images=int(config.demo.num_images),
                           seed=int(config.demo.seed), overwrite=True)
  build_tfds('optsar_rsvg', raw_dir, tfds_dir)
  grid = variants(deviations())
  done: dict[str, list[dict]] = {name: [] for name, _ in grid}
  markdown = ''
  for name, changes in grid:
    for seed in seeds:
      run_dir = os.path.join(args.workdir, 'runs', name.replace('/', '_').replace("'", ''), f'seed{seed}')
      print(f'[ablation] {name} seed {seed}: {run_dir}', flush=True)
      done[name].append(run_one(config, changes, seed, run_dir, tfds_dir))
      # The table so far after every run: an interrupted grid still leaves its finished rows.
      markdown = table([(n, done[n]) for n, _ in grid], seeds)
      paths.write_text_atomic(os.path.join(args.workdir, 'ablation.md'), markdown + '\n')
  print(markdown)
  return 0


if __name__ == '__main__':
  cli.run(main)
