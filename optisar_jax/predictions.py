"""Predictions files and COCO-style grounding annotations: reading, validation, writing, scoring.

Predictions file (docs/interfaces.md section 6): a JSON list, one entry per query,
`{"id": <annotation id>, "bbox": [x, y, w, h] | null, "score": <float, optional>}`, boxes in original-image
pixels. A query id absent from the file counts as no prediction; an id not in the annotations, or one that
appears twice, is an error.

Annotations (OptSAR-RSVG release format, docs/training-and-data.md section 1.3): `images[]` with `id`, `width`,
`height`; `annotations[]` with `id`, `image_id`, `bbox` [x, y, w, h] and `category_name` (or a `category_id`
found in `categories[]`). One annotation = one query.

Every problem raises `DataError` (a ValueError) whose one-line message starts with the file's path.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import numpy as np

from optisar_jax import metrics as metrics_lib
from optisar_jax.runtime import paths


class DataError(ValueError):
  """A predictions or annotations file is missing, malformed or inconsistent (message names the file)."""


@dataclasses.dataclass(frozen=True)
class Annotations:
  """The queries of an annotations file, in file order (N = number of annotations).

  ids: N annotation ids. gt_boxes: (N, 4) float64 xyxy. image_wh: (N, 2) float64 (width, height).
  image_ids: N image ids. category_names: N names. captions: N captions (stripped; '' if absent).
  """
  path: str
  ids: list
  gt_boxes: np.ndarray
  image_wh: np.ndarray
  image_ids: list
  category_names: list
  captions: list

  def index(self) -> dict:
    """annotation id -> row."""
    return {ann_id: row for row, ann_id in enumerate(self.ids)}


def _read_json(path: str) -> Any:
  try:
    text = paths.path(path).read_text(encoding='utf-8')
  except FileNotFoundError:
    raise DataError(f'{path}: file not found') from None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'{path}: cannot read: {e}') from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f'{path}: malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})') from None


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_id(value: Any) -> bool:
  return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def _bbox(value: Any) -> list[float] | None:
  """A valid [x, y, w, h] (finite numbers, w, h >= 0) as floats, else None."""
  if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_is_number(v) for v in value):
    return None
  if value[2] < 0 or value[3] < 0:
    return None
  return [float(v) for v in value]


def load_annotations(path: str) -> Annotations:
  """Reads and validates a COCO-style grounding annotations file (see the module docstring)."""
  data = _read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get('images'), list) \
      or not isinstance(data.get('annotations'), list):
    raise DataError(f'{path}: expected a JSON object with lists "images" and "annotations"')
  image_sizes = {}
  for image in data['images']:
    if not isinstance(image, dict) or not _is_id(image.get('id')):
      raise DataError(f'{path}: an image record has no valid "id"')
    width, height = image.get('width'), image.get('height')
    if not (_is_number(width) and _is_number(height) and width > 0 and height > 0):
      raise DataError(f'{path}: image {image["id"]!r}: "width"/"height" must be positive numbers')
    image_sizes[image['id']] = (float(width), float(height))
  category_by_id = {}
  for category in data.get('categories', []) or []:
    if isinstance(category, dict) and _is_id(category.get('id')) and isinstance(category.get('name'), str):
      category_by_id[category['id']] = category['name']

  ids, boxes, sizes, image_ids, names, captions = [], [], [], [], [], []
  seen = set()
  for ann in data['annotations']:
    if not isinstance(ann, dict) or not _is_id(ann.get('id')):
      raise DataError(f'{path}: an annotation has no valid "id"')
    ann_id = ann['id']
    if ann_id in seen:
      raise DataError(f'{path}: duplicate annotation id {ann_id!r}')
    seen.add(ann_id)
    if ann.get('image_id') not in image_sizes:
      raise DataError(f'{path}: annotation {ann_id!r}: image_id {ann.get("image_id")!r} not in "images"')
    bbox = _bbox(ann.get('bbox'))
    if bbox is None or bbox[2] <= 0 or bbox[3] <= 0:
      raise DataError(f'{path}: annotation {ann_id!r}: invalid bbox {ann.get("bbox")!r} '
                      '(expected [x, y, w, h], finite, w > 0, h > 0)')
    name = ann.get('category_name')
    if not isinstance(name, str):
      if ann.get('category_id') not in category_by_id:
        raise DataError(f'{path}: annotation {ann_id!r}: no "category_name" and category_id '
                        f'{ann.get("category_id")!r} not in "categories"')
      name = category_by_id[ann['category_id']]
    caption = ann.get('caption')
    ids.append(ann_id)
    boxes.append([bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]])
    sizes.append(image_sizes[ann['image_id']])
    image_ids.append(ann['image_id'])
    names.append(name)
    captions.append(caption.strip() if isinstance(caption, str) else '')
  return Annotations(path=path, ids=ids, gt_boxes=np.asarray(boxes, np.float64).reshape(-1, 4),
                     image_wh=np.asarray(sizes, np.float64).reshape(-1, 2), image_ids=image_ids,
                     category_names=names, captions=captions)


def load_predictions(path: str, annotations: Annotations | None = None) -> dict:
  """Reads and validates a predictions file.

  Args:
    path: the predictions file.
    annotations: when given, every id must be one of its annotation ids.

  Returns:
    {annotation id: (bbox [x, y, w, h] floats or None, score float or None)}.
  """
  data = _read_json(path)
  if not isinstance(data, list):
    raise DataError(f'{path}: expected a JSON list of {{"id", "bbox", "score"}} entries')
  known = set(annotations.ids) if annotations is not None else None
  result = {}
  for position, entry in enumerate(data):
    if not isinstance(entry, dict) or not _is_id(entry.get('id')):
      raise DataError(f'{path}: entry {position} has no valid "id"')
    query_id = entry['id']
    if known is not None and query_id not in known:
      raise DataError(f'{path}: id {query_id!r} is not an annotation id of {annotations.path}')
    if query_id in result:
      raise DataError(f'{path}: id {query_id!r} appears more than once')
    if 'bbox' not in entry:
      raise DataError(f'{path}: id {query_id!r} has no "bbox" (use null for no prediction)')
    bbox = None
    if entry['bbox'] is not None:
      bbox = _bbox(entry['bbox'])
      if bbox is None:
        raise DataError(f'{path}: id {query_id!r}: invalid bbox {entry["bbox"]!r} '
                        '(expected [x, y, w, h], finite, w >= 0, h >= 0, or null)')
    score = entry.get('score')
    if score is not None and not _is_number(score):
      raise DataError(f'{path}: id {query_id!r}: "score" must be a finite number')
    result[query_id] = (bbox, None if score is None else float(score))
  return result


def prediction_boxes(predictions: dict, annotations: Annotations) -> np.ndarray:
  """(N, 4) float64 xyxy predictions in annotation order; NaN rows where a query has no prediction."""
  boxes = np.full((len(annotations.ids), 4), np.nan, np.float64)
  for row, ann_id in enumerate(annotations.ids):
    bbox = predictions.get(ann_id, (None, None))[0]
    if bbox is not None:
      boxes[row] = [bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]]
  return boxes


def score_predictions(predictions_path: str, annotations_path: str) -> dict:
  """Metrics JSON (metrics.grounding_metrics) of a predictions file against an annotations file."""
  annotations = load_annotations(annotations_path)
  predictions = load_predictions(predictions_path, annotations)
  return metrics_lib.grounding_metrics(prediction_boxes(predictions, annotations), annotations.gt_boxes,
                                       annotations.image_wh, annotations.category_names)


def write_predictions(path: str, ids: Sequence, boxes_xyxy: np.ndarray, scores: Sequence | None = None) -> None:
  """Writes a predictions file (atomically; `path` local or remote).

  Args:
    ids: N annotation ids.
    boxes_xyxy: (N, 4) xyxy boxes in original pixels; a row with a NaN = no prediction (bbox null).
    scores: optional N scores (written for rows that have a box).
  """
  boxes_xyxy = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
  if len(ids) != boxes_xyxy.shape[0]:
    raise ValueError(f'write_predictions: {len(ids)} ids for {boxes_xyxy.shape[0]} boxes')
  entries = []
  for row, ann_id in enumerate(ids):
    ann_id = ann_id.item() if isinstance(ann_id, np.generic) else ann_id
    box = boxes_xyxy[row]
    if not np.all(np.isfinite(box)):
      entries.append({'id': ann_id, 'bbox': None})
      continue
    entry = {'id': ann_id, 'bbox': [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]}
    if scores is not None:
      entry['score'] = float(scores[row])
    entries.append(entry)
  paths.write_json_atomic(path, entries, indent=None, allow_nan=False)
