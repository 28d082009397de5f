"""Timing harness: forward, train step, evaluation and input pipeline, one JSON line per measurement.

Every measurement compiles (or warms up) first, then times `repeats` calls, blocking on the result of
each, and reports the median and spread. GFLOPs come from XLA's cost analysis of the compiled
computation (per call), so `gflops_per_s = gflops / median_s` is the achieved rate. Peer comparisons
(`--against ultralytics`) alternate our call and the peer's call inside one process so that both see the
same machine state; `ratio = ours / peer`.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import numpy as np


def cost_gflops(compiled) -> float | None:
  """FLOPs of one call of a compiled jax computation, in GFLOP (None when XLA does not say)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # some backends do not implement cost analysis
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops']) / 1e9


def peak_memory_bytes() -> int | None:
  """Peak device memory in use so far (None on backends without memory stats, e.g. CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    return None
  if not stats:
    return None
  return int(stats.get('peak_bytes_in_use', stats.get('bytes_in_use', 0)))


def time_calls(fn: Callable[[], Any], *, warmup: int, repeats: int) -> list[float]:
  """Wall-clock seconds of `repeats` calls of `fn` after `warmup` calls (each blocked until ready)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def time_alternating(ours: Callable[[], Any], peer: Callable[[], Any], *, warmup: int, repeats: int
                     ) -> tuple[list[float], list[float]]:
  """Times `ours` and `peer` in alternation (ours, peer, ours, ...), after warming up both."""
  for _ in range(warmup):
    jax.block_until_ready(ours())
    peer()
  ours_times, peer_times = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(ours())
    ours_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    peer()
    peer_times.append(time.perf_counter() - start)
  return ours_times, peer_times


def summarize(times: list[float]) -> dict[str, float]:
  return {
      'median_s': statistics.median(times),
      'min_s': min(times),
      'max_s': max(times),
      'stdev_s': statistics.pstdev(times) if len(times) > 1 else 0.0,
      'repeats': len(times),
  }


def record(what: str, config_name: str, batch: int, imgsz: int, times: list[float],
           gflops: float | None, **extra) -> dict[str, Any]:
  """One measurement as the JSON-line dict of the benchmark contract."""
  stats = summarize(times)
  out = {'what': what, 'config': config_name, 'batch': batch, 'imgsz': imgsz, **stats,
         'gflops': gflops,
         'gflops_per_s': (gflops / stats['median_s']) if gflops else None,
         'device': jax.devices()[0].device_kind, 'num_devices': jax.device_count(),
         'peak_memory_bytes': peak_memory_bytes()}
  out.update(extra)
  return out


def random_images(batch: int, imgsz: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (batch, imgsz, imgsz, 3), dtype=np.uint8)
