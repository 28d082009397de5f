"""Ahead-of-time compile report: what a train step or an evaluation step costs on an accelerator topology,
measured on a machine that has none.

    report = compile_programs(config, topology='v5e:4x4', per_chip_batch=8, what=('train_step', 'predict'))

`jax.experimental.topologies.get_topology_desc` gives abstract TPU chips (libtpu installed, the `tpu` extra)
or GPUs (the `cuda12` extra and a GpuTargetConfig proto, `optisar_jax/gpu_targets/*.txtpb`). The programs
are built exactly as training and evaluation build them (`step.make_train_step`, the state shardings of
the config's rules, `evaluation.make_packed_predict_fn`), lowered with abstract arguments placed on a mesh
of those devices and compiled by the target's own compiler. Per chip (the compiled SPMD program is one
chip's program), the report gives:

* `memory`: argument, temporary, output and aliased bytes from XLA's memory analysis; `peak_bytes` =
  argument + temporary + output - aliased (donated state); the chip's `hbm_bytes` and `fits`;
* `flops` and `bytes_accessed`: XLA's cost analysis of the compiled program (TPU only; the GPU compiler
  returns none). These are the compiler's static ESTIMATES, not measurements;
* `collectives`: per kind (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute) the
  number of instructions in the compiled HLO and the bytes they produce, by element type, split into ICI
  (within a slice) and DCN (across slices) by their replica groups;
* `fusions`: the largest fusions by bytes (operands + result), with the source op that XLA names;
* `compile_s`: lowering + compilation time on this host.

Topology names are libtpu's (`v4:2x2x2`, `v5e:4x4`, `v5p:4x4x4`, `v6e:2x4`, ...). `num_slices > 1` models a
multi-slice pod: the mesh's data axis is then slice-major, so the collectives over it cross DCN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# This host has no TPU; libtpu only compiles here. Tell it so up front, which keeps it from probing the GCE
# metadata server and from printing errors about the host: none of these describe the TARGET, which
# comes from `get_topology_desc`. The lockfile guards chips, of which an ahead-of-time compile uses none,
# so several compiles (or a test beside a report) may run at once.
if not any(os.path.exists(p) for p in ('/dev/accel0', '/dev/vfio/0')):
  for _key, _value in (('TPU_SKIP_MDS_QUERY', '1'), ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'),
                       ('TPU_WORKER_HOSTNAMES', 'localhost'), ('TPU_ACCELERATOR_TYPE', 'v5litepod-1')):
    os.environ.setdefault(_key, _value)

PROGRAMS = ('train_step', 'predict')

# HBM per chip (bytes) by the device_kind the topology reports.
HBM_BYTES = {
    'TPU v4': 16 * 2**30,      # per device: libtpu's v4 topologies give one device per TensorCore (2 per
                               # 32 GiB chip, no megacore), so v4:2x2x4 (v4-32) has 32 devices
    'TPU v5 lite': 16 * 2**30,
    'TPU v5': 95 * 2**30,
    'TPU v5p': 95 * 2**30,
    'TPU v6 lite': 32 * 2**30,
    'NVIDIA H100 80GB HBM3': 80 * 2**30,
    'NVIDIA H200': 141 * 10**9,
}

COLLECTIVE_KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4,
                'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1,
                's4': 0.5, 'u4': 0.5}
_ARRAY_RE = re.compile(r'\b(pred|[suf]\d+|bf16|c64|c128|f8e4m3fn|f8e5m2)\[([\d,]*)\]')
GPU_TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpu_targets')


# ------------------------------------------------------------------------------------------- devices

def topology_devices(topology: str, *, num_slices: int = 1) -> list:
  """Abstract devices of a TPU topology name ('v5e:4x4') or a GPU target ('h100:8', 'h200:8'; cuda12 extra).

  A bad name ends with a one-line ValueError naming it.
  """
  from jax.experimental import topologies
  gpu = re.fullmatch(r'(h100|h200):(\d+)', topology.lower())
  try:
    if gpu:
      if num_slices != 1:
        raise ValueError('--num_slices applies to TPU topologies only')
      proto_path = os.path.join(GPU_TARGETS_DIR, f'{gpu.group(1)}.txtpb')
      with open(proto_path) as f:
        target_config = f.read()
      topo = topologies.get_topology_desc(platform='cuda', target_config=target_config,
                                          topology=f'1x1x{int(gpu.group(2))}')
    else:
      kwargs = {'num_slices': num_slices} if num_slices > 1 else {}
      topo = topologies.get_topology_desc(topology_name=topology, platform='tpu', **kwargs)
  except ValueError:
    raise
  except Exception as err:  # the plugins raise XlaRuntimeError / RuntimeError with multi-line texts
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise ValueError(f'topology {topology!r}: {first[:300]}') from None
  return list(topo.devices)


def slice_of(device) -> int:
  return int(getattr(device, 'slice_index', 0) or 0)


def make_topology_mesh(devices: Sequence, shape: Sequence[int], axes: Sequence[str]) -> jax.sharding.Mesh:
  """A mesh over abstract devices: `shape` (one -1 allowed) over `axes`, all axes Auto.

  With several slices the devices are ordered slice-major, so the leading (data) axis spans the slices
  (its collectives cross DCN) and the others stay inside a slice.
  """
  from optisar_jax.runtime import sharding as sharding_lib
  devices = sorted(devices, key=lambda d: (slice_of(d), d.id))
  shape = sharding_lib._resolve_shape(shape, axes, len(devices))
  num_slices = len({slice_of(d) for d in devices})
  if num_slices > 1 and shape[0] % num_slices:
    raise ValueError(f'mesh shape {shape}: the leading axis must be a multiple of the {num_slices} slices')
  grid = np.array(devices, dtype=object).reshape(shape)
  return jax.sharding.Mesh(grid, tuple(axes), axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


# ------------------------------------------------------------------------------------- HLO reading

@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  result: str          # the result shape text
  operands: str        # the text inside the call parentheses
  attributes: str      # everything after the call parentheses


def _matching_paren(text: str, start: int) -> int:
  depth = 0
  for i in range(start, len(text)):
    c = text[i]
    if c in '({':
      depth += 1
    elif c in ')}':
      depth -= 1
      if depth == 0:
        return i
  return len(text) - 1


_INSTR_RE = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*')


def parse_instructions(hlo_text: str) -> list[Instruction]:
  """Every instruction line of an HLO module's text: `name = shape opcode(operands), attributes`."""
  out = []
  for line in hlo_text.splitlines():
    m = _INSTR_RE.match(line)
    if not m:
      continue
    rest = line[m.end():]
    if rest.startswith('('):
      close = _matching_paren(rest, 0)
      result, rest = rest[:close + 1], rest[close + 1:].lstrip()
    else:
      parts = rest.split(' ', 1)
      if len(parts) < 2:
        continue
      result, rest = parts[0], parts[1].lstrip()
    op = re.match(r'([\w\-]+)\(', rest)
    if not op:
      continue
    open_at = op.end() - 1
    close = _matching_paren(rest, open_at)
    out.append(Instruction(m.group(1), op.group(1), result, rest[open_at + 1:close], rest[close + 1:]))
  return out


