"""Evaluation, inference and export of a trained tiny run: exactness across devices, batching and export."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from optisar_jax import evaluation
from optisar_jax import export
from optisar_jax import inference
from optisar_jax import predictions as predictions_lib
from optisar_jax.text import run_texts as texts_lib


def _grounder(workdir, config, devices, **overrides):
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    section, name = key.split('__')
    config[section][name] = value
  mesh = jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)
  params, rest, _, graphdef = evaluation.restore_weights(config, workdir)
  return evaluation.Grounder(config, params, rest, texts_lib.load_run_texts(config, workdir), mesh=mesh,
                             eval_graphdef=graphdef)


def _dense_predict(grounder, images, queries):
  """The export's form of predict (every image with its own Q query rows), in process."""
  predict = jax.jit(evaluation.make_predict_fn(grounder.config, grounder._graphdef))
  boxes, scores = predict(grounder.params, grounder.rest, images, queries)
  return np.asarray(boxes), np.asarray(scores)


@pytest.fixture(scope='module')
def test_split(trained_tiny):
  workdir, config = trained_tiny
  grounder = _grounder(workdir, config, jax.devices()[:1])
  metrics, results, examples = evaluation.evaluate_split(grounder, config, 'test', progress=False)
  return metrics, results, examples


def test_metrics_bitwise_identical_for_1_4_and_8_devices(trained_tiny, test_split):
  workdir, config = trained_tiny
  metrics1, results1, _ = test_split
  assert metrics1['all']['n'] == len(results1) > 0
  for count in (4, 8):
    grounder = _grounder(workdir, config, jax.devices()[:count])
    metrics, results, _ = evaluation.evaluate_split(grounder, config, 'test', progress=False)
    assert json.dumps(metrics, sort_keys=True) == json.dumps(metrics1, sort_keys=True)
    for a, b in zip(results1, results):
      assert a.query_id == b.query_id and a.score == b.score
      np.testing.assert_array_equal(a.box, b.box)


def test_batched_queries_equal_one_query_per_forward(trained_tiny, test_split):
  workdir, config = trained_tiny
  _, batched, examples = test_split
  single = _grounder(workdir, config, jax.devices()[:1], eval__max_queries_per_image=1)
  _, one_by_one, _ = evaluation.evaluate_split(single, config, 'test', progress=False)
  assert [r.query_id for r in one_by_one] == [r.query_id for r in batched]
  for a, b in zip(batched, one_by_one):
    assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(a.box, b.box, atol=1e-2)


