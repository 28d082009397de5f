"""Run logs: WORKDIR/metrics.jsonl, TensorBoard event files, and a progress line on the console.

`MetricsWriter(workdir)` appends one JSON object per logged step to `WORKDIR/metrics.jsonl`
(`{"step": 100, "loss": 3.2, "box": ..., "cls": ..., "lr": ...}`), flushed at every write so a crashed
or preempted run keeps everything logged so far, and writes the same scalars to TensorBoard under
`WORKDIR/tensorboard`. Only process 0 writes; the others get a writer that does nothing, so the loop
calls it unconditionally. A resumed run appends to the same file.

Remote workdirs (`gs://...`, optisar_jax/runtime/paths.py). Object stores cannot append to an object
(gcsfs opens mode 'a' as an overwrite and uploads only at close), and tensorboardX's own `gs://` writer
goes through google-cloud-storage's client, not epath, and re-uploads its file at every flush. So with a
remote workdir both files are written to a local staging directory exactly as for a local workdir
(metrics.jsonl first downloaded from the workdir when a resumed run finds one), and `sync()` uploads
every file that changed since the last upload as a whole object (atomic: a reader sees the previous
upload or the new one, never a torn file). `write` syncs when `sync_seconds` have passed since the last
upload (the first write syncs at once), `close` always does; a run that dies without closing loses at
most the last `sync_seconds` of rows, which its resumption (from the last checkpoint) logs again.

`ProgressPrinter` prints `step/total, epoch, loss components, images/s, ETA`: on a terminal one line
rewritten in place, otherwise (log files, CI) one line per call.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import sys
import tempfile
import time
import uuid
import weakref
from typing import Any, Mapping, TextIO

import jax
import numpy as np

from optisar_jax.runtime import paths

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_SUBDIR = 'tensorboard'
REMOTE_SYNC_SECONDS = 30.0


def to_python_scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Floats / ints from jax or numpy scalars (non-finite floats become None, valid JSON)."""
  out = {}
  for name, value in metrics.items():
    if isinstance(value, (str, bool)) or value is None:
      out[name] = value
      continue
    array = np.asarray(jax.device_get(value))
    if array.size != 1:
      raise ValueError(f'metric {name!r} has shape {array.shape}; only scalars are logged')
    scalar = array.reshape(()).item()
    if isinstance(scalar, float) and not math.isfinite(scalar):
      scalar = None
    out[name] = scalar
  return out


class MetricsWriter:
  """metrics.jsonl + TensorBoard scalars, written by process 0 only.

  `workdir`: a local directory or a remote URL (`gs://bucket/run`); `sync_seconds`: for a remote
  workdir, the least time between two uploads of the staged files (module docstring).
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None,
               sync_seconds: float = REMOTE_SYNC_SECONDS):
    self.workdir = str(paths.path(workdir))
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = str(paths.path(workdir) / METRICS_FILE)
    self.remote = paths.is_remote(workdir)
    self.sync_seconds = float(sync_seconds)
    self._file = None
    self._tb = None
    self._staging: str | None = None
    self._uploaded: dict[str, tuple[int, int]] = {}
    self._last_sync = -math.inf
    if not self.enabled:
      return
    local_dir = self.workdir
    if self.remote:
      self._staging = tempfile.mkdtemp(prefix='optisar-run-logs-')
      # Removed with the writer (or at exit) when a crashed run never calls close.
      self._cleanup = weakref.finalize(self, shutil.rmtree, self._staging, True)
      local_dir = self._staging
      if paths.isfile(self.path):    # a resumed run goes on appending to the uploaded rows
        paths.copy_file(self.path, os.path.join(local_dir, METRICS_FILE))
        self._uploaded[METRICS_FILE] = self._signature(METRICS_FILE)
    else:
      os.makedirs(local_dir, exist_ok=True)
    self._file = open(os.path.join(local_dir, METRICS_FILE), 'a', encoding='utf-8')
    if tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
      # A suffix of its own: the default name (seconds and host) is the same for a run resumed within
      # the second, whose writer would replace the first one's file.
      self._tb = SummaryWriter(os.path.join(local_dir, TENSORBOARD_SUBDIR),
                               filename_suffix=f'.{os.getpid()}.{uuid.uuid4().hex[:6]}')

  def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = '') -> dict[str, Any]:
    """Logs `metrics` (scalars) for `step`; returns the record written. `prefix` namespaces TB tags."""
    record = {'step': int(step), **to_python_scalars(metrics)}
    if not self.enabled:
      return record
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    if self._tb is not None:
      for name, value in record.items():
        if name != 'step' and isinstance(value, numbers.Real) and not isinstance(value, bool):
          self._tb.add_scalar(prefix + name, value, int(step))
      self._tb.flush()
    if self.remote and time.monotonic() - self._last_sync >= self.sync_seconds:
      self.sync()
    return record

  def write_image(self, step: int, name: str, image) -> None:
    """Logs an RGB uint8 (H, W, 3) picture to TensorBoard under `name` (process 0; no-op without TB)."""
    if self.enabled and self._tb is not None:
      self._tb.add_image(name, np.asarray(image), int(step), dataformats='HWC')
      self._tb.flush()

  def _signature(self, relative: str) -> tuple[int, int]:
    info = os.stat(os.path.join(self._staging, relative))
    return info.st_size, info.st_mtime_ns

  def sync(self) -> list[str]:
    """Uploads the staged files that changed since their last upload to the remote workdir (whole
    objects); returns their paths relative to the workdir. Nothing to do for a local workdir."""
    if self._staging is None:
      return []
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()
    uploaded = []
    for relative in paths.list_files(self._staging):
      signature = self._signature(relative)
      if self._uploaded.get(relative) == signature:
        continue
      paths.copy_file(os.path.join(self._staging, relative), paths.path(self.workdir) / relative)
      self._uploaded[relative] = signature
      uploaded.append(relative)
    self._last_sync = time.monotonic()
    return uploaded

  def close(self) -> None:
    """Closes the files and, for a remote workdir, uploads them and removes the staging directory
    (further writes are an error)."""
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._staging is not None:
      self.sync()
      self._cleanup()
      self._staging = None

  def __enter__(self) -> 'MetricsWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of WORKDIR/metrics.jsonl (a torn last line from a killed run is skipped)."""
  text = (paths.path(workdir) / METRICS_FILE).read_text(encoding='utf-8')
  records = []
  for line in text.splitlines():
    line = line.strip()
    if not line:
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records


