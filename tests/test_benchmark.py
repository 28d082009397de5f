"""The timing harness's own arithmetic: FLOP counts, statistics and the alternation order."""

import statistics

import jax
import jax.numpy as jnp
import pytest

from optisar_jax import benchmark


def test_cost_gflops_counts_a_matmul():
  x = jnp.ones((64, 32), jnp.float32)
  compiled = jax.jit(lambda a, b: a @ b).lower(x, x.T).compile()
  assert benchmark.cost_gflops(compiled) == pytest.approx(2 * 64 * 32 * 64 / 1e9)


def test_summarize_and_alternation_order():
  stats = benchmark.summarize([3.0, 1.0, 2.0, 10.0])
  assert stats == {'median_s': 2.5, 'min_s': 1.0, 'max_s': 10.0,
                   'stdev_s': pytest.approx(3.5355, rel=1e-4), 'repeats': 4}
  calls = []
  ours_times, peer_times = benchmark.time_alternating(
      lambda: calls.append('ours'), lambda: calls.append('peer'), warmup=1, repeats=3, pause_s=0.0)
  assert calls == ['ours', 'peer'] * 4
  assert len(ours_times) == len(peer_times) == 3


def test_timing_counts_warmup_and_repeats(monkeypatch):
  """Warm-up calls are not timed; each timed call reports its own duration (a fake clock that advances
  1 s per call makes every timing exactly 1.0 s)."""
  clock = {'t': 0.0}
  calls = []
  monkeypatch.setattr(benchmark.time, 'perf_counter', lambda: clock['t'])

  def fn():
    calls.append(1)
    clock['t'] += 1.0

  times = benchmark.time_calls(fn, warmup=2, repeats=3)
  assert len(calls) == 2 + 3 and times == [1.0, 1.0, 1.0]


def test_record_reports_the_achieved_rate():
  out = benchmark.record('forward', 'tiny.py', 1, 64, [0.5, 0.5, 0.5], 2.0, ratio=1.1)
  assert out['gflops_per_s'] == 4.0 and out['median_s'] == 0.5 and out['ratio'] == 1.1
  assert out['num_devices'] == jax.device_count()


@pytest.mark.slow
def test_forward_against_another_cpu_kernel_choice():
  """--against_cpu_ynnpack: the same forward compiled twice (the config's kernels and 'all'), alternated."""
  from optisar_jax.config import load_config
  config = load_config('tiny')
  out = benchmark.bench_forward(config, 'tiny.py', 1, 64, warmup=1, repeats=2, against_cpu_ynnpack='all')
  assert out['peer'] == 'xla.cpu_ynnpack_eval=all' and out['repeats'] == 2
  assert out['ratio'] == pytest.approx(out['median_s'] / out['peer_median_s'])
  assert out['gflops'] > 0
  with pytest.raises(ValueError, match="'xla.cpu_ynnpack_eval': 'fast' is not one of"):
    benchmark.bench_forward(load_config('tiny'), 'tiny.py', 1, 64, warmup=1, repeats=1, against_cpu_ynnpack='fast')


def test_loop_benchmark_pairs_loop_and_bare_intervals(monkeypatch):
  """`--what loop`: after the compile interval, cycles of (loop, loop, bare, bare) log intervals; a bare
  interval reuses the previous device batch (the input is not read), and only the second interval of each
  pair is measured. A stand-in for the training loop consumes the wrapped batches as the real one does and
  logs known rates, so the reported medians and per-cycle ratios are exact."""
  from optisar_jax.config import load_config
  from optisar_jax.train import loop, run_logging

  log_every, warmup, repeats = 3, 1, 2
  pulled, consumed, logged = [], [], []

  def upstream():
    for i in range(10 ** 6):
      pulled.append(i)
      yield i

  def fake_train(config, workdir, *, wrap_batches):
    steps = int(config.train.num_steps)
    assert steps == log_every * (1 + 4 * (warmup + repeats)) and int(config.train.log_every) == log_every
    batches = wrap_batches(upstream())
    for step in range(1, steps + 1):
      consumed.append(next(batches))
      if step % log_every == 0 and step > log_every:
        interval = step // log_every - 1          # the interval this log closes
        rate = 100.0 + interval if benchmark._BareIntervals.phase(interval).startswith('loop') else 200.0 + interval
        logged.append({'step': step, 'images_per_s': rate})
    return {}

  monkeypatch.setattr(loop, 'train', fake_train)
  monkeypatch.setattr(run_logging, 'read_metrics', lambda workdir: [{'step': 3, 'loss': 1.0}] + logged)
  monkeypatch.setattr(benchmark, '_synthetic_source', lambda config, n, split: None)
  out = benchmark.bench_loop(load_config('tiny'), 'tiny', 4, 64, warmup=warmup, repeats=repeats,
                             log_every=log_every)

  # Intervals 0..12: compile, then (loop, loop*, bare, bare*) x 3; the starred ones of cycles 2 and 3 count.
  assert [benchmark._BareIntervals.phase(k) for k in range(6)] == [
      'compile', 'loop', 'loop measured', 'bare', 'bare measured', 'loop']
  assert out['images_per_s'] == pytest.approx(statistics.median([100.0 + 6, 100.0 + 10]))
  assert out['step_images_per_s'] == pytest.approx(statistics.median([200.0 + 8, 200.0 + 12]))
  assert out['paired_ratios'] == pytest.approx([106 / 208, 110 / 212])
  assert out['loop_vs_step'] == pytest.approx(108 / 210)
  assert out['settle_images_per_s'] == pytest.approx(statistics.median([100.0 + 5, 100.0 + 9]))
  assert out['repeats'] == repeats and out['worker_count'] == 0 and out['log_every'] == log_every
  # Bare intervals repeat the last batch of the loop pair before them and read nothing upstream.
  per_interval = [consumed[k * log_every:(k + 1) * log_every] for k in range(13)]
  assert per_interval[3] == per_interval[4] == [per_interval[2][-1]] * log_every
  assert per_interval[5] == [per_interval[2][-1] + 1 + j for j in range(log_every)]
  assert len(pulled) == log_every * (1 + 2 * (warmup + repeats))
