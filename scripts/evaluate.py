"""Scores grounding predictions: Pr@0.5..0.9, meanIoU, cumIoU for all / optical / SAR queries.

Usage:
  python scripts/evaluate.py --predictions P.json --annotations test.json [--output metrics.json]

Prints a metrics table; with --output also writes the metrics JSON (interfaces.md section 5), atomically.
Errors end with one line on stderr: exit code 2 for bad arguments, 1 for bad or missing files.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from optisar_jax import metrics as metrics_lib  # noqa: E402
from optisar_jax import predictions as predictions_lib  # noqa: E402


class _OneLineParser(argparse.ArgumentParser):
  """argparse that reports a usage error as a single line."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def build_parser() -> argparse.ArgumentParser:
  parser = _OneLineParser(prog='evaluate.py', description=__doc__.split('\n\n')[0],
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--predictions', help='predictions file to score (JSON list, interfaces.md section 6)')
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
    predictions_lib.write_json_atomic(output, metrics)
    print(f'wrote {output}')
  return metrics


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.predictions is None:
    parser.error('--predictions P --annotations A.json is required')
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
