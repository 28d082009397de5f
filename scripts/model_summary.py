"""Prints the per-module parameter table of a config's detector; the last line is `total_params N`.

Usage:
  python scripts/model_summary.py --config configs/optsar_rsvg.py [--depth 1] [--config.model.scale=l]
  python scripts/model_summary.py --config configs/optsar_rsvg.py --scales n,s,m,l,x   # markdown, per layer
"""

import argparse
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='config file or bare name under configs/')
  parser.add_argument('--depth', type=int, default=1, help='levels of sub-modules listed under each layer')
  parser.add_argument('--scales', default='', help='comma-separated scales: print one markdown table of the '
                      'per-layer counts of each instead (docs/architecture.md section 3)')
  args, overrides = parser.parse_known_args(argv)
  from optisar_jax.config import load_config
  from optisar_jax.models.summary import format_summary, scales_table_markdown
  try:
    config = load_config(args.config, overrides)
    if args.scales:
      print(scales_table_markdown(config, [s for s in args.scales.split(',') if s]))
      return
  except (FileNotFoundError, KeyError, ValueError) as err:
    sys.exit(f'model_summary: {err.args[0] if isinstance(err, KeyError) else err}')
  print(format_summary(config, args.depth))


if __name__ == '__main__':
  main()
