"""Pictures of grounding results: boxes and queries drawn on images, and a grid of examples.

Colours: ground truth green, prediction red (dashed-free, 2 px). Text is drawn with PIL's built-in bitmap
font so no font files are needed.
"""

from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GT_COLOUR = (40, 220, 60)
PRED_COLOUR = (235, 40, 40)


def _font():
  return ImageFont.load_default()


def draw_grounding(image: np.ndarray | Image.Image, query: str, *,
                   pred_box: Sequence[float] | None = None, gt_box: Sequence[float] | None = None,
                   score: float | None = None, caption_width: int = 48) -> Image.Image:
  """Draws boxes (xyxy, image pixels) and the query under the image.

  Returns a new RGB image: the input (boxes drawn) above a white band holding the query and score.
  """
  base = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
  base = base.convert('RGB')
  draw = ImageDraw.Draw(base)
  width = max(1, round(min(base.size) / 128))
  if gt_box is not None:
    draw.rectangle([float(v) for v in gt_box], outline=GT_COLOUR, width=width)
  if pred_box is not None:
    draw.rectangle([float(v) for v in pred_box], outline=PRED_COLOUR, width=width)
  label = query if score is None else f'{query} ({score:.2f})'
  lines = textwrap.wrap(label, width=max(8, caption_width)) or ['']
  line_height = 12
  canvas = Image.new('RGB', (base.width, base.height + line_height * len(lines) + 4), 'white')
  canvas.paste(base, (0, 0))
  text_draw = ImageDraw.Draw(canvas)
  for i, line in enumerate(lines):
    text_draw.text((2, base.height + 2 + i * line_height), line, fill=(0, 0, 0), font=_font())
  return canvas


def make_grid(tiles: Sequence[Image.Image], columns: int = 4, tile_size: int = 192,
              padding: int = 4) -> Image.Image:
  """Lays tiles (each scaled to `tile_size` wide, aspect kept) on a white grid."""
  if not tiles:
    raise ValueError('make_grid: no tiles')
  scaled = []
  for tile in tiles:
    ratio = tile_size / tile.width
    scaled.append(tile.resize((tile_size, max(1, round(tile.height * ratio))), Image.BILINEAR))
  columns = max(1, min(columns, len(scaled)))
  rows = (len(scaled) + columns - 1) // columns
  row_heights = [max(t.height for t in scaled[r * columns:(r + 1) * columns]) for r in range(rows)]
  grid = Image.new('RGB', (columns * (tile_size + padding) + padding,
                           sum(row_heights) + padding * (rows + 1)), 'white')
  y = padding
  for r in range(rows):
    for c, tile in enumerate(scaled[r * columns:(r + 1) * columns]):
      grid.paste(tile, (padding + c * (tile_size + padding), y))
    y += row_heights[r] + padding
  return grid
