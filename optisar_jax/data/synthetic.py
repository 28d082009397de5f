"""Synthetic OptSAR-RSVG / DIOR-RSVG datasets in the exact release layouts (the demo's data).

The scenes are a real grounding task: every image holds 2-5 objects, often several of one category, and
each annotation's caption singles out its target by category ("the harbor"), size ("the largest ship"),
extreme position ("the leftmost ship"), absolute position ("the ship in the upper left") or relation to a
unique object of another category ("the ship left of the harbor"). A caption is written only when it is
unambiguous given the image (with margins, so that a small detector can see the difference); an object
without such a caption stays in the image as an unannotated distractor.

Objects are drawn as distinct shapes and colours per category, at least ~14% of the image's long side so
that they stay visible after a 128 px letterbox. Optical images are colour JPEGs on textured terrain; SAR
images are 8-bit single-channel PNGs (mode L) with multiplicative gamma speckle and bright point
scatterers. Image sizes vary (128-256 px, not always square).

Everything is derived from the seed: the same seed gives byte-identical files. The dataset is written to a
temporary folder next to `out` and renamed at the end.

Layouts (docs/training-and-data.md sections 1 and 2):
  optsar: images/{split}/opt_NNNNNN.jpg | sar_NNNNNN.png, labels/{split}/*.txt (YOLO), {split}.json (COCO
          with caption and category_name; the 16 official categories with ids 0-15). Numbers contiguous per
          domain across train -> val -> test; ~8:1:1 split; both domains in every split.
  dior:   Annotations/NNNNN.xml (filename, source/database, size, object{name, pose, bndbox, description}),
          JPEGImages/NNNNN.jpg, {train,val,test}.txt of global object indices (~70:10:20 per expression).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tempfile
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from optisar_jax.data import categories as cats
from optisar_jax.data.release import DatasetError

FORMATS = ('optsar', 'dior')
SPLITS = ('train', 'val', 'test')
MIN_SIZE, MAX_SIZE = 128, 256
JPEG_QUALITY = 92

# Per category: (shape, short/long aspect range, main colour, accent colour). Shapes are drawn with their
# long axis horizontal and rotated by 90 degrees for vertical objects; every shape touches all four sides
# of its box, so the box is tight.
_STYLES = {
    'optical vehicle': ('car', (0.45, 0.55), (205, 35, 35), (40, 40, 60)),
    'optical bridge': ('bar', (0.2, 0.28), (150, 150, 150), (85, 85, 85)),
    'optical crossroad': ('plus', (0.9, 1.0), (60, 60, 60), (230, 200, 40)),
    'optical T junction': ('tee', (0.75, 0.9), (125, 125, 130), (250, 250, 250)),
    'optical ground track field': ('track', (0.55, 0.65), (180, 70, 50), (60, 150, 60)),
    'optical baseball diamond': ('diamond', (0.95, 1.0), (205, 165, 105), (70, 140, 60)),
    'optical swimming pool': ('pool', (0.5, 0.6), (40, 180, 235), (250, 250, 250)),
    'optical tennis court': ('court', (0.48, 0.55), (40, 115, 80), (250, 250, 250)),
    'optical parking lot': ('parking', (0.6, 0.75), (100, 100, 105), (230, 230, 230)),
    'optical basketball court': ('hoops', (0.52, 0.6), (225, 120, 40), (250, 250, 250)),
    'optical storage tank': ('tank', (1.0, 1.0), (235, 235, 235), (140, 140, 140)),
    'optical ship': ('hull', (0.28, 0.36), (245, 245, 250), (80, 80, 95)),
    'optical airplane': ('plane', (0.9, 1.0), (195, 200, 220), (120, 125, 145)),
    'optical harbor': ('harbor', (0.55, 0.7), (30, 60, 140), (175, 165, 145)),
    'sar transmission tower': ('tower', (0.9, 1.0), None, None),
    'sar ship': ('sar_hull', (0.26, 0.36), None, None),
    # DIOR-RSVG classes (shared looks reuse the OptSAR styles).
    'vehicle': ('car', (0.45, 0.55), (205, 35, 35), (40, 40, 60)),
    'overpass': ('xcross', (0.85, 1.0), (165, 160, 140), (90, 85, 75)),
    'chimney': ('ring', (1.0, 1.0), (120, 40, 40), (215, 200, 190)),
    'Expressway-Service-area': ('parking', (0.6, 0.75), (150, 120, 85), (240, 240, 200)),
    'harbor': ('harbor', (0.55, 0.7), (30, 60, 140), (175, 165, 145)),
    'basketballcourt': ('hoops', (0.52, 0.6), (225, 120, 40), (250, 250, 250)),
    'baseballfield': ('diamond', (0.95, 1.0), (205, 165, 105), (70, 140, 60)),
    'groundtrackfield': ('track', (0.55, 0.65), (180, 70, 50), (60, 150, 60)),
    'bridge': ('bar', (0.2, 0.28), (150, 150, 150), (85, 85, 85)),
    'stadium': ('stadium', (0.7, 0.85), (160, 160, 175), (40, 170, 70)),
    'windmill': ('windmill', (0.9, 1.0), (250, 250, 250), (60, 60, 60)),
    'airplane': ('plane', (0.9, 1.0), (195, 200, 220), (120, 125, 145)),
    'tenniscourt': ('court', (0.48, 0.55), (40, 115, 80), (250, 250, 250)),
    'airport': ('runway', (0.3, 0.4), (85, 85, 90), (250, 250, 250)),
    'ship': ('hull', (0.28, 0.36), (245, 245, 250), (80, 80, 95)),
    'trainstation': ('rails', (0.3, 0.4), (135, 100, 80), (45, 40, 40)),
    'storagetank': ('tank', (1.0, 1.0), (235, 235, 235), (140, 140, 140)),
    'golffield': ('golf', (0.6, 0.8), (120, 205, 95), (70, 150, 60)),
    'dam': ('dam', (0.3, 0.4), (195, 195, 185), (35, 80, 155)),
    'Expressway-toll-station': ('toll', (0.45, 0.6), (230, 205, 40), (90, 90, 90)),
}

_CELL_NAMES = {
    (0, 0): ('in the upper left', 'in the upper left corner'),
    (0, 1): ('at the top', 'in the top middle'),
    (0, 2): ('in the upper right', 'in the upper right corner'),
    (1, 0): ('on the left', 'on the left side'),
    (1, 1): ('in the center', 'in the middle'),
    (1, 2): ('on the right', 'on the right side'),
    (2, 0): ('in the lower left', 'in the lower left corner'),
    (2, 1): ('at the bottom', 'in the bottom middle'),
    (2, 2): ('in the lower right', 'in the lower right corner'),
}


@dataclasses.dataclass
class SceneObject:
  """One drawn object: category and tight box (x0, y0, x1, y1), integer pixels, x1/y1 exclusive."""
  category: str
  box: tuple[int, int, int, int]
  caption: str | None = None

  @property
  def center(self) -> tuple[float, float]:
    return (self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0

  @property
  def area(self) -> int:
    return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


@dataclasses.dataclass
class Scene:
  """A generated image (PIL, RGB for optical, L for SAR) and its objects."""
  image: Image.Image
  domain: str
  objects: list[SceneObject]


# --------------------------------------------------------------------------------------------- drawing

def _draw_shape(shape: str, w: int, h: int, main, accent, rng: np.random.Generator) -> Image.Image:
  """RGBA patch (w x h, long axis horizontal) with the shape touching all four sides."""
  im = Image.new('RGBA', (w, h), (0, 0, 0, 0))
  d = ImageDraw.Draw(im)
  m, a = tuple(main) + (255,), tuple(accent) + (255,)
  W, H = w - 1, h - 1
  t = max(1, round(min(w, h) / 10))
  if shape == 'car':
    d.rounded_rectangle([0, 0, W, H], radius=max(1, h // 4), fill=m)
    d.rectangle([round(w * 0.22), round(h * 0.18), round(w * 0.38), H - round(h * 0.18)], fill=a)
    d.rectangle([round(w * 0.65), round(h * 0.18), round(w * 0.8), H - round(h * 0.18)], fill=a)
  elif shape == 'bar':
    d.rectangle([0, 0, W, H], fill=m)
    d.rectangle([0, 0, W, t - 1], fill=a)
    d.rectangle([0, H - t + 1, W, H], fill=a)
    for x in range(0, w, max(4, h)):
      d.line([x, t, x, H - t], fill=a, width=1)
  elif shape == 'plus':
    tw, th = max(2, round(w * 0.3)), max(2, round(h * 0.3))
    d.rectangle([0, (h - th) // 2, W, (h - th) // 2 + th], fill=m)
    d.rectangle([(w - tw) // 2, 0, (w - tw) // 2 + tw, H], fill=m)
    d.line([0, h // 2, W, h // 2], fill=a, width=1)
    d.line([w // 2, 0, w // 2, H], fill=a, width=1)
  elif shape == 'tee':
    tw, th = max(2, round(w * 0.3)), max(2, round(h * 0.3))
    d.rectangle([0, 0, W, th], fill=m)
    d.rectangle([(w - tw) // 2, 0, (w - tw) // 2 + tw, H], fill=m)
    d.line([0, th // 2, W, th // 2], fill=a, width=1)
    d.line([w // 2, th // 2, w // 2, H], fill=a, width=1)
  elif shape in ('track', 'stadium'):
    d.ellipse([0, 0, W, H], fill=m)
    d.ellipse([2 * t, 2 * t, W - 2 * t, H - 2 * t], fill=a)
    if shape == 'stadium':
      d.ellipse([t, t, W - t, H - t], outline=(250, 250, 250, 255), width=1)
  elif shape == 'diamond':
    d.polygon([(w / 2, 0), (W, h / 2), (w / 2, H), (0, h / 2)], fill=m)
    d.polygon([(w / 2, h * 0.3), (w * 0.7, h / 2), (w / 2, h * 0.7), (w * 0.3, h / 2)], fill=a)
  elif shape == 'pool':
    d.rectangle([0, 0, W, H], fill=a)
    d.rectangle([t, t, W - t, H - t], fill=m)
    for k in range(1, 4):
      y = round(h * k / 4)
      d.line([2 * t, y, W - 2 * t, y], fill=(200, 240, 255, 255), width=1)
  elif shape == 'court':
    d.rectangle([0, 0, W, H], fill=m)
    d.rectangle([t, t, W - t, H - t], outline=a, width=1)
    d.line([w // 2, 0, w // 2, H], fill=a, width=max(1, t // 2))
    d.line([t, h // 2, W - t, h // 2], fill=a, width=1)
  elif shape == 'parking':
    d.rectangle([0, 0, W, H], fill=m)
    rows, cols = 3, max(3, round(w / max(6, h / 3)))
    cw, ch = w / cols, h / rows
    palette = [(200, 40, 40), (240, 240, 240), (40, 60, 160), (30, 30, 30), (220, 200, 60)]
    for r in range(rows):
      for c in range(cols):
        if rng.random() < 0.75:
          col = palette[int(rng.integers(len(palette)))] + (255,)
          d.rectangle([c * cw + 1, r * ch + 1, (c + 1) * cw - 2, (r + 1) * ch - 2], fill=col)
    d.rectangle([0, 0, W, H], outline=a, width=1)
  elif shape == 'hoops':
    d.rectangle([0, 0, W, H], fill=m)
    d.line([w // 2, 0, w // 2, H], fill=a, width=1)
    r = min(w, h) * 0.22
    d.ellipse([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], outline=a, width=1)
    d.rectangle([0, round(h * 0.35), round(w * 0.15), round(h * 0.65)], outline=a, width=1)
    d.rectangle([W - round(w * 0.15), round(h * 0.35), W, round(h * 0.65)], outline=a, width=1)
  elif shape in ('tank', 'ring'):
    d.ellipse([0, 0, W, H], fill=m if shape == 'tank' else a)
    d.ellipse([0, 0, W, H], outline=a if shape == 'tank' else m, width=max(1, 2 * t if shape == 'ring' else t))
    c = min(w, h) * 0.12
    d.ellipse([w / 2 - c, h / 2 - c, w / 2 + c, h / 2 + c], fill=(60, 60, 60, 255))
  elif shape == 'hull':
    d.polygon([(0, h * 0.18), (w * 0.72, 0), (W, h / 2), (w * 0.72, H), (0, h * 0.82)], fill=m)
    d.line([w * 0.1, h / 2, w * 0.8, h / 2], fill=a, width=max(1, h // 6))
  elif shape == 'plane':
    fw = max(2, round(h * 0.16))
    d.rectangle([0, (h - fw) // 2, W, (h - fw) // 2 + fw], fill=m)                  # fuselage
    d.polygon([(w * 0.38, 0), (w * 0.58, 0), (w * 0.62, H), (w * 0.42, H)], fill=m)  # wings
    d.polygon([(0, h * 0.25), (w * 0.12, h * 0.25), (w * 0.12, h * 0.75), (0, h * 0.75)], fill=a)  # tail
  elif shape == 'harbor':
    d.rectangle([0, 0, W, H], fill=m)
    d.rectangle([0, 0, W, max(2, round(h * 0.22))], fill=a)
    for k in range(4):
      x = round(w * (0.1 + 0.25 * k))
      d.rectangle([x, 0, x + max(1, round(w * 0.07)), round(h * 0.8)], fill=a)
  elif shape == 'xcross':
    b = max(2, round(min(w, h) * 0.16))
    d.polygon([(0, 0), (b, 0), (W, H - b), (W, H), (W - b, H), (0, b)], fill=m)
    d.polygon([(W, 0), (W, b), (b, H), (0, H), (0, H - b), (W - b, 0)], fill=m)
    d.line([0, 0, W, H], fill=a, width=1)
    d.line([W, 0, 0, H], fill=a, width=1)
  elif shape == 'windmill':
    cx, cy = w / 2, h * 0.55
    bw = max(1.5, min(w, h) * 0.07)
    for tx, ty in ((w / 2, 0), (0, H), (W, H)):
      d.polygon([(cx - bw, cy), (tx, ty), (cx + bw, cy)], fill=m)
    d.ellipse([cx - 2 * bw, cy - 2 * bw, cx + 2 * bw, cy + 2 * bw], fill=a)
  elif shape == 'runway':
    d.rectangle([0, 0, W, H], fill=m)
    for x in range(round(w * 0.05), w - 4, max(5, w // 10)):
      d.rectangle([x, h // 2 - 1, x + max(2, w // 25), h // 2], fill=a)
    d.rectangle([0, 0, W, H], outline=a, width=1)
  elif shape == 'rails':
    d.rectangle([0, 0, W, H], fill=m)
    for k in range(1, 5):
      y = round(h * k / 5)
      d.line([0, y, W, y], fill=a, width=1)
    d.rectangle([round(w * 0.3), 0, round(w * 0.7), max(1, round(h * 0.15))], fill=(200, 200, 200, 255))
  elif shape == 'golf':
    d.ellipse([0, 0, W, H], fill=m)
    d.ellipse([w * 0.2, h * 0.25, w * 0.55, h * 0.7], fill=a)
    d.ellipse([w * 0.6, h * 0.3, w * 0.75, h * 0.5], fill=(240, 230, 170, 255))
    d.line([w * 0.35, h * 0.45, w * 0.35, h * 0.2], fill=(250, 250, 250, 255), width=1)
  elif shape == 'dam':
    d.rectangle([0, 0, W, round(h * 0.55)], fill=a)
    d.rectangle([0, round(h * 0.55), W, H], fill=m)
  elif shape == 'toll':
    d.rectangle([0, 0, W, H], fill=a)
    n = 6
    for k in range(n):
      x0 = round(w * k / n)
      d.rectangle([x0 + 1, 0, round(w * (k + 0.5) / n), H], fill=m)
  else:
    raise ValueError(f'unknown shape {shape!r}')
  return im


def _draw_sar_shape(shape: str, w: int, h: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """(reflectivity float32 (h, w), mask bool (h, w)) of a SAR target, long axis horizontal."""
  refl = Image.new('L', (w, h), 0)
  mask = Image.new('L', (w, h), 0)
  dr, dm = ImageDraw.Draw(refl), ImageDraw.Draw(mask)
  W, H = w - 1, h - 1
  if shape == 'sar_hull':
    poly = [(0, h * 0.2), (w * 0.75, 0), (W, h / 2), (w * 0.75, H), (0, h * 0.8)]
    dr.polygon(poly, fill=55)
    dm.polygon(poly, fill=255)
    dr.line([w * 0.15, h / 2, w * 0.7, h / 2], fill=110, width=max(1, h // 5))
    for _ in range(int(rng.integers(3, 6))):
      x = rng.uniform(0.12, 0.8) * w
      y = h / 2 + rng.uniform(-0.15, 0.15) * h
      dr.ellipse([x - 1, y - 1, x + 1, y + 1], fill=250)
  elif shape == 'tower':
    t = max(1, round(min(w, h) / 12))
    for im_draw, val in ((dr, 85), (dm, 255)):
      im_draw.rectangle([0, 0, W, H], outline=val, width=t)
      im_draw.line([0, 0, W, H], fill=val, width=t)
      im_draw.line([W, 0, 0, H], fill=val, width=t)
    for x, y in ((1, 1), (W - 1, 1), (1, H - 1), (W - 1, H - 1), (w / 2, h / 2)):
      dr.ellipse([x - 1, y - 1, x + 1, y + 1], fill=250)
  else:
    raise ValueError(f'unknown SAR shape {shape!r}')
  return np.asarray(refl, np.float32) / 100.0, np.asarray(mask) > 0


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int, channels: int) -> np.ndarray:
  """Low-frequency noise in [0, 1], float32 (h, w, channels): a random grid upsampled bicubically."""
  out = []
  for _ in range(channels):
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    out.append(np.asarray(Image.fromarray(grid, 'L').resize((w, h), Image.BICUBIC), np.float32) / 255.0)
  return np.stack(out, axis=-1)


_TERRAIN = [(95, 125, 70), (140, 120, 90), (120, 120, 115), (170, 155, 120), (80, 105, 85)]


def _optical_background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
  base = np.asarray(_TERRAIN[int(rng.integers(len(_TERRAIN)))], np.float32)
  low = _smooth_noise(rng, w, h, int(rng.integers(3, 7)), 3)
  mid = _smooth_noise(rng, w, h, int(rng.integers(12, 24)), 1)
  img = base + 45.0 * (low - 0.5) + 25.0 * (mid - 0.5) + rng.normal(0.0, 7.0, (h, w, 1))
  # A few field patches of a shifted tint: texture, not objects (no sharp outlines).
  patches = Image.new('L', (w, h), 0)
  dp = ImageDraw.Draw(patches)
  for _ in range(int(rng.integers(2, 5))):
    x0, y0 = rng.uniform(-0.2, 0.9) * w, rng.uniform(-0.2, 0.9) * h
    dp.rectangle([x0, y0, x0 + rng.uniform(0.2, 0.6) * w, y0 + rng.uniform(0.2, 0.6) * h],
                 fill=int(rng.integers(60, 140)))
  patches = np.asarray(patches.filter(ImageFilter.GaussianBlur(2)), np.float32)[..., None] / 255.0
  tint = rng.uniform(-30, 30, 3).astype(np.float32)
  return img + patches * tint


def _sar_background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
  refl = 0.02 + 0.02 * _smooth_noise(rng, w, h, 4, 1)[..., 0]
  if rng.random() < 0.5:  # a stretch of land along one side
    land = Image.new('L', (w, h), 0)
    side = int(rng.integers(4))
    frac = rng.uniform(0.15, 0.35)
    box = {0: [0, 0, frac * w, h], 1: [(1 - frac) * w, 0, w, h], 2: [0, 0, w, frac * h],
           3: [0, (1 - frac) * h, w, h]}[side]
    ImageDraw.Draw(land).rectangle(box, fill=255)
    land = np.asarray(land.filter(ImageFilter.GaussianBlur(3)), np.float32) / 255.0
    refl = refl + land * (0.12 + 0.15 * _smooth_noise(rng, w, h, 10, 1)[..., 0])
  return refl.astype(np.float32)


# ------------------------------------------------------------------------------------------- layouts

def _choose_categories(rng: np.random.Generator, names: tuple[str, ...]) -> list[str]:
  n = int(rng.choice([2, 3, 4, 5], p=[0.2, 0.3, 0.3, 0.2]))
  k = int(rng.integers(1, min(3, n, len(names)) + 1))
  chosen = [names[i] for i in rng.choice(len(names), size=k, replace=False)]
  counts = [1] * k
  for _ in range(n - k):
    counts[int(rng.integers(k))] += 1
  return [c for c, m in zip(chosen, counts) for _ in range(m)]


def _place(rng: np.random.Generator, category: str, w: int, h: int,
           taken: list[tuple[int, int, int, int]]) -> tuple[tuple[int, int, int, int], bool] | None:
  """A free box for one object (and whether it is vertical), or None after 60 tries."""
  _, (amin, amax), _, _ = _STYLES[category]
  long_max = min(0.42 * max(w, h), 0.85 * min(w, h))
  for _ in range(60):
    long_side = rng.uniform(0.14 * max(w, h), max(0.14 * max(w, h) + 1, long_max))
    short_side = max(6.0, long_side * rng.uniform(amin, amax))
    vertical = bool(rng.random() < 0.5)
    bw, bh = (short_side, long_side) if vertical else (long_side, short_side)
    bw, bh = int(round(bw)), int(round(bh))
    if bw > w - 6 or bh > h - 6:
      continue
    x0 = int(rng.integers(3, w - bw - 2))
    y0 = int(rng.integers(3, h - bh - 2))
    box = (x0, y0, x0 + bw, y0 + bh)
    gap = 4
    if all(box[2] + gap <= t[0] or t[2] + gap <= box[0] or box[3] + gap <= t[1] or t[3] + gap <= box[1]
           for t in taken):
      return box, vertical
  return None


def _render_optical(rng, w, h, layout) -> tuple[Image.Image, list[SceneObject]]:
  canvas = Image.fromarray(np.clip(_optical_background(rng, w, h), 0, 255).astype(np.uint8), 'RGB')
  objects = []
  for category, box, vertical in layout:
    shape, _, main, accent = _STYLES[category]
    bw, bh = box[2] - box[0], box[3] - box[1]
    pw, ph = (bh, bw) if vertical else (bw, bh)
    jitter = rng.integers(-12, 13, 3)
    main_j = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(main, jitter))
    patch = _draw_shape(shape, pw, ph, main_j, accent, rng)
    if rng.random() < 0.5:
      patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
    if vertical:
      patch = patch.transpose(Image.ROTATE_90)
    canvas.paste(patch, box[:2], patch)
    tight = patch.getchannel('A').getbbox()
    objects.append(SceneObject(category, (box[0] + tight[0], box[1] + tight[1],
                                          box[0] + tight[2], box[1] + tight[3])))
  pixels = np.asarray(canvas, np.float32) + rng.normal(0.0, 3.0, (h, w, 3))
  return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), 'RGB'), objects


def _render_sar(rng, w, h, layout) -> tuple[Image.Image, list[SceneObject]]:
  refl = _sar_background(rng, w, h)
  objects = []
  for category, box, vertical in layout:
    shape = _STYLES[category][0]
    bw, bh = box[2] - box[0], box[3] - box[1]
    pw, ph = (bh, bw) if vertical else (bw, bh)
    target, mask = _draw_sar_shape(shape, pw, ph, rng)
    if rng.random() < 0.5:
      target, mask = target[:, ::-1], mask[:, ::-1]
    if vertical:
      target, mask = np.rot90(target), np.rot90(mask)
    region = refl[box[1]:box[3], box[0]:box[2]]
    region[mask] = np.maximum(region[mask], target[mask])
    ys, xs = np.nonzero(mask)
    objects.append(SceneObject(category, (box[0] + int(xs.min()), box[1] + int(ys.min()),
                                          box[0] + int(xs.max()) + 1, box[1] + int(ys.max()) + 1)))
  looks = 3.0
  speckle = rng.gamma(looks, 1.0 / looks, refl.shape).astype(np.float32)
  amplitude = np.sqrt(refl * speckle)
  pixels = np.clip(np.round(255.0 * amplitude / 1.3), 0, 255).astype(np.uint8)
  return Image.fromarray(pixels, 'L'), objects


# ------------------------------------------------------------------------------------------- captions

def _cell(center, w, h):
  return min(2, int(3 * center[1] / h)), min(2, int(3 * center[0] / w))


def _in_cell(center, cell, w, h, margin: float) -> bool:
  """Whether `center` lies in `cell` (row, col) of the 3x3 grid grown (margin > 0) or shrunk by margin."""
  r, c = cell
  x0, x1 = c * w / 3 - margin * w, (c + 1) * w / 3 + margin * w
  y0, y1 = r * h / 3 - margin * h, (r + 1) * h / 3 + margin * h
  return x0 <= center[0] < x1 and y0 <= center[1] < y1


def _caption_candidates(i: int, objects: list[SceneObject], w: int, h: int) -> dict[str, list[str]]:
  """Unambiguous captions of object i, grouped by kind (category, size, extreme, position, relation)."""
  me = objects[i]
  noun = cats.category_words(me.category)
  same = [o for j, o in enumerate(objects) if j != i and o.category == me.category]
  out: dict[str, list[str]] = {}
  if not same:
    out['category'] = [f'the {noun}', f'the {noun} in the image']
  else:
    if me.area >= 1.6 * max(o.area for o in same):
      out['size'] = [f'the largest {noun}', f'the biggest {noun}'] if len(same) > 1 else \
          [f'the larger {noun}', f'the large {noun}']
    elif 1.6 * me.area <= min(o.area for o in same):
      out['size'] = [f'the smallest {noun}'] if len(same) > 1 else [f'the smaller {noun}', f'the small {noun}']
    cx, cy = me.center
    ext = []
    if all(cx + 0.12 * w <= o.center[0] for o in same):
      ext.append(f'the leftmost {noun}')
    if all(cx - 0.12 * w >= o.center[0] for o in same):
      ext.append(f'the rightmost {noun}')
    if all(cy + 0.12 * h <= o.center[1] for o in same):
      ext.append(f'the topmost {noun}')
    if all(cy - 0.12 * h >= o.center[1] for o in same):
      ext.append(f'the bottommost {noun}')
    if ext:
      out['extreme'] = ext
  cell = _cell(me.center, w, h)
  if _in_cell(me.center, cell, w, h, -0.04) and not any(_in_cell(o.center, cell, w, h, 0.06) for o in same):
    out['position'] = [f'the {noun} {phrase}' for phrase in _CELL_NAMES[cell]]
  rel = []
  counts: dict[str, int] = {}
  for o in objects:
    counts[o.category] = counts.get(o.category, 0) + 1
  mx, my = me.center
  for ref in objects:
    if ref.category == me.category or counts[ref.category] != 1:
      continue
    rnoun = cats.category_words(ref.category)
    rx, ry = ref.center
    tests = (
        ('left of', me.box[2] <= ref.box[0], lambda o: o.center[0] < rx + 0.05 * w),
        ('right of', me.box[0] >= ref.box[2], lambda o: o.center[0] > rx - 0.05 * w),
        ('above', me.box[3] <= ref.box[1], lambda o: o.center[1] < ry + 0.05 * h),
        ('below', me.box[1] >= ref.box[3], lambda o: o.center[1] > ry - 0.05 * h),
    )
    for word, clearly, possibly in tests:
      if clearly and not any(possibly(o) for o in same):
        rel.append(f'the {noun} {word} the {rnoun}')
    if same:
      dist = lambda o: float(np.hypot(o.center[0] - rx, o.center[1] - ry))
      if 1.5 * np.hypot(mx - rx, my - ry) <= min(dist(o) for o in same):
        rel.append(f'the {noun} closest to the {rnoun}')
  if rel:
    out['relation'] = rel
  return out


def generate_scene(rng: np.random.Generator, domain: str, category_names: tuple[str, ...]) -> Scene:
  """One image of `domain` with 2-5 objects of `category_names` and unambiguous captions."""
  for _ in range(20):
    w, h = (int(v) for v in rng.integers(MIN_SIZE, MAX_SIZE + 1, 2))
    if rng.random() < 0.3:
      h = w
    layout, taken = [], []
    for category in _choose_categories(rng, category_names):
      placed = _place(rng, category, w, h, taken)
      if placed is not None:
        taken.append(placed[0])
        layout.append((category, placed[0], placed[1]))
    if len(layout) < 2:
      continue
    render = _render_sar if domain == 'sar' else _render_optical
    image, objects = render(rng, w, h, layout)
    for i, obj in enumerate(objects):
      candidates = _caption_candidates(i, objects, w, h)
      if candidates:
        kinds = sorted(candidates)
        texts = candidates[kinds[int(rng.integers(len(kinds)))]]
        obj.caption = texts[int(rng.integers(len(texts)))]
    if any(o.caption for o in objects):
      return Scene(image, domain, objects)
  raise RuntimeError('could not generate a scene with an unambiguous caption')  # practically unreachable


def _encode(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  if fmt == 'JPEG':
    image.save(buf, format='JPEG', quality=JPEG_QUALITY, subsampling=0)
  else:
    image.save(buf, format='PNG', compress_level=6)
  return buf.getvalue()


def _write(path: str, data: bytes | str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data.encode('utf-8') if isinstance(data, str) else data)


# --------------------------------------------------------------------------------------------- writers

def _split_counts(n: int, fractions: tuple[float, float, float], minimum: int) -> list[int]:
  val = max(minimum, int(round(n * fractions[1])))
  test = max(minimum, int(round(n * fractions[2])))
  return [n - val - test, val, test]


def _write_optsar(tmp: str, num_images: int, seed: int) -> None:
  if num_images < 6:
    raise ValueError(f'--num_images {num_images}: the optsar format needs at least 6 images (both domains '
                     'in each of train, val, test)')
  plan_rng = np.random.default_rng([seed, 0])
  optical_names = tuple(c for c in cats.OPTSAR_CATEGORIES if cats.domain_of_category(c) == 'optical')
  sar_names = tuple(c for c in cats.OPTSAR_CATEGORIES if cats.domain_of_category(c) == 'sar')
  counters = {'optical': 0, 'sar': 0}
  image_id = ann_id = 0
  for split, count in zip(SPLITS, _split_counts(num_images, (0.8, 0.1, 0.1), 2)):
    n_sar = min(count - 1, max(1, int(round(0.3 * count))))
    domains = ['sar'] * n_sar + ['optical'] * (count - n_sar)
    domains = [domains[i] for i in plan_rng.permutation(count)]
    coco = {'images': [], 'annotations': [],
            'categories': [{'id': i, 'name': c} for i, c in enumerate(cats.OPTSAR_CATEGORIES)]}
    for domain in domains:
      image_id += 1
      counters[domain] += 1
      rng = np.random.default_rng([seed, 1, image_id])
      scene = generate_scene(rng, domain, sar_names if domain == 'sar' else optical_names)
      stem = f'{"sar" if domain == "sar" else "opt"}_{counters[domain]:06d}'
      ext, fmt = ('png', 'PNG') if domain == 'sar' else ('jpg', 'JPEG')
      file_name = f'{stem}.{ext}'
      w, h = scene.image.size
      _write(os.path.join(tmp, 'images', split, file_name), _encode(scene.image, fmt))
      coco['images'].append({'id': image_id, 'file_name': file_name, 'width': w, 'height': h})
      rows = []
      for obj in scene.objects:
        if not obj.caption:
          continue
        ann_id += 1
        x0, y0, x1, y1 = obj.box
        cid = cats.OPTSAR_CATEGORY_IDS[obj.category]
        coco['annotations'].append({
            'id': ann_id, 'image_id': image_id, 'category_id': cid, 'category_name': obj.category,
            'caption': obj.caption, 'bbox': [x0, y0, x1 - x0, y1 - y0], 'area': (x1 - x0) * (y1 - y0),
            'iscrowd': 0})
        rows.append(f'{cid} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} '
                    f'{(y1 - y0) / h:.6f}\n')
      _write(os.path.join(tmp, 'labels', split, stem + '.txt'), ''.join(rows))
    _write(os.path.join(tmp, f'{split}.json'), json.dumps(coco, indent=1) + '\n')


def _dior_xml(filename: str, w: int, h: int, objects: list[SceneObject]) -> str:
  lines = ['<annotation>', f'  <filename>{escape(filename)}</filename>',
           '  <source>', '    <database>DIOR</database>', '  </source>',
           '  <size>', f'    <width>{w}</width>', f'    <height>{h}</height>', '    <depth>3</depth>',
           '  </size>']
  for o in objects:
    x0, y0, x1, y1 = o.box
    lines += ['  <object>', f'    <name>{escape(o.category)}</name>', '    <pose>Unspecified</pose>',
              '    <bndbox>', f'      <xmin>{x0}</xmin>', f'      <ymin>{y0}</ymin>',
              f'      <xmax>{x1}</xmax>', f'      <ymax>{y1}</ymax>', '    </bndbox>',
              f'    <description>{escape(o.caption)}</description>', '  </object>']
  return '\n'.join(lines + ['</annotation>']) + '\n'


def _write_dior(tmp: str, num_images: int, seed: int) -> None:
  if num_images < 3:
    raise ValueError(f'--num_images {num_images}: the dior format needs at least 3 images')
  total = 0
  for k in range(1, num_images + 1):
    rng = np.random.default_rng([seed, 2, k])
    scene = generate_scene(rng, 'optical', cats.DIOR_CLASSES)
    objects = [o for o in scene.objects if o.caption]
    stem = f'{k:05d}'
    w, h = scene.image.size
    _write(os.path.join(tmp, 'JPEGImages', stem + '.jpg'), _encode(scene.image, 'JPEG'))
    _write(os.path.join(tmp, 'Annotations', stem + '.xml'), _dior_xml(stem + '.jpg', w, h, objects))
    total += len(objects)
  # Per-expression split (~70:10:20 as in the release), every split non-empty.
  order = np.random.default_rng([seed, 3]).permutation(total)
  n_train, n_val, n_test = _split_counts(total, (0.7, 0.1, 0.2), 1)
  parts = {'train': order[:n_train], 'val': order[n_train:n_train + n_val], 'test': order[n_train + n_val:]}
  for split, idx in parts.items():
    _write(os.path.join(tmp, f'{split}.txt'), ''.join(f'{i}\n' for i in sorted(int(v) for v in idx)))


def make_synthetic_dataset(out: str, format: str = 'optsar', num_images: int = 200, seed: int = 0,
                           *, overwrite: bool = False) -> str:  # pylint: disable=redefined-builtin
  """Writes a synthetic dataset in the OptSAR-RSVG ('optsar') or DIOR-RSVG ('dior') release layout.

  Args:
    out: the dataset folder to create. If it exists and is not empty, `overwrite` must be True.
    format: 'optsar' or 'dior'.
    num_images: number of images (optsar >= 6, dior >= 3).
    seed: the same seed gives byte-identical files.
    overwrite: replace an existing non-empty `out` (only once the new copy is complete).
  Returns:
    `out` (absolute path).
  """
  if format not in FORMATS:
    raise ValueError(f'--format {format!r}: expected one of {", ".join(FORMATS)}')
  out = os.path.abspath(os.fspath(out))
  if os.path.exists(out) and not os.path.isdir(out):
    raise DatasetError(f'{out}: exists and is not a folder')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise DatasetError(f'{out}: folder exists and is not empty (pass --overwrite to replace it)')
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  try:
    (_write_optsar if format == 'optsar' else _write_dior)(tmp, int(num_images), int(seed))
    os.chmod(tmp, 0o755)
    if os.path.isdir(out):
      old = tmp + '.old'
      os.rename(out, old)
      os.rename(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return out
