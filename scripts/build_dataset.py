"""Builds the TFDS dataset (ArrayRecord) from a downloaded or generated release.

  python scripts/build_dataset.py --dataset optsar_rsvg --manual_dir data/OptSAR-RSVG --data_dir data/tfds

The release is validated first; any problem ends with a one-line message naming the file and what is
wrong, and a non-zero exit. The build happens in a temporary folder inside --data_dir and becomes
--data_dir/<dataset>/1.0.0 only when complete. Read it with
tfds.data_source('<dataset>', split=..., data_dir=...).
"""

import argparse
import sys

from optisar_jax.data import release, sources


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dataset', required=True, choices=release.DATASETS)
  parser.add_argument('--manual_dir', required=True, help='the extracted release (or synthetic copy)')
  parser.add_argument('--data_dir', required=True, help='TFDS data dir to build into')
  parser.add_argument('--overwrite', action='store_true', help='rebuild even if a complete build exists')
  args = parser.parse_args(argv)
  try:
    path = sources.build_tfds(args.dataset, args.manual_dir, args.data_dir, overwrite=args.overwrite)
  except (release.DatasetError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'built {args.dataset} in {path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
