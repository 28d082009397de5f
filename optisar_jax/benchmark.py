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

from optisar_jax.runtime import compile_options


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
  """Wall-clock seconds of `fn` (blocked until its result is ready) after `warmup` calls, `repeats` times."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def time_alternating(ours: Callable[[], Any], peer: Callable[[], Any], *, warmup: int, repeats: int,
                     pause_s: float = 0.5) -> tuple[list[float], list[float]]:
  """Times `ours` and `peer` in alternation (ours, peer, ours, ...), after warming up both.

  Each timed call starts after `pause_s` of idleness: a runtime's worker threads keep spinning for a
  while after their work is done (OpenMP's block time is ~200 ms), and without the pause they take cores
  from the call that follows.
  """
  for _ in range(warmup):
    jax.block_until_ready(ours())
    peer()
  ours_times, peer_times = [], []
  for _ in range(repeats):
    time.sleep(pause_s)
    start = time.perf_counter()
    jax.block_until_ready(ours())
    ours_times.append(time.perf_counter() - start)
    time.sleep(pause_s)
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


# ------------------------------------------------------------------------------------ measurements
def _fresh_weights(config):
  """Eval-mode (params, rest) of a freshly initialised model (timings do not depend on the values)."""
  from flax import nnx
  from optisar_jax.grounding import GroundingModel
  model = GroundingModel(config, rngs=nnx.Rngs(config.seed))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, params, rest


def _with_cpu_ynnpack(config, program: str, choice: str):
  """A copy of the config whose `xla.cpu_ynnpack_<program>` is `choice`."""
  import ml_collections
  other = ml_collections.ConfigDict(config.to_dict())
  other.xla[f'cpu_ynnpack_{program}'] = choice
  compile_options.compiler_options(other, program)        # validates the choice
  return other


def bench_forward(config, config_name: str, batch: int, imgsz: int, *, warmup: int, repeats: int,
                  against: str | None = None, threads: int | None = None,
                  against_cpu_ynnpack: str | None = None) -> dict[str, Any]:
  """Eval-mode forward (backbone + neck + head, one query per image, decoded top-1 box).

  `against_cpu_ynnpack`: also time the same program compiled with `xla.cpu_ynnpack_eval` = that choice,
  alternating in this process (the peer is then that program)."""
  import jax.numpy as jnp
  from optisar_jax import evaluation
  config.data.imgsz = imgsz
  other_config = _with_cpu_ynnpack(config, 'eval', against_cpu_ynnpack) if against_cpu_ynnpack else None
  graphdef, params, rest = _fresh_weights(config)

  def compile_predict(cfg):
    predict = jax.jit(evaluation.make_predict_fn(cfg, graphdef),
                      compiler_options=compile_options.compiler_options(cfg, 'eval'))
    return predict.lower(params, rest, images, queries).compile()

  images = jnp.asarray(random_images(batch, imgsz))
  queries = jnp.asarray(np.random.default_rng(1).normal(size=(batch, 1, config.text.dim)), jnp.float32)
  queries = queries / jnp.linalg.norm(queries, axis=-1, keepdims=True)
  compiled = compile_predict(config)
  gflops = cost_gflops(compiled)
  ours = lambda: compiled(params, rest, images, queries)
  if against or against_cpu_ynnpack:
    if against_cpu_ynnpack:
      other = compile_predict(other_config)
      peer = lambda: jax.block_until_ready(other(params, rest, images, queries))
      against = f'xla.cpu_ynnpack_eval={against_cpu_ynnpack}'
    else:
      peer = _peer(against, config, batch, imgsz, 'forward', threads)
    t_ours, t_peer = time_alternating(ours, peer, warmup=warmup, repeats=repeats)
    peer_stats = summarize(t_peer)
    name = against if against_cpu_ynnpack else against + _peer_name(config)
    return record('forward', config_name, batch, imgsz, t_ours, gflops, peer=name,
                  peer_median_s=peer_stats['median_s'],
                  ratio=summarize(t_ours)['median_s'] / peer_stats['median_s'])
  return record('forward', config_name, batch, imgsz, time_calls(ours, warmup=warmup, repeats=repeats), gflops)


def _peer_name(config) -> str:
  return f':yoloe-11{config.model.scale}'


def _peer(against: str, config, batch: int, imgsz: int, mode: str, threads: int | None):
  if against != 'ultralytics':
    raise ValueError(f'--against {against!r}: only ultralytics is supported')
  from optisar_jax import peers
  scale = config.model.scale
  if scale not in ('n', 's', 'm', 'l', 'x'):
    raise ValueError(f'--against ultralytics needs a standard scale (n/s/m/l/x), config has {scale!r}')
  import os
  threads = threads or os.cpu_count() or 1
  return peers.build_ultralytics_peer(scale, imgsz, batch, threads, mode)


def bench_train_step(config, config_name: str, batch: int, imgsz: int, *, warmup: int, repeats: int,
                     against: str | None = None, threads: int | None = None,
                     against_cpu_ynnpack: str | None = None) -> dict[str, Any]:
  """One optimizer step (forward, assigner, losses, backward, AdamW, EMA) on a random batch.


  `against_cpu_ynnpack`: also time the same step compiled with `xla.cpu_ynnpack_train` = that choice, on
  its own copy of the state, alternating in this process."""
  import jax.numpy as jnp
  from optisar_jax.train import optimizer as optimizer_lib
  from optisar_jax.runtime import sharding as sharding_lib
  from optisar_jax.train import step as step_lib
  config.data.imgsz = imgsz
  config.train.batch_size = batch
  other_config = _with_cpu_ynnpack(config, 'train', against_cpu_ynnpack) if against_cpu_ynnpack else None
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = tuple(tuple(rule) for rule in config.mesh.sharding_rules)
  setup = step_lib.setup_training(config, mesh, rules, make_tx=lambda model: optimizer_lib.make_recipe(
      config.optim, steps_per_epoch=100, total_steps=10000, params_tree=model))
  state = setup.state
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  step_fn = step_lib.jit_train_step(config, setup, mesh)
  rng = np.random.default_rng(0)
  k, m = int(config.data.max_text_slots), int(config.data.max_boxes)
  xy = rng.uniform(0, imgsz * 0.6, (batch, m, 2))
  wh = rng.uniform(16, imgsz * 0.3, (batch, m, 2))
  batch_np = {
      'image': random_images(batch, imgsz), 'boxes': np.concatenate([xy, xy + wh], -1).astype(np.float32),
      'box_slots': rng.integers(0, k, (batch, m)).astype(np.int32),
      'box_mask': (np.arange(m)[None] < 4).repeat(batch, 0), 'text_ids': np.tile(np.arange(k, dtype=np.int32), (batch, 1)),
      'text_mask': np.ones((batch, k), bool), 'domain': np.zeros((batch,), np.int32),
      # own generator: the text table below stays the one earlier benchmarks drew
      'hsv_gains': (1 + np.random.default_rng(1).uniform(-1, 1, (batch, 3)) * 0.5).astype(np.float32)}
  if config.text.mode == 'trainable':
    table = rng.integers(3, int(config.text.tower.vocab_size), (k, int(config.text.tower.context_length))).astype(np.int32)
  else:
    table = rng.normal(size=(k, int(config.text.dim))).astype(np.float32)
  with jax.set_mesh(mesh):
    global_batch = sharding_lib.global_batch_from_process_local(batch_np, batch_sharding)
    table = jax.device_put(table, replicated)
    key = jax.device_put(jax.random.PRNGKey(0), replicated)
    numbers = jax.device_put(setup.recipe.numbers, replicated)
    compiled = step_fn.lower(state, global_batch, table, key, numbers).compile()
    gflops = cost_gflops(compiled)
    holder = {'state': state}

    def ours():
      holder['state'], metrics = compiled(holder['state'], global_batch, table, key, numbers)
      return metrics

    if against or against_cpu_ynnpack:
      if against_cpu_ynnpack:
        other = step_lib.jit_train_step(other_config, setup, mesh).lower(
            state, global_batch, table, key, numbers).compile()
        other_holder = {'state': jax.tree.map(jnp.copy, state)}

        def peer():
          other_holder['state'], metrics = other(other_holder['state'], global_batch, table, key, numbers)
          return jax.block_until_ready(metrics)

        name = f'xla.cpu_ynnpack_train={against_cpu_ynnpack}'
      else:
        peer = _peer(against, config, batch, imgsz, 'train_step', threads)
        name = against + _peer_name(config)
      t_ours, t_peer = time_alternating(ours, peer, warmup=warmup, repeats=repeats)
      peer_stats = summarize(t_peer)
      out = record('train_step', config_name, batch, imgsz, t_ours, gflops, peer=name,
                   peer_median_s=peer_stats['median_s'],
                   ratio=summarize(t_ours)['median_s'] / peer_stats['median_s'])
    else:
      out = record('train_step', config_name, batch, imgsz,
                   time_calls(ours, warmup=warmup, repeats=repeats), gflops)
  out['images_per_s'] = batch / out['median_s']
  return out


def _synthetic_source(config, num_images: int, split: str):
  """A TFDS source of a synthetic dataset built in a temporary directory (when --data_dir is not given)."""
  import atexit
  import shutil
  import tempfile
  from optisar_jax.data import build_tfds, make_synthetic_dataset
  from optisar_jax.data.sources import open_source
  root = tempfile.mkdtemp(prefix='optisar-bench-')
  atexit.register(shutil.rmtree, root, ignore_errors=True)   # a measurement's scratch data, not a result
  make_synthetic_dataset(f'{root}/raw', format='optsar', num_images=num_images, seed=0)
  build_tfds('optsar_rsvg', f'{root}/raw', f'{root}/tfds')
  config.data.name = 'optsar_rsvg'
  config.data.data_dir = f'{root}/tfds'
  return open_source(config, split)


def bench_evaluate(config, config_name: str, batch: int, imgsz: int, *, warmup: int, repeats: int,
                   num_images: int = 60, source=None, split: str = 'test', **unused) -> dict[str, Any]:
  """Evaluation throughput (queries/s) on a split of a synthetic dataset of `num_images` images (about 10 %
  in test and val, 80 % in train): packed queries (the config's `eval.batch_size` images and
  `eval.query_slots` queries per device step, `batch` overriding the images and scaling the query slots)
  vs one forward per query with the same image slots. Both run the streaming path of
  `evaluation.evaluate_split` (per-image metadata, pixels decoded a step ahead); `peak_rss_mb` is this
  process's peak resident memory, for comparing splits of different sizes."""
  import ml_collections
  import resource
  from optisar_jax import evaluation
  from optisar_jax.data import pipeline
  from optisar_jax.text import run_texts as texts_lib
  del unused
  config.data.imgsz = imgsz
  if batch != int(config.eval.batch_size):
    config.eval.query_slots = max(1, round(int(config.eval.query_slots) * batch / int(config.eval.batch_size)))
  config.eval.batch_size = batch
  if source is None:
    source = _synthetic_source(config, num_images, split)
  names = list(source.dataset_info.features['objects']['category'].names)
  examples = [pipeline.eval_metadata(source[i], i, imgsz) for i in range(len(source))]
  pad = int(config.data.pad_value)

  def image_of(i):
    return pipeline.eval_canvas(source[i], imgsz, pad, resize=str(config.data.resize))

  queries = sum(len(ex['captions']) for ex in examples)
  graphdef, params, rest = _fresh_weights(config)
  dim = int(config.text.dim)

  class _Texts:
    def __call__(self, strings):
      rng = np.random.default_rng(abs(hash(tuple(strings))) % (2 ** 32))
      v = rng.normal(size=(len(strings), dim)).astype(np.float32)
      return v / np.linalg.norm(v, axis=-1, keepdims=True)

  results = {}
  # 'batched': the config's packing (queries share their image's backbone and neck context);
  # 'per_query': the same image slots, each carrying one query (one full forward per query).
  for label in ('batched', 'per_query'):
    cfg = ml_collections.ConfigDict(config.to_dict())
    if label == 'per_query':
      cfg.eval.max_queries_per_image = 1
      cfg.eval.query_slots = batch
    grounder = evaluation.Grounder(cfg, params, rest, texts_lib.RunTexts(vocabulary=None, table=None))
    grounder.embedder = _Texts()
    run = lambda: grounder.run(examples, category_names=names, progress=False, image_of=image_of)
    results[label] = time_calls(run, warmup=warmup, repeats=repeats)
  batched, single = summarize(results['batched']), summarize(results['per_query'])
  out = record('evaluate', config_name, batch, imgsz, results['batched'], None,
               queries=queries, images=len(examples), image_slots=batch,
               query_slots=int(config.eval.query_slots),
               queries_per_s=queries / batched['median_s'],
               per_query_median_s=single['median_s'], per_query_queries_per_s=queries / single['median_s'],
               speedup_vs_per_query=single['median_s'] / batched['median_s'], split=split,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  return out


def bench_input(config, config_name: str, batch: int, imgsz: int, *, warmup: int, repeats: int,
                num_images: int = 64, source=None, against_workers: str | None = None,
                batches_per_round: int = 6, **unused) -> dict[str, Any]:
  """Training input pipeline (decode, mosaic, affine, flip, text slots; the HSV jitter only with
  `data.augment.hsv_on_device` off) in images/s.

  Steady-state throughput: each round starts the pipeline (`TrainDataset.iterator`, grain with
  `data.worker_count` worker processes), draws `warmup` batches untimed (worker start-up, their first
  buffers), times the next `batches_per_round` batches, and stops the pipeline, so no worker runs outside
  its own round. `against_workers` ('1,2'): the same rounds with those worker counts, alternating with the
  config's (config, 1, 2, config, 1, 2, ...) in this process; `repeats` rounds each; `peer`,
  `peer_median_s` and `ratio` (= ours / peer) describe the first listed count, `by_workers` all of them. Reported per worker
  count: the median round's images/s and images/s per busy core (max(1, workers): with no worker the
  training thread does the work).
  """
  import time as time_lib
  from optisar_jax.data import pipeline, sources
  from optisar_jax.data.vocabulary import build_vocabulary
  del unused
  config.data.imgsz = imgsz
  config.train.batch_size = batch
  config.train.num_steps = 10 ** 6
  if source is None:
    source = _synthetic_source(config, num_images, 'train')
  captions, names = sources.training_captions(source)
  vocabulary = build_vocabulary(captions, names, config.data)
  ours = pipeline.resolve_worker_count(int(config.data.worker_count), int(config.data.max_auto_workers))
  counts = [ours]
  if against_workers:
    try:
      counts += [int(w) for w in str(against_workers).split(',') if w.strip()]
    except ValueError:
      raise ValueError(f'--against_workers {against_workers!r}: expected worker counts such as 1,2') from None
    if min(counts) < 0:
      raise ValueError(f'--against_workers {against_workers!r}: worker counts must be >= 0')
  datasets = {}
  for w in counts:
    config.data.worker_count = w
    datasets[w] = pipeline.make_train_dataset(source, config, vocabulary)
  rounds: dict[int, list[float]] = {w: [] for w in counts}
  step = 0
  for _ in range(repeats):
    for w in counts:
      with datasets[w].iterator(step) as iterator:
        for _ in range(warmup):
          next(iterator)
        start = time_lib.perf_counter()
        for _ in range(batches_per_round):
          next(iterator)
        rounds[w].append((time_lib.perf_counter() - start) / batches_per_round)
      step += warmup + batches_per_round
  out = record('input', config_name, batch, imgsz, rounds[ours], None,
               mosaic=float(config.data.augment.mosaic), hsv_on_device=bool(config.data.augment.hsv_on_device),
               worker_count=ours,
               batches_per_round=batches_per_round)
  out['images_per_s'] = batch / out['median_s']
  out['images_per_s_per_core'] = out['images_per_s'] / max(1, ours)
  if against_workers:
    peer_median = summarize(rounds[counts[1]])['median_s']   # the first listed count is `peer`
    out.update(peer=f'data.worker_count={counts[1]}', peer_median_s=peer_median,
               ratio=out['median_s'] / peer_median)
    out['by_workers'] = {}
    for w in counts[1:]:
      median = summarize(rounds[w])['median_s']
      out['by_workers'][str(w)] = {'median_s': median, 'images_per_s': batch / median,
                                   'images_per_s_per_core': batch / median / max(1, w),
                                   'speedup': out['median_s'] / median}
  return out


class _BareIntervals:
  """The device batches `bench_loop`'s training loop consumes: log interval 0 (the compile) and then
  cycles of four intervals, loop, loop, bare, bare. A loop interval takes fresh batches from the loop's
  prefetcher; a bare interval gives the step the previous batch again, so the input pipeline fills its
  buffers and then rests. Only the second interval of each pair is measured: the first absorbs the switch
  (the batches buffered during a bare pair, the filling of the buffers after a loop pair)."""

  def __init__(self, batches, log_every: int):
    self._batches = batches
    self._log_every = int(log_every)
    self._calls = 0
    self._last = None

  @staticmethod
  def phase(interval: int) -> str:
    """'compile', 'loop', 'loop measured', 'bare' or 'bare measured' for log interval `interval`."""
    if interval == 0:
      return 'compile'
    return ('loop', 'loop measured', 'bare', 'bare measured')[(interval - 1) % 4]

  def __iter__(self):
    return self

  def __next__(self):
    interval = self._calls // self._log_every
    self._calls += 1
    if self.phase(interval).startswith('bare') and self._last is not None:
      return self._last
    self._last = next(self._batches)
    return self._last


def bench_loop(config, config_name: str, batch: int, imgsz: int, *, warmup: int, repeats: int,
               num_images: int = 400, source=None, log_every: int = 20, **unused) -> dict[str, Any]:
  """The training loop as `scripts/train.py` runs it (input pipeline with `data.worker_count` workers,
  device prefetch, the step, logging) against its bare train step, paired, in one run.

  One fresh run on a synthetic dataset of `num_images` images, logging every `log_every` steps (no
  checkpoints but the last, no validation), alternates cycles of four log intervals (`_BareIntervals`):
  two with the input (the loop), two where the same compiled step runs again on the previous device batch
  (the bare step, the input idle). The second interval of each pair is measured. The first `warmup`
  cycles are dropped, `repeats` cycles are kept. `images_per_s` / `step_images_per_s`: medians of the
  measured loop / bare intervals (the loop's own logged `images_per_s`); `loop_vs_step` = their ratio;
  `paired_ratios`: loop over bare per cycle (both within a few seconds of each other, so a machine whose
  speed drifts over minutes still compares like with like). The timed loop interval shows the input's
  cost only when the untimed one before it has used up the batches buffered during the bare pair (about
  2 * data.prefetch_buffer + 3 per worker plus data.device_prefetch): true when the input alone is
  faster than the step. When it is not, the untimed interval is the slower one:
  `settle_images_per_s` (median of the untimed loop intervals) shows it.
  """
  import tempfile
  import ml_collections
  from optisar_jax.data import pipeline
  from optisar_jax.train import loop
  from optisar_jax.train import run_logging
  del unused, source
  if repeats < 1 or warmup < 0:
    raise ValueError(f'--what loop: --repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}')
  config.data.imgsz = imgsz
  config.train.batch_size = batch
  _synthetic_source(config, num_images, 'train')
  cycles = warmup + repeats
  config.train.num_steps = log_every * (1 + 4 * cycles)
  config.train.log_every = log_every
  config.train.checkpoint_every = config.train.num_steps
  config.train.eval_every_steps = 0
  config.train.eval_every_epochs = 0
  with tempfile.TemporaryDirectory(prefix='optisar-bench-loop-') as workdir:
    loop.train(ml_collections.ConfigDict(config.to_dict()), workdir,
               wrap_batches=lambda batches: _BareIntervals(batches, log_every))
    rows = [r for r in run_logging.read_metrics(workdir) if 'images_per_s' in r]
  # The first log (end of interval 0) has no rate: row i is interval i + 1.
  rates = {'loop': [], 'loop measured': [], 'bare measured': []}
  for i, row in enumerate(rows):
    phase = _BareIntervals.phase(i + 1)
    if phase in rates and (i // 4) >= warmup:
      rates[phase].append(row['images_per_s'])
  loop_rates, bare_rates = rates['loop measured'], rates['bare measured']
  if len(loop_rates) != repeats or len(bare_rates) != repeats:
    raise RuntimeError(f'--what loop: expected {repeats} measured intervals of each kind, got '
                       f'{len(loop_rates)} and {len(bare_rates)} (metrics rows: {len(rows)})')
  workers = pipeline.resolve_worker_count(int(config.data.worker_count), int(config.data.max_auto_workers))
  out = record('loop', config_name, batch, imgsz, [batch / r for r in loop_rates], None,
               worker_count=workers, log_every=log_every,
               hsv_on_device=bool(config.data.augment.hsv_on_device))
  out['images_per_s'] = statistics.median(loop_rates)
  out['step_images_per_s'] = statistics.median(bare_rates)
  out['loop_vs_step'] = out['images_per_s'] / out['step_images_per_s']
  out['paired_ratios'] = [lo / ba for lo, ba in zip(loop_rates, bare_rates)]
  out['settle_images_per_s'] = statistics.median(rates['loop'])
  return out


BENCHMARKS = {'forward': bench_forward, 'train_step': bench_train_step, 'evaluate': bench_evaluate,
              'input': bench_input, 'loop': bench_loop}
