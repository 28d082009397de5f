"""XLA compiler options of our heavy programs (train step, evaluation predict, forward benchmark): config `xla`.

XLA:CPU (jaxlib 0.10) hands the convolutions, dots and reductions it can to YNNPACK
(`xla_cpu_experimental_ynn_fusion_type` lists the op kinds; by default all of them). Measured on this
project's 2-core Zen 3 CPU, float32, alternating in one process (docs/benchmarks.md):

* convolutions and dots run faster in XLA's own (Eigen) kernels: YNNPACK's stride-2 3x3 convolutions reach
  45-80 GFLOP/s inside the scale-m model, Eigen's 120-130;
* reductions over leading axes (BatchNorm statistics, the SSA's pooled statistics) run 20x faster in
  YNNPACK: XLA's own loops take 22-28 ms for the max or mean of an 80x80x1024 map, YNNPACK 1 ms.

Which choice is fastest depends on the program and the map sizes, so the config sets it per program:
`xla.cpu_ynnpack_train` (the train step) and `xla.cpu_ynnpack_eval` (evaluation and the forward benchmark),
each 'all' (XLA's default), 'reduce' (reductions only) or 'none'. Measured (seconds per call, median):

  program (config)                     all      reduce   none
  eval forward, scale m, 640, batch 1  0.863    0.700    0.703
  train step, scale m, 640, batch 2    11.92    11.22    10.31
  train step, demo, 128, batch 16      0.276    0.248    0.322

The choices compute the same sums in a different order (float32 rounding only). On GPU and TPU no option
is set.
"""

from __future__ import annotations

import contextlib
import gc

import jax
import ml_collections

PROGRAMS = ('train', 'eval')
# value of `xla.cpu_ynnpack_*` -> xla_cpu_experimental_ynn_fusion_type (None: XLA's default list)
_YNN_FUSION_TYPES = {'all': None, 'reduce': 'LIBRARY_FUSION_TYPE_REDUCE', 'none': ''}


def compiler_options(config: ml_collections.ConfigDict, program: str, *, platform: str | None = None
                     ) -> dict[str, str] | None:
  """`compiler_options` for `jax.jit` of `program` ('train' or 'eval') under `config.xla`, or None (XLA's
  defaults) when the config says 'all' or the target `platform` (default: the default backend) is not
  the CPU."""
  if program not in PROGRAMS:
    raise ValueError(f'compiler_options: program {program!r} is not one of {PROGRAMS}')
  key = f'cpu_ynnpack_{program}'
  if 'xla' not in config or key not in config.xla:
    raise KeyError(f"config key 'xla.{key}' does not exist")
  choice = config.xla[key]
  if choice not in _YNN_FUSION_TYPES:
    raise ValueError(f"config key 'xla.{key}': {choice!r} is not one of {sorted(_YNN_FUSION_TYPES)}")
  fusion_types = _YNN_FUSION_TYPES[choice]
  if fusion_types is None or (platform or jax.default_backend()) != 'cpu':
    return None
  return {'xla_cpu_experimental_ynn_fusion_type': fusion_types}


# Allocations between two young-generation passes of Python's cyclic garbage collector while a program is
# traced (the default is 700).
TRACING_GC_THRESHOLD = 50_000


@contextlib.contextmanager
def fewer_gc_passes():
  """Python's garbage collector with a larger young generation (`TRACING_GC_THRESHOLD`) inside the block.

  Tracing and lowering a model allocate millions of short-lived objects, and every 700 allocations the
  collector scans the young objects, most of them still alive inside the trace, and every few scans the
  older generations too. With a threshold of 50,000 the tiny train step's `lower` took 4.6-4.9 s instead
  of 5.6-5.8 s (2-core x86 CPU, alternating runs); the traced program is the same. The old thresholds
  come back on exit.
  """
  old = gc.get_threshold()
  gc.set_threshold(max(TRACING_GC_THRESHOLD, old[0]), *old[1:])
  try:
    yield
  finally:
    gc.set_threshold(*old)
