"""Times one thing after warm-up; prints one JSON line per measurement.

  python scripts/benchmark.py --what forward --config configs/optsar_rsvg.py [--batch 1] [--imgsz 640]
  python scripts/benchmark.py --what forward --config configs/optsar_rsvg.py --against ultralytics
  python scripts/benchmark.py --what forward --config configs/optsar_rsvg.py --against_cpu_ynnpack all
  python scripts/benchmark.py --what {train_step,evaluate,input} --config configs/demo.py

Keys: what, config, batch, imgsz, median_s (and min/max/stdev), gflops (per call, XLA cost analysis, when
known), gflops_per_s, device, peak_memory_bytes; with --against ultralytics also peer, peer_median_s and
ratio = ours / peer (same process, alternating runs). --against needs `pip install -e '.[bench]'`.
--against_cpu_ynnpack C compares with the same program compiled with the config's xla.cpu_ynnpack_* = C.
--what input --against_workers 1,2 times input rounds with 1 and 2 grain workers against the config's
data.worker_count (by_workers: images/s, images/s per core, speedup).
--what loop runs the training loop (input workers, device prefetch, step, logging) on synthetic data,
alternating log intervals with the input and with the bare step in one run: images_per_s,
step_images_per_s, loop_vs_step, paired_ratios.
"""

import argparse
import json
import os

from optisar_jax import cli


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--what', required=True, choices=['forward', 'train_step', 'evaluate', 'input', 'loop'])
  parser.add_argument('--config', required=True, help='config file')
  parser.add_argument('--batch', type=int, default=None, help='batch (default: 1 for forward, else the config)')
  parser.add_argument('--imgsz', type=int, default=None, help='input size (default: the config data.imgsz)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--against', choices=['ultralytics'], default=None, help='time the PyTorch peer too')
  parser.add_argument('--num_images', type=int, default=None,
                      help='evaluate/input: images of the synthetic dataset generated for the measurement')
  parser.add_argument('--threads', type=int, default=None, help='peer torch threads (default: all cores)')
  parser.add_argument('--against_cpu_ynnpack', choices=['all', 'reduce', 'none'], default=None,
                      help="forward/train_step: time the same program compiled with xla.cpu_ynnpack_{eval,train} "
                           "= this choice, alternating (XLA:CPU's kernel libraries, compile_options.py)")
  parser.add_argument('--split', default=None, help="evaluate: the synthetic dataset's split to evaluate "
                      "(default test; train holds 80 %% of --num_images)")
  parser.add_argument('--against_workers', default=None,
                      help="input: also time these grain worker counts (e.g. 0,1,2), alternating rounds with "
                           "the config's data.worker_count")
  args, config = cli.parse_with_config(parser)
  from optisar_jax import benchmark
  batch = args.batch or (1 if args.what == 'forward' else
                         int(config.eval.batch_size) if args.what == 'evaluate' else int(config.train.batch_size))
  imgsz = args.imgsz or int(config.data.imgsz)
  kwargs = {'warmup': args.warmup, 'repeats': args.repeats}
  if args.against and args.against_cpu_ynnpack:
    raise ValueError('--against and --against_cpu_ynnpack: give one of them')
  if args.what in ('forward', 'train_step'):
    kwargs.update(against=args.against, threads=args.threads, against_cpu_ynnpack=args.against_cpu_ynnpack)
  elif args.against or args.against_cpu_ynnpack:
    raise ValueError(f'--against/--against_cpu_ynnpack: not available for --what {args.what}')
  if args.against_workers is not None:
    if args.what != 'input':
      raise ValueError(f'--against_workers: not available for --what {args.what}')
    kwargs['against_workers'] = args.against_workers
  if args.split is not None:
    if args.what != 'evaluate':
      raise ValueError(f'--split: not available for --what {args.what}')
    kwargs['split'] = args.split
  if args.num_images is not None:
    if args.what not in ('evaluate', 'input', 'loop'):
      raise ValueError(f'--num_images: not available for --what {args.what}')
    kwargs['num_images'] = args.num_images
  result = benchmark.BENCHMARKS[args.what](config, os.path.basename(args.config), batch, imgsz, **kwargs)
  print(json.dumps(result), flush=True)
  return 0


if __name__ == '__main__':
  cli.run(main)