def array_bytes(shape_text: str) -> dict[str, float]:
  """{element type: bytes} of every array shape in a (possibly tuple) shape text."""
  total: dict[str, float] = {}
  for dtype, dims in _ARRAY_RE.findall(shape_text):
    n = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
    total[dtype] = total.get(dtype, 0) + n * _DTYPE_BYTES.get(dtype, 4)
  return total


def _replica_groups(attributes: str) -> list[list[int]] | None:
  """The replica groups of a collective: explicit `{{0,1},{2,3}}` or iota `[2,2]<=[4]` / `[2,2]<=[2,2]T(1,0)`."""
  m = re.search(r'replica_groups=\{((?:\{[\d,]*\},?)*)\}', attributes)
  if m:
    return [[int(x) for x in g.split(',') if x] for g in re.findall(r'\{([\d,]*)\}', m.group(1))]
  m = re.search(r'replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', attributes)
  if m:
    groups_shape = [int(x) for x in m.group(1).split(',')]
    reshape = [int(x) for x in m.group(2).split(',')]
    ids = np.arange(math.prod(reshape)).reshape(reshape)
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(',')])
    return ids.reshape(groups_shape).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
  if m:   # mesh[axis_0=4,axis_1=2] {axis_0}: devices (iota over the mesh) that differ only along the listed axes
    axes = re.findall(r"'?([\w]+)'?=(\d+)", m.group(1))
    names = [a for a, _ in axes]
    sizes = [int(n) for _, n in axes]
    reduced = [names.index(a) for a in re.findall(r"'?([\w]+)'?", m.group(2)) if a in names]
    kept = [i for i in range(len(names)) if i not in reduced]
    ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(kept + reduced)
    return ids.reshape(-1, math.prod(sizes[i] for i in reduced) if reduced else 1).tolist()
  m = re.search(r'source_target_pairs=\{((?:\{[\d,]*\},?)*)\}', attributes)
  if m:
    return [[int(x) for x in g.split(',') if x] for g in re.findall(r'\{([\d,]*)\}', m.group(1))]
  return None


