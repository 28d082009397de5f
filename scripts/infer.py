"""Grounds one or more queries on one image with a trained workdir.

  python scripts/infer.py --workdir W --image IMG --query "the ship in the upper left" [--output out.png]

Prints one JSON line per query: {"bbox": [x, y, w, h], "score": s} in original-image pixels ("bbox" is
null when no anchor scores above eval.conf_threshold). Several --query flags run the backbone once.
With --output, draws the boxes and queries into a PNG.
"""

import argparse
import json

from optisar_jax import cli


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='training workdir (checkpoints, text/, config.json)')
  parser.add_argument('--image', required=True, help='image file (JPEG, PNG, TIFF, single-band SAR, ...)')
  parser.add_argument('--query', action='append', required=True, help='referring expression (repeatable)')
  parser.add_argument('--output', help='PNG to draw the boxes and queries into')
  parser.add_argument('--no_ema', action='store_true', help='use the raw, not EMA, weights')
  args = parser.parse_args()
  from optisar_jax import inference
  answers = inference.ground_image_file(args.workdir, args.image, args.query, use_ema=not args.no_ema,
                                        output_png=args.output)
  for answer in answers:
    print(json.dumps(answer))
  return 0


if __name__ == '__main__':
  cli.run(main)
