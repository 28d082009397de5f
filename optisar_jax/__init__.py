"""optisar-jax: OptiSAR-Net++ (cross-domain optical/SAR visual grounding) in JAX and flax.nnx."""

import glob as _glob
import os as _os

__version__ = "0.1.0"


def _cpu_only_when_no_accelerator() -> None:
  """With libtpu installed (the `tpu` extra, also used for ahead-of-time TPU compiles) but no TPU, JAX
  would initialise the TPU plugin on first use, and libtpu prints errors while probing for TPU hosts.
  When JAX_PLATFORMS is unset and the machine has no TPU or NVIDIA device files, use the CPU backend only
  (the compile report still loads the TPU plugin for its abstract topologies). Set JAX_PLATFORMS to
  override."""
  if 'JAX_PLATFORMS' in _os.environ:
    return
  accelerator_files = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*', '/dev/kfd')
  if any(_glob.glob(pattern) for pattern in accelerator_files):
    return
  _os.environ['JAX_PLATFORMS'] = 'cpu'
  import sys as _sys
  if 'jax' in _sys.modules:   # jax already imported: its config read the environment at import time
    try:
      _sys.modules['jax'].config.update('jax_platforms', 'cpu')
    except Exception:  # backends already initialised: nothing left to choose
      pass


_cpu_only_when_no_accelerator()
