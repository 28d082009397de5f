"""OptiSARNet: the OptiSAR-Net++ detector for text-queried grounding (docs/architecture.md sections 1-3).

  images (B,S,S,3) in [0,1] --encode_image--> ImageFeatures: P3/P4/P5 backbone maps (layers 4, 6, 10)
                                              + the PL-MoE balance loss
  ImageFeatures, text (B,K,D) --ground--> neck (layers 11-22, TGDF-SSA at 16/19/22) + head (layer 23)

  ground = ground_context(image_context(features), text): layer 13 and the text-independent tensors of
  layer 16 (ImageContext) are computed once per image; evaluation shares them between the queries.

Layers follow the reference yaml (`optisar-net-plusplus-66m.yaml`); `model.scale` picks [depth, width,
max_channels] from `model.scales`: c2 = ceil8(min(c2_yaml, max_channels) * width), repeats
n' = max(round(n * depth), 1) if n > 1 (Python's round-half-even), c3k forced on for scales m/l/x.

Text handling: the head always sees the refined prompts t_hat. The TGDF-SSA layers see the raw text in
training; in eval they see the raw text when `model.tgdg.neck_text == 'raw'` (our default) and t_hat when
it is 'refined' (the reference at inference).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from optisar_jax.models.blocks import C2PSA, SPPF, C3k2
from optisar_jax.models.fusion import TGDFSSA
from optisar_jax.models.head import GroundingHead
from optisar_jax.models.layers import Conv, LayerOptions, upsample2x
from optisar_jax.models.moe import PLMoE

# Module name of each reference layer index (the summary's rows).
LAYER_NAMES = (
    'Conv', 'Conv', 'C3k2', 'Conv', 'C3k2', 'Conv', 'C3k2', 'Conv', 'PLMoE', 'SPPF', 'C2PSA',
    'Upsample', 'Concat', 'C3k2', 'Upsample', 'Concat', 'TGDFSSA', 'Conv', 'Concat', 'TGDFSSA', 'Conv',
    'Concat', 'TGDFSSA', 'GroundingHead')


def ceil8(x: float) -> int:
  """Round a channel count up to a multiple of 8 (Ultralytics make_divisible)."""
  return int(math.ceil(x / 8) * 8)


@struct.dataclass
class ImageFeatures:
  """Output of `encode_image`: the three backbone maps (strides 8, 16, 32; NHWC) and the PL-MoE
  load-balance loss of that forward pass. Iterates / indexes like the tuple of the three maps."""
  maps: tuple[jax.Array, ...]
  moe_aux_loss: jax.Array

  def __iter__(self) -> Iterator[jax.Array]:
    return iter(self.maps)

  def __len__(self) -> int:
    return len(self.maps)

  def __getitem__(self, i):
    return self.maps[i]


@struct.dataclass
class ImageContext:
  """What every query of an image shares (`OptiSARNet.image_context`): the neck's text-independent part.

  x13 (B,H4,W4,c13): layer 13; p5 (B,H5,W5,c10): backbone P5 (concatenated at layer 21); l16: the
  text-independent tensors of TGDF-SSA layer 16 (`TGDFSSA.visual`) on the stride-8 map; moe_aux_loss ().
  Every leaf has the batch on axis 0, so contexts can be repeated or gathered per query with tree_map.
  """
  x13: jax.Array
  p5: jax.Array
  l16: tuple[jax.Array, ...]
  moe_aux_loss: jax.Array


class ParamFreeLayer(nnx.Module):
  """Parameter-free layer (Upsample, Concat); present so that the layer list keeps the yaml indices."""

  def __init__(self, kind: str):
    self.kind = kind


class OptiSARNet(nnx.Module):
  """OptiSAR-Net++ (scale from `model_config.scale`, any input size divisible by 32).

  Args:
    model_config: the config's `model` block.
    text_dim: width D of the text embeddings fed to the model.
  """

  def __init__(self, model_config, text_dim: int, *, rngs: nnx.Rngs):
    cfg = model_config
    if cfg.scale not in cfg.scales:
      raise ValueError(f"model.scale='{cfg.scale}' is not one of model.scales {sorted(cfg.scales)}")
    depth, width, max_channels = cfg.scales[cfg.scale]
    if cfg.tgdg.neck_text not in ('raw', 'refined'):
      raise ValueError(f"model.tgdg.neck_text='{cfg.tgdg.neck_text}': expected 'raw' or 'refined'")
    if cfg.tgdg.neck_text == 'refined' and text_dim != cfg.embed_dim:
      raise ValueError(f"model.tgdg.neck_text='refined' needs text width {text_dim} == model.embed_dim "
                       f'{cfg.embed_dim}: the neck guide MLP reads raw text in training')
    opts = LayerOptions.from_config(cfg)
    self.compute_dtype = opts.dtype
    self.neck_text = cfg.tgdg.neck_text
    self.strides = tuple(int(s) for s in cfg.strides)
    self.reg_max = int(cfg.reg_max)
    self.deterministic = False    # flipped by model.train() / model.eval() like Dropout's flag

    def ch(c):
      return ceil8(min(c, max_channels) * width)

    def reps(n):
      return max(round(n * depth), 1) if n > 1 else n

    c3k_all = cfg.scale in ('m', 'l', 'x')
    tgdg_args = dict(text_dim=text_dim, tgdg_config=cfg.tgdg, opts=opts, rngs=rngs)
    kw = dict(opts=opts, rngs=rngs)
    c = [0] * 24
    layers = []

    def add(module, c_out):
      c[len(layers)] = c_out
      layers.append(module)

    add(Conv(3, ch(64), 3, 2, **kw), ch(64))                                                     # 0
    add(Conv(c[0], ch(128), 3, 2, **kw), ch(128))                                                # 1
    add(C3k2(c[1], ch(256), reps(2), c3k=c3k_all, e=0.25, **kw), ch(256))                        # 2
    add(Conv(c[2], ch(256), 3, 2, **kw), ch(256))                                                # 3
    add(C3k2(c[3], ch(512), reps(2), c3k=c3k_all, e=0.25, **kw), ch(512))                        # 4
    add(Conv(c[4], ch(512), 3, 2, **kw), ch(512))                                                # 5
    add(C3k2(c[5], ch(512), reps(2), c3k=True, **kw), ch(512))                                   # 6
    add(Conv(c[6], ch(1024), 3, 2, **kw), ch(1024))                                              # 7
    add(PLMoE(c[7], ch(1024), reps(2), cfg.moe, **kw), ch(1024))                                 # 8
    add(SPPF(c[8], ch(1024), 5, **kw), ch(1024))                                                 # 9
    add(C2PSA(c[9], ch(1024), reps(2), **kw), ch(1024))                                          # 10
    add(ParamFreeLayer('upsample'), c[10])                                                               # 11
    add(ParamFreeLayer('concat'), c[11] + c[6])                                                          # 12
    add(C3k2(c[12], ch(512), reps(2), c3k=c3k_all, **kw), ch(512))                               # 13
    add(ParamFreeLayer('upsample'), c[13])                                                               # 14
    add(ParamFreeLayer('concat'), c[14] + c[4])                                                          # 15
    add(TGDFSSA(c[15], ch(256), reps(3), **tgdg_args), ch(256))                                  # 16
    add(Conv(c[16], ch(256), 3, 2, **kw), ch(256))                                               # 17
    add(ParamFreeLayer('concat'), c[17] + c[13])                                                         # 18
    add(TGDFSSA(c[18], ch(512), reps(3), **tgdg_args), ch(512))                                  # 19
    add(Conv(c[19], ch(512), 3, 2, **kw), ch(512))                                               # 20
    add(ParamFreeLayer('concat'), c[20] + c[10])                                                         # 21
    add(TGDFSSA(c[21], ch(1024), reps(3), **tgdg_args), ch(1024))                                # 22
    add(GroundingHead((c[16], c[19], c[22]), text_dim, cfg, **kw), 0)                            # 23
    self.layers = nnx.List(layers)
    self.channels = tuple(c[:23])

  # ------------------------------------------------------------------------------------------- API

  def feature_shapes(self, image_size: int | tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """(H_i, W_i) of the three head levels for an input of `image_size` (static)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h % 32 or w % 32:
      raise ValueError(f'input size {h}x{w} must be divisible by 32')
    return tuple((h // s, w // s) for s in self.strides)

  def encode_image(self, images: jax.Array, *, rngs: nnx.Rngs | None = None) -> ImageFeatures:
    """Backbone (layers 0-10). images (B,S,S,3) float in [0,1] -> ImageFeatures(maps at strides 8/16/32).

    `rngs` feeds the PL-MoE gate noise in train mode.
    """
    if images.shape[1] % 32 or images.shape[2] % 32:
      raise ValueError(f'image size {images.shape[1]}x{images.shape[2]} must be divisible by 32')
    x = images.astype(self.compute_dtype)
    L = self.layers
    for i in range(4):
      x = L[i](x)
    p3 = L[4](x)
    p4 = L[6](L[5](p3))
    x, moe_aux = L[8](L[7](p4), rngs=rngs)
    p5 = L[10](L[9](x))
    return ImageFeatures((p3, p4, p5), moe_aux)

  def image_context(self, features: ImageFeatures | Sequence[jax.Array], *,
                    rngs: nnx.Rngs | None = None) -> ImageContext:
    """The part of the neck that does not see the text (layer 13 and most of layer 16), from
    `encode_image`'s features (a plain tuple of 3 maps counts as zero MoE loss)."""
    p3, p4, p5 = tuple(features)
    moe_aux = (features.moe_aux_loss if isinstance(features, ImageFeatures)
               else jnp.zeros((), jnp.float32))
    L = self.layers
    x13 = L[13](jnp.concatenate([upsample2x(p5), p4], axis=-1))
    l16 = L[16].visual(jnp.concatenate([upsample2x(x13), p3], axis=-1), rngs=rngs)
    return ImageContext(x13=x13, p5=p5, l16=l16, moe_aux_loss=moe_aux)

  def ground_context(self, context: ImageContext, text_embeddings: jax.Array, *,
                     rngs: nnx.Rngs | None = None) -> dict:
    """The text-dependent rest of the neck and the head: `ground` = `ground_context(image_context(.))`.

    context rows and text rows correspond (B of each, or text with 1 row for all); returns as `ground`.
    """
    L = self.layers
    text = jnp.asarray(text_embeddings, jnp.float32)
    prompts = L[23].refine_text(text)
    training = not self.deterministic
    neck_text = text if (training or self.neck_text == 'raw') else prompts
    x16 = L[16].fuse(context.l16, neck_text)
    x19 = L[19](jnp.concatenate([L[17](x16), context.x13], axis=-1), neck_text, rngs=rngs)
    x22 = L[22](jnp.concatenate([L[20](x19), context.p5], axis=-1), neck_text, rngs=rngs)
    box_logits, region_text_logits, region_logits = L[23]((x16, x19, x22), prompts)
    return {'box_logits': box_logits, 'region_text_logits': region_text_logits,
            'region_logits': region_logits, 'moe_aux_loss': context.moe_aux_loss}

  def ground(self, features: ImageFeatures | Sequence[jax.Array], text_embeddings: jax.Array, *,
             rngs: nnx.Rngs | None = None) -> dict:
    """Neck + head. features from `encode_image` (a plain tuple of 3 maps counts as zero MoE loss);
    text_embeddings (B or 1, K, D): the K prompts of an image interact through the TGDF-SSA max.

    Returns {'box_logits': (B,A,4 reg_max), 'region_text_logits': (B,A,K) float32,
             'region_logits': ((B,H3,W3,r3^2), (B,H4,W4,r4^2), (B,H5,W5,r5^2)), 'moe_aux_loss': ()}.
    """
    return self.ground_context(self.image_context(features, rngs=rngs), text_embeddings, rngs=rngs)

  def ground_queries(self, features: ImageFeatures | Sequence[jax.Array], query_embeddings: jax.Array, *,
                     rngs: nnx.Rngs | None = None) -> dict:
    """Grounds every query on its own (= Q separate `ground` calls with K = 1) with the backbone and the
    text-independent part of the neck (`image_context`) run once per image: the Q queries are folded into
    the batch after that. query_embeddings (B,Q,D).

    Returns query-major outputs: {'box_logits': (B,Q,A,4 reg_max), 'region_text_logits': (B,Q,A),
    'region_logits': tuple of (B,Q,H_i,W_i,r_i^2), 'moe_aux_loss': ()}. Exact in eval mode; in train mode
    BatchNorm would pool its batch statistics over the B*Q copies.
    """
    b, q, d = query_embeddings.shape
    context = jax.tree.map(lambda a: jnp.repeat(a, q, axis=0) if a.ndim else a,
                           self.image_context(features, rngs=rngs))
    out = self.ground_context(context, query_embeddings.reshape(b * q, 1, d), rngs=rngs)
    return {'box_logits': out['box_logits'].reshape(b, q, *out['box_logits'].shape[1:]),
            'region_text_logits': out['region_text_logits'].reshape(b, q, -1),
            'region_logits': tuple(r.reshape(b, q, *r.shape[1:]) for r in out['region_logits']),
            'moe_aux_loss': out['moe_aux_loss']}

  def __call__(self, images: jax.Array, text_embeddings: jax.Array, *, rngs: nnx.Rngs | None = None) -> dict:
    """ground(encode_image(images), text_embeddings)."""
    return self.ground(self.encode_image(images, rngs=rngs), text_embeddings, rngs=rngs)
