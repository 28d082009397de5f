"""Test-session setup for the JAX/grain stack.

* 8 simulated CPU devices, so sharding tests can build meshes such as data 4 x fsdp 2. This must happen
  before jax is imported anywhere.
* absl flags marked as parsed: grain reads absl flags and fails with UnparsedFlagAccessError otherwise.
* a persistent compilation cache of this session only (below), shared with subprocesses.
* `-m "not slow"`: the fast subset (end-to-end and multi-process tests are marked slow).
"""

import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  _flags += ' --xla_force_host_platform_device_count=8'
# The suite's time is compilation (tiny programs that run a few steps), so the tests compile for speed
# (CPU only; the accelerators' compilers ignore these flags). LLVM at -O0 compiles the tiny train step
# ~30 % faster. Every comparison in the suite is between programs compiled with the same
# flags; subprocesses inherit them (tests.test_multihost*, tests.test_scripts).
if '--xla_backend_optimization_level' not in _flags:
  _flags += ' --xla_backend_optimization_level=0'
# XLA:CPU's loop emitters instead of its newer MLIR fusion emitters: the tiny train step compiles in 25.5-26.3 s
# instead of 29.4-32.1 s (alone, alternating), and the whole suite took 10.9 instead of 13.7 minutes
# (2026-12-06, 2 cores). The same arithmetic in other loops; where XLA folds constants at compile time the
# last bits may differ from the same numbers computed at run time (tests/test_optimizer.py).
if '--xla_cpu_use_fusion_emitters' not in _flags:
  _flags += ' --xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = _flags.strip()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

# Tests compile the same tiny programs many times, in this process and in the subprocesses of the command
# and multi-process tests: they share one persistent compilation cache, made for this test session and
# removed at its end, so that the suite's time never depends on earlier runs. OPTISAR_JAX_TEST_CACHE_DIR
# names a directory to keep between sessions instead (for quick local iterations; CI never sets it).
import shutil  # noqa: E402
import tempfile  # noqa: E402

from optisar_jax.cli import enable_compilation_cache  # noqa: E402

_KEPT_CACHE = os.environ.get('OPTISAR_JAX_TEST_CACHE_DIR')
_SESSION_VAR = 'OPTISAR_JAX_TEST_SESSION_CACHE'        # set by the session's first process for its workers
_INHERITED = os.environ.get(_SESSION_VAR)
_SESSION_CACHE = _KEPT_CACHE or _INHERITED or tempfile.mkdtemp(prefix='optisar-jax-test-xla-')
_OWNS_CACHE = not (_KEPT_CACHE or _INHERITED)
os.environ[_SESSION_VAR] = _SESSION_CACHE              # pytest-xdist workers share the controller's cache
os.environ['OPTISAR_JAX_CACHE_DIR'] = _SESSION_CACHE   # inherited by every subprocess
enable_compilation_cache(_SESSION_CACHE)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWNS_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def _drop_compiled_programs():
  """Compiled programs are dropped after each test module (they stay in the session's persistent cache):
  a worker's memory then holds one module's executables, not the whole suite's."""
  yield
  import gc
  import jax
  jax.clear_caches()
  gc.collect()


# The modules that take longest, longest first (measured with --durations on the 2-core machine). The two
# pytest-xdist workers take whole modules in collection order (`--dist loadfile --no-loadscope-reorder` in
# pyproject.toml), so starting the long ones first lets the workers finish together
# (longest-processing-time-first scheduling); the rest keep their order.
LONGEST_FIRST = (
    'test_elastic.py', 'test_recovery.py', 'test_compile_report.py', 'test_commands.py', 'test_train_loop.py',
    'test_evaluation.py', 'test_remote_paths.py', 'test_multihost_eval.py', 'test_scripts.py',
    'test_detector.py', 'test_param_counts.py',
)


def pytest_collection_modifyitems(config, items):
  """Every test that uses the trained tiny run (`trained_tiny`, about a minute to train) is slow; modules
  are ordered longest first (LONGEST_FIRST)."""
  del config
  for item in items:
    if 'trained_tiny' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.slow)
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  order = {id(item): i for i, item in enumerate(items)}
  items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))


def _build_once(tmp_path_factory, name: str, build) -> str:
  """`build(path)` run once per test session, even with several pytest-xdist workers: the first worker to
  get here builds under a file lock, the others wait and reuse the result. A worker that fails midway
  leaves no `.done` mark, so the next one builds again from scratch. Returns the path (a str)."""
  import filelock
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base     # shared by the workers
  target, done = root / name, root / f'{name}.done'
  with filelock.FileLock(str(root / f'{name}.lock')):
    if not done.exists():
      shutil.rmtree(target, ignore_errors=True)
      build(str(target))
      done.touch()
  return str(target)


@pytest.fixture(scope='session')
def synthetic_tfds(tmp_path_factory):
  """A small synthetic OptSAR-RSVG release built into TFDS: (raw_dir, data_dir). Built once per session."""
  from optisar_jax.data import build_tfds, make_synthetic_dataset

  def build(root):
    make_synthetic_dataset(os.path.join(root, 'raw'), format='optsar', num_images=40, seed=3)
    build_tfds('optsar_rsvg', os.path.join(root, 'raw'), os.path.join(root, 'tfds'))

  root = _build_once(tmp_path_factory, 'synthetic', build)
  return os.path.join(root, 'raw'), os.path.join(root, 'tfds')


def tiny_config(data_dir, *overrides):
  from optisar_jax.config import load_config
  return load_config('tiny', [f'data.data_dir={data_dir}', *overrides])


@pytest.fixture(scope='session')
def trained_tiny(synthetic_tfds, tmp_path_factory):
  """A tiny run trained for 4 steps on the synthetic dataset: (workdir, config). Trained once per session
  (about a minute) and shared by the workers: tests read it and copy it before changing anything."""
  from optisar_jax.train import loop
  config = tiny_config(synthetic_tfds[1], 'train.num_steps=4', 'train.checkpoint_every=4')
  root = _build_once(tmp_path_factory, 'trained', lambda root: loop.train(config, os.path.join(root, 'run')))
  return os.path.join(root, 'run'), config
