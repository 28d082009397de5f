"""The training loop end to end on the synthetic dataset: logging, resumption, sharding equality, learning."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from optisar_jax import evaluation
from optisar_jax.train import loop
from optisar_jax.train import optimizer as optimizer_lib
from optisar_jax.runtime import sharding as sharding_lib
from optisar_jax.train import step as step_lib


pytestmark = pytest.mark.slow      # trains the tiny model or runs processes: minutes on a 2-core CPU

def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_metrics_jsonl_has_every_logged_step_and_loss_components(trained_tiny):
  workdir, _ = trained_tiny
  rows = [r for r in _rows(workdir) if 'loss' in r]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  for row in rows:
    for key in ('loss', 'box', 'cls', 'dfl', 'region', 'moe', 'lr'):
      assert np.isfinite(row[key]), (key, row)
    total = row['box'] + row['cls'] + row['dfl'] + row['region'] + row['moe']
    assert row['loss'] == pytest.approx(total, rel=1e-5)


def _fixed_batch(config):
  from optisar_jax.data import pipeline, sources
  from optisar_jax.data.vocabulary import build_vocabulary
  source = sources.open_source(config, 'train')
  captions, names = sources.training_captions(source)
  vocabulary = build_vocabulary(captions, names, config.data)
  from optisar_jax.text import tokenization
  from optisar_jax.text.tower import build_text_table
  tokenizer = tokenization.build_caption_tokenizer(list(vocabulary), int(config.text.tower.vocab_size))
  table = build_text_table(config, list(vocabulary), tokenizer=tokenizer)
  batch = pipeline.make_train_dataset(source, config, vocabulary).batch_at(0)
  return batch, table


# Fitting one fixed batch: no dropout and no router noise, so that two runs differ only by what a test
# changes; the float32 and bfloat16 tests share this program (one compilation for both).
FIT_ONE_BATCH = ('optim.lr=0.004', 'optim.warmup_min_steps=1', 'model.tgdg.ssa_dropout=0.0',
                 'model.moe.noisy_gating=False')


def _run_steps(config, mesh, batch, table, steps):
  setup = step_lib.setup_training(config, mesh, (('.*', ()),), make_tx=lambda model: (
      optimizer_lib.make_recipe(config.optim, steps_per_epoch=4, total_steps=100, params_tree=model)))
  state = setup.state
  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  step_fn = step_lib.jit_train_step(config, setup, mesh)
  history = []
  with jax.set_mesh(mesh):
    global_batch = sharding_lib.global_batch_from_process_local(batch, batch_sharding)
    for _ in range(steps):
      state, metrics = step_fn(state, global_batch, jax.device_put(table, replicated),
                               jax.device_put(jax.random.PRNGKey(0), replicated),
                               jax.device_put(setup.recipe.numbers, replicated))
      history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def _step_one(config, mesh, batch, table):
  """Step 1's loss, loss components, gradient and updated BatchNorm/MoE statistics on `mesh` (the train
  step's own `loss_and_grads`, jitted with the train step's shardings), fetched to the host."""
  setup = step_lib.setup_training(config, mesh, (('.*', ()),), make_tx=lambda model: (
      optimizer_lib.make_optimizer(config.optim, steps_per_epoch=4, total_steps=100, params_tree=model)))
  replicated = sharding_lib.replicated(mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  fn = jax.jit(step_lib.make_loss_and_grads(config, setup.train_graphdef, gathered=replicated),
               in_shardings=(setup.shardings, batch_sharding, replicated, replicated))
  with jax.set_mesh(mesh):
    global_batch = sharding_lib.global_batch_from_process_local(batch, batch_sharding)
    return jax.device_get(fn(setup.state, global_batch, jax.device_put(table, replicated),
                             jax.device_put(jax.random.PRNGKey(0), replicated)))


def _leaves(tree):
  return [(jax.tree_util.keystr(path), np.asarray(leaf, np.float64))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_one_device_and_eight_device_mesh_give_the_same_step(synthetic_tfds):
  """Step 1 on 1 device and on a (4, 2) mesh of 8: the same weights on the same batch, so everything
  differs only by the order of float32 sums. BatchNorm groups of 8 (the default) span the whole tiny batch
  of 8, so on 8 devices (one image each) their statistics cross devices, and the numbers are still those
  of one device: a group is a fixed set of images wherever it runs (docs/scaling.md). (Groups that live
  on one device each need no BatchNorm all-reduce at all: tests/test_compile_report.py counts them.)

  Bounds, from float32 rounding (u = 6e-8). A sum of n terms taken in another order moves by about
  sqrt(n) u of the sum of the terms' magnitudes; n is up to ~1e5 here (a BatchNorm statistic or a weight
  gradient over 8-16 images of up to 32 x 32 positions), so ~2e-5 of that magnitude.
  - loss and components: sums of mostly positive terms, so ~2e-5 relative bounds them; asserted 5e-5
    (measured: the loss 4e-7 to 6e-7, the box component up to 1.2e-5).
  - gradient: the backward pass divides by BatchNorm standard deviations, some tiny in an untrained model,
    which amplifies the reordering noise; and a BatchNorm weight's gradient is a sum of terms of both signs
    that cancel by up to ~100x. So each leaf is bounded relative to itself plus the whole gradient's norm G:
    |dg_leaf| <= 1e-3 |g_leaf| + 2e-4 G (L2 norms). Measured: leaves above 1e-3 G differ by at most 3e-4
    of themselves; the largest difference of any leaf is 5.6e-5 G; leaves whose true gradient is 0 (a key
    bias under softmax, a bias just before a BatchNorm) hold noise of ~1e-9 G. The gradient norm:
    asserted 5e-4 relative (measured 2e-5 to 5e-5).
  - BatchNorm running statistics: means and variances of the same images: 1e-4 relative + 1e-6.
  A sign error, a missing all-reduce or a group statistic taken over the wrong images moves these by
  orders of magnitude more."""
  config = tiny_config(synthetic_tfds[1], 'model.tgdg.ssa_dropout=0.0', 'model.moe.noisy_gating=False')
  assert (config.model.bn_group_size, config.train.batch_size) == (8, 8)
  batch, table = _fixed_batch(config)
  one = jax.make_mesh((1, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                      devices=jax.devices()[:1])
  eight = jax.make_mesh((4, 2), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  loss1, parts1, rest1, grads1 = _step_one(config, one, batch, table)
  loss8, parts8, rest8, grads8 = _step_one(config, eight, batch, table)
  np.testing.assert_allclose(loss8, loss1, rtol=5e-5)
  for key in ('box', 'cls', 'dfl', 'region', 'moe'):
    np.testing.assert_allclose(parts8[key], parts1[key], rtol=5e-5, atol=1e-7, err_msg=key)
  g1, g8 = _leaves(grads1), _leaves(grads8)
  total = np.sqrt(sum(np.sum(g ** 2) for _, g in g1))
  assert total > 0 and len(g1) == len(g8) > 300
  np.testing.assert_allclose(np.sqrt(sum(np.sum(g ** 2) for _, g in g8)), total, rtol=5e-4)
  for (name, a), (_, b) in zip(g1, g8):
    assert np.linalg.norm(b - a) <= 1e-3 * np.linalg.norm(a) + 2e-4 * total, name
  statistics = [(n, a, b) for (n, a), (_, b) in zip(_leaves(rest1), _leaves(rest8)) if a.dtype.kind == 'f']
  assert len(statistics) > 50
  for name, a, b in statistics:
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=name)


def test_bfloat16_training_tracks_float32(synthetic_tfds):
  """The tiny config trained in bf16 compute (the accelerator forms: cpu_forms off, float32 weight
  gradients) against float32 (with the CPU's forms, which equal the accelerator forms up to float32
  rounding, far below the bound's 2u = 8e-3), fitting one batch for 3 steps.

  Tolerance, derived: at step 1 the losses differ only by the forward pass's rounding; every layer rounds
  its output to bf16 (unit roundoff u = 2^-8) and the loss, a mean over thousands of anchors, keeps at
  most the systematic part: |L_bf16 - L_f32| <= 2u L (measured 2e-3 relative). Each later step adds the
  effect of the weights having moved differently: the bf16 update differs from the float32 one by at most
  its own size (Adam's updates are bounded by the learning rate either way), so to first order the loss
  difference grows by at most float32's own loss change at that step:
  |L_bf16(t) - L_f32(t)| <= 2u L_f32(t) + sum_{s<t} |L_f32(s+1) - L_f32(s)|  (measured at most 1/3 of it).
  Beyond a few steps the assigner's top-k and the MoE's top-2, both discrete, make the runs drift apart
  like two seeds, so the test stops at 3 (measured on a 2-core x86 CPU, 2026-12-05: steps 1-3 within a
  third of the bound; at steps 4-6 the bf16 loss rose while the float32 one kept falling, by more than it).
  """
  u = 2.0 ** -8
  one = jax.make_mesh((1, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                      devices=jax.devices()[:1])
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    config = tiny_config(synthetic_tfds[1], *FIT_ONE_BATCH,
                         *(() if dtype == 'float32' else ('model.compute_dtype=bfloat16', 'model.cpu_forms=off')))
    batch, table = _fixed_batch(config)
    _, history = _run_steps(config, one, batch, table, 3)
    runs[dtype] = np.array([float(h['loss']) for h in history])
  f32, bf16 = runs['float32'], runs['bfloat16']
  assert abs(bf16[0] - f32[0]) <= 2 * u * f32[0], (bf16[0], f32[0])
  drift = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(f32)))])
  bound = 2 * u * f32 + drift
  assert np.all(np.abs(bf16 - f32) <= bound), (bf16, f32, bound)
  assert bf16[-1] < bf16[0] and f32[-1] < f32[0]


def test_loss_falls_when_fitting_one_batch(synthetic_tfds):
  config = tiny_config(synthetic_tfds[1], *FIT_ONE_BATCH)     # the float32 program of the bf16 test above
  batch, table = _fixed_batch(config)
  one = jax.make_mesh((1, 1), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                      devices=jax.devices()[:1])
  _, history = _run_steps(config, one, batch, table, 25)
  first = float(history[0]['loss'])
  last = float(np.mean([h['loss'] for h in history[-3:]]))
  assert last < 0.6 * first, (first, last)


def test_frozen_text_mode_trains_from_the_embedding_cache(synthetic_tfds, tmp_path):
  """The paper's mode: a frozen encoder's embeddings precomputed once, looked up by the train step; the
  evaluator embeds queries that are not in the cache with the same encoder."""
  from optisar_jax.text.cache import prepare_text_embeddings
  encoder_dir = os.path.join(os.path.dirname(__file__), 'fixtures', 'text', 'bert')   # 32-d BERT
  emb_dir = str(tmp_path / 'embeddings')
  config = tiny_config(synthetic_tfds[1], 'text.mode=frozen', f'text.encoder={encoder_dir}',
                       f'text.embeddings_dir={emb_dir}', 'train.num_steps=2', 'train.checkpoint_every=2')
  cache = prepare_text_embeddings(config, synthetic_tfds[1], emb_dir)
  assert 'background' in cache and cache.dim == 32
  workdir = str(tmp_path / 'run')
  loop.train(config, workdir)
  rows = _rows(workdir)
  assert [r['step'] for r in rows] == [1, 2] and all(np.isfinite(r['loss']) for r in rows)
  grounder = evaluation.load_grounder(workdir)
  unseen = 'a query that no training caption contains'
  assert unseen not in cache
  vectors = grounder.embedder([unseen, 'background'])
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(vectors[1], cache.lookup(['background'])[0], atol=1e-6)
