"""Grounding evaluation and inference: the image-side work once per image, shared by all of its queries.

For every image of a split: letterbox to `data.imgsz`, run `encode_image` and the text-independent part
of the neck (`image_context`) once, ground each of its queries on its own (equal to one forward per
query), take the top-1 anchor, undo the letterbox, and score with the paper's metrics (Pr@0.5..0.9,
meanIoU, cumIoU; all / optical / SAR).

Packing (`pack_queries`): an eval step gives every device a block of `eval.batch_size` image slots and
`eval.query_slots` query slots; each query slot names the image slot (of its own block) whose context it
reads, so compute follows the number of queries and not a fixed number of query slots per image. Every
block costs the same whatever it holds, so the packer looks for the fewest blocks (largest images first,
each into the block with the most free query slots); an image that fits in no block whole is split over
blocks with free image slots (its context is then computed in each).

Determinism: the packing is a function of the query counts alone, not of the device count; every device always
runs the same per-device program, and a query's result does not depend on the other rows of its block,
so the metrics are bitwise identical for any number of devices or processes. Every process reads the
whole split and holds all predictions; process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import sys
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from optisar_jax.runtime import compile_options
from optisar_jax import grounding
from optisar_jax import metrics as metrics_lib
from optisar_jax import predictions as predictions_lib
from optisar_jax.data import pipeline
from optisar_jax.models import box_ops
from optisar_jax.runtime import distributed
from optisar_jax.runtime import paths
from optisar_jax.runtime import sharding as sharding_lib
from optisar_jax.text import run_texts as texts_lib

TEXT_CHUNK = 64  # rows per text-tower call: fixed, so a string's vector never depends on its neighbours


def _decode_top1(out: dict, points: jax.Array, strides: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(boxes (...,4) xyxy canvas pixels, scores (...)) of the top-1 anchor of `ground_*` outputs whose
  region-text logits are (..., A) and box logits (..., A, 4 reg_max)."""
  logits = out['region_text_logits']
  best = jnp.argmax(logits, axis=-1)                                   # first index on ties
  score = jax.nn.sigmoid(jnp.take_along_axis(logits, best[..., None], axis=-1)[..., 0])
  best_logits = jnp.take_along_axis(out['box_logits'], best[..., None, None], axis=-2)[..., 0, :]
  boxes = box_ops.decode_boxes(best_logits, points[best], strides[best])
  return boxes.astype(jnp.float32), score.astype(jnp.float32)


def make_predict_fn(config: ml_collections.ConfigDict, eval_graphdef):
  """`predict(params, rest, images uint8 (N,S,S,3), queries (N,Q,D)) -> (boxes (N,Q,4), scores (N,Q))`.

  Every image with Q queries of its own (the export's and the forward benchmark's form). Boxes are xyxy
  pixels of the letterboxed canvas; scores are sigmoid match probabilities of the top-1 anchor of each
  query. Only the winning anchor's box is decoded.
  """
  points, strides = grounding.anchors_for(config)

  def predict(params, rest, images, queries):
    model = nnx.merge(eval_graphdef, params, rest, copy=True)
    detector = model.detector
    features = detector.encode_image(images.astype(jnp.float32) / 255.0)
    return _decode_top1(detector.ground_queries(features, queries), points, strides)

  return predict


def make_packed_predict_fn(config: ml_collections.ConfigDict, eval_graphdef, blocks: int):
  """`predict(params, rest, images uint8 (G*n,S,S,3), queries (G*m,D), owner int32 (G*m,))
  -> (boxes (G*m,4), scores (G*m,))` for G = `blocks` blocks of n image slots and m query slots.

  Query j of block g reads the image context of image slot owner[g*m + j] (0..n-1) of the same block, so
  when the leading axes are split over G devices the gather stays on each device.
  """
  points, strides = grounding.anchors_for(config)

  def predict(params, rest, images, queries, owner):
    model = nnx.merge(eval_graphdef, params, rest, copy=True)
    detector = model.detector
    n, m = images.shape[0] // blocks, queries.shape[0] // blocks
    context = detector.image_context(detector.encode_image(images.astype(jnp.float32) / 255.0))
    owner = owner.reshape(blocks, m)

    def gather(a):
      if a.ndim == 0:
        return a
      per_block = a.reshape(blocks, n, *a.shape[1:])
      return jax.vmap(lambda x, o: x[o])(per_block, owner).reshape(blocks * m, *a.shape[1:])

    out = detector.ground_context(jax.tree.map(gather, context), queries[:, None, :])
    out = {'region_text_logits': out['region_text_logits'][..., 0], 'box_logits': out['box_logits']}
    return _decode_top1(out, points, strides)

  return predict


