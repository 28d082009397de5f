"""The training state and the pure, sharded training step.

`TrainState` is a plain pytree (a dict), so Orbax saves it and `jax.jit` shards it without wrappers:

    {'step': int32 (),                        optimizer steps taken
     'params': nnx.State of nnx.Param,        float32 master weights
     'rest': nnx.State of everything else,    BatchNorm running statistics (nnx.BatchStat)
     'opt_state': optax state,
     'ema': {'params': ..., 'rest': ...}}     EMA of params and BatchNorm statistics (evaluated, exported)

`train_step(state, batch, text_table, rng, numbers) -> (state, metrics)` is jitted once with explicit
in/out shardings and the state donated (see `jit_train_step`). `numbers` are the optimizer schedule's
(`optimizer.Recipe.numbers`: lr, schedule length, warmup, ...), arguments rather than constants of the
program, so runs that differ only in them share one compiled step. Randomness (SSA dropout, MoE gate noise)
comes from `fold_in(rng, state['step'])`, so a resumed run draws exactly what an uninterrupted one draws.

BatchNorm under sharding: the statistics are those of fixed groups of `model.bn_group_size` consecutive
images of the global batch (8, the reference's images per GPU; `layers.BatchNorm`), and the PL-MoE
balance loss is averaged over the same groups. A group is the same set of images on any device count,
so the numbers do not depend on how many devices a run has (tested: 1 vs 8 devices); when the per-device
batch is a multiple of the group, XLA needs no cross-device reduction for them. `bn_group_size = 0`
takes the statistics of the whole global batch (SyncBN; XLA then all-reduces every BatchNorm).

Mixed precision: under `model.compute_dtype` bfloat16 (the 'auto' default on GPU/TPU) the float32 master
weights are cast inside the step. BatchNorm computes in float32. The gradients of the convolution and
dense kernels are bfloat16 where XLA sums them across devices: the partitioner places the sum after the
cast back to the weights' compute dtype (docs/scaling.md has the measurement and the way out).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from optisar_jax.runtime import compile_options
from optisar_jax import platform as platform_lib
from optisar_jax.data import device_hsv
from optisar_jax.grounding import GroundingModel, anchors_for, graphdefs_of
from optisar_jax.train import ema as ema_lib
from optisar_jax.train import losses
from optisar_jax.train import optimizer as optimizer_lib

TrainState = dict


def _state_from(params, rest, tx: optax.GradientTransformation) -> TrainState:
  return {
      'step': jnp.zeros((), jnp.int32),
      'params': params,
      'rest': rest,
      'opt_state': tx.init(params),
      'ema': ema_lib.init_ema({'params': params, 'rest': rest}),
  }


def state_from_model(model: GroundingModel, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state holding the model's initial weights."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return _state_from(params, rest, tx)


def init_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state of the config's model (use under `jax.eval_shape` for the abstract tree)."""
  return state_from_model(GroundingModel(config, rngs=nnx.Rngs(config.seed)), tx)


