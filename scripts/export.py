"""Exports a trained workdir for serving: Orbax inference state + serialized jax.export functions.

  python scripts/export.py --workdir W --output DIR [--no_ema] [--platforms cpu,cuda,tpu]

Load it with `optisar_jax.export.load_export(DIR)` (no training code needed).
"""

import argparse

from optisar_jax import cli


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='training workdir')
  parser.add_argument('--output', required=True, help='export directory to create')
  parser.add_argument('--no_ema', action='store_true', help='export the raw, not EMA, weights')
  parser.add_argument('--platforms', default='cpu,cuda,tpu',
                      help='comma-separated platforms to lower for (the export serves on any of them)')
  args = parser.parse_args()
  from optisar_jax import export
  platforms = [p.strip() for p in args.platforms.split(',') if p.strip()]
  path = export.write_export(args.workdir, args.output, use_ema=not args.no_ema, platforms=platforms)
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  cli.run(main)
