"""OptiSARNet: parameter counts (scale m), abstract shapes at 640 px, tiny-config numerics.

Full-model programs are compiled with XLA's cheapest settings (O0): the tests check numbers, not speed,
and compiling the tiny model's forward + backward dominates the runtime on a small CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from optisar_jax.config import load_config
from optisar_jax.models import ImageFeatures, OptiSARNet
from optisar_jax.models.summary import build_abstract_model, count_params, layer_param_counts

FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}

# docs/architecture.md section 3, scale m; the head without SAVPE (5,562,336) and the fixed DFL (16).
LAYERS_M = [1_856, 73_984, 111_872, 590_336, 444_928, 2_360_320, 1_380_352, 2_360_320, 2_908_099, 656_896,
            990_976, 0, 0, 1_642_496, 0, 0, 1_299_277, 590_336, 0, 3_217_725, 2_360_320, 0, 3_348_813,
            3_784_414]


def normal(seed, shape):
  """Test inputs from numpy: eager jax.random would compile a threefry program per shape."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def jit(fn):
  return jax.jit(fn, compiler_options=FAST_COMPILE)


@pytest.fixture(scope='module')
def abstract_m():
  return build_abstract_model(load_config('optsar_rsvg'))


def test_scale_m_parameter_counts(abstract_m):
  model = abstract_m
  assert layer_param_counts(model) == LAYERS_M
  # = the reference's 28,123,336 without SAVPE, minus its 16 fixed DFL weights (not a parameter here).
  assert count_params(model) == 28_123_320
  head = model.layers[23]
  assert count_params(head.refine) == 1_575_424 and head.text_proj is None
  assert sum(count_params(m) for m in head.region) == 400_152
  assert [r.grid_size for r in head.region] == [4, 2, 2]


def test_scale_m_shapes_at_640_are_abstract(abstract_m):
  model = abstract_m
  model.eval()
  graphdef, state = nnx.split(model)
  images = jax.ShapeDtypeStruct((2, 640, 640, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((2, 20, 512), jnp.float32)
  out = jax.eval_shape(lambda s, x, t: nnx.merge(graphdef, s)(x, t), state, images, text)
  assert out['box_logits'].shape == (2, 8400, 64)
  assert out['region_text_logits'].shape == (2, 8400, 20)
  assert [r.shape for r in out['region_logits']] == [(2, 80, 80, 16), (2, 40, 40, 4), (2, 20, 20, 4)]
  assert out['moe_aux_loss'].shape == ()
  assert model.feature_shapes(640) == ((80, 80), (40, 40), (20, 20))


@pytest.fixture(scope='module')
def tiny():
  cfg = load_config('tiny')
  model = OptiSARNet(cfg.model, cfg.text.dim, rngs=nnx.Rngs(0))
  # BatchNorm momentum 0: one training step then sets the running statistics to that batch's, which
  # makes the eval-mode numbers of the untrained model well scaled (with the init statistics mean 0,
  # var 1 the activations shrink layer after layer and the scores collapse to the bias).
  model.set_attributes(momentum=0.0)
  # Open the text gates a little (init is fg = 0) so that the neck output depends on the text here.
  for i in (16, 19, 22):
    model.layers[i].attn.feature_gate[...] = jnp.full_like(model.layers[i].attn.feature_gate[...], 0.5)
  images = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 64, 64, 3)), jnp.float32)
  text = normal(2, (2, 3, cfg.text.dim))
  return model, images, text


