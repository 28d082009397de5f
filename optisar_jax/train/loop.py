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

import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np

from optisar_jax import evaluation
from optisar_jax.data import pipeline
from optisar_jax.data import sources
from optisar_jax.runtime import checkpoint as checkpoint_lib
from optisar_jax.runtime import distributed
from optisar_jax.runtime import paths
from optisar_jax.runtime import prefetch as prefetch_lib
from optisar_jax.train import optimizer as optimizer_lib
from optisar_jax.train import run_logging
from optisar_jax.runtime import sharding as sharding_lib
from optisar_jax.train import step as step_lib
from optisar_jax.text import run_texts as texts_lib

LOSS_KEYS = ('loss', 'box', 'cls', 'dfl', 'region', 'moe')


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/inf (with `train.nonfinite = 'stop'`)."""


def train(config: ml_collections.ConfigDict, workdir: str, *, coordinator_address: str | None = None,
          num_processes: int | None = None, process_id: int | None = None,
          stop_after_steps: int | None = None,
          wrap_batches: Callable[[Iterator[Any]], Iterator[Any]] | None = None) -> dict[str, Any]:
  """Trains (resuming from WORKDIR if it holds a checkpoint); returns the last logged metrics plus
  'finished' (False when a stop signal or `stop_after_steps` ended this invocation early; {} plus
  'finished' when the run had already finished before this call).

  `stop_after_steps` stops (with a checkpoint) after that many steps of THIS invocation, as a preemption
  would (used by tests of resumption). `wrap_batches` wraps the iterator of device batches the steps
  consume (`scripts/benchmark.py --what loop` interleaves bare-step intervals with it); for fresh,
  benchmark-only runs: a wrapper that repeats batches makes the saved input state disagree with the data
  the steps saw.
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
  setup = step_lib.setup_training(config, mesh, rules, make_tx=lambda model: optimizer_lib.make_recipe(
      config.optim, steps_per_epoch=dataset.steps_per_epoch, total_steps=total_steps, params_tree=model))
  state, state_shardings = setup.state, setup.shardings
  schedules = optimizer_lib.schedules_from(setup.recipe.numbers)   # the logged lr: the step's own numbers

  distributed.barrier('setup')   # Orbax's manager syncs over gloo, which waits only 30 s for stragglers
  checkpointer = checkpoint_lib.TrainCheckpointer.from_config(workdir, config)
  data_iter = dataset.iterator(0)
  start_step = 0
  if checkpointer.latest_step() is not None:
    abstract = sharding_lib.abstract_with_shardings(jax.eval_shape(lambda: state), state_shardings)
    restored = checkpointer.restore_newest_intact(abstract)      # a damaged newest one is set aside
    if restored is None:
      if main:
        print(f'no intact checkpoint in {checkpointer.directory}: starting from step 0', flush=True)
    else:
      _, state, data_state = restored
      start_step = int(jax.device_get(state['step']))
      # A checkpoint without input state (converted, or from older code) resumes the data at its step.
      data_iter.set_state(data_state if data_state is not None else dataset.state_at(start_step))
      if main:
        print(f'resumed from {checkpointer.directory} at step {start_step}', flush=True)

  # --------------------------------------------------------------------------------- the jitted step
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  train_step = step_lib.jit_train_step(config, setup, mesh)
  text_table = jax.device_put(texts.table, replicated)
  base_rng = jax.device_put(jax.random.PRNGKey(config.seed), replicated)
  numbers = jax.device_put(setup.recipe.numbers, replicated)   # the schedule's: arguments of the step

  # ----------------------------------------------------------------------------------------- loop
  writer = run_logging.MetricsWriter(workdir)
  printer = run_logging.ProgressPrinter(total_steps, steps_per_epoch=dataset.steps_per_epoch,
                                        global_batch_size=config.train.batch_size,
                                        keys=LOSS_KEYS + ('lr',))
  eval_every = config.train.eval_every_steps or (config.train.eval_every_epochs * dataset.steps_per_epoch)
  validator = evaluation.Validator(config, workdir, split=config.data.eval_split, mesh=mesh)
  last_logged: dict[str, Any] = {}
  pending: list[dict[str, Any]] = []
  skipped = 0
  steps_this_run = 0
  step = start_step
  compiled_step = None
  last_log = None                        # (step, time) of the previous log, for the images/s column
  # Host batches come from grain (worker processes); the next `data.device_prefetch` are placed on the
  # devices while the current step runs. The iterator state saved with a checkpoint is that of the step
  # reached, not of the batches already prefetched.
  batches = prefetch_lib.DevicePrefetch(
      data_iter, lambda b: sharding_lib.global_batch_from_process_local(b, batch_sharding),
      size=int(config.data.device_prefetch))
  # Without JAX's preemption service, processes agree on a stop by all-gathering their SIGTERM flags:
  # at log steps only, never a host sync per step.
  guard = checkpoint_lib.PreemptionGuard(sync_every=int(config.train.log_every))
  step_batches = wrap_batches(batches) if wrap_batches is not None else batches
  try:
    with jax.set_mesh(mesh), guard, batches:
      while step < total_steps:
        batch = next(step_batches)
        if compiled_step is None:   # compiled ahead of the first call, on every process before any runs it
          compiled_step = distributed.compile_together(train_step, state, batch, text_table, base_rng,
                                                       numbers, name='train_step')
        state, metrics = compiled_step(state, batch, text_table, base_rng, numbers)
        step += 1
        steps_this_run += 1
        pending.append(metrics)
        log_now = step % config.train.log_every == 0 or step == total_steps
        stop = guard.should_stop(step) or (stop_after_steps is not None and steps_this_run >= stop_after_steps)
        save_now = step % config.train.checkpoint_every == 0 or step == total_steps or stop
        if log_now or save_now:
          # Every step's finiteness is checked before anything is logged or saved: a stop (preemption
          # included) never checkpoints a state that a non-finite step has spoilt.
          fetched = jax.device_get(pending)
          pending = []
          for offset, m in enumerate(fetched):
            if not m['finite']:
              if config.train.nonfinite == 'stop':
                raise NonFiniteLossError(
                    f'non-finite loss at step {step - len(fetched) + offset + 1} (loss={float(m["loss"])}); '
                    "set --config.train.nonfinite=skip to skip such steps")
              skipped += 1
          last_fetched = fetched[-1]
        if log_now:
          row = {k: float(v) for k, v in last_fetched.items() if k != 'finite'}
          row.update(optimizer_lib.schedule_values(schedules, step - 1))
          row['epoch'] = (step - 1) // dataset.steps_per_epoch + 1
          now = time.perf_counter()
          if last_log is not None:          # the first interval holds the compile: no rate for it
            row['images_per_s'] = (step - last_log[0]) * config.train.batch_size / (now - last_log[1])
          last_log = (step, now)
          if skipped:
            row['skipped_steps'] = skipped
          last_logged = writer.write(step, row)
          printer(step, row)
        if save_now:
          checkpointer.save(step, state, dataset.state_at(step), config, force=True)
        if optimizer_lib.validation_due(step, dataset.steps_per_epoch, total_steps, config.train) and step < total_steps:
          _validate(validator, state, step, checkpointer, dataset, writer, printer, config)
        if stop:
          checkpointer.wait()
          printer.message(f'stopped at step {step} of {total_steps} ('
                          f'{"stop signal" if guard.stop_requested or stop_after_steps is None else "stop_after_steps"}'
                          f'); checkpoint {step} saved, the same command continues from it')
          break
  except BaseException:
    # The run ends with an error (a non-finite loss under train.nonfinite='stop' included): the checkpoint
    # being written in the background finishes first, so no save dies half-done with the interpreter.
    _close_quietly(checkpointer, writer, printer, data_iter)
    raise
  checkpointer.wait()
  if eval_every and step == total_steps:
    _validate(validator, state, step, checkpointer, dataset, writer, printer, config)
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  printer.close()
  data_iter.close()
  return {**last_logged, 'finished': step >= total_steps}


