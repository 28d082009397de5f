"""The TPU cost model's bytes for small programs by channel width: why narrow, high-resolution stages cost
more traffic than their tensors' sizes on TPU (docs/scaling.md, "Where the bytes go").

  python scripts/layout_probe.py [--topology v5e:2x2]

Each line compiles one small program for one abstract chip (no TPU needed; libtpu from the tpu or test
extra) and prints XLA's cost-model bytes accessed (an ESTIMATE). A TPU vector register holds 128 lanes of
the minor (channel) dimension, so a tensor with fewer channels is padded, and relayouts at program
boundaries add copies.

1. Single ops (x + 1, two chained 1x1 convolutions) at about equal tensor bytes and different widths,
   against the bytes of their inputs and outputs.
2. The train step of a chain of 4 of the model's own Conv -> BatchNorm (groups of 8) -> SiLU layers (3x3,
   bf16 compute, float32 weight gradients, 8 images), in bytes per layer over one activation's bytes, by
   width; and at 64 channels with the BatchNorm + SiLU (or the whole layer) rematerialised in the
   backward pass (`nnx.remat`) instead of stored.
3. Where scale m's activations are narrow: the outputs of the model's convolutions and matmuls in one
   forward pass at 640 px (traced, not compiled), by resolution and width, as stored and padded to
   128 lanes.
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

  for c, hw, remat in ((32, 224, 'none'), (64, 160, 'none'), (128, 112, 'none'), (64, 160, 'normalize'),
                       (64, 160, 'layer')):
    train_chain(replicated, c, hw, remat)
  activations_by_width('configs/optsar_rsvg.py')
  return 0


def activations_by_width(config_path: str) -> None:
  """Prints the bf16 bytes of every 4-d convolution / matmul output of one 640-px forward pass of the
  config's model (as a TPU run resolves it), grouped by (resolution, channels)."""
  import collections
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from optisar_jax import grounding
  from optisar_jax.config import load_config
  config = compile_report.target_config(load_config(config_path), 'tpu')
  size = int(config.data.imgsz)
  graphdef, state = nnx.split(grounding.abstract_model(config))

  def forward(state, images):
    model = nnx.merge(graphdef, state, copy=True)
    return model.detector(images, jnp.zeros((1, 4, int(config.text.dim)), jnp.float32), rngs=nnx.Rngs(0))

  stored, padded, count = collections.Counter(), collections.Counter(), collections.Counter()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      for value in eqn.params.values():
        inner = getattr(value, 'jaxpr', value)
        if hasattr(inner, 'eqns'):
          walk(inner)
      if eqn.primitive.name in ('conv_general_dilated', 'dot_general') and len(eqn.outvars[0].aval.shape) == 4:
        shape = eqn.outvars[0].aval.shape
        key = (shape[1], shape[-1])
        pixels = shape[0] * shape[1] * shape[2]
        stored[key] += 2 * pixels * shape[-1]
        padded[key] += 2 * pixels * max(shape[-1], 128)
        count[key] += 1

  walk(jax.make_jaxpr(forward)(state, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).jaxpr)
  total, total_padded = sum(stored.values()), sum(padded.values())
  narrow = sum(v for (_, c), v in stored.items() if c < 128)
  narrow_padded = sum(v for (_, c), v in padded.items() if c < 128)
  print(f'{config_path}, one {size}-px image: convolution outputs {total / 1e6:.1f} MB as stored, '
        f'{total_padded / 1e6:.1f} MB padded to 128 lanes; narrower than 128 channels: '
        f'{narrow / total:.0%} stored, {narrow_padded / total_padded:.0%} padded')
  for key in sorted(stored, key=lambda k: -padded[k])[:8]:
    print(f'  {key[0]:>4} px, {key[1]:>4} channels: {count[key]:>3} outputs, {stored[key] / 1e6:6.1f} MB stored, '
          f'{padded[key] / 1e6:6.1f} MB padded')


def train_chain(sharding, c: int, hw: int, remat: str, layers_: int = 4) -> None:
  """Compiles the train step (loss, gradients, new BatchNorm statistics) of `layers_` Conv-BN-SiLU layers
  and prints the cost model's bytes per layer in units of one (8, hw, hw, c) bf16 activation."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from optisar_jax.models import layers
  opts = layers.LayerOptions(dtype=jnp.bfloat16, cpu_forms=False, bn_group_size=8, f32_weight_grads=True)
  chain = nnx.List([layers.Conv(c, c, 3, 1, opts=opts, rngs=nnx.Rngs(i)) for i in range(layers_)])
  graphdef, params, rest = nnx.split(chain, nnx.Param, ...)

  def loss(params, rest, x):
    model = nnx.merge(graphdef, params, rest, copy=True)
    for layer in model:
      if remat == 'normalize':
        x = nnx.remat(lambda m, y: m.normalize(y))(layer, layer.conv(x))
      elif remat == 'layer':
        x = nnx.remat(lambda m, y: m(y))(layer, x)
      else:
        x = layer(x)
    return jnp.mean(x.astype(jnp.float32) ** 2), nnx.split(model, nnx.Param, ...)[2]

  def step(params, rest, x):
    (value, new_rest), grads = jax.value_and_grad(loss, has_aux=True)(params, rest, x)
    return value, grads, new_rest

  abstract = lambda tree: jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding), tree)
  x = jax.ShapeDtypeStruct((8, hw, hw, c), jnp.bfloat16, sharding=sharding)
  compiled = jax.jit(step).lower(abstract(params), abstract(rest), x).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  activation = 8 * hw * hw * c * 2
  print(f'train step of {layers_} Conv-BN-SiLU 3x3, 8x{hw}x{hw}x{c}, remat {remat:<9} cost model '
        f'{cost["bytes accessed"] / 1e6:8.1f} MB = {cost["bytes accessed"] / activation / layers_:5.1f} '
        f'activations per layer, {cost["flops"] / 1e9:6.1f} GFLOP', flush=True)


if __name__ == '__main__':
  sys.exit(main())