@pytest.fixture(scope='module')
def train_step(tiny):
  """One training-mode forward + backward of the tiny model (params and batch stats split)."""
  model, images, text = tiny
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def step(params, rest, key):
    net = nnx.merge(graphdef, params, rest)

    def loss_fn(net):
      features = net.encode_image(images, rngs=nnx.Rngs(key))
      out = net.ground(features, text, rngs=nnx.Rngs(jax.random.fold_in(key, 1)))
      loss = (out['box_logits'].mean() + jax.nn.sigmoid(out['region_text_logits']).mean()
              + sum(r.mean() for r in out['region_logits']) + out['moe_aux_loss'])
      return loss, (out, features.maps)

    (loss, (out, maps)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(net)
    return loss, out, maps, nnx.state(net, nnx.BatchStat), grads

  loss, out, maps, new_stats, grads = jit(step)(params, rest, jax.random.key(3))
  return loss, out, maps, new_stats, grads, nnx.state(model, nnx.BatchStat)


@pytest.fixture(scope='module')
def eval_encode(tiny):
  """Eval-mode backbone of the tiny model as a function of its state (compiled once)."""
  model, images, _ = tiny
  twin = nnx.clone(model)
  twin.eval()                              # the mode is part of the graphdef
  graphdef = nnx.graphdef(twin)
  return jit(lambda s: nnx.merge(graphdef, s).encode_image(images))


@pytest.mark.slow
def test_tiny_forward_backward_finite(train_step, tiny):
  loss, out, _, _, grads, _ = train_step
  assert bool(jnp.isfinite(loss))
  assert out['box_logits'].shape == (2, 64 + 16 + 4, 64)
  assert out['region_text_logits'].shape == (2, 84, 3)
  assert [r.shape[-1] for r in out['region_logits']] == [16, 4, 4]
  leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(g).all() for g in leaves)
  assert sum(np.abs(g).sum() > 0 for g in leaves) > 0.9 * len(leaves)
  moe = tiny[0].layers[8]
  coef, k, e = 1e-3, 2, 4
  assert coef * k - 1e-7 <= float(out['moe_aux_loss']) <= coef * e + 1e-7
  assert float(jnp.abs(grads['layers'][8]['m'][0]['moe']['gate']['sim_matrix'][...]).sum()) > 0   # aux trains the gate
  assert moe.m[0].moe.gate.noisy


@pytest.mark.slow
def test_batchnorm_train_vs_eval_and_running_stats(train_step, tiny, eval_encode):
  _, _, train_maps, new_stats, _, old_stats = train_step
  old, new = jax.tree.leaves(old_stats), jax.tree.leaves(new_stats)
  assert sum(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(old, new)) > 0.9 * len(old)
  model, images, _ = tiny
  model.eval()
  # Running statistics still at their init: eval mode differs from training mode.
  for a, b in zip(train_maps, eval_encode(nnx.state(model)).maps):
    assert a.shape == b.shape and np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  nnx.update(model, new_stats)                             # running stats := the training batch's
  eval_maps = eval_encode(nnx.state(model)).maps
  # Layers 0-6 are deterministic: eval with those statistics reproduces training mode. P5 differs
  # because the training pass routed the MoE with gate noise.
  for a, b in zip(train_maps[:2], eval_maps[:2]):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_train_mode_without_rngs_is_a_clear_error(tiny):
  model, images, text = tiny
  model.train()
  with pytest.raises(ValueError, match='needs rngs'):
    nnx.eval_shape(lambda m: m(images, text), model)
  model.eval()
  assert nnx.eval_shape(lambda m: m(images, text), model)['box_logits'].shape == (2, 84, 64)


@pytest.mark.slow
def test_ground_queries_equals_separate_ground_calls(tiny, train_step, eval_encode):
  model, images, _ = tiny
  model.eval()
  nnx.update(model, train_step[3])                         # well-scaled running statistics
  graphdef, state = nnx.split(model)
  queries = normal(7, (2, 3, 32))
  features = eval_encode(state)
  assert isinstance(features, ImageFeatures) and len(features) == 3
  together = jit(lambda s, f, q: nnx.merge(graphdef, s).ground_queries(f, q))(state, features, queries)
  ground = jit(lambda s, f, t: nnx.merge(graphdef, s).ground(f, t))
  for q in range(3):
    alone = ground(state, features, queries[:, q:q + 1])
    # Batch 6 vs batch 2 programs may sum in another order: float32 rounding only.
    np.testing.assert_allclose(together['box_logits'][:, q], alone['box_logits'], rtol=5e-4, atol=1e-4)
    np.testing.assert_allclose(together['region_text_logits'][:, q], alone['region_text_logits'][..., 0],
                               rtol=5e-4, atol=1e-4)
    for a, b in zip(together['region_logits'], alone['region_logits']):
      np.testing.assert_allclose(a[:, q], b, rtol=5e-4, atol=1e-4)
  # The queries really differ, in the scores and (gates open) in the boxes through the neck.
  assert float(jnp.abs(together['region_text_logits'][:, 0] - together['region_text_logits'][:, 1]).max()) > 1e-4
  assert float(jnp.abs(together['box_logits'][:, 0] - together['box_logits'][:, 1]).max()) > 1e-6
