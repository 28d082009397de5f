"""One image, one or more queries: load, letterbox, ground, map back, draw.

    answers = ground_image_file(workdir, 'scene.png', ['the ship left of the harbor'])
    # [{'query': ..., 'bbox': [x, y, w, h] | None, 'score': s}]   (original pixels, COCO xywh)
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from optisar_jax import evaluation
from optisar_jax import visualize
from optisar_jax.data.release import load_image_rgb
from optisar_jax.runtime import paths


def xyxy_to_coco(box) -> list[float] | None:
  if box is None:
    return None
  x1, y1, x2, y2 = (float(v) for v in box)
  return [x1, y1, x2 - x1, y2 - y1]


def ground_image(grounder: evaluation.Grounder, image: np.ndarray, queries: Sequence[str]) -> list[dict]:
  """[{'query', 'bbox' (COCO xywh, original pixels, or None), 'score'}] for an RGB uint8 image."""
  answers = grounder.ground(image, queries)
  return [{'query': q, 'bbox': xyxy_to_coco(box), 'score': float(score)}
          for q, (box, score) in zip(queries, answers)]


def ground_image_file(workdir: str, image_path: str, queries: Sequence[str], *, use_ema: bool = True,
                      output_png: str | None = None) -> list[dict]:
  """Loads the run in `workdir`, grounds `queries` on the image file, optionally draws them into a PNG."""
  queries = [q.strip() for q in queries]
  for q in queries:
    if not q:
      raise ValueError('--query: empty query')
  image = load_image_rgb(image_path)
  grounder = evaluation.load_grounder(workdir, use_ema=use_ema)
  answers = ground_image(grounder, image, queries)
  if output_png:
    tiles = []
    tile_width = max(256, image.shape[1]) if len(answers) > 1 else None
    for answer in answers:
      box = answer['bbox']
      xyxy = None if box is None else [box[0], box[1], box[0] + box[2], box[1] + box[3]]
      tiles.append(visualize.draw_grounding(image, answer['query'], pred_box=xyxy, score=answer['score'],
                                            width=tile_width))
    picture = visualize.make_grid(tiles, columns=min(4, len(tiles)), with_gt=False)
    buffer = io.BytesIO()
    picture.save(buffer, format='PNG')
    paths.write_bytes_atomic(output_png, buffer.getvalue())
  return answers
