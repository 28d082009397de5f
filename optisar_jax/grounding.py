"""The grounding model as trained and served: the OptiSAR-Net++ detector plus, optionally, a text tower.

Two text modes (config `text.mode`):

* `frozen`: the paper's setting. Texts are embedded once, offline, by a frozen encoder (MobileCLIP2-B);
  the run holds a *text table* of shape (V, D) float32 whose row i embeds vocabulary string i.
* `trainable`: a small CLIP-architecture tower is trained jointly with the detector (the demo, where no
  pretrained encoder can be downloaded). The text table is then (V, L) int32: row i holds the token ids
  of vocabulary string i.

Either way the training batch names its K text slots by vocabulary id (`text_ids`, (B, K)), and
`embed_texts(text_table, ids)` turns ids into (..., D) unit vectors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
import ml_collections

from optisar_jax.models import box_ops
from optisar_jax.models.detector import OptiSARNet


class GroundingModel(nnx.Module):
  """Detector (+ trainable text tower when `config.text.mode == 'trainable'`)."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.text_mode = config.text.mode
    if self.text_mode not in ('frozen', 'trainable'):
      raise ValueError(f"config key 'text.mode': expected 'frozen' or 'trainable', got {self.text_mode!r}")
    self.detector = OptiSARNet(config.model, config.text.dim, rngs=rngs)
    if self.text_mode == 'trainable':
      from optisar_jax.text.tower import TextTower
      self.text_tower = TextTower(config.text.tower, out_dim=config.text.dim, rngs=rngs)
    else:
      self.text_tower = None

  def embed_texts(self, text_table: jax.Array, ids: jax.Array) -> jax.Array:
    """Text embeddings (..., D), L2-normalised, for vocabulary ids (...)."""
    rows = jnp.take(text_table, ids, axis=0)
    if self.text_tower is None:
      return rows.astype(jnp.float32)
    flat = rows.reshape((-1, rows.shape[-1]))
    return self.text_tower(flat).reshape(ids.shape + (-1,))

  def __call__(self, images: jax.Array, text_embeddings: jax.Array, *, rngs: nnx.Rngs | None = None):
    return self.detector(images, text_embeddings, rngs=rngs)


def abstract_model(config: ml_collections.ConfigDict) -> GroundingModel:
  """The model with ShapeDtypeStruct leaves (no FLOPs, no memory)."""
  return nnx.eval_shape(lambda: GroundingModel(config, rngs=nnx.Rngs(config.seed)))


def graphdefs_of(model: GroundingModel):
  """(train graphdef, eval graphdef): the static structure of the model in each mode."""
  model.train()
  train_def = nnx.split(model, nnx.Param, ...)[0]
  model.eval()
  eval_def = nnx.split(model, nnx.Param, ...)[0]
  return train_def, eval_def


def graphdefs(config: ml_collections.ConfigDict):
  """`graphdefs_of` an abstract model of the config."""
  return graphdefs_of(abstract_model(config))


def anchors_for(config: ml_collections.ConfigDict):
  """Anchor points (A, 2) in grid units and strides (A, 1) for the config's square input size."""
  size = config.data.imgsz
  feature_sizes = [(size // s, size // s) for s in config.model.strides]
  return box_ops.make_anchors(feature_sizes, config.model.strides)