def abstract_state(model: GroundingModel, tx: optax.GradientTransformation) -> TrainState:
  """The state tree of `model` (concrete or abstract) as ShapeDtypeStructs (a checkpoint restore target)."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return jax.eval_shape(lambda p, r: {
      'step': jnp.zeros((), jnp.int32), 'params': p, 'rest': r, 'opt_state': tx.init(p),
      'ema': ema_lib.init_ema({'params': p, 'rest': r})}, params, rest)


class TrainSetup(NamedTuple):
  """What a training run needs from the model: the placed state, the optimizer and how to rebuild the
  model."""
  state: TrainState
  shardings: Any
  recipe: optimizer_lib.Recipe
  train_graphdef: Any
  eval_graphdef: Any

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.recipe.tx


def setup_training(config: ml_collections.ConfigDict, mesh, rules, *,
                   make_tx: Callable[[GroundingModel], optimizer_lib.Recipe | optax.GradientTransformation]
                   ) -> TrainSetup:
  """Builds the model once and returns its fresh state placed on `mesh` by the sharding `rules`.

  The initial values are computed eagerly on the host CPU (the modules draw them with numpy from the
  seed, which is fast; jit-compiling hundreds of random initialisers takes minutes on a CPU), identically
  on every process, and each device then receives only its shard (`make_array_from_callback`). The
  values do not depend on the device count. The host copy is dropped after placement (at 28M parameters
  it is ~0.5 GB with the optimizer moments, which every pod host can hold). `make_tx(model)` builds the
  optimizer (it reads parameter groups from the model): an `optimizer.Recipe` (`optimizer.make_recipe`),
  or any optax transformation, whose schedule is then part of the compiled step.
  """
  from optisar_jax.runtime import sharding as sharding_lib
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    model = GroundingModel(config, rngs=nnx.Rngs(config.seed))
    recipe = make_tx(model)
    if not isinstance(recipe, optimizer_lib.Recipe):
      recipe = optimizer_lib.Recipe.fixed(recipe)
    tx = recipe.tx
    # One jitted program builds the optimizer and EMA state: eagerly, each zeros_like / copy of a new
    # shape is a separate compilation (about 170 of them, 4 s, for the tiny model).
    _, params, rest = nnx.split(model, nnx.Param, ...)
    host_state = jax.device_get(jax.jit(lambda p, r: _state_from(p, r, tx))(params, rest))
  train_def, eval_def = graphdefs_of(model)
  state, shardings = sharding_lib.place_state(host_state, mesh, rules)
  return TrainSetup(state, shardings, recipe, train_def, eval_def)


def _tree_all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def model_images(batch: dict[str, jax.Array], compute_dtype, *, hsv_on_device: bool) -> jax.Array:
  """The images the model trains on: `batch['image']` (uint8 (B, S, S, 3)) with the augmentation's HSV
  gains `batch['hsv_gains']` (B, 3) applied when `hsv_on_device` (`device_hsv.enabled(config.data)`),
  scaled to [0, 1] in `compute_dtype`."""
  images = batch['image']
  if hsv_on_device:
    images = device_hsv.apply_hsv_gains(images, batch['hsv_gains'])
  return images.astype(compute_dtype) / 255.0


def make_loss_and_grads(config: ml_collections.ConfigDict, train_graphdef, *, gathered=None
                        ) -> Callable[..., tuple[jax.Array, dict, Any, Any]]:
  """Returns the pure `loss_and_grads(state, batch, text_table, rng) -> (loss, components, new_rest,
  grads)`: the training loss (Sec. 3.5 of the paper: box + cls + dfl + region + moe) of `state['params']`
  on `batch`, its float32 gradient with respect to every parameter, the loss components and the updated
  BatchNorm/MoE statistics (`new_rest`). The train step applies the optimizer to `grads`; tests compare
  them across device counts. Arguments as in `make_train_step`."""
  loss_config = config.loss
  compute_dtype = jnp.dtype(platform_lib.compute_dtype(config.model))
  hsv_on_device = device_hsv.enabled(config.data)

  def loss_and_grads(state: TrainState, batch: dict[str, jax.Array], text_table: jax.Array, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state['step'])
    images = model_images(batch, compute_dtype, hsv_on_device=hsv_on_device)
    points, strides = anchors_for(config)

    def loss_fn(params):
      if gathered is not None:
        params = jax.tree.map(lambda p: jax.lax.with_sharding_constraint(p, gathered), params)
      # copy=True: the BatchStat variables are mutated inside this trace (train-mode BatchNorm).
      model = nnx.merge(train_graphdef, params, state['rest'], copy=True)
      text = model.embed_texts(text_table, batch['text_ids'])
      outputs = model(images, text, rngs=nnx.Rngs(step_rng))
      total, components = losses.detection_loss(outputs, batch, (points, strides), loss_config)
      new_rest = nnx.split(model, nnx.Param, ...)[2]
      return total, (components, new_rest)

    (loss, (components, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    return loss, components, new_rest, grads

  return loss_and_grads


def make_train_step(config: ml_collections.ConfigDict, train_graphdef, recipe: optimizer_lib.Recipe,
                    *, param_shardings=None, gathered=None) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """Returns the pure `train_step(state, batch, text_table, rng, numbers)`.

  batch: the pipeline's dict (docs/internals.md) as global jax.Arrays: image uint8 (B,S,S,3), boxes
  (B,M,4), box_slots (B,M), box_mask (B,M), text_ids (B,K), text_mask (B,K), hsv_gains (B,3) (applied
  to the images when `data.augment.hsv_on_device`, `model_images`). text_table: (V,D) float32
  embeddings (frozen text) or (V,L) int32 token ids (trainable tower), replicated. numbers: the
  schedule's numbers (`recipe.numbers`, replicated scalars); `recipe.transformation(numbers)` is the
  optimizer of the step.

  Sharded weights (FSDP rules): with `gathered` (the replicated sharding of the mesh) and
  `param_shardings` (the params' shardings), the forward pass uses each weight all-gathered whole and the
  gradients return to the weights' shards (a reduce-scatter), as FSDP / ZeRO-3 do. Without this XLA is
  free to keep a weight sharded and split the ACTIVATIONS over its channels instead: on scale m with a
  (4, 4) mesh that moved 49 GB of activations per step through all-gathers (docs/scaling.md).
  """
  skip_nonfinite = config.train.nonfinite == 'skip'
  ema_decay, ema_tau = config.train.ema_decay, config.train.ema_tau

  loss_and_grads = make_loss_and_grads(config, train_graphdef, gathered=gathered)

  def train_step(state: TrainState, batch: dict[str, jax.Array], text_table: jax.Array, rng: jax.Array,
                 numbers: dict[str, jax.Array]):
    loss, components, new_rest, grads = loss_and_grads(state, batch, text_table, rng)
    if param_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    tx = recipe.transformation(numbers)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    finite = jnp.isfinite(loss) & _tree_all_finite(grads)
    new_state = {
        'step': state['step'] + 1,
        'params': params,
        'rest': new_rest,
        'opt_state': opt_state,
        'ema': state['ema'],
    }
    if skip_nonfinite:
      # Keep the old weights, statistics and optimizer moments. Integer leaves (the step counters of the
      # optimizer's schedules) still advance, like state['step'], so the data order and the learning-rate
      # schedule stay those of an uninterrupted run. One conditional picks the whole set: a per-leaf
      # jnp.where costs XLA minutes of compilation (30 s -> 200 s for the tiny step on a CPU).
      new, old = (params, new_rest, opt_state), (state['params'], state['rest'], state['opt_state'])
      chosen = jax.lax.cond(finite, lambda: new, lambda: old)
      kept = jax.tree_util.tree_map(
          lambda n, c: n if jnp.issubdtype(n.dtype, jnp.integer) else c, new, chosen)
      new_state['params'], new_state['rest'], new_state['opt_state'] = kept
    new_state['ema'] = ema_lib.update_ema(
        state['ema'], {'params': new_state['params'], 'rest': new_state['rest']},
        step=new_state['step'], decay=ema_decay, tau=ema_tau)
    metrics = {'loss': loss, **components, 'grad_norm': optax.global_norm(grads),
               'finite': finite.astype(jnp.float32)}
    return new_state, metrics

  return train_step


def jit_train_step(config: ml_collections.ConfigDict, setup: TrainSetup, mesh):
  """The train step jitted once: the state sharded by the rules and donated, the batch split over the
  mesh's data axes, the text table, the rng key and the schedule's numbers replicated."""
  from optisar_jax.runtime import sharding as sharding_lib
  replicated = sharding_lib.replicated(mesh)
  return jax.jit(make_train_step(config, setup.train_graphdef, setup.recipe,
                                 param_shardings=setup.shardings['params'], gathered=replicated),
                 in_shardings=(setup.shardings, sharding_lib.batch_sharding(mesh), replicated, replicated,
                               replicated),
                 out_shardings=(setup.shardings, replicated), donate_argnums=(0,),
                 compiler_options=compile_options.compiler_options(config, 'train'))
