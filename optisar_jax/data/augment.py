"""Image and box augmentation for training, and the letterbox used everywhere (numpy + PIL, no cv2).

Reference behaviour (docs/training-and-data.md section 6.2, Ultralytics 8.3-era), coordinates continuous
(pixel edges at integers, a box [x0, x1] covers x0 <= x < x1):

* `letterbox(image, S)`: gain r = min(S/H, S/W), bilinear resize to (round(W r), round(H r)), pad with 114,
  left = round(dw/2 - 0.1), top = round(dh/2 - 0.1). A canvas box is `orig * r + (left, top)`.
* Training, single image: the image is resized so its long side is S (size ceil(W r), ceil(H r)),
  letterboxed on an S x S canvas, then warped by the random affine below.
* Training, mosaic: four images (long side S each) on a 2S x 2S canvas around a centre drawn from
  U[S/2, 3S/2]^2 (Ultralytics `_mosaic4` layout); boxes shifted, clipped to the canvas, zero-area boxes
  dropped; the tiles' caption lists merged (identical strings share one id); then the random affine with
  border -S/2 (output S x S).
* Random affine M = T S R P C: centring C, perspective P, rotation + scale R (scale ~ U[1-s, 1+s]),
  shear S, translation T ~ U[0.5-t, 0.5+t] * S; fill 114. A box becomes the axis-aligned hull of its
  transformed corners, clipped to the canvas, kept iff w > min_box_size, h > min_box_size,
  aspect < max_aspect_ratio and new area / (old area * scale^2) > min_area_ratio.
* HSV jitter with gains ~ 1 + U[-1, 1] * (hsv_h, hsv_s, hsv_v) (hue multiplied modulo 180 in OpenCV units,
  saturation and value multiplied and clipped), applied through a 33^3 colour look-up table with trilinear
  interpolation (Pillow's Color3DLUT, mean error < 0.1 grey level against the exact transform). With
  `hsv_on_device` (the configs' default) the gains are drawn here from the same stream but the pixels are
  left alone: the sample carries the gains and the train step applies the exact transform
  (`device_hsv.py`), which takes the most expensive step of the input off the host.
* Horizontal flip with p = fliplr and vertical flip with p = flipud; with `rewrite_directions_on_flip` the
  captions are rewritten (`text_swaps.flip_rewrite`, deviation 11.1).

Resampling (`data.resize`):

* 'pil' (our default): Pillow's bilinear. When the affine has no rotation, shear or perspective (the
  paper's setting), the whole chain (long-side resize, letterbox or mosaic placement, affine, flips) is one
  axis-aligned map per tile, so each tile is resampled ONCE from the original pixels straight into the
  output with Pillow's antialiased `resize(box=...)`; no 2S canvas is built. Otherwise the canvas is built
  and warped with `Image.transform`.
* 'opencv' (the reference): OpenCV's INTER_LINEAR semantics in numpy, no antialiasing. Resizes
  (`resize_bilinear`, as `cv2.resize`) sample at half-pixel centres, src = (dst + 0.5) * in / out - 0.5,
  clamped to the edge pixels; the training warp (`warp_bilinear`, as `cv2.warpAffine` /
  `cv2.warpPerspective` with a constant border) samples the canvas at M^-1 (X, Y) of each output pixel
  index; the flips mirror the warped image (`np.fliplr`), all in the reference's order: long-side resize,
  canvas, warp, HSV, flip (with `hsv_on_device` the HSV runs after the flip, in the train step: the two
  commute). The resize reproduces OpenCV's fixed-point arithmetic; the warp uses exact
  float32 weights where OpenCV rounds coordinates to 1/32 pixel, so a rotated warp can differ from
  OpenCV's by a grey level on a few pixels (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageFilter

from optisar_jax.data import text_swaps
from optisar_jax.data.vocabulary import config_value

_BILINEAR = Image.Resampling.BILINEAR


# --------------------------------------------------------------------------------------------- samples

@dataclasses.dataclass
class Sample:
  """One image with its boxes and captions.

  Attributes:
    image: uint8 (H, W, 3) RGB pixels.
    boxes: float32 (n, 4) xyxy pixels of `image`.
    labels: int64 (n,) index into `texts` of each box's caption.
    texts: the sample's distinct captions.
    domain: 0 optical, 1 SAR.
    hsv_gains: float32 (3,) HSV gains the train step still has to apply to `image` (`hsv_on_device`),
      None when the image is final.
  """
  image: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray
  texts: list
  domain: int = 0
  hsv_gains: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The `data.augment.*` numbers plus `data.imgsz` and `data.pad_value`."""
  imgsz: int = 640
  pad_value: int = 114
  enabled: bool = True
  mosaic: float = 1.0
  close_mosaic_epochs: int = 10
  degrees: float = 0.0
  translate: float = 0.1
  scale: float = 0.5
  shear: float = 0.0
  perspective: float = 0.0
  hsv_h: float = 0.015
  hsv_s: float = 0.7
  hsv_v: float = 0.4
  hsv_on_device: bool = False      # True: draw the gains, return them in Sample.hsv_gains, leave the pixels
  fliplr: float = 0.5
  flipud: float = 0.0
  rewrite_directions_on_flip: bool = True
  min_box_size: float = 2.0
  max_aspect_ratio: float = 100.0
  min_area_ratio: float = 0.1
  resize: str = 'pil'              # `data.resize`: 'pil' or 'opencv' (module docstring)

  def __post_init__(self):
    check_resize(self.resize)

  @classmethod
  def from_config(cls, data_config) -> 'AugmentConfig':
    """From the `data` ConfigDict; a missing key raises KeyError naming it."""
    kwargs = {'imgsz': int(config_value(data_config, 'imgsz')), 'pad_value': int(config_value(data_config, 'pad_value')),
              'resize': str(config_value(data_config, 'resize'))}
    for field in dataclasses.fields(cls):
      if field.name in kwargs:
        continue
      kwargs[field.name] = type(field.default)(config_value(data_config, 'augment.' + field.name))
    return cls(**kwargs)


