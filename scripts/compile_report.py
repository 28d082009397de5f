"""Compiles the train step and the evaluation predict ahead of time for an accelerator topology, with no
accelerator present, and reports per-chip memory, the XLA cost model's FLOPs and bytes, collectives and the
largest fusions (optisar_jax/compile_report.py).

  python scripts/compile_report.py --config configs/optsar_rsvg.py --topology v5e:4x4 --per_chip_batch 8 \
      [--mesh '(-1, 1)'] [--what train_step,predict] [--num_slices 1] [--json report.json] [--hlo_out DIR]

TPU topologies (libtpu names such as v4:2x2x2, v5e:4x4, v5p:4x4x4, v6e:2x4) need the `tpu` extra
(`pip install -e '.[tpu]'`); GPU targets h100:N / h200:N need the `cuda12` extra. FLOPs and bytes are the
compiler's static estimates, not measurements.
"""

import argparse
import ast
import os
import sys

os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')          # no metadata server is asked about the host
os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')  # deviceless GPU compiles: no driver to check
if '--xla_gpu_enable_triton_gemm' not in os.environ.get('XLA_FLAGS', ''):
  # Without a device XLA:GPU cannot autotune Triton GEMM tilings (the compile fails); use cuBLAS.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_gpu_enable_triton_gemm=false').strip()
os.environ.setdefault('OPTISAR_JAX_CACHE_DIR', '')         # compile times are part of the report

from optisar_jax import cli


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='config file')
  parser.add_argument('--topology', required=True, help="e.g. v5e:4x4, v5p:4x4x4, v4:2x2x2, h100:8")
  parser.add_argument('--per_chip_batch', type=int, default=8, help='images per chip (global batch = this x chips)')
  parser.add_argument('--mesh', default=None, help="mesh shape over the config's mesh.axes, e.g. '(-1, 1)' or "
                                                   "'(4, 4)' (default: the config's mesh.shape)")
  parser.add_argument('--what', default='train_step,predict', help='comma-separated: train_step, predict')
  parser.add_argument('--num_slices', type=int, default=1, help='TPU slices (multi-slice pod over DCN)')
  parser.add_argument('--vocab_size', type=int, default=100_000,
                      help='rows of the replicated text table (captions + adversarial variants + pool)')
  parser.add_argument('--json', default=None, help='write the report here')
  parser.add_argument('--hlo_out', default=None, help='write each compiled program as HLO text into this folder')
  args, config = cli.parse_with_config(parser)
  from optisar_jax import compile_report
  mesh = None
  if args.mesh is not None:
    try:
      mesh = tuple(int(x) for x in ast.literal_eval(args.mesh))
    except (ValueError, SyntaxError, TypeError):
      raise ValueError(f'--mesh {args.mesh!r}: expected a tuple of integers such as (-1, 1)') from None
  if args.per_chip_batch < 1:
    raise ValueError(f'--per_chip_batch {args.per_chip_batch}: must be >= 1')
  what = tuple(w.strip() for w in args.what.split(',') if w.strip())
  reports = compile_report.compile_programs(
      config, topology=args.topology, per_chip_batch=args.per_chip_batch, what=what, mesh_shape=mesh,
      num_slices=args.num_slices, vocab_size=args.vocab_size, hlo_out=args.hlo_out,
      progress=lambda message: print(message, file=sys.stderr, flush=True))
  print(compile_report.format_report(reports), flush=True)
  if args.json:
    from optisar_jax.runtime import paths
    paths.write_json_atomic(args.json, reports, sort_keys=True)
  return 0


if __name__ == '__main__':
  cli.run(main)