def collective_kind(opcode: str) -> str | None:
  """'all-reduce' for all-reduce / all-reduce-start (the -done half is not counted), else None."""
  base = opcode[:-len('-start')] if opcode.endswith('-start') else opcode
  return base if base in COLLECTIVE_KINDS else None


def collectives(instructions: Sequence[Instruction], device_slices: Sequence[int] | None = None) -> dict:
  """{kind: {'count', 'bytes', 'bytes_by_dtype', 'dcn_count', 'dcn_bytes'}} over the instructions.

  Bytes are those of the result (for an async *-start, the output half of its tuple). `device_slices[i]`
  is the slice of logical device i; a collective whose replica group spans two slices is a DCN one.
  """
  out: dict[str, dict] = {}
  for ins in instructions:
    kind = collective_kind(ins.opcode)
    if kind is None:
      continue
    result = ins.result
    if ins.opcode.endswith('-start') and result.startswith('('):
      arrays = _ARRAY_RE.findall(result)
      if kind in ('all-gather', 'collective-permute', 'all-to-all', 'reduce-scatter') and len(arrays) >= 2:
        arrays = arrays[len(arrays) // 2:]
      result = ' '.join(f'{d}[{s}]' for d, s in arrays)
    by_dtype = array_bytes(result)
    entry = out.setdefault(kind, {'count': 0, 'bytes': 0, 'bytes_by_dtype': {}, 'dcn_count': 0,
                                  'dcn_bytes': 0})
    size = int(sum(by_dtype.values()))
    entry['count'] += 1
    entry['bytes'] += size
    for dtype, b in by_dtype.items():
      entry['bytes_by_dtype'][dtype] = int(entry['bytes_by_dtype'].get(dtype, 0) + b)
    groups = _replica_groups(ins.attributes)
    if device_slices is not None and groups and len(set(device_slices)) > 1:
      if any(len({device_slices[i] for i in g if i < len(device_slices)}) > 1 for g in groups):
        entry['dcn_count'] += 1
        entry['dcn_bytes'] += size
  return out


def largest_fusions(instructions: Sequence[Instruction], n: int = 10) -> list[dict]:
  """The n fusions with the most bytes (operand + result shapes), with the op name XLA records."""
  rows = []
  for ins in instructions:
    if ins.opcode != 'fusion':
      continue
    size = sum(array_bytes(ins.operands).values()) + sum(array_bytes(ins.result).values())
    kind = re.search(r'kind=(\w+)', ins.attributes)
    op_name = re.search(r'op_name="([^"]*)"', ins.attributes)
    rows.append({'name': ins.name, 'kind': kind.group(1) if kind else '', 'bytes': int(size),
                 'result': ins.result[:120], 'op_name': op_name.group(1)[-160:] if op_name else ''})
  rows.sort(key=lambda r: -r['bytes'])
  return rows[:n]


# ----------------------------------------------------------------------------------- the programs

def target_config(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """The config as a run on `platform` resolves it ('auto' compute dtype and CPU forms)."""
  from optisar_jax import platform as platform_lib
  return platform_lib.resolve(config, platform)


def _abstract_batch(config, global_batch: int, sharding) -> dict:
  s, m, k = config.data.imgsz, config.data.max_boxes, config.data.max_text_slots

  def a(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  return {'image': a((global_batch, s, s, 3), jnp.uint8), 'boxes': a((global_batch, m, 4), jnp.float32),
          'box_slots': a((global_batch, m), jnp.int32), 'box_mask': a((global_batch, m), jnp.bool_),
          'text_ids': a((global_batch, k), jnp.int32), 'text_mask': a((global_batch, k), jnp.bool_),
          'domain': a((global_batch,), jnp.int32), 'hsv_gains': a((global_batch, 3), jnp.float32)}


def _text_table(config, vocab_size: int, sharding):
  if config.text.mode == 'trainable':
    return jax.ShapeDtypeStruct((vocab_size, config.text.tower.context_length), jnp.int32, sharding=sharding)
  return jax.ShapeDtypeStruct((vocab_size, config.text.dim), jnp.float32, sharding=sharding)


def lower_train_step(config, mesh, global_batch: int, vocab_size: int):
  """The jitted train step lowered with abstract state, batch and text table on `mesh`."""
  from optisar_jax import grounding
  from optisar_jax.runtime import compile_options
  from optisar_jax.runtime import sharding as sharding_lib
  from optisar_jax.train import optimizer as optimizer_lib
  from optisar_jax.train import step as step_lib
  rules = tuple(tuple(rule) for rule in config.mesh.sharding_rules)
  model = grounding.abstract_model(config)
  recipe = optimizer_lib.make_recipe(config.optim, steps_per_epoch=1000, total_steps=300_000, params_tree=model)
  train_def, _ = grounding.graphdefs_of(model)
  abstract = step_lib.abstract_state(model, recipe.tx)
  shardings = sharding_lib.param_shardings(mesh, abstract, rules)
  state = sharding_lib.abstract_with_shardings(abstract, shardings)
  replicated = sharding_lib.replicated(mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  jitted = jax.jit(step_lib.make_train_step(config, train_def, recipe, param_shardings=shardings['params'],
                                            gathered=replicated),
                   in_shardings=(shardings, batch_sharding, replicated, replicated, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,),
                   compiler_options=compile_options.compiler_options(config, 'train', platform=mesh_platform(mesh)))
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
  with jax.set_mesh(mesh):
    lowered = jitted.lower(state, _abstract_batch(config, global_batch, batch_sharding),
                           _text_table(config, vocab_size, replicated), rng,
                           jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated),
                                        recipe.numbers))
  return lowered, state_bytes(state)


def state_bytes(state) -> dict:
  """Bytes of the train state (weights, BatchNorm statistics, optimizer and EMA state): `total` as one
  copy, `per_chip` as the shardings place it (a replicated leaf counts whole on every chip)."""
  total = per_chip = 0
  for leaf in jax.tree.leaves(state):
    itemsize = np.dtype(leaf.dtype).itemsize
    total += math.prod(leaf.shape) * itemsize
    per_chip += math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
  return {'total': int(total), 'per_chip': int(per_chip)}


def lower_predict(config, mesh, per_chip_images: int):
  """The packed evaluation predict of `per_chip_images` image slots and the config's query slots per chip
  (scaled like the images), lowered on `mesh` with the EMA-shaped weights replicated."""
  from optisar_jax import evaluation, grounding
  from optisar_jax.runtime import compile_options
  from optisar_jax.runtime import sharding as sharding_lib
  model = grounding.abstract_model(config)
  _, eval_def = grounding.graphdefs_of(model)
  from flax import nnx
  _, params, rest = nnx.split(model, nnx.Param, ...)
  replicated = sharding_lib.replicated(mesh)
  blocks = mesh.size
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
  slots = max(1, round(config.eval.query_slots * per_chip_images / config.eval.batch_size))
  s = config.data.imgsz

  def place(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

  jitted = jax.jit(evaluation.make_packed_predict_fn(config, eval_def, blocks),
                   in_shardings=(replicated, replicated, batch, batch, batch),
                   out_shardings=(batch, batch),          # as evaluation.Grounder: answers stay per chip
                   compiler_options=compile_options.compiler_options(config, 'eval', platform=mesh_platform(mesh)))
  with jax.set_mesh(mesh):
    return jitted.lower(place(params, replicated), place(rest, replicated),
                        jax.ShapeDtypeStruct((blocks * per_chip_images, s, s, 3), jnp.uint8, sharding=batch),
                        jax.ShapeDtypeStruct((blocks * slots, config.text.dim), jnp.float32, sharding=batch),
                        jax.ShapeDtypeStruct((blocks * slots,), jnp.int32, sharding=batch)), slots


def mesh_platform(mesh) -> str:
  return mesh.devices.flat[0].platform


def _cost(compiled) -> dict:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends (GPU, deviceless) do not implement it
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def analyse(compiled, mesh, *, hbm_bytes: int | None) -> dict:
  """Memory, cost, collectives and fusions of one compiled program (per chip)."""
  mem = compiled.memory_analysis()
  argument = int(mem.argument_size_in_bytes)
  temp = int(mem.temp_size_in_bytes)
  output = int(mem.output_size_in_bytes)
  alias = int(getattr(mem, 'alias_size_in_bytes', 0))
  peak = argument + temp + output - alias
  cost = _cost(compiled)
  text = compiled.as_text()
  instructions = parse_instructions(text)
  device_slices = [slice_of(d) for d in mesh.devices.flat]
  return {
      'flops': float(cost['flops']) if 'flops' in cost else None,
      'bytes_accessed': float(cost['bytes accessed']) if 'bytes accessed' in cost else None,
      'memory': {'argument_bytes': argument, 'temp_bytes': temp, 'output_bytes': output, 'alias_bytes': alias,
                 'peak_bytes': peak, 'hbm_bytes': hbm_bytes,
                 'fits': (peak <= hbm_bytes) if hbm_bytes else None},
      'collectives': collectives(instructions, device_slices),
      'fusions': largest_fusions(instructions),
  }, text


@contextlib.contextmanager
def _without_persistent_cache():
  """Ahead-of-time executables for abstract devices are neither stored in nor loaded from the persistent
  compilation cache (the scripts turn it on), and compile_s times a real compile. JAX decides whether a
  process uses the cache once, at its first compilation, and keeps that answer: the flag alone would be
  ignored (the executables were written to the cache and a second report would time a cache load), so
  the decision is reset on the way in and out."""
  from jax.experimental.compilation_cache import compilation_cache
  was = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', was)
    compilation_cache.reset_cache()


def compile_programs(config: ml_collections.ConfigDict, *, topology: str, per_chip_batch: int,
                     what: Sequence[str] = PROGRAMS, mesh_shape: Sequence[int] | None = None,
                     num_slices: int = 1, vocab_size: int = 100_000, hlo_out: str | None = None,
                     progress=print) -> dict:
  """Compiles each program of `what` for `topology` and returns {program: report} (module docstring)."""
  unknown = [w for w in what if w not in PROGRAMS]
  if unknown:
    raise ValueError(f'--what: {unknown} not among {PROGRAMS}')
  devices = topology_devices(topology, num_slices=num_slices)
  platform = devices[0].platform
  config = target_config(config, platform)
  mesh = make_topology_mesh(devices, tuple(mesh_shape) if mesh_shape is not None else tuple(config.mesh.shape),
                            tuple(config.mesh.axes))
  chips = mesh.size
  kind = devices[0].device_kind
  hbm = HBM_BYTES.get(kind)
  global_batch = per_chip_batch * chips
  with config.unlocked():
    config.train.batch_size = global_batch
  reports = {}
  with _without_persistent_cache():
    for program in what:
      progress(f'compiling {program} for {topology} ({chips} x {kind}, mesh {dict(mesh.shape)}) ...')
      start = time.perf_counter()
      if program == 'train_step':
        lowered, state = lower_train_step(config, mesh, global_batch, vocab_size)
        extra = {'global_batch': global_batch, 'state_bytes': state}
      else:
        lowered, slots = lower_predict(config, mesh, per_chip_batch)
        extra = {'global_batch': global_batch, 'query_slots_per_chip': slots}
      compiled = lowered.compile()
      seconds = time.perf_counter() - start
      result, text = analyse(compiled, mesh, hbm_bytes=hbm)
      reports[program] = {'topology': topology, 'num_slices': num_slices, 'platform': platform,
                          'device_kind': kind, 'chips': chips, 'mesh': dict(mesh.shape), 'per_chip_batch': per_chip_batch,
                          **extra, 'compile_s': round(seconds, 2), 'compute_dtype': str(config.model.compute_dtype),
                          'bn_group_size': int(config.model.get('bn_group_size', 0)),
                          'weight_grad_dtype': _weight_grad_dtype(config), **result}
      if hlo_out:
        from optisar_jax.runtime import paths
        paths.write_text_atomic(paths.path(hlo_out) / f'{program}.hlo.txt', text)
  return reports


def _weight_grad_dtype(config) -> str:
  """The dtype weight gradients are produced (and summed across chips) in: float32, or the compute dtype
  under `model.weight_grad_dtype = 'compute'`."""
  from optisar_jax.models import precision
  if precision.float32_weight_grads(config.model, config.model.compute_dtype):
    return 'float32'
  return str(config.model.compute_dtype)


def _gib(x) -> str:
  return '-' if x is None else f'{x / 2**30:.2f} GiB'


def format_report(reports: dict) -> str:
  """A human-readable table of `compile_programs`' result."""
  lines = []
  for program, r in reports.items():
    m = r['memory']
    per_image = r['per_chip_batch'] or 1
    lines.append(f"== {program}: {r['topology']} x{r['num_slices']} slice(s), {r['chips']} x {r['device_kind']}, "
                 f"mesh {r['mesh']}, global batch {r['global_batch']}, compute {r['compute_dtype']}, "
                 f"BN groups {r['bn_group_size']}, weight gradients {r['weight_grad_dtype']}, "
                 f"compile {r['compile_s']:.1f} s")
    if 'state_bytes' in r:
      lines.append(f"   train state: {_gib(r['state_bytes']['total'])} in all, "
                   f"{_gib(r['state_bytes']['per_chip'])} per chip as sharded")
    lines.append(f"   per chip: arguments {_gib(m['argument_bytes'])}, temporaries {_gib(m['temp_bytes'])}, "
                 f"outputs {_gib(m['output_bytes'])}, aliased {_gib(m['alias_bytes'])}, peak {_gib(m['peak_bytes'])}"
                 f" of {_gib(m['hbm_bytes'])} HBM -> fits: {m['fits']}")
    if r['flops'] is not None:
      intensity = r['flops'] / r['bytes_accessed'] if r['bytes_accessed'] else float('nan')
      lines.append(f"   cost model (estimate): {r['flops'] / 1e9:.1f} GFLOP, {r['bytes_accessed'] / 1e9:.2f} GB "
                   f"accessed per chip ({r['flops'] / 1e9 / per_image:.1f} GFLOP, "
                   f"{r['bytes_accessed'] / 1e9 / per_image:.2f} GB per image); {intensity:.1f} FLOP/byte")
    for kind, c in sorted(r['collectives'].items()):
      dtypes = ', '.join(f'{d} {b / 1e6:.2f} MB' for d, b in sorted(c['bytes_by_dtype'].items()))
      lines.append(f"   {kind:<19} {c['count']:>4} instructions, {c['bytes'] / 1e6:9.2f} MB ({dtypes}); "
                   f"DCN {c['dcn_count']} / {c['dcn_bytes'] / 1e6:.2f} MB")
    if not r['collectives']:
      lines.append('   no collectives')
    lines.append('   largest fusions by bytes:')
    for f in r['fusions']:
      lines.append(f"     {f['bytes'] / 1e6:9.1f} MB  {f['kind']:<8} {f['name']:<28} {f['op_name'][-90:]}")
  return '\n'.join(lines)
