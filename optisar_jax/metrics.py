"""Grounding metrics: Pr@{0.5..0.9}, meanIoU, cumIoU, per domain (all / optical / SAR) and per category.

Definitions (docs/interfaces.md section 5, docs/training-and-data.md section 8), per query q with one gt box g and
one predicted box p or none, both xyxy in original-image pixels:

* p and g are clipped to [0, W] x [0, H]; inter_q = overlap area, union_q = area(p) + area(g) - inter_q,
  IoU_q = inter_q / union_q (0 when union_q = 0).
* No prediction: inter_q = 0, union_q = area(clipped g), IoU_q = 0 (the query still counts).
* Pr@t = share of queries with IoU_q >= t (inclusive); meanIoU = mean IoU_q; cumIoU = sum inter / sum union.
* Values in percent. A group with no queries has "n": 0 and null values.
* Domain: SAR iff the category name, lower-cased, starts with "sar"; otherwise optical.

Pure numpy float64, deterministic (no dependence on query order beyond float summation order, which is fixed).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
METRIC_KEYS = tuple(f'Pr@{t}' for t in THRESHOLDS) + ('meanIoU', 'cumIoU')
DOMAINS = ('all', 'optical', 'sar')


def is_sar(category_name: str) -> bool:
  """The domain rule of the reference evaluation: SAR iff the name starts with "sar" (any case)."""
  return str(category_name).lower().startswith('sar')


def clip_boxes(boxes: np.ndarray, image_wh: np.ndarray) -> np.ndarray:
  """(N, 4) xyxy boxes clipped to [0, W] x [0, H] of their (N, 2) image (width, height)."""
  boxes = np.asarray(boxes, np.float64)
  image_wh = np.asarray(image_wh, np.float64)
  xs = np.clip(boxes[:, 0::2], 0.0, image_wh[:, :1])
  ys = np.clip(boxes[:, 1::2], 0.0, image_wh[:, 1:2])
  return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)


def _area(boxes: np.ndarray) -> np.ndarray:
  return np.clip(boxes[:, 2] - boxes[:, 0], 0.0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0.0, None)


def query_overlaps(pred_boxes: np.ndarray, gt_boxes: np.ndarray, image_wh: np.ndarray,
                   has_prediction: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-query intersection, union and IoU.

  Args:
    pred_boxes: (N, 4) xyxy predictions; a row with a NaN means no prediction.
    gt_boxes: (N, 4) xyxy ground truth.
    image_wh: (N, 2) (width, height) of each query's image.
    has_prediction: optional (N,) bool; False also means no prediction.

  Returns:
    inter (N,), union (N,), iou (N,), float64.
  """
  pred_boxes = np.asarray(pred_boxes, np.float64).reshape(-1, 4)
  gt_boxes = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
  image_wh = np.asarray(image_wh, np.float64).reshape(-1, 2)
  present = np.all(np.isfinite(pred_boxes), axis=1)
  if has_prediction is not None:
    present &= np.asarray(has_prediction, bool)
  gt = clip_boxes(gt_boxes, image_wh)
  pred = clip_boxes(np.where(present[:, None], pred_boxes, 0.0), image_wh)
  inter_w = np.clip(np.minimum(pred[:, 2], gt[:, 2]) - np.maximum(pred[:, 0], gt[:, 0]), 0.0, None)
  inter_h = np.clip(np.minimum(pred[:, 3], gt[:, 3]) - np.maximum(pred[:, 1], gt[:, 1]), 0.0, None)
  inter = np.where(present, inter_w * inter_h, 0.0)
  union = np.where(present, _area(pred), 0.0) + _area(gt) - inter
  safe_union = np.where(union > 0, union, 1.0)
  iou = np.where(union > 0, inter / safe_union, 0.0)
  return inter, union, iou


def summarize(inter: np.ndarray, union: np.ndarray, iou: np.ndarray) -> dict:
  """{"n", "Pr@0.5".."Pr@0.9", "meanIoU", "cumIoU"} in percent for one group of queries (null when n = 0)."""
  n = int(iou.shape[0])
  if n == 0:
    return {'n': 0, **{key: None for key in METRIC_KEYS}}
  out = {'n': n}
  for t in THRESHOLDS:
    out[f'Pr@{t}'] = 100.0 * float(np.count_nonzero(iou >= t)) / n
  out['meanIoU'] = 100.0 * float(np.sum(iou)) / n
  total_union = float(np.sum(union))
  out['cumIoU'] = 100.0 * float(np.sum(inter)) / total_union if total_union > 0 else 0.0
  return out


def grounding_metrics(pred_boxes: np.ndarray, gt_boxes: np.ndarray, image_wh: np.ndarray,
                      category_names: Sequence[str], has_prediction: np.ndarray | None = None) -> dict:
  """The metrics JSON of docs/interfaces.md section 5, plus a per-category breakdown.

  Args:
    pred_boxes: (N, 4) xyxy predictions in original pixels; NaN rows = no prediction.
    gt_boxes: (N, 4) xyxy ground truth in original pixels.
    image_wh: (N, 2) (width, height) of each query's image.
    category_names: N category names (they decide the domain).
    has_prediction: optional (N,) bool mask of queries that have a prediction.

  Returns:
    {"all": {...}, "optical": {...}, "sar": {...}, "per_category": {name: {...}}} (names sorted).
  """
  inter, union, iou = query_overlaps(pred_boxes, gt_boxes, image_wh, has_prediction)
  names = [str(name) for name in category_names]
  if len(names) != iou.shape[0]:
    raise ValueError(f'{len(names)} category names for {iou.shape[0]} queries')
  sar = np.array([is_sar(name) for name in names], bool).reshape(-1)
  groups = {'all': np.ones_like(sar), 'optical': ~sar, 'sar': sar}
  result = {domain: summarize(inter[mask], union[mask], iou[mask]) for domain, mask in groups.items()}
  names_array = np.array(names, dtype=object)
  result['per_category'] = {
      name: summarize(inter[names_array == name], union[names_array == name], iou[names_array == name])
      for name in sorted(set(names))}
  return result


def format_metrics_table(metrics: dict, *, per_category: bool = False) -> str:
  """A small fixed-width text table of a metrics dict (rows: domains, then categories if asked)."""
  header = f'{"":<28}{"n":>7}' + ''.join(f'{key:>9}' for key in METRIC_KEYS)
  rows = [(domain, metrics[domain]) for domain in DOMAINS if domain in metrics]
  if per_category:
    rows += list(metrics.get('per_category', {}).items())
  lines = [header]
  for name, values in rows:
    cells = ''.join(f'{"-":>9}' if values[key] is None else f'{values[key]:>9.2f}' for key in METRIC_KEYS)
    lines.append(f'{name[:27]:<28}{values["n"]:>7}' + cells)
  return '\n'.join(lines)
