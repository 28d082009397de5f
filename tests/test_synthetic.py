"""Synthetic OptSAR-RSVG / DIOR-RSVG generator: layout, determinism, unambiguous captions, atomic writes."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from optisar_jax.data import categories as cats
from optisar_jax.data import release, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


@pytest.fixture(scope='module')
def optsar_dir(tmp_path_factory):
  return synthetic.make_synthetic_dataset(str(tmp_path_factory.mktemp('syn') / 'optsar'), 'optsar', 20, 3)


def test_optsar_layout_follows_the_release_rules(optsar_dir):
  assert sorted(os.listdir(optsar_dir)) == ['images', 'labels', 'test.json', 'train.json', 'val.json']
  records = release.read_optsar(optsar_dir, strict=True)  # contiguous numbering, no stray files, ...
  assert [len(records[s]) for s in release.SPLITS] == [16, 2, 2]
  sizes = set()
  for split, recs in records.items():
    assert {r.domain for r in recs} == {'optical', 'sar'}, split
    for r in recs:
      assert r.objects, r.filename
      with Image.open(r.path) as im:
        sizes.add(im.size)
        if r.domain == 'sar':
          assert im.mode == 'L' and im.format == 'PNG' and r.filename.startswith('sar_')
        else:
          assert im.mode == 'RGB' and im.format == 'JPEG' and r.filename.startswith('opt_')
      assert all(synthetic.MIN_SIZE <= v <= synthetic.MAX_SIZE for v in (r.width, r.height))
      captions = [o.caption for o in r.objects]
      assert len(set(captions)) == len(captions), r.filename
      for o in r.objects:
        assert cats.domain_of_category(o.category) == r.domain
        assert o.bbox[2] >= 6 and o.bbox[3] >= 6
      labels = os.path.join(optsar_dir, 'labels', split, os.path.splitext(r.filename)[0] + '.txt')
      with open(labels) as f:
        assert len(f.read().splitlines()) == len(r.objects)
  assert len(sizes) > 5 and any(w != h for w, h in sizes)
  with open(os.path.join(optsar_dir, 'train.json')) as f:
    coco = json.load(f)
  assert [(c['id'], c['name']) for c in coco['categories']] == list(enumerate(cats.OPTSAR_CATEGORIES))
  assert all({'caption', 'category_name', 'bbox', 'category_id'} <= set(a) for a in coco['annotations'])


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path):
  a = synthetic.make_synthetic_dataset(str(tmp_path / 'a'), 'optsar', 7, 11)
  b = synthetic.make_synthetic_dataset(str(tmp_path / 'b'), 'optsar', 7, 11)
  c = synthetic.make_synthetic_dataset(str(tmp_path / 'c'), 'optsar', 7, 12)
  assert _tree(a) == _tree(b)
  assert _tree(a) != _tree(c)
  d1 = synthetic.make_synthetic_dataset(str(tmp_path / 'd1'), 'dior', 4, 5)
  d2 = synthetic.make_synthetic_dataset(str(tmp_path / 'd2'), 'dior', 4, 5)
  assert _tree(d1) == _tree(d2)
  assert sorted(os.listdir(tmp_path)) == ['a', 'b', 'c', 'd1', 'd2']  # no temporary folders left


def test_captions_are_unambiguous_and_varied():
  kinds = set()
  for k in range(40):
    rng = np.random.default_rng([7, k])
    domain = 'sar' if k % 3 == 0 else 'optical'
    names = tuple(c for c in cats.OPTSAR_CATEGORIES if cats.domain_of_category(c) == domain)
    scene = synthetic.generate_scene(rng, domain, names)
    w, h = scene.image.size
    assert 2 <= len(scene.objects) <= 5
    assert scene.image.mode == ('L' if domain == 'sar' else 'RGB')
    for i, obj in enumerate(scene.objects):
      mine = synthetic._caption_candidates(i, scene.objects, w, h)  # pylint: disable=protected-access
      if obj.caption is None:
        assert not mine
        continue
      assert any(obj.caption in v for v in mine.values())
      kinds.update(kind for kind, v in mine.items() if obj.caption in v)
      for j in range(len(scene.objects)):
        if j != i:  # no other object of the image fits the caption
          other = synthetic._caption_candidates(j, scene.objects, w, h)  # pylint: disable=protected-access
          assert all(obj.caption not in v for v in other.values()), (obj.caption, i, j)
      x0, y0, x1, y1 = obj.box
      assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
      assert max(x1 - x0, y1 - y0) >= 0.13 * max(w, h)  # visible after a 128 px letterbox
  assert kinds == {'category', 'size', 'extreme', 'position', 'relation'}


def test_sar_has_speckle_and_bright_scatterers():
  rng = np.random.default_rng(0)
  scene = synthetic.generate_scene(rng, 'sar', ('sar ship',))
  pixels = np.asarray(scene.image)
  assert pixels.ndim == 2 and pixels.dtype == np.uint8
  x0, y0, x1, y1 = scene.objects[0].box
  assert pixels[y0:y1, x0:x1].max() >= 250   # point scatterers saturate
  background = pixels[pixels < 90]
  assert background.std() > 5                # speckle, not a flat background


def test_dior_layout_and_split_files(tmp_path):
  root = synthetic.make_synthetic_dataset(str(tmp_path / 'dior'), 'dior', 6, 1)
  assert sorted(os.listdir(root)) == ['Annotations', 'JPEGImages', 'test.txt', 'train.txt', 'val.txt']
  xmls = sorted(os.listdir(os.path.join(root, 'Annotations')))
  assert xmls == [f'{k:05d}.xml' for k in range(1, 7)]
  with open(os.path.join(root, 'Annotations', xmls[0])) as f:
    text = f.read()
  assert re.search(r'<object>\s*<name>.*</name>\s*<pose>Unspecified</pose>\s*<bndbox>.*</bndbox>\s*'
                   r'<description>.*</description>\s*</object>', text, re.S)
  total = sum(text.count('<object>') for text in
              (open(os.path.join(root, 'Annotations', x)).read() for x in xmls))
  listed = []
  for split in release.SPLITS:
    with open(os.path.join(root, f'{split}.txt')) as f:
      ids = [int(line) for line in f.read().split()]
    assert ids, split
    listed += ids
  assert sorted(listed) == list(range(total))


def test_existing_output_and_bad_arguments_are_refused(tmp_path):
  out = tmp_path / 'ds'
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  with pytest.raises(release.DatasetError, match='not empty'):
    synthetic.make_synthetic_dataset(str(out), 'optsar', 6, 0)
  with pytest.raises(ValueError, match='at least 6'):
    synthetic.make_synthetic_dataset(str(tmp_path / 'small'), 'optsar', 3, 0)
  with pytest.raises(ValueError, match='--format'):
    synthetic.make_synthetic_dataset(str(tmp_path / 'x'), 'coco', 6, 0)
  assert sorted(os.listdir(tmp_path)) == ['ds']
  synthetic.make_synthetic_dataset(str(out), 'optsar', 6, 0, overwrite=True)
  assert not (out / 'keep.txt').exists() and (out / 'train.json').exists()


def test_cli(tmp_path):
  script = os.path.join(REPO, 'scripts', 'make_synthetic_dataset.py')
  run = lambda *a: subprocess.run([sys.executable, script, *a], capture_output=True, text=True, timeout=60)
  ok = run('--out', str(tmp_path / 'o'), '--format', 'optsar', '--num_images', '6', '--seed', '1')
  assert ok.returncode == 0, ok.stderr
  assert (tmp_path / 'o' / 'test.json').exists()
  bad = run('--out', str(tmp_path / 'o'), '--format', 'optsar', '--num_images', '6', '--seed', '1')
  assert bad.returncode != 0
  assert bad.stderr.strip().count('\n') == 0 and 'not empty' in bad.stderr
