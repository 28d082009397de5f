"""TFDS builders: synthetic release -> build (ArrayRecord) -> tfds.data_source round-trips every annotation."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from optisar_jax.data import categories as cats
from optisar_jax.data import release, sources, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  base = tmp_path_factory.mktemp('builders')
  optsar = synthetic.make_synthetic_dataset(str(base / 'optsar'), 'optsar', 12, 4)
  dior = synthetic.make_synthetic_dataset(str(base / 'dior'), 'dior', 8, 2)
  data_dir = str(base / 'tfds')
  sources.build_tfds('optsar_rsvg', optsar, data_dir)
  sources.build_tfds('dior_rsvg', dior, data_dir)
  return dict(optsar=optsar, dior=dior, data_dir=data_dir)


def _examples(name, split, data_dir):
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  out = {}
  for i in range(len(source)):
    ex = source[i]
    out[ex['image/filename'].decode()] = ex
  return out


def _bbox_array(ex):
  return np.asarray(ex['objects']['bbox'], np.float64).reshape(-1, 4)


def test_optsar_round_trip_every_annotation(built):
  info = tfds.builder('optsar_rsvg', data_dir=built['data_dir']).info
  assert info.features['objects']['category'].names == list(cats.OPTSAR_CATEGORIES)
  assert info.features['domain'].names == ['optical', 'sar']
  assert str(info.version) == '1.0.0'
  seen_ids = set()
  for split in release.SPLITS:
    with open(os.path.join(built['optsar'], f'{split}.json')) as f:
      coco = json.load(f)
    examples = _examples('optsar_rsvg', split, built['data_dir'])
    assert sorted(examples) == sorted(im['file_name'] for im in coco['images'])
    for im in coco['images']:
      ex = examples[im['file_name']]
      anns = [a for a in coco['annotations'] if a['image_id'] == im['id']]
      assert ex['image/id'] == im['id']
      domain = 'sar' if im['file_name'].startswith('sar_') else 'optical'
      assert ex['domain'] == ['optical', 'sar'].index(domain)
      assert list(ex['objects']['id']) == [a['id'] for a in anns]
      assert [c.decode() for c in ex['objects']['caption']] == [a['caption'].strip() for a in anns]
      categories = [cats.OPTSAR_CATEGORIES[c] for c in ex['objects']['category']]
      assert categories == [a['category_name'] for a in anns]
      w, h = im['width'], im['height']
      boxes = _bbox_array(ex)  # ymin, xmin, ymax, xmax normalised
      xywh = np.stack([boxes[:, 1] * w, boxes[:, 0] * h, (boxes[:, 3] - boxes[:, 1]) * w,
                       (boxes[:, 2] - boxes[:, 0]) * h], axis=1)
      np.testing.assert_allclose(xywh, np.asarray([a['bbox'] for a in anns], np.float64), atol=0.5)
      image = ex['image']
      assert image.shape == (h, w, 3) and image.dtype == np.uint8
      path = os.path.join(built['optsar'], 'images', split, im['file_name'])
      with Image.open(path) as f:
        original = np.asarray(f)
      if domain == 'sar':  # stored single-channel, comes back replicated to 3 channels
        assert original.ndim == 2
        for c in range(3):
          np.testing.assert_array_equal(image[..., c], original)
      else:
        np.testing.assert_array_equal(image, original)
      seen_ids.update(a['id'] for a in anns)
  assert len(seen_ids) >= 20


def _dior_expected(root):
  """split -> {filename: [(global id, class, caption, (xmin, ymin, xmax, ymax))]} parsed independently."""
  objects = []
  for name in sorted(os.listdir(os.path.join(root, 'Annotations'))):
    tree = ET.parse(os.path.join(root, 'Annotations', name)).getroot()
    for obj in tree.iter('object'):
      b = obj.find('bndbox')
      objects.append((tree.find('filename').text, obj.find('name').text, obj.find('description').text,
                      tuple(float(b.find(t).text) for t in ('xmin', 'ymin', 'xmax', 'ymax')),
                      int(tree.find('size/width').text), int(tree.find('size/height').text)))
  expected = {}
  for split in release.SPLITS:
    with open(os.path.join(root, f'{split}.txt')) as f:
      indices = sorted(int(v) for v in f.read().split())
    per_image = {}
    for i in indices:
      per_image.setdefault(objects[i][0], []).append((i,) + objects[i][1:])
    expected[split] = per_image
  return expected


def test_dior_round_trip_and_split_semantics(built):
  expected = _dior_expected(built['dior'])
  splits_of = {}
  for split in release.SPLITS:
    examples = _examples('dior_rsvg', split, built['data_dir'])
    assert sorted(examples) == sorted(expected[split])
    for filename, objs in expected[split].items():
      ex = examples[filename]
      splits_of.setdefault(filename, []).append((split, [o[0] for o in objs]))
      assert ex['image/id'] == int(filename.split('.')[0])
      assert ex['domain'] == 0
      assert list(ex['objects']['id']) == [o[0] for o in objs]
      assert [cats.DIOR_CLASSES[c] for c in ex['objects']['category']] == [o[1] for o in objs]
      assert [c.decode() for c in ex['objects']['caption']] == [o[2].strip() for o in objs]
      w, h = objs[0][4], objs[0][5]
      boxes = _bbox_array(ex)
      xyxy = np.stack([boxes[:, 1] * w, boxes[:, 0] * h, boxes[:, 3] * w, boxes[:, 2] * h], axis=1)
      np.testing.assert_allclose(xyxy, np.asarray([o[3] for o in objs]), atol=0.5)
      assert ex['image'].shape == (h, w, 3)
  # The split is per expression: some image is in two splits, each time with different objects.
  multi = {f: s for f, s in splits_of.items() if len(s) > 1}
  assert multi
  for entries in multi.values():
    ids = [set(objs) for _, objs in entries]
    assert all(not (a & b) for k, a in enumerate(ids) for b in ids[k + 1:])


def _write_dior(root, files):
  """files: {xml stem: [(class, caption)]}; a 64x48 image each; boxes are distinct per object."""
  os.makedirs(os.path.join(root, 'Annotations'))
  os.makedirs(os.path.join(root, 'JPEGImages'))
  for stem, objs in files.items():
    Image.new('RGB', (64, 48), (10, 20, 30)).save(os.path.join(root, 'JPEGImages', stem + '.jpg'))
    body = ''.join(f'<object><name>{c}</name><pose>Unspecified</pose><bndbox><xmin>{k}</xmin><ymin>1</ymin>'
                   f'<xmax>{k + 10}</xmax><ymax>20</ymax></bndbox><description>{d}</description></object>'
                   for k, (c, d) in enumerate(objs))
    with open(os.path.join(root, 'Annotations', stem + '.xml'), 'w') as f:
      f.write(f'<annotation><filename>{stem}.jpg</filename><source><database>DIOR</database></source>'
              f'<size><width>64</width><height>48</height><depth>3</depth></size>{body}</annotation>')


def test_dior_indices_count_over_files_sorted_by_name(tmp_path, monkeypatch):
  root = str(tmp_path / 'dior')
  _write_dior(root, {'00010': [('ship', 'ten a'), ('dam', 'ten b')], '00002': [('vehicle', 'two a')],
                     '00003': [('airport', 'three a'), ('harbor', 'three b')]})
  for split, lines in (('train', '0\n3\n'), ('val', '1\n4\n'), ('test', '2\n')):
    with open(os.path.join(root, f'{split}.txt'), 'w') as f:
      f.write(lines)
  records = release.read_dior(root)
  got = {s: [(r.filename, [(o.id, o.caption) for o in r.objects]) for r in recs] for s, recs in records.items()}
  assert got == {'train': [('00002.jpg', [(0, 'two a')]), ('00010.jpg', [(3, 'ten a')])],
                 'val': [('00003.jpg', [(1, 'three a')]), ('00010.jpg', [(4, 'ten b')])],
                 'test': [('00003.jpg', [(2, 'three b')])]}
  # Independent of the order the file system lists the files in.
  real_listdir = os.listdir
  monkeypatch.setattr(release.os, 'listdir', lambda p: list(reversed(sorted(real_listdir(p)))))
  assert release.read_dior(root) == records


def test_failed_build_leaves_nothing_that_looks_built(tmp_path):
  manual = synthetic.make_synthetic_dataset(str(tmp_path / 'optsar'), 'optsar', 6, 0)
  with open(os.path.join(manual, 'test.json')) as f:
    name = json.load(f)['images'][-1]['file_name']
  path = os.path.join(manual, 'images', 'test', name)
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:  # header intact (size checks pass), pixel data cut off
    f.write(data[:len(data) // 3])
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(release.DatasetError, match=name):
    sources.build_tfds('optsar_rsvg', manual, data_dir)
  assert not os.path.exists(os.path.join(data_dir, 'optsar_rsvg', '1.0.0'))
  assert [e for e in os.listdir(data_dir) if e.startswith('.')] == []


def test_build_cli(built, tmp_path):
  script = os.path.join(REPO, 'scripts', 'build_dataset.py')
  bad = subprocess.run([sys.executable, script, '--dataset', 'optsar_rsvg', '--manual_dir',
                        str(tmp_path / 'missing'), '--data_dir', str(tmp_path / 'tfds')],
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1].startswith('error: ') and 'missing' in bad.stderr
  # A complete existing build is reused, not rebuilt.
  final = os.path.join(built['data_dir'], 'optsar_rsvg', '1.0.0')
  stamp = os.stat(os.path.join(final, 'dataset_info.json')).st_mtime_ns
  assert sources.build_tfds('optsar_rsvg', built['optsar'], built['data_dir']) == final
  assert os.stat(os.path.join(final, 'dataset_info.json')).st_mtime_ns == stamp


def test_importing_tfds_builders_registers_both():
  import tfds_builders  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  assert tfds.builder_cls('optsar_rsvg') is tfds_builders.OptsarRsvg
  assert tfds.builder_cls('dior_rsvg') is tfds_builders.DiorRsvg
