"""The training loop: mesh, input, model, shardings, the jitted step, checkpoints, logging, validation.

    train(config, workdir)            # what scripts/train.py runs

Semantics worth knowing:

* Global vs per-process batch: `train.batch_size` is the GLOBAL batch. Each of P processes reads only its
  rows (B / P) of every global batch from the data source and hands them to
  `jax.make_array_from_process_local_data`; the step sees one global array sharded over all devices.
* Resuming: the newest checkpoint in WORKDIR/checkpoints is restored (state, EMA, optimizer, step and the
  input iterator state) onto the current mesh, so a stopped run continues with exactly the batches and
  random numbers an uninterrupted run would have used. SIGTERM saves a checkpoint and exits cleanly.
* Logging: WORKDIR/metrics.jsonl (one JSON object per logged step: step, loss, box, cls, dfl, region,
  moe, lr, grad_norm, ...; validation rows carry `val/` keys), TensorBoard under WORKDIR/tensorboard, and
  a progress line with step, epoch, loss, images/s and ETA.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from optisar_jax.data import pipeline
from optisar_jax.data import sources
from optisar_jax.runtime import checkpoint as checkpoint_lib
from optisar_jax.runtime import distributed
from optisar_jax.runtime import paths
from optisar_jax.train import optimizer as optimizer_lib
from optisar_jax.train import run_logging
from optisar_jax.runtime import sharding as sharding_lib
from optisar_jax.train import step as step_lib
from optisar_jax.text import run_texts as texts_lib

LOSS_KEYS = ('loss', 'box', 'cls', 'dfl', 'region', 'moe')


class NonFiniteLossError(RuntimeError):
  """The loss became NaN/inf (with `train.nonfinite = 'stop'`)."""


def train(config: ml_collections.ConfigDict, workdir: str, *, coordinator_address: str | None = None,
          num_processes: int | None = None, process_id: int | None = None,
          stop_after_steps: int | None = None) -> dict[str, Any]:
  """Trains (resuming from WORKDIR if it holds a checkpoint); returns the last logged metrics.

  `stop_after_steps` stops (with a checkpoint) after that many steps of THIS invocation, as a preemption
  would (used by tests of resumption).
  """
  distributed.initialize(coordinator_address, num_processes, process_id)
  main = jax.process_index() == 0
  paths.makedirs(workdir)
  if main:
    paths.write_json_atomic(paths.path(workdir) / 'config.json', config.to_dict(), sort_keys=True, default=list)

  # ------------------------------------------------------------------------------------------ mesh
  mesh = sharding_lib.make_mesh(config.mesh)
  sharding_lib.local_batch_size(config.train.batch_size, mesh)  # checks divisibility

  # ----------------------------------------------------------------------------------------- input
  source = sources.open_source(config, config.data.train_split)
  texts = texts_lib.prepare_run_texts(config, workdir, lambda: sources.open_source(
      config, config.data.train_split, skip_images=True))
  dataset = pipeline.make_train_dataset(
      source, config, texts.vocabulary, process_index=jax.process_index(),
      process_count=jax.process_count())
  total_steps = dataset.num_steps

  # ------------------------------------------------------------------------------ model + optimizer
  rules = tuple(tuple(rule) for rule in config.mesh.sharding_rules)
  setup = step_lib.setup_training(config, mesh, rules, make_tx=lambda model: optimizer_lib.make_optimizer(
      config.optim, steps_per_epoch=dataset.steps_per_epoch, total_steps=total_steps, params_tree=model))
  state, state_shardings = setup.state, setup.shardings
  schedules = optimizer_lib.make_schedules(
      config.optim, steps_per_epoch=dataset.steps_per_epoch, total_steps=total_steps)

  distributed.barrier('setup')   # Orbax's manager syncs over gloo, which waits only 30 s for stragglers
  checkpointer = checkpoint_lib.TrainCheckpointer.from_config(workdir, config)
  data_iter = dataset.iterator(0)
  start_step = 0
  latest = checkpointer.latest_step()
  if latest is not None:
    abstract = sharding_lib.abstract_with_shardings(jax.eval_shape(lambda: state), state_shardings)
    state, data_state = checkpointer.restore(latest, abstract)
    if data_state is not None:
      data_iter.set_state(data_state)
    start_step = int(jax.device_get(state['step']))
    if main:
      print(f'resumed from {checkpointer.directory} at step {start_step}', flush=True)

  # --------------------------------------------------------------------------------- the jitted step
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  train_step = step_lib.jit_train_step(config, setup, mesh)
  text_table = jax.device_put(texts.table, replicated)
  base_rng = jax.device_put(jax.random.PRNGKey(config.seed), replicated)

  # ----------------------------------------------------------------------------------------- loop
  writer = run_logging.MetricsWriter(workdir)
  printer = run_logging.ProgressPrinter(total_steps, steps_per_epoch=dataset.steps_per_epoch,
                                        global_batch_size=config.train.batch_size,
                                        keys=LOSS_KEYS + ('lr',))
  eval_every = config.train.eval_every_steps or (config.train.eval_every_epochs * dataset.steps_per_epoch)
  last_logged: dict[str, Any] = {}
  pending: list[dict[str, Any]] = []
  skipped = 0
  steps_this_run = 0
  step = start_step
  compiled_step = None
  with jax.set_mesh(mesh), checkpoint_lib.PreemptionGuard() as guard:
    while step < total_steps:
      batch_np = next(data_iter)
      batch = sharding_lib.global_batch_from_process_local(batch_np, batch_sharding)
      if compiled_step is None:   # compiled ahead of the first call, on every process before any runs it
        compiled_step = distributed.compile_together(train_step, state, batch, text_table, base_rng,
                                                     name='train_step')
      state, metrics = compiled_step(state, batch, text_table, base_rng)
      step += 1
      steps_this_run += 1
      pending.append(metrics)
      log_now = step % config.train.log_every == 0 or step == total_steps
      if log_now:
        fetched = jax.device_get(pending)
        pending = []
        for m in fetched:
          if not m['finite']:
            if config.train.nonfinite == 'stop':
              raise NonFiniteLossError(
                  f'non-finite loss at or before step {step} (loss={float(m["loss"])}); '
                  "set --config.train.nonfinite=skip to skip such steps")
            skipped += 1
        row = {k: float(v) for k, v in fetched[-1].items() if k != 'finite'}
        row.update(optimizer_lib.schedule_values(schedules, step - 1))
        row['epoch'] = (step - 1) // dataset.steps_per_epoch + 1
        if skipped:
          row['skipped_steps'] = skipped
        last_logged = writer.write(step, row)
        printer(step, row)
      stop = guard.should_stop(step) or (stop_after_steps is not None and steps_this_run >= stop_after_steps)
      if step % config.train.checkpoint_every == 0 or step == total_steps or stop:
        checkpointer.save(step, state, data_iter.get_state(), config, force=True)
      if eval_every and step % eval_every == 0 and step < total_steps:
        _validate(config, workdir, state, step, checkpointer, data_iter, writer, printer, mesh)
      if stop:
        break
  checkpointer.wait()
  if eval_every and step == total_steps:
    _validate(config, workdir, state, step, checkpointer, data_iter, writer, printer, mesh)
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  printer.close()
  data_iter.close()
  return last_logged


def _validate(config, workdir, state, step, checkpointer, data_iter, writer, printer, mesh) -> None:
  """Evaluates the EMA weights on `data.eval_split`, logs val/ metrics, keeps the best by meanIoU."""
  from optisar_jax import evaluation
  metrics = evaluation.evaluate_state(config, workdir, state, split=config.data.eval_split, mesh=mesh,
                                      progress=False)
  row = {'val/Pr@0.5': metrics['all']['Pr@0.5'], 'val/meanIoU': metrics['all']['meanIoU'],
         'val/cumIoU': metrics['all']['cumIoU']}
  writer.write(step, row)
  printer.message(f'step {step}: val Pr@0.5 {row["val/Pr@0.5"]:.2f}  meanIoU {row["val/meanIoU"]:.2f}')
  if metrics['all']['meanIoU'] is not None:
    checkpointer.save_best(step, state, metrics['all']['meanIoU'], data_iter.get_state(), config)
