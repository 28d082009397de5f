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
so the metrics are bitwise identical for any number of devices or processes.

Several hosts: every process reads the split's annotations (no pixels) and computes the same packing;
each then decodes, embeds and places only the blocks of its own devices (`jax.make_array_from_callback`),
one step ahead of them (a background thread), and keeps only its own answers until one all-gather at the
end; process 0 writes the files. Weights are placed replicated from each process's own copy, so nothing
crosses hosts but that gather.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from optisar_jax.runtime import compile_options
from optisar_jax import grounding
from optisar_jax import metrics as metrics_lib
from optisar_jax import predictions as predictions_lib
from optisar_jax.data import augment
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


def _host_copy(x) -> np.ndarray:
  """This process's copy of a replicated (or single-device) array, or a host array, as numpy."""
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def place_replicated(tree, mesh: jax.sharding.Mesh):
  """`tree` replicated on every device of `mesh`, which may span processes (every process passes the same
  values). Arrays already on exactly the mesh's devices (the training state, any sharding) are resharded
  on the devices; anything else goes through this process's host copy, so no array crosses hosts."""
  replicated = sharding_lib.replicated(mesh)
  devices = set(mesh.devices.flat)
  reshard = jax.jit(lambda x: x, out_shardings=replicated)

  def place(x):
    if isinstance(x, jax.Array) and x.sharding.device_set == devices:
      return x if x.sharding.is_equivalent_to(replicated, x.ndim) else reshard(x)
    host = _host_copy(x)
    return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])

  return jax.tree.map(place, tree)


