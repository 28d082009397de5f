"""Inference artifacts: an Orbax checkpoint of the inference state and a serialized `jax.export` function.

    write_export(workdir, output_dir)                 # scripts/export.py
    model = load_export(output_dir)                   # needs jax, orbax, numpy (+ tokenizers): no model code
    boxes, scores = model.predict(images_uint8, query_embeddings)
    answers = model.ground(image_rgb, ['the ship in the upper left'])   # trainable-text runs

Layout of OUTPUT_DIR (written under a temporary name and renamed at the end; a remote OUTPUT_DIR such as
gs://bucket/export is built in a local temporary directory and uploaded with export.json last, so a
directory with export.json is complete):

    export.json           metadata: imgsz, pad value, text mode and dim, encoder identity, step, shapes
    inference_state/      Orbax checkpoint {'params', 'rest'} as plain nested dicts (EMA weights and
                          BatchNorm statistics, no optimizer state); restores onto any device count, and
                          `nnx.replace_by_pure_dict` puts it back into a GroundingModel for fine-tuning
    config.json           the training config
    text/                 vocabulary.json (+ tokenizer.json in trainable-text mode)
    predict.jaxexport     (weights..., images uint8 (N,S,S,3), queries f32 (N,Q,D)) -> (boxes (N,Q,4) xyxy
                          canvas pixels, scores (N,Q)); N and Q are symbolic
    embed.jaxexport       (weights..., token ids int32 (T,L)) -> (T,D) unit vectors (trainable text only)

The exported functions take the weights as a flat list (the leaves of the pure-dict state in
`jax.tree.leaves` order), so loading needs no Flax pytree types.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optisar_jax.runtime import paths

EXPORT_FILE = 'export.json'
STATE_DIR = 'inference_state'
PREDICT_FILE = 'predict.jaxexport'
EMBED_FILE = 'embed.jaxexport'
FORMAT = 'optisar-jax-export-v1'


def _pure(state) -> dict:
  return state.to_pure_dict() if hasattr(state, 'to_pure_dict') else state


PLATFORMS = ('cpu', 'cuda', 'tpu')


def write_export(workdir: str, output_dir: str, *, use_ema: bool = True,
                 platforms: Sequence[str] = PLATFORMS) -> str:
  """Exports the newest checkpoint of a training workdir to `output_dir`; returns the path.

  The functions are traced once and lowered for every platform in `platforms` (by default CPU, CUDA and
  TPU), so an export written on one serves on the others; the platform-independent StableHLO carries
  the model as this host's config resolves it (docs/scaling.md).
  """
  platforms = tuple(dict.fromkeys(str(p).lower() for p in platforms))
  unknown = [p for p in platforms if p not in ('cpu', 'cuda', 'rocm', 'tpu')]
  if unknown or not platforms:
    raise ValueError(f'--platforms {",".join(platforms)}: expected some of cpu, cuda, rocm, tpu')
  import orbax.checkpoint as ocp
  from flax import nnx
  from jax import export as jax_export

  from optisar_jax import evaluation
  from optisar_jax.text import run_texts as texts_lib

  config = evaluation.load_config_from_workdir(workdir)
  params, rest, step, eval_graphdef = evaluation.restore_weights(config, workdir, use_ema=use_ema)
  texts_lib.load_run_texts(config, workdir)  # checks the run's text files exist and are consistent
  weights = {'params': _pure(params), 'rest': _pure(rest)}
  leaves, treedef = jax.tree.flatten(weights)
  leaf_paths = [[str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
                for path, _ in jax.tree_util.tree_flatten_with_path(weights)[0]]

  def states(flat):
    """The flat weight list back into the model's (params, rest) nnx.States (structure from the checkpoint)."""
    tree = jax.tree.unflatten(treedef, list(flat))
    p = jax.tree.map(lambda x: x, params)
    r = jax.tree.map(lambda x: x, rest)
    nnx.replace_by_pure_dict(p, tree['params'])
    nnx.replace_by_pure_dict(r, tree['rest'])
    return p, r

  predict_core = evaluation.make_predict_fn(config, eval_graphdef)

  def predict(flat, images, queries):
    return predict_core(*states(flat), images, queries)

  size = int(config.data.imgsz)
  n, q = jax_export.symbolic_shape('n, q')
  weight_specs = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in leaves]
  exported_predict = jax_export.export(jax.jit(predict), platforms=platforms)(
      weight_specs, jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8),
      jax.ShapeDtypeStruct((n, q, int(config.text.dim)), jnp.float32))
  exported_embed = None
  if config.text.mode == 'trainable':
    t, = jax_export.symbolic_shape('t')

    def embed(flat, tokens):
      return nnx.merge(eval_graphdef, *states(flat), copy=True).text_tower(tokens)

    exported_embed = jax_export.export(jax.jit(embed), platforms=platforms)(
        weight_specs, jax.ShapeDtypeStruct((t, int(config.text.tower.context_length)), jnp.int32))

  if paths.exists(output_dir):
    raise FileExistsError(f'{output_dir}: already exists; remove it or choose another --output')
  tmp = paths.staging_dir(output_dir, prefix='.export-')
  try:
    host_weights = jax.tree.map(np.asarray, jax.device_get(weights))
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, STATE_DIR), host_weights)
      checkpointer.wait_until_finished()
    with open(os.path.join(tmp, PREDICT_FILE), 'wb') as f:
      f.write(exported_predict.serialize())
    if exported_embed is not None:
      with open(os.path.join(tmp, EMBED_FILE), 'wb') as f:
        f.write(exported_embed.serialize())
    paths.copy_tree(texts_lib.text_dir(workdir), os.path.join(tmp, 'text'))
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=list)
    cache_identity = None
    if config.text.mode == 'frozen':
      cache_identity = texts_lib.load_run_texts(config, workdir).cache.encoder_identity
    meta = {'format': FORMAT, 'step': step, 'ema': use_ema, 'imgsz': size,
            'pad_value': int(config.data.pad_value), 'resize': str(config.data.get('resize', 'pil')),
            'text_mode': config.text.mode,
            'text_dim': int(config.text.dim), 'text_encoder': config.text.encoder,
            'text_encoder_identity': cache_identity,
            'context_length': int(config.text.tower.context_length),
            'conf_threshold': float(config.eval.conf_threshold),
            'platforms': list(platforms), 'weight_paths': leaf_paths}
    with open(os.path.join(tmp, EXPORT_FILE), 'w') as f:
      json.dump(meta, f, indent=2, sort_keys=True)
    paths.publish_dir(tmp, output_dir, last=[EXPORT_FILE])
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return output_dir


