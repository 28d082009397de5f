"""Checkpoints: the train state, the data iterator state and the config, saved together with Orbax.

Layout under the run's work directory:

    WORKDIR/checkpoints/<step>/{state, data, config}        the last `train.keep_checkpoints` steps
    WORKDIR/checkpoints_best/<step>/{state, data, config}   the best by validation meanIoU (one kept)

* `state`: the train state pytree (params, opt_state, ema, step, ...) as an Orbax PyTree (the layout of
  Orbax's StandardSave; small replicated arrays written whole, see MIN_REPLICA_SLICE_BYTES); every
  process writes its own shards, so nothing is gathered on one host.
* `data`: the input iterator state (JSON): the next global step and what checks it belongs to the run. It
  is the same in every process (checked at each save), so one copy is saved and a checkpoint written by
  P processes restores on any process count (older checkpoints' `{"per_process": [...]}` form too, when
  its entries agree).
* `config`: the run's config (JSON), for reference and for tools.

Restoring takes an abstract tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` built for the
CURRENT mesh (`sharding.abstract_with_shardings`), so a checkpoint written on one mesh or device count
is read onto any other (or onto one CPU).

Atomicity is Orbax's: a step is written to `<step>.orbax-checkpoint-tmp-<n>` and renamed when complete,
so a run killed mid-save leaves a tmp directory that is never taken for the latest step (and is removed
when the next manager opens the directory). A complete checkpoint damaged later (a truncated or missing
file: a failing disk, an interrupted copy) is found when it is restored: `restore_newest_intact` names it
in one line, moves it to `WORKDIR/checkpoints_damaged/<step>` (never deletes it) and restores the next
newest; every process takes the same decision.
On gs:// (no atomic rename) Orbax writes the step in place
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
DAMAGED_SUBDIR = 'checkpoints_damaged'
BEST_METRIC = 'meanIoU'

_BYTES_KEY = '__utf8_bytes__'

# Orbax writes a replicated jax.Array "replica-parallel": each of its R replicas (devices holding a whole
# copy) writes 1/R of it, so that a pod's hosts share the write. Every piece costs an on-device slice (a
# small program compiled per piece shape, on the save's critical path), its own device-to-host copy and
# its own chunk: fixed costs that pay off only for large pieces. An array whose per-replica piece would be
# smaller than this is written whole by one replica instead. On scale m that is at least the 524 of 606
# leaves under 256 KiB (biases, norms, BatchNorm statistics, small kernels: 3 % of the bytes); on the tiny
# config with 8 CPU devices it cut a save of the train state from 16.3 s (first) / 7.1 s (later) to 3.2 s
# (docs/internals.md).
MIN_REPLICA_SLICE_BYTES = 256 * 1024


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """The handler of the `state` item: Orbax's own type handlers, except that jax.Arrays are written with
  `MIN_REPLICA_SLICE_BYTES` (and the same array metadata store as Orbax's default, so the layout on disk
  is unchanged). A registry of our own: Orbax's global one is left as it is."""
  # Orbax 0.12 has no public name for the store its default jax.Array handler is built with.
  from orbax.checkpoint._src.metadata import array_metadata_store
  arrays = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
                                          array_metadata_store=array_metadata_store.Store())
  registry = ocp.type_handlers.create_type_handler_registry(*[
      (ty, arrays if ty is jax.Array else ocp.type_handlers.get_type_handler(ty))
      for ty in ocp.type_handlers.supported_types()])
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _state_restore(abstract, *, partial: bool = False) -> ocp.args.PyTreeRestore:
  """Restore arguments of the `state` item: each leaf read onto its `jax.ShapeDtypeStruct`'s sharding;
  `partial` reads only the keys of `abstract` (the rest of the saved tree is skipped)."""
  return ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                partial_restore=partial)


