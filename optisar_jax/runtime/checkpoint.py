"""Checkpoints: the train state, the data iterator state and the config, saved together with Orbax.

Layout under the run's work directory:

    WORKDIR/checkpoints/<step>/{state, data, config}        the last `train.keep_checkpoints` steps
    WORKDIR/checkpoints_best/<step>/{state, data, config}   the best by validation meanIoU (one kept)

* `state`: the train state pytree (params, opt_state, ema, step, ...) as Orbax `StandardSave`; every
  process writes its own shards, so nothing is gathered on one host.
* `data`: the data iterator state (JSON). With several processes the states of all processes are
  gathered and saved as `{"per_process": [...]}`; each process restores its own entry.
* `config`: the run's config (JSON), for reference and for tools.

Restoring takes an abstract tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` built for the
CURRENT mesh (`sharding.abstract_with_shardings`), so a checkpoint written on one mesh or device count
is read onto any other (or onto one CPU).

Atomicity is Orbax's: a step is written to `<step>.orbax-checkpoint-tmp-<n>` and renamed when complete,
so a run killed mid-save leaves a tmp directory that is never taken for the latest step (and is removed
when the next manager opens the directory). On gs:// (no atomic rename) Orbax writes the step in place
and marks it complete with `<step>/commit_success.txt`. Directories are `epath.Path`s (runtime/paths.py).

`PreemptionGuard` turns SIGTERM (the scheduler's preemption notice) into a flag the loop checks every
step; with several processes all of them agree on the step at which to save (JAX's preemption sync
point), so the collective save never deadlocks.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from optisar_jax.runtime import paths

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = 'checkpoints'
BEST_SUBDIR = 'checkpoints_best'
BEST_METRIC = 'meanIoU'

_BYTES_KEY = '__utf8_bytes__'


def config_to_dict(config) -> Any:
  """A JSON-compatible copy of a ConfigDict / dict / None."""
  if config is None:
    return {}
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def _encode_data_state(data_state) -> Any:
  if isinstance(data_state, (bytes, bytearray)):
    return {_BYTES_KEY: bytes(data_state).decode('utf-8')}
  return data_state


def _decode_data_state(data_state) -> Any:
  if isinstance(data_state, dict) and set(data_state) == {_BYTES_KEY}:
    return data_state[_BYTES_KEY].encode('utf-8')
  return data_state


def _gather_json(value) -> list[Any]:
  """`value` (JSON-compatible) of every process, in process order (a collective: all processes call it)."""
  if jax.process_count() == 1:
    return [value]
  payload = np.frombuffer(json.dumps(value).encode('utf-8'), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([payload.size], np.int32))).reshape(-1)
  padded = np.zeros((int(lengths.max()),), np.uint8)
  padded[:payload.size] = payload
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return [json.loads(bytes(row[:n]).decode('utf-8')) for row, n in zip(gathered, lengths)]


class TrainCheckpointer:
  """Saves and restores (state, data iterator state, config) with an Orbax `CheckpointManager`.

  All processes must call `save`, `save_best` and `restore` (they are collective).
  """

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, best_directory: str | None = None,
               best_metric: str = BEST_METRIC, async_save: bool = True):
    self.directory = paths.path(directory)      # an epath.Path: Orbax writes gs:// through it as well
    self.best_directory = paths.path(best_directory) if best_directory else None
    self.best_metric = best_metric
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save))
    self._best_manager = None
    self._best_value: float | None = None
    if self.best_directory:
      self._best_manager = ocp.CheckpointManager(
          self.best_directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, cleanup_tmp_directories=True,
              best_fn=lambda metrics: metrics[best_metric], best_mode='max',
              keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save))

  @classmethod
  def from_config(cls, workdir: str, config, **kwargs) -> 'TrainCheckpointer':
    """WORKDIR/checkpoints (keeping `config.train.keep_checkpoints`) and WORKDIR/checkpoints_best."""
    return cls(paths.path(workdir) / CHECKPOINT_SUBDIR, max_to_keep=config.train.keep_checkpoints,
               best_directory=paths.path(workdir) / BEST_SUBDIR, **kwargs)

  # ------------------------------------------------------------------------------------------- save
  def _args(self, state, data_state, config) -> ocp.args.Composite:
    states = _gather_json(_encode_data_state(data_state))
    data = states[0] if len(states) == 1 else {'per_process': states}
    return ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data),
        config=ocp.args.JsonSave(config_to_dict(config)))

  def save(self, step: int, state, data_state=None, config=None, force: bool = False) -> bool:
    """Starts saving `step` (asynchronously); returns whether a save was started.

    `force=True` saves even if the manager's policy would skip this step (e.g. at preemption). A step that
    is already saved (a preemption or the end of training right after a periodic save) is skipped.
    """
    if int(step) in self._manager.all_steps():
      return False
    return self._manager.save(int(step), args=self._args(state, data_state, config), force=force)

  def best_value(self) -> float | None:
    """The metric of the kept best checkpoint, None when there is none."""
    if self._best_manager is None:
      return None
    if self._best_value is None:
      step = self._best_manager.best_step()
      metrics = None if step is None else self._best_manager.metrics(step)
      if metrics is not None:
        self._best_value = float(metrics[self.best_metric])
    return self._best_value

  def save_best(self, step: int, state, metric_value: float, data_state=None, config=None) -> bool:
    """Saves `step` to the best directory if `metric_value` beats the kept best; returns whether it did."""
    if self._best_manager is None:
      raise ValueError('this TrainCheckpointer has no best_directory')
    best = self.best_value()
    if best is not None and not float(metric_value) > best:
      return False
    self._best_manager.wait_until_finished()
    saved = self._best_manager.save(int(step), args=self._args(state, data_state, config),
                                    metrics={self.best_metric: float(metric_value)}, force=True)
    if saved:
      self._best_value = float(metric_value)
    return saved

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()
    if self._best_manager is not None:
      self._best_manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the managers."""
    self.wait()
    self._manager.close()
    if self._best_manager is not None:
      self._best_manager.close()

  # ---------------------------------------------------------------------------------------- restore
  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step (None when there is none)."""
    return self._manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    """Steps of all complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The step kept in the best directory (None when there is none)."""
    return None if self._best_manager is None else self._best_manager.best_step()

  def _restore(self, manager, step, abstract_state):
    if step is None:
      step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {manager.directory}')
    restored = manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    data = restored['data']
    if isinstance(data, dict) and set(data) == {'per_process'}:
      per_process = data['per_process']
      if len(per_process) != jax.process_count():
        raise ValueError(f'checkpoint {step} holds data states of {len(per_process)} processes; this run has '
                         f'{jax.process_count()}')
      data = per_process[jax.process_index()]
    return restored['state'], _decode_data_state(data)

  def restore_subtree(self, abstract_subtree, *, step: int | None = None, best: bool = False) -> Any:
    """Only the keys of `abstract_subtree` from the saved state (an Orbax partial restore), e.g.
    `{'step': ..., 'ema': {'params': ..., 'rest': ...}}`: evaluation and export read the EMA weights and
    never the optimizer's moments. Leaves are `jax.ShapeDtypeStruct`s with the shardings to restore onto.
    `step` None = the newest checkpoint (or the best one with `best=True`)."""
    manager = self._best_manager if best else self._manager
    if manager is None:
      raise ValueError('this TrainCheckpointer has no best_directory')
    if step is None:
      step = manager.best_step() if best else manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {manager.directory}')
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
    restored = manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=abstract_subtree, restore_args=restore_args, partial_restore=True)))
    return restored['state']

  def restore(self, step: int | None, abstract_state) -> tuple[Any, Any]:
    """(state, data_state) of `step` (None = latest) laid out as `abstract_state` says.

    `abstract_state`: the train state's tree of `jax.ShapeDtypeStruct`s with the current mesh's shardings
    (`sharding.abstract_with_shardings(jax.eval_shape(init_fn), shardings)`).
    """
    return self._restore(self._manager, step, abstract_state)

  def restore_best(self, abstract_state) -> tuple[Any, Any]:
    """(state, data_state) of the best checkpoint."""
    if self._best_manager is None:
      raise ValueError('this TrainCheckpointer has no best_directory')
    return self._restore(self._best_manager, self._best_manager.best_step(), abstract_state)

  def restore_config(self, step: int | None = None) -> dict:
    """The config dict saved with `step` (None = latest)."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    return self._manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']