def _format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return '--:--'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes:02d}:{secs:02d}'


def _format_value(value) -> str:
  if value is None:
    return 'nan'
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


class ProgressPrinter:
  """`step/total  epoch e/E  loss .. box .. cls ..  123.4 img/s  ETA 1:02:03` on process 0.

  On a TTY the line is rewritten in place (carriage return); otherwise each call prints a new line.
  Throughput and ETA come from the wall time between calls (the first call only starts the clock).
  """

  def __init__(self, total_steps: int, *, steps_per_epoch: int | None = None, global_batch_size: int = 1,
               stream: TextIO | None = None, tty: bool | None = None, enabled: bool | None = None,
               keys: tuple[str, ...] | None = None):
    self.total_steps = int(total_steps)
    self.steps_per_epoch = steps_per_epoch
    self.global_batch_size = int(global_batch_size)
    self.stream = stream if stream is not None else sys.stdout
    self.tty = bool(getattr(self.stream, 'isatty', lambda: False)()) if tty is None else tty
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.keys = keys
    self._last: tuple[int, float] | None = None
    self._rate: float | None = None
    self._open_line = False

  def line(self, step: int, metrics: Mapping[str, Any], now: float | None = None) -> str:
    """The progress text for `step` (updates the throughput estimate)."""
    now = time.perf_counter() if now is None else now
    if self._last is not None and step > self._last[0] and now > self._last[1]:
      rate = (step - self._last[0]) / (now - self._last[1])
      self._rate = rate if self._rate is None else 0.7 * self._rate + 0.3 * rate
    self._last = (int(step), now)
    parts = [f'{int(step)}/{self.total_steps}']
    if self.steps_per_epoch:
      epochs = self.total_steps / self.steps_per_epoch
      # step counts completed steps: step s belongs to epoch (s - 1) // steps_per_epoch + 1.
      parts.append(f"epoch {max(int(step) - 1, 0) // self.steps_per_epoch + 1}/{math.ceil(epochs)}")
    values = to_python_scalars({k: v for k, v in metrics.items() if self.keys is None or k in self.keys})
    parts.append(' '.join(f'{name} {_format_value(value)}' for name, value in values.items()))
    if self._rate:
      parts.append(f'{self._rate * self.global_batch_size:.1f} img/s')
      parts.append(f'ETA {_format_duration((self.total_steps - int(step)) / self._rate)}')
    return '  '.join(part for part in parts if part)

  def __call__(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Prints the progress for `step`."""
    text = self.line(step, metrics)
    if not self.enabled:
      return
    if self.tty:
      self.stream.write('\r\x1b[2K' + text)
      self._open_line = True
    else:
      self.stream.write(text + '\n')
    self.stream.flush()

  def message(self, text: str) -> None:
    """Prints a whole line (e.g. an eval result) without breaking the in-place progress line."""
    if not self.enabled:
      return
    if self._open_line:
      self.stream.write('\n')
      self._open_line = False
    self.stream.write(text + '\n')
    self.stream.flush()

  def close(self) -> None:
    """Ends the in-place line."""
    if self.enabled and self._open_line:
      self.stream.write('\n')
      self.stream.flush()
      self._open_line = False