def test_pack_queries_uses_few_blocks():
  # examples with 3, 0, 1, 5 queries; blocks of 2 image slots and 4 query slots: 9 queries need 3 blocks;
  # example 3 is cut at 4 queries, largest pieces go first, each to the block with the most room
  blocks = evaluation.pack_queries([3, 0, 1, 5], 2, 4)
  assert blocks == [
      evaluation.Block((3,), ((0, 3, 0), (0, 3, 1), (0, 3, 2), (0, 3, 3))),
      evaluation.Block((0,), ((0, 0, 0), (0, 0, 1), (0, 0, 2))),
      evaluation.Block((2, 3), ((0, 2, 0), (1, 3, 4))),
  ]
  # an image that fits whole in no block is split over the free image slots: 2 blocks, not 3
  assert evaluation.pack_queries([4, 4, 4], 3, 6) == [
      evaluation.Block((0, 2), ((0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (1, 2, 0), (1, 2, 1))),
      evaluation.Block((1, 2), ((0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 1, 3), (1, 2, 2), (1, 2, 3))),
  ]
  # one query per image slot: the backbone runs once per query
  blocks = evaluation.pack_queries([3, 1], 2, 2, max_queries_per_image=1)
  assert [b.images for b in blocks] == [(0, 0), (0, 1)]
  assert [b.queries for b in blocks] == [((0, 0, 0), (1, 0, 2)), ((0, 0, 1), (1, 1, 0))]
  with pytest.raises(ValueError, match='eval.query_slots=0'):
    evaluation.pack_queries([1], 2, 0)


@pytest.mark.parametrize('image_slots,query_slots', [(4, 14), (4, 13), (8, 26), (3, 5)])
def test_pack_queries_places_every_query_once_within_the_slots(image_slots, query_slots):
  # the synthetic test split of 200 images: 20 images with 2-5 queries (66 in all)
  counts = [3, 4, 2, 3, 4, 3, 5, 4, 3, 3, 2, 4, 3, 4, 3, 4, 2, 3, 3, 4]
  blocks = evaluation.pack_queries(counts, image_slots, query_slots)
  placed = sorted((i, q) for b in blocks for _, i, q in b.queries)
  assert placed == [(i, q) for i, c in enumerate(counts) for q in range(c)]
  for b in blocks:
    assert len(b.images) <= image_slots and len(b.queries) <= query_slots
    assert all(b.images[slot] == i for slot, i, _ in b.queries)
  lower_bound = max(-(-len(counts) // image_slots), -(-sum(counts) // query_slots))
  assert len(blocks) == lower_bound          # this split packs without a wasted block
  assert blocks == evaluation.pack_queries(counts, image_slots, query_slots)     # a function of the counts


def test_packed_predict_equals_one_forward_per_image(trained_tiny, loaded_grounder):
  """Packed rows that read a shared image context equal the dense per-image forward."""
  config = trained_tiny[1]
  grounder = loaded_grounder
  n, m = config.eval.batch_size, config.eval.query_slots
  g = grounder.blocks_per_step
  rng = np.random.default_rng(5)
  images = rng.integers(0, 255, (g * n, config.data.imgsz, config.data.imgsz, 3), np.uint8)
  queries = grounder.embedder(['the ship in the upper left', 'the largest vehicle', 'the bridge'])
  owner = rng.integers(0, n, (g * m,)).astype(np.int32)
  choice = rng.integers(0, 3, (g * m,))
  boxes, scores = grounder.predict_packed(images, queries[choice], owner)
  dense_boxes, dense_scores = _dense_predict(grounder, images, np.broadcast_to(queries, (g * n, 3, queries.shape[-1])))
  image_of_row = np.arange(g * m) // m * n + owner
  np.testing.assert_allclose(scores, dense_scores[image_of_row, choice], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(boxes, dense_boxes[image_of_row, choice], rtol=1e-5, atol=1e-3)


def test_predictions_file_scores_like_the_evaluator(trained_tiny, test_split, synthetic_tfds, tmp_path):
  metrics, results, _ = test_split
  out = str(tmp_path / 'preds.json')
  evaluation.write_outputs(metrics, results, output=str(tmp_path / 'm.json'), predictions_out=out)
  rescored = predictions_lib.score_predictions(out, os.path.join(synthetic_tfds[0], 'test.json'))
  for domain in ('all', 'optical', 'sar'):
    assert rescored[domain]['n'] == metrics[domain]['n']
    for key, value in metrics[domain].items():
      if value is not None and key != 'n':
        assert rescored[domain][key] == pytest.approx(value, abs=1e-3), (domain, key)
  with open(str(tmp_path / 'm.json')) as f:
    assert set(json.load(f)) >= {'all', 'optical', 'sar'}


def test_export_gives_the_in_process_outputs(trained_tiny, tmp_path):
  workdir, config = trained_tiny
  path = export.write_export(workdir, str(tmp_path / 'export'))
  exported = export.load_export(path)
  grounder = _grounder(workdir, config, jax.devices()[:1])
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (4, config.data.imgsz, config.data.imgsz, 3), np.uint8)
  vectors = grounder.embedder(['the ship in the upper left', 'the largest vehicle', 'the bridge'])
  queries = np.broadcast_to(vectors[None, :, :], (images.shape[0],) + vectors.shape).copy()
  boxes, scores = _dense_predict(grounder, images, queries)
  e_boxes, e_scores = exported.predict(images, queries)
  np.testing.assert_allclose(e_boxes, boxes, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(e_scores, scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(exported.embed(['the bridge']), vectors[2:3], atol=1e-6)
  with pytest.raises(FileExistsError):
    export.write_export(workdir, path)
  # Lowered for CPU, CUDA and TPU: the same file serves on each. A fresh Python process that imports
  # only the loader (no model, training or flax code) gives the in-process outputs on this CPU.
  assert exported.platforms == ('cpu', 'cuda', 'tpu')
  inputs, outputs = str(tmp_path / 'inputs.npz'), str(tmp_path / 'outputs.npz')
  np.savez(inputs, images=images, queries=queries)
  code = (
      'import sys, numpy as np\n'
      'from optisar_jax.export import load_export\n'
      f'e = load_export({path!r})\n'
      f'd = np.load({inputs!r})\n'
      "boxes, scores = e.predict(d['images'], d['queries'])\n"
      "loaded = [m for m in sys.modules if m.startswith(('optisar_jax.models', 'optisar_jax.train', 'flax'))]\n"
      f"np.savez({outputs!r}, boxes=boxes, scores=scores, loaded=np.array(loaded, dtype=str))\n")
  subprocess.run([sys.executable, '-c', code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  fresh = np.load(outputs)
  assert list(fresh['loaded']) == []
  np.testing.assert_allclose(fresh['boxes'], boxes, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(fresh['scores'], scores, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='--platforms'):
    export.write_export(workdir, str(tmp_path / 'bad'), platforms=('gpu-ish',))


@pytest.fixture(scope='module')
def loaded_grounder(trained_tiny):
  return evaluation.load_grounder(trained_tiny[0])


@pytest.mark.parametrize('fmt,mode', [('JPEG', 'RGB'), ('PNG', 'RGB'), ('PNG', 'L')])
def test_infer_maps_the_box_back_to_the_original_image(trained_tiny, loaded_grounder, tmp_path, fmt, mode):
  workdir, config = trained_tiny
  grounder = loaded_grounder
  rng = np.random.default_rng(1)
  h, w = 90, 150                                           # non-square: letterbox pads top and bottom
  pixels = rng.integers(0, 255, (h, w) if mode == 'L' else (h, w, 3), np.uint8)
  path = str(tmp_path / f'image.{fmt.lower()}')
  Image.fromarray(pixels, mode).save(path, format=fmt)
  from optisar_jax.data import augment
  from optisar_jax.data.release import load_image_rgb
  image = load_image_rgb(path)
  assert image.shape == (h, w, 3)
  if fmt == 'PNG' and mode == 'L':                         # the command-line path, with its picture
    answers = inference.ground_image_file(workdir, path, ['the ship in the upper left'],
                                          output_png=str(tmp_path / 'out.png'))
    assert os.path.isfile(tmp_path / 'out.png')
  else:
    answers = inference.ground_image(grounder, image, ['the ship in the upper left'])
  (answer,) = answers
  # The same query through the batched path, mapped back by hand.
  canvas, lb = augment.letterbox(image, config.data.imgsz, config.data.pad_value)
  vectors = grounder.embedder(['the ship in the upper left'])
  boxes, scores = _dense_predict(grounder, canvas[None], vectors[None, :1])
  expected = np.clip((boxes[0, 0] - [lb.left, lb.top, lb.left, lb.top]) / lb.ratio, 0, [w, h, w, h])
  assert answer['score'] == pytest.approx(float(scores[0, 0]), rel=1e-5)
  assert answer['bbox'] is not None
  x, y, bw, bh = answer['bbox']
  np.testing.assert_allclose([x, y, x + bw, y + bh], expected, atol=1e-3)
  assert 0 <= x and 0 <= y and x + bw <= w + 1e-6 and y + bh <= h + 1e-6
