"""Predictions files: scoring against COCO-style annotations, validation errors, scripts/evaluate.py."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from optisar_jax import predictions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('optisar_evaluate_script', os.path.join(REPO, 'scripts', 'evaluate.py'))
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)

ANNOTATIONS = {
    'images': [{'id': 1, 'file_name': 'opt_000001.jpg', 'width': 100, 'height': 100},
               {'id': 2, 'file_name': 'sar_000002.jpg', 'width': 50, 'height': 40}],
    'categories': [{'id': 11, 'name': 'optical ship'}, {'id': 15, 'name': 'sar ship'}],
    'annotations': [
        {'id': 10, 'image_id': 1, 'category_id': 11, 'category_name': 'optical ship', 'bbox': [0, 0, 10, 10],
         'caption': ' the ship on the left '},
        {'id': 11, 'image_id': 1, 'category_id': 11, 'bbox': [20, 20, 20, 20], 'caption': 'a ship'},
        {'id': 12, 'image_id': 2, 'category_id': 15, 'category_name': 'sar ship', 'bbox': [0, 0, 10, 10]},
    ],
}


def _write(tmp_path, name, obj):
  path = tmp_path / name
  path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
  return str(path)


def test_score_predictions(tmp_path):
  ann = _write(tmp_path, 'test.json', ANNOTATIONS)
  # 10: IoU 0.5; 11: null; 12: absent (no prediction), so optical meanIoU 25, SAR 0.
  preds = _write(tmp_path, 'preds.json', [{'id': 10, 'bbox': [0, 0, 5, 10], 'score': 0.9}, {'id': 11, 'bbox': None}])
  m = predictions.score_predictions(preds, ann)
  assert m['all']['n'] == 3 and m['all']['Pr@0.5'] == pytest.approx(100 / 3)
  assert m['optical']['meanIoU'] == 25.0 and m['optical']['cumIoU'] == pytest.approx(50 / 500 * 100)
  assert m['sar']['n'] == 1 and m['sar']['meanIoU'] == 0.0 and m['sar']['cumIoU'] == 0.0
  assert set(m['per_category']) == {'optical ship', 'sar ship'}   # id 11 resolved through categories
  loaded = predictions.load_annotations(ann)
  assert loaded.captions[0] == 'the ship on the left' and loaded.gt_boxes[1].tolist() == [20, 20, 40, 40]


def test_write_predictions_roundtrip(tmp_path):
  ann = _write(tmp_path, 'test.json', ANNOTATIONS)
  out = str(tmp_path / 'sub' / 'preds.json')
  predictions.write_predictions(out, [10, 11, 12], [[0, 0, 10, 10], [float('nan')] * 4, [0, 0, 10, 10]],
                                [0.5, 0.1, 0.7])
  entries = json.loads(open(out).read())
  assert entries[1] == {'id': 11, 'bbox': None} and entries[0]['score'] == 0.5
  m = predictions.score_predictions(out, ann)
  assert m['all']['Pr@0.9'] == pytest.approx(200 / 3)
  assert os.listdir(tmp_path / 'sub') == ['preds.json']


@pytest.mark.parametrize('content, message', [
    ([{'id': 99, 'bbox': None}], 'id 99 is not an annotation id'),
    ([{'id': 10, 'bbox': None}, {'id': 10, 'bbox': [0, 0, 1, 1]}], 'id 10 appears more than once'),
    ('[{"id": 10, "bbox": [0, 0, 1', 'malformed JSON'),
    ({'id': 10}, 'expected a JSON list'),
    ([{'id': 10, 'bbox': [0, 0, -1, 1]}], 'id 10: invalid bbox'),
    ([{'id': 10}], 'id 10 has no "bbox"'),
    ([{'id': 10, 'bbox': None, 'score': 'high'}], '"score" must be a finite number'),
])
def test_prediction_errors(tmp_path, content, message):
  ann = _write(tmp_path, 'test.json', ANNOTATIONS)
  preds = _write(tmp_path, 'preds.json', content)
  with pytest.raises(predictions.DataError) as info:
    predictions.score_predictions(preds, ann)
  text = str(info.value)
  assert text.startswith(preds + ':') and message in text and '\n' not in text


def test_annotation_errors(tmp_path):
  bad = dict(ANNOTATIONS, annotations=ANNOTATIONS['annotations'] + [{'id': 13, 'image_id': 7, 'bbox': [0, 0, 1, 1],
                                                                    'category_name': 'sar ship'}])
  path = _write(tmp_path, 'bad.json', bad)
  with pytest.raises(predictions.DataError, match='annotation 13: image_id 7 not in "images"'):
    predictions.load_annotations(path)
  with pytest.raises(predictions.DataError, match='missing.json: file not found'):
    predictions.load_annotations(str(tmp_path / 'missing.json'))


def test_evaluate_main_writes_json(tmp_path, capsys):
  ann = _write(tmp_path, 'test.json', ANNOTATIONS)
  preds = _write(tmp_path, 'preds.json', [{'id': 10, 'bbox': [0, 0, 10, 10]}])
  out = str(tmp_path / 'eval' / 'metrics.json')
  assert evaluate.main(['--predictions', preds, '--annotations', ann, '--output', out]) == 0
  written = json.loads(open(out).read())
  assert written['optical']['Pr@0.5'] == 50.0 and written['sar']['n'] == 1
  assert 'meanIoU' in capsys.readouterr().out
  assert os.listdir(tmp_path / 'eval') == ['metrics.json']


def test_evaluate_script_errors_are_one_line(tmp_path):
  ann = _write(tmp_path, 'test.json', ANNOTATIONS)
  preds = _write(tmp_path, 'preds.json', [{'id': 42, 'bbox': None}])
  script = os.path.join(REPO, 'scripts', 'evaluate.py')
  run = subprocess.run([sys.executable, script, '--predictions', preds, '--annotations', ann],
                       capture_output=True, text=True)
  assert run.returncode == 1 and run.stderr.count('\n') == 1 and 'preds.json: id 42' in run.stderr
  run = subprocess.run([sys.executable, script, '--annotations', ann], capture_output=True, text=True)
  assert run.returncode == 2 and run.stderr.count('\n') == 1
