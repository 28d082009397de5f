"""Per-platform defaults: what `'auto'` in a config means on the CPU, a GPU or a TPU.

* `model.compute_dtype = 'auto'`: float32 on the CPU (where tests and the demo run), bfloat16 on GPU and TPU.
  Parameters, BatchNorm statistics, losses and the optimizer stay float32 everywhere.
* `model.cpu_forms = 'auto'` ('on', 'off'): the convolution forms tuned for XLA:CPU (`layers.Conv2d`: 1x1 convolutions as
  matmuls, depthwise convolutions as shifted sums) on the CPU only; GPU and TPU compile the plain
  convolutions, which their compilers map onto the MXU / tensor cores.

`resolve(config, platform)` returns a copy with both keys concrete; the model and the train step call
`compute_dtype()` / `cpu_forms()` themselves, so a config left at 'auto' follows the default backend
(`jax.default_backend()`), and the compile report resolves it for the topology it compiles for.
"""

from __future__ import annotations

import jax
import ml_collections

ACCELERATORS = ('gpu', 'cuda', 'rocm', 'tpu')


def _platform(platform: str | None) -> str:
  return (platform or jax.default_backend()).lower()


def compute_dtype(model_config, platform: str | None = None) -> str:
  """The compute dtype name of `model.compute_dtype` ('auto' -> float32 on CPU, bfloat16 on accelerators)."""
  value = str(model_config.compute_dtype)
  if value != 'auto':
    return value
  return 'bfloat16' if _platform(platform) in ACCELERATORS else 'float32'


def cpu_forms(model_config, platform: str | None = None) -> bool:
  """Whether the model uses the XLA:CPU-tuned convolution forms (`model.cpu_forms`: 'auto', 'on', 'off')."""
  value = str(model_config.get('cpu_forms', 'auto'))
  if value not in ('auto', 'on', 'off'):
    raise ValueError(f"config key 'model.cpu_forms': {value!r} is not one of 'auto', 'on', 'off'")
  if value == 'auto':
    return _platform(platform) == 'cpu'
  return value == 'on'


def resolve(config: ml_collections.ConfigDict, platform: str | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` with `model.compute_dtype` and `model.cpu_forms` resolved for `platform`."""
  values = config.to_dict()
  values['model']['compute_dtype'] = compute_dtype(config.model, platform)
  values['model']['cpu_forms'] = 'on' if cpu_forms(config.model, platform) else 'off'
  return ml_collections.ConfigDict(values)