def _manager(directory, options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, options=options, item_handlers={
      'state': _state_handler(), 'data': ocp.JsonCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()})


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
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save)
    self._manager = _manager(self.directory, self._options)
    self._best_manager = None
    self._best_value: float | None = None
    self._best_options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, cleanup_tmp_directories=True,
        best_fn=lambda metrics: metrics[best_metric], best_mode='max',
        keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save)
    # The best directory is made by the first save_best: a run that never validates leaves none behind.
    if self.best_directory and self.best_directory.is_dir():
      self._best_manager = _manager(self.best_directory, self._best_options)

  @classmethod
  def from_config(cls, workdir: str, config, **kwargs) -> 'TrainCheckpointer':
    """WORKDIR/checkpoints (keeping `config.train.keep_checkpoints`) and WORKDIR/checkpoints_best."""
    return cls(paths.path(workdir) / CHECKPOINT_SUBDIR, max_to_keep=config.train.keep_checkpoints,
               best_directory=paths.path(workdir) / BEST_SUBDIR, **kwargs)

  # ------------------------------------------------------------------------------------------- save
  def _args(self, state, data_state, config) -> ocp.args.Composite:
    states = _gather_json(_encode_data_state(data_state))
    if any(other != states[0] for other in states[1:]):
      raise ValueError(f'input iterator states differ between processes at a checkpoint ({states[0]!r} vs '
                       f'{next(o for o in states[1:] if o != states[0])!r}); they must be one global state')
    data = states[0]
    return ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
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
    if not self.best_directory:
      raise ValueError('this TrainCheckpointer has no best_directory')
    if self._best_manager is None:
      self._best_manager = _manager(self.best_directory, self._best_options)
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
        state=_state_restore(abstract_state), data=ocp.args.JsonRestore()))
    data = restored['data']
    if isinstance(data, dict) and set(data) == {'per_process'}:     # written before the single form
      per_process = data['per_process']
      if any(entry != per_process[0] for entry in per_process[1:]):
        if len(per_process) != jax.process_count():
          raise ValueError(f'checkpoint {step} holds different data states for {len(per_process)} processes; '
                           f'this run has {jax.process_count()}')
        data = per_process[jax.process_index()]
      else:
        data = per_process[0]
    return restored['state'], _decode_data_state(data)

  def restore_newest_intact(self, abstract_state) -> tuple[int, Any, Any] | None:
    """(step, state, data_state) of the newest checkpoint that restores, or None when none does (or there
    is none). A checkpoint that fails to restore on any process is named in one line, moved to
    WORKDIR/checkpoints_damaged/<step> by process 0 and skipped by every process."""
    while True:
      step = self._manager.latest_step()
      if step is None:
        return None
      error = None
      try:
        state, data_state = self._restore(self._manager, step, abstract_state)
      except Exception as err:  # Orbax, TensorStore and asyncio raise many kinds for a damaged file
        error = err
      failed = _gather_json(error is not None)
      if not any(failed):
        return int(step), state, data_state
      self._set_aside(int(step), error)

  def _set_aside(self, step: int, error: BaseException | None) -> None:
    """Moves checkpoint `step` out of the managed directory (process 0) and reopens the manager."""
    source = self.directory / str(step)
    aside_root = self.directory.parent / DAMAGED_SUBDIR
    target = aside_root / str(step)
    n = 1
    while target.exists():
      target = aside_root / f'{step}-{n}'
      n += 1
    reason = f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}' if error else \
        'it failed to restore on another process'
    if jax.process_index() == 0:
      if paths.is_remote(source):    # object stores have no directory rename: copy, then delete
        paths.copy_tree(source, target)
        source.rmtree()
      else:
        aside_root.mkdir(parents=True, exist_ok=True)
        source.rename(target)
      print(f'checkpoint {source} is damaged ({reason[:200]}); moved it to {target} and trying the next newest',
            flush=True)
    if jax.process_count() > 1:
      from optisar_jax.runtime import distributed
      distributed.barrier(f'checkpoint-{step}-set-aside')
    self._manager.close()
    self._manager = _manager(self.directory, self._options)

  def restore_subtree(self, abstract_subtree, *, step: int | None = None, best: bool = False) -> Any:
    """Only the keys of `abstract_subtree` from the saved state (an Orbax partial restore), e.g.
    `{'step': ..., 'ema': {'params': ..., 'rest': ...}}`: evaluation and export read the EMA weights and
    never the optimizer's moments. Leaves are `jax.ShapeDtypeStruct`s with the shardings to restore onto.
    `step` None = the newest checkpoint (or the best one with `best=True`)."""
    manager = self._best_manager if best else self._manager
    if manager is None:
      raise FileNotFoundError(f'{self.best_directory}: no best checkpoint (nothing was validated)')
    if step is None:
      step = manager.best_step() if best else manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {manager.directory}')
    restored = manager.restore(int(step), args=ocp.args.Composite(
        state=_state_restore(abstract_subtree, partial=True)))
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
