"""compile_options: what XLA:CPU hands to YNNPACK per program (config `xla.cpu_ynnpack_*`), and that only the
kernels change."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from optisar_jax.runtime import compile_options
from optisar_jax.config import load_config

OPTION = 'xla_cpu_experimental_ynn_fusion_type'


def _config(train, evaluate=None):
  return ml_collections.ConfigDict({'xla': {'cpu_ynnpack_train': train, 'cpu_ynnpack_eval': evaluate or train}})


def test_choices_per_program():
  config = _config('none', 'reduce')
  assert compile_options.compiler_options(config, 'train') == {OPTION: ''}
  assert compile_options.compiler_options(config, 'eval') == {OPTION: 'LIBRARY_FUSION_TYPE_REDUCE'}
  assert compile_options.compiler_options(_config('all'), 'eval') is None
  # scale m trains fastest with no YNNPACK; the small demo and tiny maps with YNNPACK's reductions
  for name, train in (('optsar_rsvg', 'none'), ('dior_rsvg', 'none'), ('demo', 'reduce'), ('tiny', 'reduce')):
    config = load_config(name)
    assert (config.xla.cpu_ynnpack_train, config.xla.cpu_ynnpack_eval) == (train, 'reduce'), name


def test_bad_config_names_the_key():
  with pytest.raises(KeyError, match=r"'xla.cpu_ynnpack_eval' does not exist"):
    compile_options.compiler_options(ml_collections.ConfigDict({'xla': {}}), 'eval')
  with pytest.raises(ValueError, match=r"'xla.cpu_ynnpack_train': 'eigen' is not one of \['all', 'none', 'reduce'\]"):
    compile_options.compiler_options(_config('eigen'), 'train')
  with pytest.raises(ValueError, match='program'):
    compile_options.compiler_options(_config('all'), 'export')


def _program(x, w, m):
  """A stride-2 3x3 conv, a 1x1 conv as a matmul and a spatial max (the three op kinds in question)."""
  y = jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  z = jnp.einsum('bhwc,cd->bhwd', jax.nn.silu(y), m)
  return z, z.max(axis=(1, 2))


@pytest.mark.parametrize('choice', ['reduce', 'none'])
def test_kernels_change_not_the_result(choice):
  """With YNNPACK limited (or off) the compiled program keeps YNNPACK only where asked, and its values
  equal XLA's default program up to float32 summation order."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 32, 32, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 16, 32)), jnp.float32)
  m = jnp.asarray(rng.normal(size=(32, 24)), jnp.float32)
  default = jax.jit(_program).lower(x, w, m).compile()
  limited = jax.jit(_program, compiler_options=compile_options.compiler_options(_config(choice), 'eval')).lower(
      x, w, m).compile()
  def ynn_fusions(compiled):        # the op_name of every YNNPACK fusion call
    return [line.split('op_name="')[1].split('"')[0] for line in compiled.as_text().splitlines()
            if line.lstrip().startswith('%ynn_fusion') and 'kind=kCustom' in line]

  assert any('conv_general_dilated' in name for name in ynn_fusions(default))   # XLA's default list
  if choice == 'none':
    assert ynn_fusions(limited) == []
  else:
    assert ynn_fusions(limited) == ['jit(_program)/reduce_max']
  for a, b in zip(default(x, w, m), limited(x, w, m)):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_fewer_gc_passes_raises_the_young_threshold_only_inside_and_restores_it_after_an_error():
  import gc
  before = gc.get_threshold()
  with compile_options.fewer_gc_passes():
    inside = gc.get_threshold()
    lowered = jax.jit(lambda x: x * 2 + 1).lower(jnp.ones(3))     # a trace inside the block works as usual
  assert inside == (max(compile_options.TRACING_GC_THRESHOLD, before[0]), *before[1:])
  assert gc.get_threshold() == before
  assert 'multiply' in lowered.as_text()
  with pytest.raises(RuntimeError):
    with compile_options.fewer_gc_passes():
      raise RuntimeError('a failed trace')
  assert gc.get_threshold() == before
