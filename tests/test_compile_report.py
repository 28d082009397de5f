"""optisar_jax/compile_report.py: the HLO reading on known text, and a real ahead-of-time compile of the tiny
config for abstract TPU v5e chips (libtpu comes with the test extra; docs/scaling.md)."""

import os

os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')   # no GCE metadata server to ask about this host

import jax
import numpy as np
import pytest
from flax import nnx

from optisar_jax import compile_report
from optisar_jax.config import load_config

HLO = """HloModule jit_train_step, entry_computation_layout={(f32[128,256]{1,0})->f32[4]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

ENTRY %main (p0: f32[128,256]) -> f32[4] {
  %p0 = f32[128,256]{1,0} parameter(0)
  %all-reduce.1 = (bf16[1024]{0}, f32[256]{0}) all-reduce(bf16[1024]{0} %x, f32[256]{0} %y), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %all-reduce-start.2 = f32[16]{0} all-reduce-start(f32[16]{0} %c), channel_id=2, replica_groups=[2,2]<=[4], to_apply=%add
  %all-reduce-done.2 = f32[16]{0} all-reduce-done(f32[16]{0} %all-reduce-start.2)
  %all-gather-start.3 = (f32[8]{0}, f32[32]{0}) all-gather-start(f32[8]{0} %d), channel_id=3, replica_groups=[1,4]<=[4], dimensions={0}
  %fusion.7 = f32[64,64]{1,0} fusion(f32[128,256]{1,0} %p0, bf16[64]{0} %e), kind=kLoop, calls=%add, metadata={op_name="jit(train_step)/jvp()/mul"}
  %fusion.8 = f32[2]{0} fusion(f32[2]{0} %f), kind=kInput, calls=%add
  %collective-permute.4 = f32[4]{0} collective-permute(f32[4]{0} %g), channel_id=4, source_target_pairs={{0,2},{2,0}}
  ROOT %copy.5 = f32[4]{0} copy(f32[4]{0} %all-reduce.1.something)
}
"""


def test_collectives_count_instructions_and_their_result_bytes_by_dtype_and_link():
  instructions = compile_report.parse_instructions(HLO)
  assert [i.opcode for i in instructions].count('all-reduce') == 1     # the copy's mention is not counted
  # Devices 0,1 on slice 0 and 2,3 on slice 1.
  got = compile_report.collectives(instructions, device_slices=[0, 0, 1, 1])
  assert set(got) == {'all-reduce', 'all-gather', 'collective-permute'}
  ar = got['all-reduce']
  assert ar['count'] == 2                                              # all-reduce + all-reduce-start, not -done
  assert ar['bytes'] == 1024 * 2 + 256 * 4 + 16 * 4
  assert ar['bytes_by_dtype'] == {'bf16': 2048, 'f32': 1088}
  # {{0,1,2,3}} spans both slices (DCN); [2,2]<=[4] is {0,1},{2,3}: within a slice (ICI).
  assert (ar['dcn_count'], ar['dcn_bytes']) == (1, 3072)
  ag = got['all-gather']
  assert (ag['count'], ag['bytes'], ag['dcn_count']) == (1, 32 * 4, 1)  # the gathered (output) half
  cp = got['collective-permute']
  assert (cp['count'], cp['bytes'], cp['dcn_count']) == (1, 16, 1)     # 0 <-> 2 crosses slices
  single = compile_report.collectives(instructions)
  assert single['all-reduce']['dcn_count'] == 0


