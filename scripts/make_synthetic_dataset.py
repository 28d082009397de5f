"""Writes a synthetic dataset in the OptSAR-RSVG release layout or the DIOR-RSVG layout.

  python scripts/make_synthetic_dataset.py --out data/synthetic_optsar --format optsar --num_images 400 --seed 0

The same seed gives byte-identical files. See optisar_jax/data/synthetic.py for what the scenes contain.
"""

import argparse
import sys

from optisar_jax.data import release, synthetic


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='dataset folder to create')
  parser.add_argument('--format', choices=synthetic.FORMATS, default='optsar')
  parser.add_argument('--num_images', type=int, default=200)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--overwrite', action='store_true', help='replace an existing non-empty --out')
  args = parser.parse_args(argv)
  try:
    out = synthetic.make_synthetic_dataset(args.out, args.format, args.num_images, args.seed,
                                           overwrite=args.overwrite)
  except (release.DatasetError, ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'wrote {args.format} dataset ({args.num_images} images, seed {args.seed}) to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