@dataclasses.dataclass(frozen=True)
class Block:
  """One device's share of an eval step: `images` = example index of each image slot; `queries` =
  (image slot, example index, query index) of each query slot."""
  images: tuple[int, ...]
  queries: tuple[tuple[int, int, int], ...]


def pack_queries(counts: Sequence[int], image_slots: int, query_slots: int,
                 max_queries_per_image: int = 0) -> list[Block]:
  """Packs the queries of examples with `counts[i]` queries each into as few blocks as it can.

  Each example's queries are cut into pieces of at most `max_queries_per_image` (when > 0; 1 reproduces one
  forward per query) and `query_slots` queries; a piece takes one image slot and a query slot per query.
  For B = the lower bound max(ceil(pieces / image_slots), ceil(queries / query_slots)), B + 1, ...: the
  pieces, largest first (ties in example order), go to the block with the most free query slots among
  those with a free image slot (ties: the first); a piece that fits whole in none is split over the blocks
  with a free image slot, most free slots first; the first B that takes every piece is the packing.
  Examples without queries take no slot. Inside a block, image slots are in placement order.
  """
  if image_slots < 1 or query_slots < 1:
    raise ValueError(f'eval.batch_size={image_slots} and eval.query_slots={query_slots} must be >= 1')
  per_piece = query_slots if max_queries_per_image <= 0 else min(query_slots, max_queries_per_image)
  pieces = [(example, first, min(per_piece, count - first))
            for example, count in enumerate(counts) for first in range(0, count, per_piece)]
  if not pieces:
    return []
  pieces.sort(key=lambda piece: -piece[2])                        # stable: ties stay in example order
  num_blocks = max(math.ceil(len(pieces) / image_slots), math.ceil(sum(counts) / query_slots))
  while True:
    blocks = _place_pieces(pieces, num_blocks, image_slots, query_slots)
    if blocks is not None:
      return blocks
    num_blocks += 1


def _place_pieces(pieces, num_blocks: int, image_slots: int, query_slots: int) -> list[Block] | None:
  """`pack_queries` for a fixed number of blocks: the blocks, or None when the pieces do not fit.

  The blocks that still have a free image slot and a free query slot sit in a heap keyed by (query slots
  used, block index), so the block with the most room (the first on ties) is found in O(log B)."""
  images: list[list[int]] = [[] for _ in range(num_blocks)]
  queries: list[list[tuple[int, int, int]]] = [[] for _ in range(num_blocks)]
  open_blocks = [(0, b) for b in range(num_blocks)]             # already a heap
  for example, first, count in pieces:
    parts = []                       # (block, queries taken): the roomiest block, or several when split
    left = count
    while left and open_blocks:
      used, b = heapq.heappop(open_blocks)
      take = min(left, query_slots - used)         # all of it, unless it fits whole in no block
      parts.append((b, take))
      left -= take
    if left:
      return None
    done = first
    for b, take in parts:
      slot = len(images[b])
      images[b].append(example)
      queries[b].extend((slot, example, done + k) for k in range(take))
      done += take
      if len(images[b]) < image_slots and len(queries[b]) < query_slots:
        heapq.heappush(open_blocks, (len(queries[b]), b))
  return [Block(tuple(images[b]), tuple(queries[b])) for b in range(num_blocks) if images[b]]


@dataclasses.dataclass
class QueryResult:
  """One query's answer, in original-image pixels (box None = no prediction)."""
  query_id: int
  caption: str
  box: np.ndarray | None
  score: float
  gt_box: np.ndarray
  category: str
  image_index: int