class PreemptionGuard:
  """Turns SIGTERM into a clean stop: the loop saves a checkpoint and exits when `should_stop(step)`.

      with PreemptionGuard() as guard:
        for step in ...:
          state, metrics = train_step(...)
          if guard.should_stop(step):
            checkpointer.save(step, state, data_state, config, force=True); checkpointer.wait(); break

    One process: a Python signal handler sets a flag (a second signal is not swallowed: the previous
    handler is restored after the first).
    Several processes: JAX's preemption service (on by default, started by jax.distributed.initialize)
    catches the signal and `multihost_utils.reached_preemption_sync_point(step)` becomes True on every
    process at the same step; `should_stop` must then be called at every step by all processes. If the
    service is off, the processes combine their local flags with an all-gather every `sync_every` steps.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM,), sync_every: int = 1):
    self.signals = tuple(signals)
    self.sync_every = max(int(sync_every), 1)
    self._flag = threading.Event()
    self._previous: dict[int, Any] = {}
    self._use_sync_point = False

  def _handler(self, signum, frame):
    del frame
    logger.warning('received signal %d: will checkpoint and stop at the next step', signum)
    self._flag.set()
    self._restore_handlers()

  def _restore_handlers(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def install(self) -> 'PreemptionGuard':
    """Installs the handlers (from the main thread); multi-process runs use JAX's sync point instead."""
    multiprocess = jax.process_count() > 1
    self._use_sync_point = multiprocess and bool(jax.config.jax_enable_preemption_service)
    if not self._use_sync_point:
      self._install_handlers()
    return self

  def _install_handlers(self) -> None:
    if self._previous or threading.current_thread() is not threading.main_thread():
      return
    for signum in self.signals:
      self._previous[signum] = signal.signal(signum, self._handler)

  def uninstall(self) -> None:
    """Restores the previous signal handlers."""
    self._restore_handlers()

  def __enter__(self) -> 'PreemptionGuard':
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()

  def request_stop(self) -> None:
    """Sets the flag as a signal would (for tests and for programmatic stops on one process)."""
    self._flag.set()

  @property
  def stop_requested(self) -> bool:
    """Whether this process has seen a stop signal."""
    return self._flag.is_set()

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; the same answer on every process."""
    if jax.process_count() == 1:
      return self._flag.is_set()
    if self._use_sync_point:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(int(step)))
      except RuntimeError:
        logger.warning('JAX preemption sync manager unavailable; falling back to all-gathered flags')
        self._use_sync_point = False
        self._install_handlers()
    if int(step) % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.asarray([int(self._flag.is_set())], np.int32))
    return bool(np.asarray(flags).any())
