"""Trains OptiSAR-Net++; resumes by itself from the newest checkpoint in --workdir.

  python scripts/train.py --config configs/tiny.py --workdir runs/tiny [--config.train.num_steps=20]
  # several hosts: add --coordinator_address HOST:PORT --num_processes N --process_id I on each
"""

import argparse

from optisar_jax import cli


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='config file, e.g. configs/optsar_rsvg.py')
  parser.add_argument('--workdir', required=True, help='run directory (checkpoints, metrics.jsonl, ...)')
  parser.add_argument('--coordinator_address', default=None, help='multi-host: HOST:PORT of process 0')
  parser.add_argument('--num_processes', type=int, default=None, help='multi-host: number of processes')
  parser.add_argument('--process_id', type=int, default=None, help='multi-host: index of this process')
  args, config = cli.parse_with_config(parser)
  from optisar_jax.runtime import distributed
  from optisar_jax.train import loop
  import time
  import jax
  start = time.perf_counter()
  last = loop.train(config, args.workdir, coordinator_address=args.coordinator_address,
                    num_processes=args.num_processes, process_id=args.process_id)
  if jax.process_index() == 0 and 'step' not in last:
    print(f'train.py: {args.workdir} had already finished training; nothing to do', flush=True)
  elif jax.process_index() == 0 and not last['finished']:
    print(f"train.py: stopped at step {last['step']}; rerun the same command to continue", flush=True)
  elif jax.process_index() == 0:
    value = last.get('loss')                # None when the last logged loss was not finite (JSON has no NaN)
    loss = '' if 'loss' not in last else f"loss {float('nan') if value is None else value:.4f}, "
    print(f"train.py: done at step {last.get('step', '?')} ({loss}{(time.perf_counter() - start) / 60:.1f} min); "
          f'checkpoints in {args.workdir}/checkpoints, metrics in {args.workdir}/metrics.jsonl', flush=True)
  distributed.shutdown()   # all processes together (see optisar_jax/runtime/distributed.py)
  return 0


if __name__ == '__main__':
  cli.run(main)
