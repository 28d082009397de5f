"""Grounding metrics on hand-made queries: thresholds, clipping, missing predictions, domains, n = 0."""

import math

import numpy as np
import pytest

from optisar_jax import metrics

NAN = [math.nan] * 4
# q1 optical IoU 0.5 (50 / 100); q2 optical no prediction (union 400); q3 SAR IoU 1 (100 / 100);
# q4 SAR IoU 0.8 (320 / 400).
PRED = [[0, 0, 5, 10], NAN, [0, 0, 10, 10], [10, 10, 30, 26]]
GT = [[0, 0, 10, 10], [0, 0, 20, 20], [0, 0, 10, 10], [10, 10, 30, 30]]
WH = [[100, 100]] * 4
CATS = ['optical ship', 'optical bridge', 'SAR ship', 'sar transmission tower']


def test_hand_made_queries():
  m = metrics.grounding_metrics(np.array(PRED, float), np.array(GT, float), np.array(WH, float), CATS)
  assert list(m) == ['all', 'optical', 'sar', 'per_category']
  assert m['all'] == pytest.approx({'n': 4, 'Pr@0.5': 75.0, 'Pr@0.6': 50.0, 'Pr@0.7': 50.0, 'Pr@0.8': 50.0,
                                    'Pr@0.9': 25.0, 'meanIoU': 57.5, 'cumIoU': 47.0})
  assert m['optical'] == pytest.approx({'n': 2, 'Pr@0.5': 50.0, 'Pr@0.6': 0.0, 'Pr@0.7': 0.0, 'Pr@0.8': 0.0,
                                        'Pr@0.9': 0.0, 'meanIoU': 25.0, 'cumIoU': 10.0})
  assert m['sar'] == pytest.approx({'n': 2, 'Pr@0.5': 100.0, 'Pr@0.6': 100.0, 'Pr@0.7': 100.0, 'Pr@0.8': 100.0,
                                    'Pr@0.9': 50.0, 'meanIoU': 90.0, 'cumIoU': 84.0})
  # cumIoU(all) lies between the domains; meanIoU(all) is the query-weighted average.
  assert m['optical']['cumIoU'] <= m['all']['cumIoU'] <= m['sar']['cumIoU']
  assert m['all']['meanIoU'] == pytest.approx((2 * m['optical']['meanIoU'] + 2 * m['sar']['meanIoU']) / 4)
  assert sorted(m['per_category']) == sorted(CATS)
  assert m['per_category']['SAR ship']['meanIoU'] == 100.0
  assert m['per_category']['optical bridge']['n'] == 1 and m['per_category']['optical bridge']['cumIoU'] == 0.0


def test_threshold_is_inclusive():
  inter, union, iou = metrics.query_overlaps(np.array([[0, 0, 5, 10]], float), np.array([[0, 0, 10, 10]], float),
                                             np.array([[10, 10]], float))
  assert (inter[0], union[0], iou[0]) == (50.0, 100.0, 0.5)
  assert metrics.summarize(inter, union, iou)['Pr@0.5'] == 100.0


def test_clipping_to_the_image():
  # The prediction sticks out on the left; clipped it equals the gt. The gt is clipped too.
  m = metrics.grounding_metrics(np.array([[-10, 0, 10, 10], [0, 0, 10, 10]], float),
                                np.array([[0, 0, 10, 10], [0, 0, 10, 20]], float),
                                np.array([[10, 10], [10, 10]], float), ['optical a', 'optical a'])
  assert m['all']['meanIoU'] == 100.0 and m['all']['cumIoU'] == 100.0


def test_missing_prediction_counts_gt_area():
  inter, union, iou = metrics.query_overlaps(np.array([[0, 0, 10, 10]], float), np.array([[0, 0, 4, 5]], float),
                                             np.array([[10, 10]], float), has_prediction=np.array([False]))
  assert (inter[0], union[0], iou[0]) == (0.0, 20.0, 0.0)


def test_empty_domain_is_null():
  m = metrics.grounding_metrics(np.array([[0, 0, 10, 10]], float), np.array([[0, 0, 10, 10]], float),
                                np.array([[10, 10]], float), ['optical ship'])
  assert m['sar'] == {'n': 0, **{key: None for key in metrics.METRIC_KEYS}}
  assert m['optical']['Pr@0.9'] == 100.0
  table = metrics.format_metrics_table(m)
  assert table.splitlines()[0].split()[:2] == ['n', 'Pr@0.5'] and 'sar' in table
  empty = metrics.grounding_metrics(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 2)), [])
  assert empty['all']['n'] == 0 and empty['all']['meanIoU'] is None and empty['per_category'] == {}


def test_sar_rule():
  assert metrics.is_sar('SAR ship') and metrics.is_sar('sar transmission tower')
  assert not metrics.is_sar('optical ship') and not metrics.is_sar('ship (sar)')