@pytest.mark.parametrize('attributes,groups', [
    ('replica_groups={{0,1},{2,3}}, to_apply=%add', [[0, 1], [2, 3]]),
    ('replica_groups=[2,2]<=[4], to_apply=%add', [[0, 1], [2, 3]]),
    ('replica_groups=[2,2]<=[2,2]T(1,0), to_apply=%add', [[0, 2], [1, 3]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}, to_apply=%add", [[0, 2], [1, 3]]),
    ('replica_groups=mesh[axis_0=2,axis_1=2] {axis_1}, to_apply=%add', [[0, 1], [2, 3]]),
    ('source_target_pairs={{0,1},{1,0}}', [[0, 1], [1, 0]]),
    ('to_apply=%add', None),
])
def test_replica_group_formats(attributes, groups):
  assert compile_report._replica_groups(attributes) == groups


def test_largest_fusions_rank_by_operand_and_result_bytes():
  rows = compile_report.largest_fusions(compile_report.parse_instructions(HLO), n=1)
  assert rows == [{'name': 'fusion.7', 'kind': 'kLoop', 'bytes': 128 * 256 * 4 + 64 * 2 + 64 * 64 * 4,
                   'result': 'f32[64,64]{1,0}', 'op_name': 'jit(train_step)/jvp()/mul'}]


def test_bad_topology_and_program_names_are_one_line_errors():
  config = load_config('tiny', [])
  with pytest.raises(ValueError, match="topology 'v9z:2x2'"):
    compile_report.compile_programs(config, topology='v9z:2x2', per_chip_batch=8, progress=lambda m: None)
  with pytest.raises(ValueError, match='--what'):
    compile_report.compile_programs(config, topology='v5e:2x2', per_chip_batch=8, what=('eval',),
                                    progress=lambda m: None)


# ---------------------------------------------------------------------------- a real TPU compile

def _tpu_available() -> bool:
  try:
    compile_report.topology_devices('v5e:2x2')
  except ValueError:
    return False
  return True


def _tiny():
  """The tiny config in the paper's text mode: frozen text embeddings looked up by the step (no text tower
  to train), which also compiles about 20 % faster than the trainable tower (56 vs 70 s on 2 CPU cores)."""
  return load_config('tiny', ['text.mode=frozen'])


@pytest.fixture(scope='module')
def tiny_reports():
  """The tiny config's train step compiled for v5e:2x2 (4 chips, 8 images each, bf16, BN groups of 8):
  data-parallel (4, 1) and FSDP (2, 2). About a minute each on 2 CPU cores."""
  if not _tpu_available():
    pytest.fail('libtpu is missing: it comes with the test extra (pip install -e ".[test]")')
  reports = {}
  from optisar_jax.runtime import sharding
  for name, mesh, rules in (('dp', (4, 1), sharding.REPLICATED_RULES), ('fsdp', (2, 2), sharding.FSDP_RULES)):
    config = _tiny()
    config.mesh.sharding_rules = rules
    reports[name] = compile_report.compile_programs(config, topology='v5e:2x2', per_chip_batch=8,
                                                    what=('train_step',), mesh_shape=mesh, vocab_size=512,
                                                    progress=lambda m: None)['train_step']
  return reports


def _leaf_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.slow
def test_tiny_train_step_for_tpu_v5e_has_no_batchnorm_all_reduce_and_float32_gradient_sums(tiny_reports):
  from optisar_jax import platform
  from optisar_jax import grounding
  dp = tiny_reports['dp']
  assert (dp['chips'], dp['global_batch'], dp['mesh']) == (4, 32, {'data': 4, 'fsdp': 1})
  assert dp['compute_dtype'] == 'bfloat16' and dp['weight_grad_dtype'] == 'float32'
  assert dp['memory']['hbm_bytes'] == 16 * 2**30 and dp['memory']['fits'] is True
  assert dp['flops'] > 0 and dp['bytes_accessed'] > 0
  # With 8 images per chip and groups of 8, BatchNorm needs no cross-chip statistics: what remains is the
  # gradient sum and the running-statistic and metric means, which XLA combines into a few all-reduces
  # (global statistics compile to ~140). Their float32 payload is every gradient and every BatchNorm
  # running statistic (its mean over groups) once, plus a few scalars; no gradient goes over in bf16.
  config = platform.resolve(_tiny(), 'tpu')
  model = grounding.abstract_model(config)
  params = _leaf_bytes(nnx.state(model, nnx.Param))
  stats = _leaf_bytes(nnx.state(model, nnx.BatchStat))
  reduce = dp['collectives']['all-reduce']
  assert reduce['count'] <= 8, reduce
  assert params + stats <= reduce['bytes_by_dtype']['f32'] <= params + stats + 4096, (reduce, params, stats)
  assert reduce['bytes_by_dtype'].get('bf16', 0) <= 64, reduce
  assert set(dp['collectives']) == {'all-reduce'}


@pytest.mark.slow
def test_fsdp_cuts_the_per_chip_arguments_by_the_sharded_state(tiny_reports):
  dp, fsdp = tiny_reports['dp'], tiny_reports['fsdp']
  assert fsdp['mesh'] == {'data': 2, 'fsdp': 2}
  assert dp['state_bytes']['total'] == fsdp['state_bytes']['total']
  assert dp['state_bytes']['per_chip'] == dp['state_bytes']['total']
  # Kernels split in two over fsdp; biases, norms and BatchNorm statistics stay whole.
  saved = dp['state_bytes']['per_chip'] - fsdp['state_bytes']['per_chip']
  assert 0.3 * dp['state_bytes']['total'] < saved < 0.5 * dp['state_bytes']['total'], (saved, dp['state_bytes'])
  # The compiler's own per-chip argument bytes drop by at least that: TPU layouts pad small arrays to
  # (8, 128) tiles, so the padded kernels it no longer holds whole weigh more than their elements (the
  # tiny config's 18.5 MB of DP arguments are mostly padding; measured drop 3.8 MB for 1.7 MB of elements).
  # The replicated rest (biases, norms, statistics, batch, text table) stays on every chip.
  drop = dp['memory']['argument_bytes'] - fsdp['memory']['argument_bytes']
  assert saved <= drop < 0.5 * dp['memory']['argument_bytes'], (drop, saved, dp['memory'])
  # The weights are gathered whole for compute and their gradients go back to the shards: the all-gathers
  # carry bf16 copies of the weights, never the activations (without the gather constraint of
  # train/step.py XLA split activations over channels instead: on scale m that was 49 GB of all-gathers
  # per step). XLA gathers a kernel once per use of its bf16 cast (forward, input gradient, weight
  # gradient, and the recomputations around them): measured 7 bf16 copies of the float32 weights' elements,
  # bounded at 8; activations would be orders of magnitude more.
  from optisar_jax import grounding
  params = _leaf_bytes(nnx.state(grounding.abstract_model(_tiny()), nnx.Param))
  gathered = fsdp['collectives']['all-gather']['bytes_by_dtype']
  assert 0 < gathered.get('bf16', 0) <= 8 * params / 2, (gathered, params)
  assert gathered.get('f32', 0) <= params, (gathered, params)
  reduced = sum(fsdp['collectives'].get(k, {}).get('bytes', 0) for k in ('all-reduce', 'reduce-scatter'))
  assert reduced <= 2 * params + 65536, (fsdp['collectives'], params)


def test_reports_keep_the_persistent_compilation_cache_out(tmp_path):
  """Inside `_without_persistent_cache` nothing is written to (or read from) the persistent cache, even in
  a process that has used it already (JAX decides once per process); after it the cache works again."""
  import jax.numpy as jnp
  from jax.experimental.compilation_cache import compilation_cache
  saved = {name: getattr(jax.config, name) for name in
           ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')}
  jax.config.update('jax_compilation_cache_dir', str(tmp_path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  compilation_cache.reset_cache()
  try:
    jax.jit(lambda x: jnp.sin(x) * 2.0).lower(np.ones((3,), np.float32)).compile()
    assert len(os.listdir(tmp_path)) == 1                 # the cache is in use in this process
    with compile_report._without_persistent_cache():
      jax.jit(lambda x: jnp.cos(x) * 3.0).lower(np.ones((5,), np.float32)).compile()
    assert len(os.listdir(tmp_path)) == 1
    jax.jit(lambda x: jnp.tan(x) * 4.0).lower(np.ones((7,), np.float32)).compile()
    assert len(os.listdir(tmp_path)) == 2                 # and again after it
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