RESIZE_MODES = ('pil', 'opencv')


def check_resize(resize: str) -> str:
  if resize not in RESIZE_MODES:
    raise ValueError(f"config key 'data.resize': {resize!r} is not one of {RESIZE_MODES}")
  return resize


def _as_rgb(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
    raise ValueError(f'image must be (H, W, 3) uint8, got shape {image.shape}')
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  elif image.shape[2] == 4:
    image = image[:, :, :3]
  if image.dtype != np.uint8:
    image = np.clip(image, 0, 255).astype(np.uint8)
  return np.ascontiguousarray(image)


def _pil(image: np.ndarray) -> Image.Image:
  """A PIL view of a C-contiguous uint8 (H, W, 3) array (no copy; the array must outlive the image)."""
  h, w = image.shape[:2]
  return Image.frombuffer('RGB', (w, h), image, 'raw', 'RGB', 0, 1)


def _fill(pad_value: int):
  return (int(pad_value),) * 3


# ------------------------------------------------------------------------------------------- letterbox

class LetterboxParams(NamedTuple):
  """How an original image sits on the letterbox canvas: canvas = original * ratio + (left, top)."""
  ratio: float
  left: int
  top: int


def letterbox_params(height: int, width: int, imgsz: int) -> tuple[LetterboxParams, tuple[int, int]]:
  """(params, (new_w, new_h)) of the letterbox of an H x W image onto an imgsz x imgsz canvas."""
  r = min(imgsz / height, imgsz / width)
  new_w, new_h = int(round(width * r)), int(round(height * r))
  dw, dh = (imgsz - new_w) / 2, (imgsz - new_h) / 2
  return LetterboxParams(r, int(round(dw - 0.1)), int(round(dh - 0.1))), (new_w, new_h)


def letterbox(image: np.ndarray, imgsz: int, pad_value: int = 114, *, resize: str = 'pil'
              ) -> tuple[np.ndarray, LetterboxParams]:
  """Resize (bilinear, aspect kept, up or down) and pad to imgsz x imgsz.

  resize: `data.resize` ('pil': Pillow's bilinear, antialiased when reducing; 'opencv': `resize_bilinear`,
  the reference's cv2.resize INTER_LINEAR).

  Returns:
    (uint8 (imgsz, imgsz, 3) canvas, LetterboxParams(ratio, left, top)).
  """
  image = _as_rgb(image)
  h, w = image.shape[:2]
  params, (new_w, new_h) = letterbox_params(h, w, imgsz)
  if check_resize(resize) == 'opencv':
    canvas = np.full((imgsz, imgsz, 3), int(pad_value), np.uint8)
    resized = resize_bilinear(image, (new_w, new_h)) if (new_w, new_h) != (w, h) else image
    canvas[params.top:params.top + new_h, params.left:params.left + new_w] = resized
    return canvas, params
  pil = Image.fromarray(image)
  if (new_w, new_h) != (w, h):
    pil = pil.resize((new_w, new_h), _BILINEAR)
  canvas = Image.new('RGB', (imgsz, imgsz), _fill(pad_value))
  canvas.paste(pil, (params.left, params.top))
  return np.asarray(canvas), params


# ----------------------------------------------------------------------------- OpenCV-style resampling

# OpenCV's INTER_LINEAR resize of uint8 images works in fixed point: weights are rounded to 11 bits
# (INTER_RESIZE_COEF_BITS), the horizontal pass keeps exact integer sums, the vertical pass drops 4 bits of
# each row, multiplies by its 11-bit weight keeping the high 16 bits, and rounds the last 2 bits away.
_COEF_SCALE = 2048


def _linear_taps(out_size: int, in_size: int, *, clamp: bool) -> tuple[np.ndarray, ...]:
  """cv2.resize INTER_LINEAR taps along one axis: (i0, i1, w0, w1), out[j] ~ in[i0] w0 + in[i1] w1 with
  integer weights summing to 2048. src = (j + 0.5) * in / out - 0.5 (in float32, as OpenCV); with `clamp`
  (OpenCV's columns) a src outside [0, in - 1] takes the edge pixel with weight 2048, without it (its rows)
  the fraction is kept and the row indices are clamped."""
  src = ((np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5).astype(np.float32)
  i0 = np.floor(src).astype(np.int64)
  frac = (src - i0.astype(np.float32)).astype(np.float32)
  if clamp:
    outside = (i0 < 0) | (i0 >= in_size - 1)
    frac[outside] = 0.0
    i0 = np.clip(i0, 0, in_size - 1)
  w0 = np.rint((np.float32(1.0) - frac) * np.float32(_COEF_SCALE)).astype(np.int64)
  w1 = np.rint(frac * np.float32(_COEF_SCALE)).astype(np.int64)
  return np.clip(i0, 0, in_size - 1), np.clip(i0 + 1, 0, in_size - 1), w0, w1


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """OpenCV's `cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)` in numpy: bilinear at half-pixel
  centres, edge pixels replicated, no antialiasing (a reduction samples 2 taps per axis whatever the
  factor), in OpenCV's fixed-point arithmetic (equal to OpenCV 5.1's output on the cases checked in
  docs/architecture.md).

  image: uint8 (H, W, C); size: (new_w, new_h) as OpenCV takes it. Returns uint8 (new_h, new_w, C).
  """
  new_w, new_h = int(size[0]), int(size[1])
  h, w = image.shape[:2]
  if new_w < 1 or new_h < 1:
    raise ValueError(f'resize_bilinear: size {size} must be positive')
  x0, x1, a0, a1 = _linear_taps(new_w, w, clamp=True)
  y0, y1, b0, b1 = _linear_taps(new_h, h, clamp=False)
  pixels = image.astype(np.int64)
  cols = pixels[:, x0] * a0[None, :, None] + pixels[:, x1] * a1[None, :, None]     # (H, new_w, C)
  top, bottom = cols[y0] >> 4, cols[y1] >> 4
  out = (((top * b0[:, None, None]) >> 16) + ((bottom * b1[:, None, None]) >> 16) + 2) >> 2
  return np.clip(out, 0, 255).astype(np.uint8)


def warp_bilinear(image: np.ndarray, M: np.ndarray, out_size: int, fill) -> np.ndarray:
  """OpenCV's warpAffine / warpPerspective (INTER_LINEAR, BORDER_CONSTANT = fill) in numpy.

  Output pixel (X, Y) (integer indices) samples `image` at M^-1 (X, Y, 1) (divided by its third entry),
  bilinearly; a neighbour outside the image reads `fill`. image uint8 (H, W, 3), M (3, 3) image -> output
  coordinates. Returns uint8 (out_size, out_size, 3).
  """
  h, w = image.shape[:2]
  padded = np.empty((h + 2, w + 2, image.shape[2]), np.float32)
  padded[...] = np.asarray(fill, np.float32)
  padded[1:-1, 1:-1] = image
  inv = np.linalg.inv(M)
  idx = np.arange(out_size, dtype=np.float64)

  def taps(coord, size):   # indices into the padded image (-1 and size read the fill) and weights
    base = np.floor(coord)
    frac = (coord - base).astype(np.float32)
    i0 = np.clip(base, -1, size).astype(np.int64) + 1
    i1 = np.clip(base + 1, -1, size).astype(np.int64) + 1
    return i0, i1, frac

  if _is_axis_aligned(M):   # separable: x depends on X only, y on Y only
    x0, x1, fx = taps(inv[0, 0] * idx + inv[0, 2], w)
    y0, y1, fy = taps(inv[1, 1] * idx + inv[1, 2], h)
    rows = padded[y0] * (1.0 - fy)[:, None, None] + padded[y1] * fy[:, None, None]
    out = rows[:, x0] * (1.0 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return _to_uint8(out)
  X, Y = np.meshgrid(idx, idx)
  src = np.einsum('ij,jhw->ihw', inv, np.stack([X, Y, np.ones_like(X)]))
  denom = src[2]
  denom = np.where(denom == 0, np.inf, denom)   # OpenCV maps a zero denominator to 0 (reads the fill)
  x0, x1, fx = taps(src[0] / denom, w)
  y0, y1, fy = taps(src[1] / denom, h)
  fx, fy = fx[..., None], fy[..., None]
  out = ((padded[y0, x0] * (1 - fx) + padded[y0, x1] * fx) * (1 - fy)
         + (padded[y1, x0] * (1 - fx) + padded[y1, x1] * fx) * fy)
  return _to_uint8(out)


def boxes_to_letterbox(boxes: np.ndarray, params: LetterboxParams) -> np.ndarray:
  """xyxy boxes in original pixels -> letterbox canvas pixels."""
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  off = np.array([params.left, params.top, params.left, params.top], np.float64)
  return (b * params.ratio + off).astype(np.float32)


def boxes_from_letterbox(boxes: np.ndarray, params: LetterboxParams, orig_size=None) -> np.ndarray:
  """xyxy canvas boxes -> original pixels; clipped to [0, W] x [0, H] when orig_size = (H, W) is given."""
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  off = np.array([params.left, params.top, params.left, params.top], np.float64)
  out = (b - off) / params.ratio
  if orig_size is not None:
    h, w = orig_size
    out = np.clip(out, 0, [w, h, w, h])
  return out.astype(np.float32)


# ----------------------------------------------------------------------------------------- geometry

@dataclasses.dataclass
class _Tile:
  """An original image placed on the intermediate canvas: canvas = original * (fx, fy) + (padw, padh),
  visible inside `region` = (x0, y0, x1, y1) (canvas pixels)."""
  image: np.ndarray
  fx: float
  fy: float
  padw: float
  padh: float
  size: tuple  # resized (w, h), as the reference's long-side resize produces
  region: tuple


def _long_side_size(h0: int, w0: int, imgsz: int) -> tuple[int, int]:
  r = imgsz / max(h0, w0)
  if r == 1:
    return w0, h0
  return min(math.ceil(w0 * r), imgsz), min(math.ceil(h0 * r), imgsz)


def _place_boxes(boxes: np.ndarray, tile: _Tile) -> np.ndarray:
  scale = np.array([tile.fx, tile.fy, tile.fx, tile.fy], np.float64)
  off = np.array([tile.padw, tile.padh, tile.padw, tile.padh], np.float64)
  return np.asarray(boxes, np.float64).reshape(-1, 4) * scale + off


def single_tile(image: np.ndarray, imgsz: int) -> _Tile:
  """The reference's single-image placement: long side resized to imgsz, letterboxed (centred)."""
  h0, w0 = image.shape[:2]
  w, h = _long_side_size(h0, w0, imgsz)
  left, top = int(round((imgsz - w) / 2 - 0.1)), int(round((imgsz - h) / 2 - 0.1))
  return _Tile(image, w / w0, h / h0, left, top, (w, h), (left, top, left + w, top + h))


def mosaic_tiles(images: Sequence[np.ndarray], imgsz: int, center: tuple[int, int]) -> list[_Tile]:
  """Ultralytics `_mosaic4` placement of 4 images on a 2S x 2S canvas around center = (xc, yc)."""
  s = imgsz
  xc, yc = center
  tiles = []
  for i, image in enumerate(images):
    h0, w0 = image.shape[:2]
    w, h = _long_side_size(h0, w0, imgsz)
    if i == 0:    # top left
      x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
      x1b, y1b = w - (x2a - x1a), h - (y2a - y1a)
    elif i == 1:  # top right
      x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, s * 2), yc
      x1b, y1b = 0, h - (y2a - y1a)
    elif i == 2:  # bottom left
      x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(s * 2, yc + h)
      x1b, y1b = w - (x2a - x1a), 0
    else:         # bottom right
      x1a, y1a, x2a, y2a = xc, yc, min(xc + w, s * 2), min(s * 2, yc + h)
      x1b, y1b = 0, 0
    tiles.append(_Tile(image, w / w0, h / h0, x1a - x1b, y1a - y1b, (w, h), (x1a, y1a, x2a, y2a)))
  return tiles


def random_affine_matrix(rng: np.random.Generator, in_size: tuple[int, int], out_size: int,
                         cfg: AugmentConfig) -> tuple[np.ndarray, float]:
  """Ultralytics RandomPerspective's M = T @ S @ R @ P @ C (canvas -> output pixels) and its scale."""
  w, h = in_size
  C = np.eye(3)
  C[0, 2], C[1, 2] = -w / 2, -h / 2
  P = np.eye(3)
  P[2, 0] = rng.uniform(-cfg.perspective, cfg.perspective)
  P[2, 1] = rng.uniform(-cfg.perspective, cfg.perspective)
  a = math.radians(rng.uniform(-cfg.degrees, cfg.degrees))
  s = rng.uniform(1 - cfg.scale, 1 + cfg.scale)
  R = np.eye(3)
  R[0, 0], R[0, 1], R[1, 0], R[1, 1] = s * math.cos(a), s * math.sin(a), -s * math.sin(a), s * math.cos(a)
  S = np.eye(3)
  S[0, 1] = math.tan(math.radians(rng.uniform(-cfg.shear, cfg.shear)))
  S[1, 0] = math.tan(math.radians(rng.uniform(-cfg.shear, cfg.shear)))
  T = np.eye(3)
  T[0, 2] = rng.uniform(0.5 - cfg.translate, 0.5 + cfg.translate) * out_size
  T[1, 2] = rng.uniform(0.5 - cfg.translate, 0.5 + cfg.translate) * out_size
  return T @ S @ R @ P @ C, float(s)


def flip_matrix(size: int, horizontal: bool, vertical: bool) -> np.ndarray:
  """Mirror of a size x size canvas (continuous coordinates: x -> size - x)."""
  F = np.eye(3)
  if horizontal:
    F[0, 0], F[0, 2] = -1.0, size
  if vertical:
    F[1, 1], F[1, 2] = -1.0, size
  return F


def _is_axis_aligned(M: np.ndarray) -> bool:
  return M[0, 1] == 0 and M[1, 0] == 0 and M[2, 0] == 0 and M[2, 1] == 0 and M[2, 2] == 1


def transform_boxes(boxes: np.ndarray, M: np.ndarray, out_size: int) -> np.ndarray:
  """Axis-aligned hull of the M-transformed corners of xyxy boxes, clipped to [0, out_size]."""
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  if not len(b):
    return np.zeros((0, 4), np.float64)
  corners = np.stack([b[:, [0, 1]], b[:, [2, 3]], b[:, [0, 3]], b[:, [2, 1]]], axis=1)  # (n, 4, 2)
  xy1 = np.concatenate([corners, np.ones(corners.shape[:2] + (1,))], axis=2) @ M.T
  xy = xy1[..., :2] / xy1[..., 2:3] if not _is_axis_aligned(M) else xy1[..., :2]
  out = np.concatenate([xy.min(axis=1), xy.max(axis=1)], axis=1)
  return np.clip(out, 0, out_size)


def box_candidates(before: np.ndarray, after: np.ndarray, cfg: AugmentConfig, eps: float = 1e-16) -> np.ndarray:
  """Ultralytics box_candidates: `before` already multiplied by the affine scale."""
  w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
  w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
  ar = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
  return ((w2 > cfg.min_box_size) & (h2 > cfg.min_box_size) & (w2 * h2 / (w1 * h1 + eps) > cfg.min_area_ratio)
          & (ar < cfg.max_aspect_ratio))


def _render_axis_aligned(tiles: Sequence[_Tile], M: np.ndarray, out_size: int, fill) -> Image.Image:
  """Each tile resampled once, original pixels -> output rectangle (antialiased Pillow resize)."""
  out = Image.new('RGB', (out_size, out_size), fill)
  sx, tx, sy, ty = M[0, 0], M[0, 2], M[1, 1], M[1, 2]
  for tile in tiles:
    x0, y0, x1, y1 = tile.region
    ox = sorted((sx * x0 + tx, sx * x1 + tx))
    oy = sorted((sy * y0 + ty, sy * y1 + ty))
    X0, X1 = int(round(max(ox[0], 0.0))), int(round(min(ox[1], out_size)))
    Y0, Y1 = int(round(max(oy[0], 0.0))), int(round(min(oy[1], out_size)))
    if X1 <= X0 or Y1 <= Y0:
      continue
    h0, w0 = tile.image.shape[:2]
    # Output pixel edge X <- canvas (X - tx) / sx <- original ((X - tx) / sx - padw) / fx.
    bx = sorted((((X0 - tx) / sx - tile.padw) / tile.fx, ((X1 - tx) / sx - tile.padw) / tile.fx))
    by = sorted((((Y0 - ty) / sy - tile.padh) / tile.fy, ((Y1 - ty) / sy - tile.padh) / tile.fy))
    box = (min(max(bx[0], 0.0), w0), min(max(by[0], 0.0), h0), min(max(bx[1], 0.0), w0), min(max(by[1], 0.0), h0))
    if box[2] <= box[0] or box[3] <= box[1]:
      continue
    # Only the source window (plus the filter's reach) is handed to Pillow, so large originals are not
    # copied whole; reducing_gap box-averages big reductions by an integer factor first.
    reach = int(math.ceil(2.0 * max((box[2] - box[0]) / (X1 - X0), (box[3] - box[1]) / (Y1 - Y0), 1.0))) + 1
    cx0, cy0 = max(int(box[0]) - reach, 0), max(int(box[1]) - reach, 0)
    cx1, cy1 = min(int(math.ceil(box[2])) + reach, w0), min(int(math.ceil(box[3])) + reach, h0)
    window = np.ascontiguousarray(tile.image[cy0:cy1, cx0:cx1])
    part = _pil(window).resize((X1 - X0, Y1 - Y0), _BILINEAR,
                               box=(box[0] - cx0, box[1] - cy0, box[2] - cx0, box[3] - cy0), reducing_gap=3.0)
    if sx < 0:
      part = part.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if sy < 0:
      part = part.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    out.paste(part, (X0, Y0))
  return out


def _render_general(tiles: Sequence[_Tile], canvas_size: tuple[int, int], M: np.ndarray, out_size: int,
                    fill) -> Image.Image:
  """Reference order: tiles resized and pasted on the canvas, then one warp (affine or perspective)."""
  canvas = Image.new('RGB', canvas_size, fill)
  for tile in tiles:
    x0, y0, x1, y1 = tile.region
    part = _pil(tile.image)
    if part.size != tuple(tile.size):
      part = part.resize(tuple(tile.size), _BILINEAR)
    bx, by = int(round(x0 - tile.padw)), int(round(y0 - tile.padh))
    canvas.paste(part.crop((bx, by, bx + (x1 - x0), by + (y1 - y0))), (int(x0), int(y0)))
  inv = np.linalg.inv(M)
  if M[2, 0] == 0 and M[2, 1] == 0:
    inv = inv / inv[2, 2]
    return canvas.transform((out_size, out_size), Image.Transform.AFFINE, tuple(inv[:2].ravel()),
                            resample=_BILINEAR, fillcolor=fill)
  inv = inv / inv[2, 2]
  return canvas.transform((out_size, out_size), Image.Transform.PERSPECTIVE, tuple(inv.ravel()[:8]),
                          resample=_BILINEAR, fillcolor=fill)


def _render_opencv(tiles: Sequence[_Tile], canvas_size: tuple[int, int], M: np.ndarray, out_size: int,
                   fill, hflip: bool, vflip: bool) -> Image.Image:
  """The reference's order with OpenCV resampling: each tile resized to its long-side size
  (`resize_bilinear`), pasted on the canvas, the canvas warped by M (`warp_bilinear`), then mirrored."""
  canvas = np.empty((canvas_size[1], canvas_size[0], 3), np.uint8)
  canvas[...] = np.asarray(fill, np.uint8)
  for tile in tiles:
    x0, y0, x1, y1 = (int(v) for v in tile.region)
    part = tile.image
    if (part.shape[1], part.shape[0]) != tuple(tile.size):
      part = resize_bilinear(part, tile.size)
    bx, by = int(round(x0 - tile.padw)), int(round(y0 - tile.padh))
    canvas[y0:y1, x0:x1] = part[by:by + (y1 - y0), bx:bx + (x1 - x0)]
  out = warp_bilinear(canvas, M, out_size, fill)
  if hflip:
    out = out[:, ::-1]
  if vflip:
    out = out[::-1]
  return Image.fromarray(np.ascontiguousarray(out))


# ---------------------------------------------------------------------------------------------- colour

_LUT_SIZE = 33
_LUT_GRID = None


def _lut_grid():
  """HSV decomposition (hue in [0, 6), chroma, value) of the 33^3 RGB grid, r fastest (Color3DLUT order)."""
  global _LUT_GRID
  if _LUT_GRID is None:
    g = np.linspace(0.0, 255.0, _LUT_SIZE)
    b, gg, r = np.meshgrid(g, g, g, indexing='ij')
    r, gg, b = r.ravel(), gg.ravel(), b.ravel()
    v = np.maximum(np.maximum(r, gg), b)
    c = v - np.minimum(np.minimum(r, gg), b)
    inv_c = 1.0 / np.maximum(c, 1e-12)
    h = np.where(v == r, (gg - b) * inv_c, np.where(v == gg, (b - r) * inv_c + 2.0, (r - gg) * inv_c + 4.0))
    sat = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    _LUT_GRID = tuple(a.astype(np.float32) for a in (np.mod(h, 6.0), sat, v / 255.0))
  return _LUT_GRID


def hsv_table(gains: Sequence[float]) -> np.ndarray:
  """Colour table (33^3 x 3, values in [0, 1]) of the reference HSV gain transform.

  The table is rebuilt for every sample (about 0.4 ms), so its modulo-6 steps avoid np.mod: for x in
  [6, 12), x - 6 is exact in float32 (Sterbenz), hence equal to x mod 6 bit for bit."""
  gh, gs, gv = (np.float32(g) for g in gains)
  h, sat, v = _lut_grid()
  h = h * gh                                    # OpenCV: hue * gain modulo 180 (= 6 sectors of 30)
  if 0.0 <= gh < 2.0:                           # h * gh in [0, 12): one subtraction is the modulo
    np.subtract(h, np.float32(6.0), out=h, where=h >= 6.0)
  else:
    h %= 6.0
  new_v = np.minimum(v * gv, np.float32(1.0))
  new_c = np.minimum(sat * gs, np.float32(1.0))
  new_c *= new_v                                # chroma = V' * min(S * gain, 1)
  out = np.empty((h.size, 3), np.float32)
  k = np.empty_like(h)
  for ch, n in enumerate((5.0, 3.0, 1.0)):
    np.add(h, np.float32(n), out=k)             # in [1, 11): one subtraction is the modulo
    np.subtract(k, np.float32(6.0), out=k, where=k >= 6.0)
    w = np.minimum(k, np.float32(4.0) - k)
    np.clip(w, 0.0, 1.0, out=w)
    w *= new_c
    np.subtract(new_v, w, out=out[:, ch])
  return out.ravel()


def hsv_jitter(image: Image.Image | np.ndarray, gains: Sequence[float]) -> Image.Image:
  """Applies HSV gains (hue, saturation, value multipliers) to an RGB image."""
  pil = image if isinstance(image, Image.Image) else Image.fromarray(_as_rgb(image))
  return pil.filter(ImageFilter.Color3DLUT(_LUT_SIZE, hsv_table(gains), channels=3))


# -------------------------------------------------------------------------------------------- pipeline

def merge_texts(samples: Sequence[Sample]) -> tuple[list, list]:
  """Mosaic caption merge: one list (first appearance order), identical strings share one id.

  Returns (texts, per-sample label arrays remapped to the merged list).
  """
  texts, index, labels = [], {}, []
  for sample in samples:
    remap = []
    for t in sample.texts:
      if t not in index:
        index[t] = len(texts)
        texts.append(t)
      remap.append(index[t])
    remap = np.asarray(remap, np.int64)
    labels.append(remap[np.asarray(sample.labels, np.int64)] if len(sample.labels) else np.zeros(0, np.int64))
  return texts, labels


def letterbox_sample(sample: Sample, imgsz: int, pad_value: int = 114, *, resize: str = 'pil') -> Sample:
  """No augmentation: letterbox the image (`letterbox`, resampled as `resize`) and map its boxes."""
  image, params = letterbox(sample.image, imgsz, pad_value, resize=resize)
  boxes = boxes_to_letterbox(sample.boxes, params)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return Sample(image, boxes[keep], np.asarray(sample.labels, np.int64)[keep], list(sample.texts), sample.domain)


def augment_sample(samples: Sequence[Sample], rng: np.random.Generator, cfg: AugmentConfig) -> Sample:
  """The training augmentation of one sample: 1 image (single) or 4 images (mosaic, first = main).

  Returns a Sample with an (imgsz, imgsz, 3) image, boxes in its pixels, merged/rewritten texts.
  """
  S = cfg.imgsz
  fill = _fill(cfg.pad_value)
  images = [_as_rgb(s.image) for s in samples]
  if len(samples) == 4:
    center = (int(rng.uniform(S / 2, 3 * S / 2)), int(rng.uniform(S / 2, 3 * S / 2)))
    tiles = mosaic_tiles(images, S, center)
    canvas_size = (2 * S, 2 * S)
    texts, labels = merge_texts(samples)
    boxes = np.concatenate([_place_boxes(s.boxes, t) for s, t in zip(samples, tiles)])
    labels = np.concatenate(labels)
    boxes = np.clip(boxes, 0, 2 * S)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, labels = boxes[keep], labels[keep]
  elif len(samples) == 1:
    tiles = [single_tile(images[0], S)]
    canvas_size = (S, S)
    texts, labels = list(samples[0].texts), np.asarray(samples[0].labels, np.int64)
    boxes = _place_boxes(samples[0].boxes, tiles[0])
  else:
    raise ValueError(f'augment_sample takes 1 or 4 samples, got {len(samples)}')

  M, scale = random_affine_matrix(rng, canvas_size, S, cfg)
  gains = rng.uniform(-1, 1, 3) * np.array([cfg.hsv_h, cfg.hsv_s, cfg.hsv_v]) + 1
  hflip = bool(rng.random() < cfg.fliplr)
  vflip = bool(rng.random() < cfg.flipud)
  MF = flip_matrix(S, hflip, vflip) @ M

  if cfg.resize == 'opencv':
    image = _render_opencv(tiles, canvas_size, M, S, fill, hflip, vflip)
  elif _is_axis_aligned(MF):
    image = _render_axis_aligned(tiles, MF, S, fill)
  else:
    image = _render_general(tiles, canvas_size, MF, S, fill)
  device_gains = None
  if cfg.hsv_h or cfg.hsv_s or cfg.hsv_v:
    if cfg.hsv_on_device:
      device_gains = gains.astype(np.float32)
    else:
      image = hsv_jitter(image, gains)

  new_boxes = transform_boxes(boxes, MF, S)
  keep = box_candidates(boxes * scale, new_boxes, cfg)
  new_boxes, labels = new_boxes[keep], labels[keep]

  if cfg.rewrite_directions_on_flip and (hflip or vflip):
    if hflip:
      texts = [text_swaps.flip_rewrite(t, horizontal=True) for t in texts]
    if vflip:
      texts = [text_swaps.flip_rewrite(t, horizontal=False) for t in texts]
  return Sample(np.asarray(image), new_boxes.astype(np.float32), labels.astype(np.int64), texts,
                int(samples[0].domain), device_gains)
