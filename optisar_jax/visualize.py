"""Pictures of grounding results: boxes and queries drawn on images, and a grid of examples with a legend.

Colours: ground truth green, prediction red (2 px at the drawn size). Everything is drawn at its final pixel
size: an image is scaled to its tile width first, then boxes and text are drawn on it, so every tile of a
grid has the same font size and no caption is cut by a later resize. Captions wrap by their measured width
(PIL's built-in scalable font, so no font files are needed).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GT_COLOUR = (40, 220, 60)
PRED_COLOUR = (235, 40, 40)
FONT_SIZE = 11
LINE_HEIGHT = 14


def _font():
  return ImageFont.load_default(size=FONT_SIZE)


def wrap_text(text: str, width_px: int, font=None) -> list[str]:
  """`text` cut into lines that each fit in `width_px` pixels in `font` (a word longer than a line is cut
  between characters)."""
  font = font or _font()
  lines: list[str] = []
  line = ''
  for word in text.split():
    candidate = f'{line} {word}' if line else word
    if font.getlength(candidate) <= width_px:
      line = candidate
      continue
    if line:
      lines.append(line)
    while font.getlength(word) > width_px and len(word) > 1:     # a word wider than a whole line
      cut = max(1, max(k for k in range(1, len(word) + 1) if font.getlength(word[:k]) <= width_px or k == 1))
      lines.append(word[:cut])
      word = word[cut:]
    line = word
  if line or not lines:
    lines.append(line)
  return lines


def draw_grounding(image: np.ndarray | Image.Image, query: str, *,
                   pred_box: Sequence[float] | None = None, gt_box: Sequence[float] | None = None,
                   score: float | None = None, width: int | None = None) -> Image.Image:
  """The image scaled to `width` pixels wide (default: as it is), boxes (xyxy, pixels of the INPUT image)
  drawn on it, and the query (with the score) wrapped to that width in a white band underneath."""
  base = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
  base = base.convert('RGB')
  scale = 1.0
  if width is not None and width != base.width:
    scale = width / base.width
    base = base.resize((int(width), max(1, round(base.height * scale))), Image.BILINEAR)
  draw = ImageDraw.Draw(base)
  line_width = 2
  for box, colour in ((gt_box, GT_COLOUR), (pred_box, PRED_COLOUR)):
    if box is not None:
      draw.rectangle([float(v) * scale for v in box], outline=colour, width=line_width)
  font = _font()
  label = query if score is None else f'{query} ({score:.2f})'
  lines = wrap_text(label, base.width - 4, font)
  canvas = Image.new('RGB', (base.width, base.height + LINE_HEIGHT * len(lines) + 4), 'white')
  canvas.paste(base, (0, 0))
  text_draw = ImageDraw.Draw(canvas)
  for i, line in enumerate(lines):
    text_draw.text((2, base.height + 2 + i * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
  return canvas


def legend(width: int, *, with_gt: bool = True) -> Image.Image:
  """A one-line band: a green square "ground truth" (when `with_gt`) and a red square "prediction"."""
  font = _font()
  band = Image.new('RGB', (max(1, width), LINE_HEIGHT + 8), 'white')
  draw = ImageDraw.Draw(band)
  x = 4
  entries = ([(GT_COLOUR, 'ground truth')] if with_gt else []) + [(PRED_COLOUR, 'prediction (score)')]
  for colour, name in entries:
    draw.rectangle([x, 5, x + 10, 15], outline=colour, width=2)
    draw.text((x + 15, 4), name, fill=(0, 0, 0), font=font)
    x += 15 + int(font.getlength(name)) + 16
  return band


def make_grid(tiles: Sequence[Image.Image], columns: int = 4, padding: int = 4, *,
              with_legend: bool = True, with_gt: bool = True) -> Image.Image:
  """Lays tiles (drawn at their final size, e.g. by `draw_grounding(..., width=W)`) on a white grid, rows
  as tall as their tallest tile, under a colour legend."""
  if not tiles:
    raise ValueError('make_grid: no tiles')
  columns = max(1, min(columns, len(tiles)))
  rows = (len(tiles) + columns - 1) // columns
  col_width = max(t.width for t in tiles)
  row_heights = [max(t.height for t in tiles[r * columns:(r + 1) * columns]) for r in range(rows)]
  width = columns * (col_width + padding) + padding
  top = legend(width, with_gt=with_gt) if with_legend else None
  offset = top.height if top is not None else 0
  grid = Image.new('RGB', (width, offset + sum(row_heights) + padding * (rows + 1)), 'white')
  if top is not None:
    grid.paste(top, (0, 0))
  y = offset + padding
  for r in range(rows):
    for c, tile in enumerate(tiles[r * columns:(r + 1) * columns]):
      grid.paste(tile, (padding + c * (col_width + padding), y))
    y += row_heights[r] + padding
  return grid


def examples_grid(results, examples, count: int, *, canvas_of=None, columns: int = 4,
                  tile_width: int = 192) -> Image.Image:
  """A grid of grounded queries, one per image, `count` images evenly spread over the split: each tile is
  the image as the model saw it (the letterbox canvas without its bars), ground truth green, prediction
  red, the query and score underneath. `results` are evaluation QueryResults, `examples` the per-image
  metadata (`letterbox`, `orig_size`); `canvas_of(i)` gives image i's canvas (default
  `examples[i]['image']`)."""
  first_of_image = {}
  for r in results:
    first_of_image.setdefault(r.image_index, r)
  chosen = list(first_of_image.values())
  if len(chosen) > count:
    chosen = [chosen[i] for i in np.linspace(0, len(chosen) - 1, count).round().astype(int)]
  tiles = []
  for r in chosen:
    ex = examples[r.image_index]
    lb = ex['letterbox']
    h, w = ex['orig_size']
    canvas = ex['image'] if canvas_of is None else canvas_of(r.image_index)
    top, left = int(round(lb.top)), int(round(lb.left))
    inner = canvas[top:top + int(round(h * lb.ratio)), left:left + int(round(w * lb.ratio))]
    scale = inner.shape[1] / w
    pred = None if r.box is None else np.asarray(r.box) * scale
    tiles.append(draw_grounding(np.ascontiguousarray(inner), r.caption, pred_box=pred,
                                gt_box=np.asarray(r.gt_box) * scale, score=r.score, width=tile_width))
  return make_grid(tiles, columns=columns)
