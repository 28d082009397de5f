"""Test-session setup for the JAX/grain stack.

* 8 simulated CPU devices, so sharding tests can build meshes such as data 4 x fsdp 2. This must happen
  before jax is imported anywhere.
* absl flags marked as parsed: grain reads absl flags and fails with UnparsedFlagAccessError otherwise.
"""

import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

# Tests compile the same tiny programs many times (and CI runs on the same machine again): share them.
from optisar_jax.cli import enable_compilation_cache  # noqa: E402

enable_compilation_cache(os.environ.get('OPTISAR_JAX_CACHE_DIR',
                                        os.path.join(os.path.expanduser('~'), '.cache', 'optisar_jax',
                                                     'xla-tests')))
