"""Pictures: captions wrapped by measured width and drawn at the final size, boxes scaled with the image,
and a grid with a colour legend (optisar_jax/visualize.py)."""

import numpy as np
import pytest

from optisar_jax import visualize


def test_wrap_text_fits_the_width_and_keeps_every_word():
  font = visualize._font()
  text = 'the storage tank closest to the topmost T junction below the harbour entrance (0.87)'
  for width in (60, 120, 188):
    lines = visualize.wrap_text(text, width, font)
    assert all(font.getlength(line) <= width for line in lines), (width, lines)
    assert ' '.join(lines).split() == text.split()
  # A word wider than the line is cut between characters, nothing lost.
  lines = visualize.wrap_text('supercalifragilistic', 30, font)
  assert ''.join(lines) == 'supercalifragilistic' and all(font.getlength(line) <= 30 for line in lines)


def test_boxes_scale_with_the_image_and_the_caption_is_below():
  image = np.zeros((64, 64, 3), np.uint8)
  tile = visualize.draw_grounding(image, 'the ship', gt_box=[8, 8, 40, 40], pred_box=[16, 4, 60, 30],
                                  score=0.5, width=192)
  pixels = np.asarray(tile)
  assert tile.width == 192 and tile.height == 192 + visualize.LINE_HEIGHT + 4   # one caption line
  # Ground truth (8, 8)-(40, 40) at scale 3 -> green edge at x = 24..25, y from 24 to 120.
  assert tuple(pixels[70, 24]) == visualize.GT_COLOUR and tuple(pixels[70, 23]) == (0, 0, 0)
  # Prediction's top edge at y = 12.
  assert tuple(pixels[12, 100]) == visualize.PRED_COLOUR
  band = pixels[192:]
  assert (band < 128).any() and (band == 255).all(axis=-1).mean() > 0.5    # dark text on white


def test_grid_has_a_legend_and_equal_font_size_in_every_tile():
  small = visualize.draw_grounding(np.zeros((32, 64, 3), np.uint8), 'a', width=150)
  large = visualize.draw_grounding(np.zeros((300, 600, 3), np.uint8), 'a', width=150)
  assert small.height - 75 == large.height - 75 == visualize.LINE_HEIGHT + 4    # same band, same font
  grid = visualize.make_grid([small, large], columns=2)
  legend = np.asarray(grid)[:visualize.LINE_HEIGHT + 8]
  colours = {tuple(p) for p in legend.reshape(-1, 3)}
  assert visualize.GT_COLOUR in colours and visualize.PRED_COLOUR in colours
  no_gt = np.asarray(visualize.make_grid([small], with_gt=False))[:visualize.LINE_HEIGHT + 8]
  assert visualize.GT_COLOUR not in {tuple(p) for p in no_gt.reshape(-1, 3)}
  with pytest.raises(ValueError, match='no tiles'):
    visualize.make_grid([])
