"""Exports a trained workdir for serving: Orbax inference state + serialized jax.export functions.

  python scripts/export.py --workdir W --output DIR [--no_ema]

Load it with `optisar_jax.export.load_export(DIR)` (no training code needed).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from optisar_jax import cli  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='training workdir')
  parser.add_argument('--output', required=True, help='export directory to create')
  parser.add_argument('--no_ema', action='store_true', help='export the raw, not EMA, weights')
  args = parser.parse_args()
  from optisar_jax import export
  path = export.write_export(args.workdir, args.output, use_ema=not args.no_ema)
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  cli.run(main)