class Grounder:
  """A trained model ready to ground queries: eval-mode weights placed on a mesh, texts, jitted predict."""

  def __init__(self, config: ml_collections.ConfigDict, params, rest, texts: texts_lib.RunTexts, *,
               mesh: jax.sharding.Mesh | None = None, eval_graphdef=None):
    self.config = config
    self.texts = texts
    self.mesh = mesh if mesh is not None else sharding_lib.make_mesh(ml_collections.ConfigDict(
        {'shape': (-1,), 'axes': ('data',)}))
    self.replicated = sharding_lib.replicated(self.mesh)
    self.batch_sharding = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec(tuple(self.mesh.axis_names)))
    self.params = jax.device_put(params, self.replicated)
    self.rest = jax.device_put(rest, self.replicated)
    if eval_graphdef is None:
      _, eval_graphdef = grounding.graphdefs(config)
    self._graphdef = eval_graphdef
    self._predict = jax.jit(make_packed_predict_fn(config, eval_graphdef, self.mesh.size),
                            in_shardings=(self.replicated, self.replicated, self.batch_sharding,
                                          self.batch_sharding, self.batch_sharding),
                            out_shardings=(self.replicated, self.replicated),
                            compiler_options=compile_options.compiler_options(config, 'eval'))
    self._compiled_predict = None
    self._tower = None
    self.embedder = texts_lib.QueryEmbedder(config, texts, embed_tokens=self._embed_tokens)

  # ------------------------------------------------------------------------------------------ text
  def _embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
    if self._tower is None:
      graphdef = self._graphdef

      def run(params, rest, chunk):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return model.text_tower(chunk)

      self._tower = jax.jit(run)
    n = tokens.shape[0]
    padded = math.ceil(max(n, 1) / TEXT_CHUNK) * TEXT_CHUNK
    tokens = np.concatenate([tokens, np.zeros((padded - n, tokens.shape[1]), tokens.dtype)])
    parts = [np.asarray(self._tower(self.params, self.rest, tokens[i:i + TEXT_CHUNK]))
             for i in range(0, padded, TEXT_CHUNK)]
    return np.concatenate(parts)[:n]

  def embed_queries(self, strings: Sequence[str]) -> dict[str, np.ndarray]:
    """{string: (D,) unit vector} for the distinct strings, embedded in sorted order (deterministic)."""
    unique = sorted(set(s.strip() for s in strings))
    vectors = self.embedder(unique) if unique else np.zeros((0, self.config.text.dim), np.float32)
    return {s: vectors[i] for i, s in enumerate(unique)}

  # ---------------------------------------------------------------------------------------- images
  @property
  def blocks_per_step(self) -> int:
    return self.mesh.size

  def predict_packed(self, images: np.ndarray, queries: np.ndarray, owner: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One packed step (see `make_packed_predict_fn`): images uint8 (G*n,S,S,3), queries (G*m,D), owner
    (G*m,) -> canvas boxes (G*m,4), scores (G*m,); G = blocks_per_step, n = eval.batch_size, m =
    eval.query_slots."""
    def place(array):
      array = np.ascontiguousarray(array)
      return jax.make_array_from_callback(array.shape, self.batch_sharding, lambda index: array[index])

    args = (self.params, self.rest, place(images), place(queries), place(owner.astype(np.int32)))
    if self._compiled_predict is None:
      self._compiled_predict = distributed.compile_together(self._predict, *args, name='predict')
    boxes, scores = self._compiled_predict(*args)
    return np.asarray(jax.device_get(boxes)), np.asarray(jax.device_get(scores))

  def ground(self, image: np.ndarray, queries: Sequence[str]) -> list[tuple[np.ndarray | None, float]]:
    """Grounds several queries on one RGB image (H,W,3) uint8: [(xyxy original pixels | None, score)]."""
    from optisar_jax.data import augment
    canvas, params = augment.letterbox(np.asarray(image), int(self.config.data.imgsz),
                                       int(self.config.data.pad_value))
    h, w = image.shape[:2]
    example = {'image': canvas, 'letterbox': params, 'orig_size': (h, w), 'captions': list(queries),
               'query_ids': np.arange(len(queries)), 'gt_boxes': np.zeros((len(queries), 4), np.float32),
               'category_ids': np.zeros(len(queries), np.int64)}
    results = self.run([example], category_names=['query'], progress=False)
    return [(r.box, r.score) for r in results]

  def run(self, examples: Iterable[dict], *, category_names: Sequence[str], progress: bool = True
          ) -> list[QueryResult]:
    """Grounds every query of every example (dicts of `pipeline.make_eval_examples`)."""
    examples = list(examples)
    vectors = self.embed_queries([c for ex in examples for c in ex['captions']])
    n, m = int(self.config.eval.batch_size), int(self.config.eval.query_slots)
    blocks = pack_queries([len(ex['captions']) for ex in examples], n, m,
                          int(self.config.eval.max_queries_per_image))
    g = self.blocks_per_step
    size = int(self.config.data.imgsz)
    dim = int(self.config.text.dim)
    conf = float(self.config.eval.conf_threshold)
    answers: dict[tuple[int, int], tuple[np.ndarray, float]] = {}
    start_time = time.perf_counter()
    done_queries = 0
    total_queries = sum(len(ex['captions']) for ex in examples)
    for first in range(0, len(blocks), g):
      step_blocks = blocks[first:first + g]
      images = np.zeros((g * n, size, size, 3), np.uint8)
      queries = np.zeros((g * m, dim), np.float32)
      owner = np.zeros((g * m,), np.int32)
      for b, block in enumerate(step_blocks):
        for slot, i in enumerate(block.images):
          images[b * n + slot] = examples[i]['image']
        for j, (slot, i, q) in enumerate(block.queries):
          queries[b * m + j] = vectors[examples[i]['captions'][q].strip()]
          owner[b * m + j] = slot
      boxes, scores = self.predict_packed(images, queries, owner)
      for b, block in enumerate(step_blocks):
        for j, (_, i, q) in enumerate(block.queries):
          answers[(i, q)] = (boxes[b * m + j], float(scores[b * m + j]))
        done_queries += len(block.queries)
      if progress and jax.process_index() == 0:
        elapsed = time.perf_counter() - start_time
        sys.stdout.write(f'\reval {done_queries}/{total_queries} queries  '
                         f'{done_queries / max(elapsed, 1e-9):.1f} queries/s')
        sys.stdout.flush()
    if progress and jax.process_index() == 0 and blocks:
      sys.stdout.write('\n')
    results: list[QueryResult] = []
    for i, ex in enumerate(examples):
      lb = ex['letterbox']
      h, w = ex['orig_size']
      for q, caption in enumerate(ex['captions']):
        canvas_box, score = answers[(i, q)]
        box = None
        if score > conf:
          box = (np.asarray(canvas_box, np.float64) - np.array([lb.left, lb.top, lb.left, lb.top])) / lb.ratio
          box = np.clip(box, 0.0, np.array([w, h, w, h], np.float64))
        results.append(QueryResult(
            query_id=int(ex['query_ids'][q]), caption=caption, box=box, score=score,
            gt_box=np.asarray(ex['gt_boxes'][q], np.float64),
            category=str(category_names[int(ex['category_ids'][q])]), image_index=i))
    return results


def score_results(results: Sequence[QueryResult], examples: Sequence[dict]) -> dict:
  """The metrics JSON (interfaces.md section 5, plus per_category) of grounded queries."""
  n = len(results)
  pred = np.full((n, 4), np.nan)
  for k, r in enumerate(results):
    if r.box is not None:
      pred[k] = r.box
  gt = np.stack([r.gt_box for r in results]) if n else np.zeros((0, 4))
  wh = np.array([[examples[r.image_index]['orig_size'][1], examples[r.image_index]['orig_size'][0]]
                 for r in results], np.float64).reshape(-1, 2)
  return metrics_lib.grounding_metrics(pred, gt, wh, [r.category for r in results])


def write_outputs(metrics: dict, results: Sequence[QueryResult], *, output: str | None,
                  predictions_out: str | None) -> None:
  """Writes the metrics JSON and the predictions file (process 0, atomically; local or remote paths)."""
  if jax.process_index() != 0:
    return
  if output:
    paths.write_json_atomic(output, metrics, allow_nan=False)
  if predictions_out:
    boxes = np.array([r.box if r.box is not None else [np.nan] * 4 for r in results], np.float64)
    predictions_lib.write_predictions(predictions_out, [r.query_id for r in results], boxes.reshape(-1, 4),
                                      [r.score for r in results])


def evaluate_split(grounder: Grounder, config: ml_collections.ConfigDict, split: str, *,
                   progress: bool = True) -> tuple[dict, list[QueryResult], list[dict]]:
  """(metrics, per-query results, examples) of `split` of the config's TFDS dataset."""
  from optisar_jax.data.sources import open_source
  source = open_source(config, split)
  names = list(source.dataset_info.features['objects']['category'].names)
  examples = list(pipeline.make_eval_examples(source, int(config.data.imgsz),
                                              pad_value=int(config.data.pad_value)))
  results = grounder.run(examples, category_names=names, progress=progress)
  return score_results(results, examples), results, examples


def evaluate_state(config: ml_collections.ConfigDict, workdir: str, state: dict, *, split: str,
                   mesh=None, progress: bool = False, use_ema: bool | None = None) -> dict:
  """Metrics of an in-memory train state (the loop's periodic validation)."""
  use_ema = config.eval.use_ema if use_ema is None else use_ema
  weights = state['ema'] if use_ema else {'params': state['params'], 'rest': state['rest']}
  texts = texts_lib.load_run_texts(config, workdir)
  grounder = Grounder(config, weights['params'], weights['rest'], texts, mesh=mesh)
  metrics, _, _ = evaluate_split(grounder, config, split, progress=progress)
  return metrics


# -------------------------------------------------------------------------------- trained workdirs
def load_config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (WORKDIR/config.json; WORKDIR local or remote)."""
  path = paths.path(workdir) / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(f'{path}: not found (is {workdir} a training workdir?)')
  data = paths.read_json(path, 'run config')
  return _tuples(ml_collections.ConfigDict(data))


def _tuples(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """JSON turned tuples into lists; configs use tuples (mesh shapes, rules, ...)."""
  def convert(value):
    if isinstance(value, list):
      return tuple(convert(v) for v in value)
    return value
  for key in list(config.keys()):
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      _tuples(value)
    else:
      config[key] = convert(value)
  return config


def restore_weights(config: ml_collections.ConfigDict, workdir: str, *, use_ema: bool = True,
                    best: bool = False):
  """(params, rest, step, eval graphdef) of the newest (or best) checkpoint in WORKDIR, on this process's
  first device. Only the weights are read (the EMA, or the live weights with `use_ema=False`): an Orbax
  partial restore that leaves the optimizer state on disk."""
  from flax import nnx
  from optisar_jax.runtime import checkpoint as checkpoint_lib
  checkpointer = checkpoint_lib.TrainCheckpointer.from_config(workdir, config, async_save=False)
  step = checkpointer.best_step() if best else checkpointer.latest_step()
  if step is None:
    checkpointer.close()
    raise FileNotFoundError(f'{checkpointer.best_directory if best else checkpointer.directory}: '
                            'no checkpoint found')
  model = grounding.abstract_model(config)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  weights = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                         {'params': params, 'rest': rest})
  target = {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=device)}
  if use_ema:
    target['ema'] = weights
  else:
    target.update(weights)
  state = checkpointer.restore_subtree(target, step=step, best=best)
  checkpointer.close()
  weights = state['ema'] if use_ema else state
  return weights['params'], weights['rest'], int(jax.device_get(state['step'])), grounding.graphdefs_of(model)[1]


def load_grounder(workdir: str, *, use_ema: bool = True, best: bool = False,
                  overrides: Sequence[str] = ()) -> Grounder:
  """A Grounder for the newest (or best) checkpoint of a training workdir."""
  from optisar_jax import config as config_lib
  config = config_lib.apply_overrides(load_config_from_workdir(workdir), overrides)
  params, rest, _, eval_graphdef = restore_weights(config, workdir, use_ema=use_ema, best=best)
  return Grounder(config, params, rest, texts_lib.load_run_texts(config, workdir), eval_graphdef=eval_graphdef)