class Grounder:
  """A trained model ready to ground queries: eval-mode weights placed on a mesh, texts, jitted predict.

  The mesh may span several processes: every process calls `run` with the same examples; each decodes,
  embeds and places only what its own devices run, and the answers are gathered at the end.
  """

  def __init__(self, config: ml_collections.ConfigDict, params, rest, texts: texts_lib.RunTexts, *,
               mesh: jax.sharding.Mesh | None = None, eval_graphdef=None):
    self.config = config
    self.texts = texts
    self.mesh = mesh if mesh is not None else sharding_lib.make_mesh(ml_collections.ConfigDict(
        {'shape': (-1,), 'axes': ('data',)}))
    self.replicated = sharding_lib.replicated(self.mesh)
    self.batch_sharding = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec(tuple(self.mesh.axis_names)))
    if eval_graphdef is None:
      _, eval_graphdef = grounding.graphdefs(config)
    self._graphdef = eval_graphdef
    self._predict = jax.jit(make_packed_predict_fn(config, eval_graphdef, self.mesh.size),
                            in_shardings=(self.replicated, self.replicated, self.batch_sharding,
                                          self.batch_sharding, self.batch_sharding),
                            out_shardings=(self.batch_sharding, self.batch_sharding),
                            compiler_options=compile_options.compiler_options(config, 'eval'))
    self._compiled_predict = None
    self._tower = None
    self.decoded_images = 0          # images this process decoded in the last `run`
    self.set_weights(params, rest)
    self.embedder = texts_lib.QueryEmbedder(config, texts, embed_tokens=self._embed_tokens)

  @property
  def eval_graphdef(self):
    """The eval-mode graph of the model (nnx.merge it with `params` and `rest`)."""
    return self._graphdef

  def set_weights(self, params, rest) -> None:
    """New weights of the same structure (the training loop's periodic validation): the compiled predict
    is kept."""
    self.params = place_replicated(params, self.mesh)
    self.rest = place_replicated(rest, self.mesh)
    self._tower_weights = None

  # ------------------------------------------------------------------------------------------ text
  def _embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
    """Trainable-tower embeddings of token rows, computed on this process's first device (each process
    embeds only the queries its own devices run)."""
    if self._tower is None:
      graphdef = self._graphdef

      def run(params, rest, chunk):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return model.text_tower(chunk)

      self._tower = jax.jit(run)
    device = jax.local_devices()[0]
    if self._tower_weights is None:
      self._tower_weights = jax.device_put(jax.tree.map(_host_copy, (self.params, self.rest)), device)
    n = tokens.shape[0]
    padded = math.ceil(max(n, 1) / TEXT_CHUNK) * TEXT_CHUNK
    tokens = np.concatenate([tokens, np.zeros((padded - n, tokens.shape[1]), tokens.dtype)])
    # A one-device mesh of its own: a caller's mesh (the training loop's) must not claim this computation.
    with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ('one',))):
      parts = [np.asarray(self._tower(*self._tower_weights, tokens[i:i + TEXT_CHUNK]))
               for i in range(0, padded, TEXT_CHUNK)]
    return np.concatenate(parts)[:n]

  def embed_queries(self, strings: Sequence[str]) -> dict[str, np.ndarray]:
    """{string: (D,) unit vector} for the distinct strings, embedded in sorted order (deterministic: a
    string's vector does not depend on the other strings)."""
    unique = sorted(set(s.strip() for s in strings))
    vectors = self.embedder(unique) if unique else np.zeros((0, self.config.text.dim), np.float32)
    return {s: vectors[i] for i, s in enumerate(unique)}

  # ---------------------------------------------------------------------------------------- images
  @property
  def blocks_per_step(self) -> int:
    return self.mesh.size

  def local_block_positions(self) -> list[int]:
    """Positions (0..G-1) in a step's blocks that this process's devices run, ascending."""
    n = int(self.config.eval.batch_size)
    shape = (self.blocks_per_step * n, 1)
    starts = {index[0].start or 0 for index in self.batch_sharding.addressable_devices_indices_map(shape).values()}
    return sorted(start // n for start in starts)

  def _place_step(self, arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]):
    """Global (images, queries, owner) arrays of one step from this process's blocks {position: (images
    (n,S,S,3), queries (m,D), owner (m,))}."""
    g, n, m = self.blocks_per_step, int(self.config.eval.batch_size), int(self.config.eval.query_slots)
    size, dim = int(self.config.data.imgsz), int(self.config.text.dim)
    shapes = ((g * n, size, size, 3), (g * m, dim), (g * m,))

    def make(k):
      rows = shapes[k][0] // g

      def part(index):
        start = index[0].start or 0
        return arrays[start // rows][k]

      return jax.make_array_from_callback(shapes[k], self.batch_sharding, part)

    return tuple(make(k) for k in range(3))

  def _predict_placed(self, images, queries, owner):
    args = (self.params, self.rest, images, queries, owner)
    if self._compiled_predict is None:
      self._compiled_predict = distributed.compile_together(self._predict, *args, name='predict')
    return self._compiled_predict(*args)

  def predict_packed(self, images: np.ndarray, queries: np.ndarray, owner: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One packed step from whole host arrays (one process): images uint8 (G*n,S,S,3), queries (G*m,D),
    owner (G*m,) -> canvas boxes (G*m,4), scores (G*m,); G = blocks_per_step, n = eval.batch_size,
    m = eval.query_slots (see `make_packed_predict_fn`)."""
    g = self.blocks_per_step
    n, m = images.shape[0] // g, queries.shape[0] // g
    arrays = {b: (images[b * n:(b + 1) * n], queries[b * m:(b + 1) * m], owner[b * m:(b + 1) * m].astype(np.int32))
              for b in range(g)}
    boxes, scores = self._predict_placed(*self._place_step(arrays))
    return np.asarray(jax.device_get(boxes)), np.asarray(jax.device_get(scores))

  def ground(self, image: np.ndarray, queries: Sequence[str]) -> list[tuple[np.ndarray | None, float]]:
    """Grounds several queries on one RGB image (H,W,3) uint8: [(xyxy original pixels | None, score)]."""
    canvas, params = augment.letterbox(np.asarray(image), int(self.config.data.imgsz),
                                       int(self.config.data.pad_value), resize=str(self.config.data.get('resize', 'pil')))
    h, w = image.shape[:2]
    example = {'image': canvas, 'letterbox': params, 'orig_size': (h, w), 'captions': list(queries),
               'query_ids': np.arange(len(queries)), 'gt_boxes': np.zeros((len(queries), 4), np.float32),
               'category_ids': np.zeros(len(queries), np.int64)}
    results = self.run([example], category_names=['query'], progress=False)
    return [(r.box, r.score) for r in results]

  def run(self, examples: Sequence[dict], *, category_names: Sequence[str], progress: bool = True,
          image_of=None) -> list[QueryResult]:
    """Grounds every query of every example (`pipeline.eval_metadata` dicts); returns one QueryResult per
    query, in example order, on every process.

    `image_of(i)` gives example i's letterboxed canvas (default: `examples[i]['image']`); it is called only
    for the images of this process's blocks, one step ahead of the device (a background thread).
    """
    from optisar_jax.runtime import prefetch as prefetch_lib
    examples = list(examples)
    if image_of is None:
      image_of = lambda i: examples[i]['image']  # noqa: E731
    n, m = int(self.config.eval.batch_size), int(self.config.eval.query_slots)
    blocks = pack_queries([len(ex['captions']) for ex in examples], n, m,
                          int(self.config.eval.max_queries_per_image))
    g = self.blocks_per_step
    mine = self.local_block_positions()
    steps = [blocks[first:first + g] for first in range(0, len(blocks), g)]
    local = [[(pos, step[pos]) for pos in mine if pos < len(step)] for step in steps]
    vectors = self.embed_queries([examples[i]['captions'][q] for step in local for _, block in step
                                  for _, i, q in block.queries])
    size, dim = int(self.config.data.imgsz), int(self.config.text.dim)

    self.decoded_images = 0

    def host_step(step_blocks):
      arrays = {}
      for pos in mine:
        images = np.zeros((n, size, size, 3), np.uint8)
        queries = np.zeros((m, dim), np.float32)
        owner = np.zeros((m,), np.int32)
        arrays[pos] = (images, queries, owner)
      for pos, block in step_blocks:
        images, queries, owner = arrays[pos]
        for slot, i in enumerate(block.images):
          images[slot] = image_of(i)
          self.decoded_images += 1
        for j, (slot, i, q) in enumerate(block.queries):
          queries[j] = vectors[examples[i]['captions'][q].strip()]
          owner[j] = slot
      return arrays

    answers: dict[tuple[int, int], tuple[np.ndarray, float]] = {}
    start_time = time.perf_counter()
    total_queries = sum(len(ex['captions']) for ex in examples)
    placed_steps = prefetch_lib.DevicePrefetch(map(host_step, local), self._place_step, size=2)
    with placed_steps:
      for done, (step_blocks, placed) in enumerate(zip(local, placed_steps), 1):
        boxes, scores = self._predict_placed(*placed)
        by_position = dict(step_blocks)
        for (first, box_rows), (_, score_rows) in zip(_by_start(boxes), _by_start(scores)):
          block = by_position.get(first // m)
          if block is None:                # a device of this process with no block in the last step
            continue
          box_rows, score_rows = np.asarray(box_rows), np.asarray(score_rows)
          for j, (_, i, q) in enumerate(block.queries):
            answers[(i, q)] = (box_rows[j], float(score_rows[j]))
        if progress and jax.process_index() == 0:
          elapsed = time.perf_counter() - start_time
          sys.stdout.write(f'\reval step {done}/{len(steps)}  '
                           f'{total_queries * done / len(steps) / max(elapsed, 1e-9):.1f} queries/s')
          sys.stdout.flush()
    if progress and jax.process_index() == 0 and blocks:
      sys.stdout.write('\n')
    answers = _gather_answers(answers)
    results: list[QueryResult] = []
    conf = float(self.config.eval.conf_threshold)
    for i, ex in enumerate(examples):
      lb = ex['letterbox']
      h, w = ex['orig_size']
      for q, caption in enumerate(ex['captions']):
        canvas_box, score = answers[(i, q)]
        box = (augment.boxes_from_letterbox(canvas_box, lb, (h, w))[0].astype(np.float64)
               if score > conf else None)
        results.append(QueryResult(
            query_id=int(ex['query_ids'][q]), caption=caption, box=box, score=score,
            gt_box=np.asarray(ex['gt_boxes'][q], np.float64),
            category=str(category_names[int(ex['category_ids'][q])]), image_index=i))
    return results


def _by_start(array: jax.Array) -> list[tuple[int, Any]]:
  """This process's shards of a leading-axis-sharded array as (first row, data), one per device."""
  return sorted(((shard.index[0].start or 0, shard.data) for shard in array.addressable_shards),
                key=lambda item: item[0])


def _gather_answers(answers: dict[tuple[int, int], tuple[np.ndarray, float]]
                    ) -> dict[tuple[int, int], tuple[np.ndarray, float]]:
  """Every process's answers, on every process (one all-gather at the end of an evaluation). Boxes and
  scores travel as float32, exactly as the device produced them."""
  if jax.process_count() == 1:
    return answers
  from jax.experimental import multihost_utils
  keys = sorted(answers)
  rows = np.zeros((len(keys), 7), np.float32)
  ids = np.asarray(keys, np.int32).reshape(-1, 2)
  for k, key in enumerate(keys):
    box, score = answers[key]
    rows[k, :4] = box
    rows[k, 4] = score
  counts = np.asarray(multihost_utils.process_allgather(np.asarray([len(keys)], np.int32))).reshape(-1)
  width = int(counts.max())
  padded_ids = np.zeros((width, 2), np.int32)
  padded_ids[:len(keys)] = ids
  padded_rows = np.zeros((width, 7), np.float32)
  padded_rows[:len(keys)] = rows
  all_ids = np.asarray(multihost_utils.process_allgather(padded_ids)).reshape(len(counts), width, 2)
  all_rows = np.asarray(multihost_utils.process_allgather(padded_rows)).reshape(len(counts), width, 7)
  merged = {}
  for p, count in enumerate(counts):
    for k in range(int(count)):
      merged[(int(all_ids[p, k, 0]), int(all_ids[p, k, 1]))] = (all_rows[p, k, :4].copy(), float(all_rows[p, k, 4]))
  return merged


def score_results(results: Sequence[QueryResult], examples: Sequence[dict]) -> dict:
  """The metrics JSON (docs/interfaces.md section 5, plus per_category) of grounded queries."""
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


def gate_values(params) -> dict[str, dict[str, list[float]]]:
  """The learned TGDF-SSA gates per fusion layer: {layer path: {'weight_gate': [nh], 'feature_gate': [nh]}}
  (one value per attention head; both start at `model.tgdg.gate_init`, the reference's (0, 0) gates stay
  dead, see docs/architecture.md)."""
  gates: dict[str, dict[str, list[float]]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = sharding_lib.path_to_str(path)
    layer, _, kind = name.rpartition('/')
    if kind in ('weight_gate', 'feature_gate'):
      gates.setdefault(layer, {})[kind] = [float(v) for v in np.asarray(_host_copy(leaf)).reshape(-1)]
  return dict(sorted(gates.items()))


class EvalSplit:
  """A split of the config's TFDS dataset, ready to evaluate: the per-image metadata of every image
  (`pipeline.eval_metadata`, no pixels: a few hundred bytes an image) and `canvas(i)`, which decodes and
  letterboxes image i on demand. Only the images of a process's own blocks are ever decoded."""

  def __init__(self, config: ml_collections.ConfigDict, split: str):
    from optisar_jax.data.sources import open_source
    self.imgsz, self.pad_value = int(config.data.imgsz), int(config.data.pad_value)
    self.resize = str(config.data.get('resize', 'pil'))
    self.split = split
    self.source = open_source(config, split, skip_images=True)
    self.category_names = list(self.source.dataset_info.features['objects']['category'].names)
    self.examples = [pipeline.eval_metadata(self.source[i], i, self.imgsz) for i in range(len(self.source))]

  def canvas(self, i: int) -> np.ndarray:
    """The letterboxed uint8 (imgsz, imgsz, 3) canvas of example i."""
    return pipeline.eval_canvas(self.source[self.examples[i]['index']], self.imgsz, self.pad_value,
                                resize=self.resize)


def evaluate_split(grounder: Grounder, config: ml_collections.ConfigDict, split: str | EvalSplit, *,
                   progress: bool = True) -> tuple[dict, list[QueryResult], list[dict]]:
  """(metrics, per-query results, per-image metadata) of `split` (a name, or an `EvalSplit` read before).

  Streams: each process decodes only the images its own devices run, a step ahead of them, so host memory
  does not grow with the split; the answers are gathered at the end, and every process returns all of them.
  """
  data = split if isinstance(split, EvalSplit) else EvalSplit(config, split)
  results = grounder.run(data.examples, category_names=data.category_names, progress=progress,
                         image_of=data.canvas)
  return score_results(results, data.examples), results, data.examples


class Validator:
  """The training loop's periodic validation: one Grounder (one compiled predict), the run's texts and the
  split's metadata, built at the first call and reused; each call evaluates new weights."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, split: str, mesh=None):
    self.config, self.workdir, self.split_name, self.mesh = config, workdir, split, mesh
    self._grounder: Grounder | None = None
    self._split: EvalSplit | None = None
    self.last_results: list[QueryResult] = []

  def __call__(self, state: dict, *, use_ema: bool | None = None, progress: bool = False) -> dict:
    """Metrics of the EMA (or live) weights of `state` on the split."""
    use_ema = self.config.eval.use_ema if use_ema is None else use_ema
    weights = state['ema'] if use_ema else {'params': state['params'], 'rest': state['rest']}
    if self._grounder is None:
      texts = texts_lib.load_run_texts(self.config, self.workdir)
      self._grounder = Grounder(self.config, weights['params'], weights['rest'], texts, mesh=self.mesh)
      self._split = EvalSplit(self.config, self.split_name)
    else:
      self._grounder.set_weights(weights['params'], weights['rest'])
    metrics, self.last_results, _ = evaluate_split(self._grounder, self.config, self._split, progress=progress)
    return metrics

  def examples_picture(self, count: int) -> np.ndarray:
    """RGB uint8 grid of `count` answers of the last call (`visualize.examples_grid`)."""
    from optisar_jax import visualize
    grid = visualize.examples_grid(self.last_results, self._split.examples, count, canvas_of=self._split.canvas)
    return np.asarray(grid)


def evaluate_state(config: ml_collections.ConfigDict, workdir: str, state: dict, *, split: str,
                   mesh=None, progress: bool = False, use_ema: bool | None = None) -> dict:
  """Metrics of an in-memory train state (one-off; the training loop keeps a `Validator`)."""
  return Validator(config, workdir, split=split, mesh=mesh)(state, use_ema=use_ema, progress=progress)


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
