"""The reference optimiser recipe as one jittable optax transformation (docs/training-and-data.md section 6.1).

    clip_by_global_norm(clip_norm)                        on the raw gradients, before everything
    scale_by_adam(b1, b2, eps)                            b1 constant (optionally warmed up, see below)
    add_decayed_weights(weight_decay, mask = decay group) decoupled (AdamW) decay, scaled by the lr below
    scale by -lr(step) (weights) / -bias_lr(step) (biases)

Parameter groups (as the reference builds them, by name):

* `bias`: every parameter whose '/'-joined path contains 'bias' (conv/linear biases, norm biases, the
  contrastive head's bias, the SSA `bias_avg`/`bias_max`): no decay; warms up from `warmup_bias_lr`.
* `no_decay`: normalisation weights (the parameters of any module whose class name contains 'Norm', or,
  when only a state tree is given, leaves named 'scale', flax's name for every norm's multiplier) and
  any path containing 'logit_scale': no decay. With `optim.decay_tgdg_gates = False` (our default, a
  deviation: docs/architecture.md) the TGDF-SSA gates `weight_gate` / `feature_gate` join this group.
* `decay`: everything else (kernels, embeddings, router temperature, LoRA factors, layer scales, and, in
  the reference, the TGDF-SSA gates).

Our parameter names map one to one onto the reference's (tests/test_param_groups.py writes the map
down), so these rules put every parameter where the reference's rules put its counterpart.

Learning rate at optimizer step s (0-based; the first update uses s = 0), epoch e = floor(s / steps_per_epoch)
(e = E from s = total_steps on, so the schedule ends at lr * lrf even when E is fractional):

    lf(e)   = 1 + (lrf - 1) * (1 - cos(pi * e / E)) / 2          (cosine from 1 to lrf over E epochs)
    lr(s)   = lr * lf(e)                                          after warmup
    lr(s)   = start + (lr * lf(e) - start) * s / n_w              for s <= n_w (start = 0, warmup_bias_lr)
    n_w     = max(round(warmup_epochs * steps_per_epoch), warmup_min_steps)   (0 if warmup_epochs <= 0)
    b1(s)   = b1                                                  (the reference: see below)

Adam's b1 stays `optim.b1` throughout, as in the reference: its warmup interpolates `momentum` only in
parameter groups that have that key, and AdamW's groups have `betas` instead. `optim.warmup_b1 = True`
(not the reference) warms b1 up as Ultralytics does SGD's momentum:
b1(s) = warmup_momentum + (b1 - warmup_momentum) * min(s / n_w, 1).

E = total_steps / steps_per_epoch: the config's `train.epochs`, or `train.num_steps / steps_per_epoch`
when `train.num_steps > 0` (see `total_train_steps`).

Numbers as arguments: the schedule's numbers (lr, lrf, epochs, steps per epoch, total and warmup steps, the
warmup starts, b1) are not baked into the compiled train step. `make_recipe` returns the transformation as a
function of them (`Recipe.transformation(numbers)`) and the run's values (`Recipe.numbers`, float32/int32
scalars), which the train step takes as an argument. A learning-rate sweep, a longer or shorter schedule or
a resumed run with a changed `train.num_steps` reuses the compiled step from the persistent compilation
cache instead of recompiling (minutes for scale m on a TPU host; `jit` embeds Python numbers as constants,
so every value would otherwise be a new program). Structural settings (the parameter groups, clipping on
or off, b2, eps, weight decay) stay part of the program.

Loss scale, clipping and eps: the reference multiplies each device's mean loss by its batch (8) and by the
world size (8), so its gradients are 64x those of a loss normalised once over the global batch of 64, which
is what optisar-jax computes. Its clip threshold 10 therefore corresponds to 10 / 64 here
(`optim.clip_norm = 10 / 64` in configs/optsar_rsvg.py). Adam's update m / (sqrt(v) + eps) is invariant to
the gradient scale except through eps, so the reference's eps 1e-8 corresponds to 1e-8 / 64 here
(`optim.eps`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from optisar_jax.runtime.sharding import path_to_str

GROUP_BIAS = 'bias'
GROUP_NO_DECAY = 'no_decay'
GROUP_DECAY = 'decay'
# The TGDF-SSA gate parameters (models/fusion.py GatedMaxSigmoidAttn), exempt from decay when
# `optim.decay_tgdg_gates` is False.
GATE_NAMES = ('weight_gate', 'feature_gate')


def total_train_steps(train_config, steps_per_epoch: int) -> int:
  """`train.num_steps` when > 0, else `train.epochs * steps_per_epoch`."""
  if train_config.num_steps > 0:
    return int(train_config.num_steps)
  return int(round(train_config.epochs * steps_per_epoch))


def warmup_steps(optim_config, steps_per_epoch: int) -> int:
  """n_w = max(round(warmup_epochs * steps_per_epoch), warmup_min_steps); 0 when warmup_epochs <= 0."""
  if optim_config.warmup_epochs <= 0:
    return 0
  return max(int(round(optim_config.warmup_epochs * steps_per_epoch)), int(optim_config.warmup_min_steps))


@dataclasses.dataclass(frozen=True)
class Schedules:
  """Step -> value functions (jittable, also callable with Python ints for logging)."""
  lr: Callable[[Any], jax.Array]          # weights (decay and no_decay groups)
  bias_lr: Callable[[Any], jax.Array]     # bias group
  momentum: Callable[[Any], jax.Array]    # Adam b1 (constant unless optim.warmup_b1)


def schedule_numbers(optim_config, *, steps_per_epoch: int, total_steps: int) -> dict[str, np.ndarray]:
  """The numbers the schedules are made of, as float32 / int32 scalars (an argument of the train step):

    lr, lrf_minus_1 (lrf - 1), epochs (E = total_steps / steps_per_epoch), steps_per_epoch, total_steps,
    warmup_steps (n_w), bias_start (warmup_bias_lr), b1_start (the warmup's first b1: warmup_momentum
    with optim.warmup_b1, else b1) and b1_delta (b1 - b1_start)
  """
  if steps_per_epoch <= 0:
    raise ValueError(f'steps_per_epoch must be positive, got {steps_per_epoch}')
  if total_steps <= 0:
    raise ValueError(f'total_steps must be positive, got {total_steps}')
  b1 = float(optim_config.b1)
  b1_start = float(optim_config.warmup_momentum) if bool(optim_config.warmup_b1) else b1
  f32, i32 = np.float32, np.int32
  return {
      'lr': f32(optim_config.lr), 'lrf_minus_1': f32(float(optim_config.lrf) - 1.0),
      'epochs': f32(total_steps / steps_per_epoch), 'steps_per_epoch': i32(steps_per_epoch),
      'total_steps': i32(total_steps), 'warmup_steps': i32(warmup_steps(optim_config, steps_per_epoch)),
      'bias_start': f32(optim_config.warmup_bias_lr), 'b1_start': f32(b1_start),
      'b1_delta': f32(b1 - b1_start)}


def schedules_from(numbers) -> Schedules:
  """The learning-rate and b1 schedules of the recipe (module docstring) from `schedule_numbers(...)`,
  concrete or traced."""
  n = {key: jnp.asarray(value) for key, value in numbers.items()}

  def epoch_of(step):
    step = jnp.asarray(step, jnp.int32)
    epoch = jnp.minimum(step // n['steps_per_epoch'], n['epochs'])
    return jnp.where(step >= n['total_steps'], n['epochs'], epoch)  # lrf at the end even when E is fractional

  def warmup_fraction(step):
    n_w = n['warmup_steps']
    ramp = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.maximum(n_w, 1), 0.0, 1.0)
    return jnp.where(n_w > 0, ramp, jnp.ones((), jnp.float32))

  def make_lr(start):
    def schedule(step):
      epoch = jnp.asarray(epoch_of(step), jnp.float32)
      factor = 1.0 + n['lrf_minus_1'] * (1.0 - jnp.cos(jnp.pi * epoch / n['epochs'])) / 2.0   # lf(e)
      target = n['lr'] * factor
      return start + (target - start) * warmup_fraction(step)
    return schedule

  def momentum(step):
    return n['b1_start'] + n['b1_delta'] * warmup_fraction(step)

  return Schedules(lr=make_lr(jnp.zeros((), jnp.float32)), bias_lr=make_lr(n['bias_start']), momentum=momentum)


def make_schedules(optim_config, *, steps_per_epoch: int, total_steps: int) -> Schedules:
  """The learning-rate and b1 schedules of the recipe (see the module docstring)."""
  return schedules_from(schedule_numbers(optim_config, steps_per_epoch=steps_per_epoch, total_steps=total_steps))


def _norm_param_paths(module: nnx.Module) -> tuple[dict[str, Any], set[str]]:
  """(the Param state, paths of the Params owned by a *Norm* module) of an nnx Module."""
  norm_prefixes = [path_to_str(path) for path, node in nnx.iter_graph(module)
                   if isinstance(node, nnx.Module) and 'Norm' in type(node).__name__]
  params = nnx.state(module, nnx.Param)
  names = [path_to_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  norm = {name for name in names
          if any(name == prefix or name.startswith(prefix + '/') for prefix in norm_prefixes if prefix)}
  return params, norm


def param_group(name: str, norm_paths: set[str] | None = None, *, decay_gates: bool = True) -> str:
  """The group ('bias', 'no_decay' or 'decay') of a parameter from its '/'-joined path.

  decay_gates: False moves the TGDF-SSA gates (`GATE_NAMES`) from 'decay' to 'no_decay'.
  """
  if 'bias' in name:
    return GROUP_BIAS
  if 'logit_scale' in name:
    return GROUP_NO_DECAY
  if not decay_gates and name.rsplit('/', 1)[-1] in GATE_NAMES:
    return GROUP_NO_DECAY
  if norm_paths is not None:
    return GROUP_NO_DECAY if name in norm_paths else GROUP_DECAY
  return GROUP_NO_DECAY if name.rsplit('/', 1)[-1] == 'scale' else GROUP_DECAY


def param_groups(params_tree, *, decay_gates: bool = True) -> Any:
  """A tree (the structure of the parameters) of group labels; accepts an nnx Module or a state tree.

  decay_gates: `optim.decay_tgdg_gates` (True = the reference's groups).
  """
  if isinstance(params_tree, nnx.Module):
    params_tree, norm = _norm_param_paths(params_tree)
  else:
    norm = None
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_group(path_to_str(path), norm, decay_gates=decay_gates), params_tree)


def _group_fn(params_tree, decay_gates: bool) -> Callable[[str], str]:
  """name -> group, with norm modules found from the Module when one is given."""
  norm = _norm_param_paths(params_tree)[1] if isinstance(params_tree, nnx.Module) else None
  return lambda name: param_group(name, norm, decay_gates=decay_gates)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A run's optimizer: `transformation(numbers)` builds the optax transformation from the schedule's
  numbers (concrete or traced: the train step takes them as an argument), `numbers` are this run's."""
  transformation: Callable[[Mapping[str, Any]], optax.GradientTransformation]
  numbers: dict[str, np.ndarray]

  @property
  def tx(self) -> optax.GradientTransformation:
    """The transformation with this run's numbers (for `init` and the abstract state)."""
    return self.transformation(self.numbers)

  @classmethod
  def fixed(cls, tx: optax.GradientTransformation) -> 'Recipe':
    """Any optax transformation as a recipe without numbers (its schedule is part of the program)."""
    return cls(transformation=lambda numbers: tx, numbers={})


def make_recipe(optim_config, *, steps_per_epoch: int, total_steps: int, params_tree=None) -> Recipe:
  """AdamW with the recipe's groups, warmup, cosine and clipping (module docstring), as a `Recipe`.

  Args:
    optim_config: the config's `optim` section (lr, b1, b2, eps, weight_decay, decay_tgdg_gates, lrf,
      warmup_epochs, warmup_min_steps, warmup_bias_lr, warmup_b1, warmup_momentum, clip_norm;
      clip_norm <= 0 disables clipping).
    steps_per_epoch: optimizer steps per epoch (training images // global batch).
    total_steps: optimizer steps of the whole run (`total_train_steps(config.train, steps_per_epoch)`).
    params_tree: the model (an nnx Module, so norm layers are found by type) or its parameter state;
      None uses the name rules alone (norm weights = leaves named 'scale').

  The transformation works on any pytree of parameters (an nnx State of Params, a dict); groups are
  decided from each leaf's path, so `init`/`update` may be given the `nnx.Param` state directly.
  """
  numbers = schedule_numbers(optim_config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  group_of = _group_fn(params_tree, bool(optim_config.decay_tgdg_gates))
  clip_norm = float(optim_config.clip_norm or 0.0)
  b2, eps, weight_decay = float(optim_config.b2), float(optim_config.eps), float(optim_config.weight_decay)

  def labels(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: group_of(path_to_str(path)), params)

  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: group_of(path_to_str(path)) == GROUP_DECAY,
                                            params)

  def lr_labels(params):
    return jax.tree.map(lambda group: 'bias' if group == GROUP_BIAS else 'weight', labels(params))

  def transformation(numbers) -> optax.GradientTransformation:
    schedules = schedules_from(numbers)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    parts += [
        optax.inject_hyperparams(optax.scale_by_adam)(b1=schedules.momentum, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.partition({'weight': optax.scale_by_learning_rate(schedules.lr),
                         'bias': optax.scale_by_learning_rate(schedules.bias_lr)}, lr_labels),
    ]
    return optax.chain(*parts)

  return Recipe(transformation=transformation, numbers=numbers)


def make_optimizer(optim_config, *, steps_per_epoch: int, total_steps: int, params_tree=None
                   ) -> optax.GradientTransformation:
  """The recipe's transformation with its numbers fixed (`make_recipe(...).tx`; arguments as there)."""
  return make_recipe(optim_config, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                     params_tree=params_tree).tx


def schedule_values(schedules: Schedules, step: int) -> dict[str, float]:
  """{'lr', 'bias_lr', 'momentum'} at `step` as Python floats (for logging)."""
  return {'lr': float(schedules.lr(step)), 'bias_lr': float(schedules.bias_lr(step)),
          'momentum': float(schedules.momentum(step))}


def steps_per_epoch_for(num_train_images: int, global_batch_size: int) -> int:
  """Optimizer steps per epoch: full global batches only (the last partial batch is dropped)."""
  steps = num_train_images // global_batch_size
  if steps <= 0:
    raise ValueError(f'{num_train_images} training images give no full global batch of {global_batch_size}')
  return steps


# ------------------------------------------------------------------------------------- validation cadence

def validation_due(step: int, steps_per_epoch: int, total_steps: int, train_config) -> bool:
  """Whether the training loop validates after optimizer step `step` (1-based: steps taken so far).

  The reference validates at the end of every 20th epoch, at the final epoch, and at the end of each of
  the last 5 epochs (`epochs - epoch <= 5`, 0-based epoch; docs/training-and-data.md section 6.1). Keys of
  `train_config` (the config's `train` section):

    eval_every_epochs   when an epoch ends and its 1-based number is a multiple of this
    eval_every_steps    > 0: every this many steps instead of the epoch rule above
    eval_last_epochs    also at the end of each of the last N epochs (0 = off)

  The final step always validates, unless both cadence keys are 0 (validation off). An epoch ends when
  `step` is a multiple of `steps_per_epoch`; the last N epochs are those ending within N * steps_per_epoch
  steps of `total_steps` (epochs E-N+1..E of an E-epoch run).
  """
  if steps_per_epoch <= 0:
    raise ValueError(f'steps_per_epoch must be positive, got {steps_per_epoch}')
  every_steps = int(train_config.eval_every_steps)
  every_epochs = int(train_config.eval_every_epochs)
  last_epochs = int(train_config.eval_last_epochs)
  if every_steps < 0 or every_epochs < 0 or last_epochs < 0:
    raise ValueError("config keys 'train.eval_every_steps', 'train.eval_every_epochs' and "
                     f"'train.eval_last_epochs' must be >= 0, got {every_steps}, {every_epochs}, {last_epochs}")
  if every_steps == 0 and every_epochs == 0:
    return False
  if step >= total_steps:
    return True
  if every_steps:
    if step % every_steps == 0:
      return True
  elif step % (every_epochs * steps_per_epoch) == 0:
    return True
  epoch_end = step % steps_per_epoch == 0
  return epoch_end and total_steps - step < last_epochs * steps_per_epoch
