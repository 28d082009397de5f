"""The demo: trains OptiSAR-Net++ on a synthetic OptSAR-RSVG-format dataset and evaluates it, on a CPU.

  python scripts/demo.py --workdir runs/demo [--config configs/demo.py] [--config.a.b=v ...]

Writes WORKDIR/eval/test_metrics.json and WORKDIR/eval/examples.png and prints the metrics table.
Running it again resumes (or, when training has finished, only re-evaluates).
"""

import argparse
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from optisar_jax import cli


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', default='runs/demo', help='where data, checkpoints and results go')
  parser.add_argument('--config', default=os.path.join(REPO, 'configs', 'demo.py'), help='config file')
  args, config = cli.parse_with_config(parser)
  from optisar_jax import demo
  demo.run_demo(config, args.workdir)
  return 0


if __name__ == '__main__':
  cli.run(main)
