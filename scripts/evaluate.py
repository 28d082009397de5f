"""Scores grounding predictions: Pr@0.5..0.9, meanIoU, cumIoU for all / optical / SAR queries.

Usage:
  python scripts/evaluate.py --workdir W [--split test] [--output F] [--predictions_out P]
  python scripts/evaluate.py --predictions P.json --annotations test.json [--output metrics.json]

The first form scores the newest checkpoint of a training workdir (EMA weights unless --no_ema) on a
split of its TFDS dataset; --output defaults to W/eval/<split>_metrics.json.

Prints a metrics table; with --output also writes the metrics JSON (docs/interfaces.md section 5), atomically.
Errors end with one line on stderr: exit code 2 for bad arguments, 1 for bad or missing files.
"""

from __future__ import annotations

import argparse
import sys

from optisar_jax import metrics as metrics_lib
from optisar_jax import predictions as predictions_lib
from optisar_jax.runtime import paths


class _OneLineParser(argparse.ArgumentParser):
  """argparse that reports a usage error as a single line."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def build_parser() -> argparse.ArgumentParser:
  parser = _OneLineParser(prog='evaluate.py', description=__doc__.split('\n\n')[0],
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', help='training workdir whose checkpoint to evaluate')
  parser.add_argument('--split', default=None, help='split to evaluate (default: the config\'s eval.split)')
  parser.add_argument('--predictions_out', help='with --workdir: also write the predictions file here')
  parser.add_argument('--no_ema', action='store_true', help='with --workdir: evaluate the raw, not EMA, weights')
  parser.add_argument('--best', action='store_true', help='with --workdir: the best (val meanIoU) checkpoint')
  parser.add_argument('--data_dir', help='with --workdir: TFDS data dir (default: the one used in training)')
  parser.add_argument('--coordinator_address', default=None, help='multi-host: HOST:PORT of process 0')
  parser.add_argument('--num_processes', type=int, default=None, help='multi-host: number of processes')
  parser.add_argument('--process_id', type=int, default=None, help='multi-host: index of this process')
  parser.add_argument('--predictions', help='predictions file to score (JSON list, docs/interfaces.md section 6)')
  parser.add_argument('--annotations', help='COCO-style annotations JSON (with --predictions)')
  parser.add_argument('--output', help='where to write the metrics JSON')
  parser.add_argument('--per_category', action='store_true', help='also print one table row per category')
  return parser


def evaluate_predictions_file(predictions_path: str, annotations_path: str, output: str | None = None,
                              *, per_category: bool = False) -> dict:
  """The `--predictions` mode: score the file, print the table, write `output` if given; returns the metrics."""
  metrics = predictions_lib.score_predictions(predictions_path, annotations_path)
  print(metrics_lib.format_metrics_table(metrics, per_category=per_category))
  if output:
    paths.write_json_atomic(output, metrics, allow_nan=False)
    print(f'wrote {output}')
  return metrics


def evaluate_workdir(workdir: str, *, split: str | None = None, output: str | None = None,
                     predictions_out: str | None = None, use_ema: bool = True, best: bool = False,
                     data_dir: str | None = None, per_category: bool = False) -> dict:
  """The `--workdir` mode: ground every query of the split, print the table, write the JSON files."""
  from optisar_jax import evaluation
  overrides = [f'data.data_dir={data_dir}'] if data_dir else []
  grounder = evaluation.load_grounder(workdir, use_ema=use_ema, best=best, overrides=overrides)
  split = split or grounder.config.eval.split
  data = evaluation.EvalSplit(grounder.config, split)
  metrics, results, _ = evaluation.evaluate_split(grounder, grounder.config, data)
  import jax
  if jax.process_count() > 1:
    print(f'process {jax.process_index()}: decoded {grounder.decoded_images} image slots '
          f'({len(results)} queries in the split)', flush=True)
  output = output or str(paths.path(workdir) / 'eval' / f'{split}_metrics.json')
  evaluation.write_outputs(metrics, results, output=output, predictions_out=predictions_out)
  per_domain = int(grounder.config.eval.get('routing_images', 32))
  if per_domain > 0:                      # PL-MoE routing per modality: routing.png and routing.json
    from optisar_jax import routing
    routing.write_routing(grounder, data, paths.path(output).parent, per_domain=per_domain)
  if jax.process_index() == 0:
    # every process holds the same metrics and gates; process 0 reports and writes
    paths.write_json_atomic(paths.path(output).parent / 'gates.json', evaluation.gate_values(grounder.params))
    print(metrics_lib.format_metrics_table(metrics, per_category=per_category))
    print(f'wrote {output}' + (f' and {predictions_out}' if predictions_out else ''))
  return metrics


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.workdir is not None:
    if args.predictions or args.annotations:
      parser.error('--workdir cannot be combined with --predictions/--annotations')
    from optisar_jax import cli
    from optisar_jax.runtime import distributed
    cli.prepare_runtime()
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    try:
      evaluate_workdir(args.workdir, split=args.split, output=args.output, predictions_out=args.predictions_out,
                       use_ema=not args.no_ema, best=args.best, data_dir=args.data_dir,
                       per_category=args.per_category)
    except (predictions_lib.DataError, OSError, KeyError, ValueError) as e:
      message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
      print(f'evaluate.py: error: {str(message).splitlines()[0]}', file=sys.stderr)
      return 1
    distributed.shutdown()
    return 0
  if args.predictions is None:
    parser.error('give --workdir W, or --predictions P --annotations A.json')
  if args.annotations is None:
    parser.error('--predictions needs --annotations A.json')
  try:
    evaluate_predictions_file(args.predictions, args.annotations, args.output, per_category=args.per_category)
  except (predictions_lib.DataError, OSError) as e:
    print(f'evaluate.py: error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