class ExportedGrounder:
  """A loaded export: `predict` (batched), `embed` (trainable text) and `ground` (one image)."""

  def __init__(self, directory: str):
    import orbax.checkpoint as ocp
    from jax import export as jax_export
    root = paths.path(directory)
    meta_path = root / EXPORT_FILE
    if not meta_path.is_file():
      raise FileNotFoundError(f'{meta_path}: not found (is {directory} an optisar-jax export?)')
    self.meta = paths.read_json(meta_path, 'export metadata')
    if self.meta.get('format') != FORMAT:
      raise ValueError(f'{meta_path}: unknown export format {self.meta.get("format")!r}')
    with ocp.StandardCheckpointer() as checkpointer:
      weights = checkpointer.restore(root / STATE_DIR)
    # Orbax may hand back dict keys in another order (and integer keys as strings): follow the recorded
    # flatten order of the exported functions.
    self.weights = [jnp.asarray(_lookup(weights, path, meta_path)) for path in self.meta['weight_paths']]
    self._predict = jax_export.deserialize(bytearray((root / PREDICT_FILE).read_bytes()))
    self._embed = None
    embed_path = root / EMBED_FILE
    if embed_path.is_file():
      self._embed = jax_export.deserialize(bytearray(embed_path.read_bytes()))
    self.tokenizer = None
    tokenizer_path = root / 'text' / 'tokenizer.json'
    if tokenizer_path.is_file():
      import tokenizers
      self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer_path.read_text(encoding='utf-8'))

  @property
  def imgsz(self) -> int:
    return int(self.meta['imgsz'])

  @property
  def platforms(self) -> tuple[str, ...]:
    """The platforms the functions were lowered for (any of them may run this export)."""
    return tuple(self._predict.platforms)

  def predict(self, images: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """images uint8 (N,S,S,3) letterboxed, queries (N,Q,D) unit vectors -> canvas xyxy (N,Q,4), scores."""
    boxes, scores = self._predict.call(self.weights, jnp.asarray(images, jnp.uint8),
                                       jnp.asarray(queries, jnp.float32))
    return np.asarray(boxes), np.asarray(scores)

  def embed(self, strings: Sequence[str]) -> np.ndarray:
    """(T, D) query embeddings with the run's trained text tower (trainable-text exports)."""
    if self._embed is None or self.tokenizer is None:
      raise ValueError('this export has no text tower (frozen text): embed queries with the encoder named '
                       f"by export.json 'text_encoder' ({self.meta.get('text_encoder')!r})")
    from optisar_jax.text.tokenization import tokenize
    tokens = tokenize(self.tokenizer, [s.strip() for s in strings], int(self.meta['context_length']))
    return np.asarray(self._embed.call(self.weights, jnp.asarray(tokens)))

  def ground(self, image: np.ndarray, queries: Sequence[str], query_embeddings: np.ndarray | None = None
             ) -> list[tuple[np.ndarray | None, float]]:
    """[(xyxy original pixels | None, score)] for each query on one RGB uint8 image."""
    from optisar_jax.data.augment import letterbox
    canvas, params = letterbox(np.asarray(image), self.imgsz, int(self.meta['pad_value']),
                               resize=str(self.meta.get('resize', 'pil')))
    vectors = self.embed(queries) if query_embeddings is None else np.asarray(query_embeddings)
    boxes, scores = self.predict(canvas[None], vectors[None])
    h, w = image.shape[:2]
    out = []
    for box, score in zip(boxes[0], scores[0]):
      if float(score) <= float(self.meta['conf_threshold']):
        out.append((None, float(score)))
        continue
      box = (np.asarray(box, np.float64) - [params.left, params.top, params.left, params.top]) / params.ratio
      out.append((np.clip(box, 0.0, [w, h, w, h]), float(score)))
    return out


def _lookup(tree, path: Sequence[str], source: str):
  node = tree
  for key in path:
    for candidate in (key, int(key) if key.lstrip('-').isdigit() else None):
      if candidate is not None and isinstance(node, dict) and candidate in node:
        node = node[candidate]
        break
    else:
      raise KeyError(f'{source}: weight {"/".join(path)} missing from the inference state')
  return node


def load_export(directory: str) -> ExportedGrounder:
  return ExportedGrounder(directory)
