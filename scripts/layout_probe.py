"""The TPU cost model's bytes for single ops by channel width: why narrow, high-resolution stages cost more
traffic than their tensors' sizes on TPU (docs/scaling.md, "Where the bytes go").

  python scripts/layout_probe.py [--topology v5e:2x2]

Each line compiles one small program for one abstract chip (no TPU needed; libtpu from the tpu or test
extra) and prints XLA's cost-model bytes accessed (an ESTIMATE) beside the bytes of its inputs and
outputs. A TPU vector register holds 128 lanes of the minor (channel) dimension, so a tensor with fewer
channels is padded, and relayouts at program boundaries add copies.
"""

import argparse
import sys

from optisar_jax import compile_report  # sets the libtpu environment first


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--topology', default='v5e:2x2')
  args = parser.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np
  device = compile_report.topology_devices(args.topology)[0]
  mesh = jax.sharding.Mesh(np.array([device]), ('d',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  bf16 = jnp.bfloat16

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def measure(name, fn, *shapes):
    args_ = [jax.ShapeDtypeStruct(s, bf16, sharding=replicated) for s in shapes]
    cost = jax.jit(fn).lower(*args_).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    io = sum(np.prod(s) * 2 for s in shapes) + sum(
        np.prod(o.shape) * o.dtype.itemsize for o in jax.tree.leaves(jax.eval_shape(fn, *args_)))
    print(f'{name:<40} cost model {cost["bytes accessed"] / 1e6:8.1f} MB   inputs+outputs {io / 1e6:7.1f} MB'
          f'   ratio {cost["bytes accessed"] / io:4.2f}', flush=True)

  for c in (32, 48, 64, 96, 128, 256):
    hw = int(round(160 * (128 / c) ** 0.5 / 8) * 8)       # about the same tensor bytes at every width
    measure(f'x + 1, 8x{hw}x{hw}x{c}', lambda x: x + 1, (8, hw, hw, c))
    measure(f'two chained 1x1 convs, 8x{hw}x{hw}x{c}', lambda x, w: conv(conv(x, w), w), (8, hw, hw, c), (1, 1, c, c))
  return 0


if __name__ == '__main__':
  sys.exit(main())
