"""PL-MoE routing pictures (optisar_jax/routing.py): top-1 expert maps and per-modality counts."""

import types

import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from optisar_jax import grounding, routing


pytestmark = pytest.mark.slow      # compiles the tiny backbone twice (~15 s)

def _grounder_like(config):
  """What routing_maps needs from a Grounder: weights placed on a one-device mesh, the eval graphdef."""
  import jax
  from optisar_jax.evaluation import place_replicated
  from optisar_jax.runtime import sharding as sharding_lib

  model = grounding.GroundingModel(config, rngs=nnx.Rngs(0))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
  holder = types.SimpleNamespace(
      config=config, mesh=mesh, replicated=sharding_lib.replicated(mesh),
      eval_graphdef=grounding.graphdefs(config)[1],
      params=place_replicated(params, mesh), rest=place_replicated(rest, mesh))
  return holder


def test_maps_counts_and_figure(synthetic_tfds):
  # 128 px: layer 8 runs at stride 32 on a 4 x 4 map, cut into 2 x 2 patches of 2 x 2 pixels
  config = tiny_config(synthetic_tfds[1], 'data.imgsz=128')
  holder = _grounder_like(config)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 128, 128, 3), dtype=np.uint8)
  images[3:] = images[3:] // 4                               # darker, so some patches route elsewhere
  maps = routing.routing_maps(holder, images)
  assert list(maps) == ['detector/layers/8/m/0/moe']
  grid = maps['detector/layers/8/m/0/moe']
  experts = config.model.moe.num_experts
  assert grid.shape == (6, 2, 2) and grid.dtype == np.int32
  assert grid.min() >= 0 and grid.max() < experts
  # eval mode: an image's routing does not depend on the other images of the batch
  again = routing.routing_maps(holder, images[::-1].copy())['detector/layers/8/m/0/moe']
  np.testing.assert_array_equal(again, grid[::-1])
  domains = [0, 0, 0, 1, 1, 1]
  counts = routing.usage_counts(maps, domains, experts)['detector/layers/8/m/0/moe']
  assert sum(counts['optical']) == sum(counts['sar']) == 3 * 4          # 3 images x 4 patches each
  assert counts['optical'] == np.bincount(grid[:3].ravel(), minlength=experts).tolist()
  figure = routing.routing_figure(routing.usage_counts(maps, domains, experts), maps, list(images), domains,
                                  shown=[0, 3])
  pixels = np.asarray(figure).reshape(-1, 3)
  colours = {tuple(p) for p in pixels[::7]}
  assert routing.DOMAIN_COLOURS['optical'] in colours or sum(counts['optical']) == 0
  assert figure.width >= 340 and figure.height > 170 + 128


def test_pick_images_spreads_over_each_domain():
  domains = [0] * 10 + [1] * 3
  assert routing.pick_images(domains, 4) == [0, 3, 6, 9, 10, 11, 12]
  assert routing.pick_images([1, 1], 5) == [0, 1]


def test_tile_tints_each_patch_with_its_expert_colour():
  canvas = np.zeros((64, 64, 3), np.uint8)
  tile = np.asarray(routing._map_tile(canvas, np.array([[0, 1], [2, 3]]), 'x', size=64))
  for (r, c), e in (((10, 10), 0), ((10, 50), 1), ((50, 10), 2), ((50, 50), 3)):
    np.testing.assert_allclose(tile[r, c], np.round(0.5 * np.asarray(routing.EXPERT_COLOURS[e])), atol=1)