def _close_quietly(checkpointer, *others) -> None:
  """Waits for the pending checkpoint and closes everything, never masking the error being raised."""
  import logging
  for close in (checkpointer.wait, checkpointer.close, *[o.close for o in others]):
    try:
      close()
    except Exception:  # noqa: BLE001 - the original error is the one to report
      logging.exception('while closing the run after an error')


def _save_png(path, picture: np.ndarray) -> None:
  """Writes an RGB uint8 array as a PNG, atomically (a reader never sees half of it; local or gs://)."""
  import io
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(picture).save(buffer, format='PNG')
  paths.write_bytes_atomic(path, buffer.getvalue())


def _validate(validator, state, step, checkpointer, dataset, writer, printer, config) -> None:
  """Evaluates the EMA weights on `data.eval_split`, logs val/ metrics, keeps the best by meanIoU."""
  metrics = validator(state)
  row = {'val/Pr@0.5': metrics['all']['Pr@0.5'], 'val/meanIoU': metrics['all']['meanIoU'],
         'val/cumIoU': metrics['all']['cumIoU']}
  writer.write(step, row)
  printer.message(f'step {step}: val Pr@0.5 {row["val/Pr@0.5"]:.2f}  meanIoU {row["val/meanIoU"]:.2f}')
  shown = int(config.train.val_examples_shown)
  if shown > 0 and jax.process_index() == 0 and validator.last_results:
    picture = validator.examples_picture(shown)       # ground truth green, prediction red
    writer.write_image(step, 'val/examples', picture)
    _save_png(paths.path(validator.workdir) / 'val' / f'step_{step}.png', picture)
  if metrics['all']['meanIoU'] is not None:
    checkpointer.save_best(step, state, metrics['all']['meanIoU'], dataset.state_at(step), config)
