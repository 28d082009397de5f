"""Release readers: each kind of bad input ends in one DatasetError whose one-line message names the file."""

import io
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from optisar_jax.data import categories as cats
from optisar_jax.data import release, synthetic


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
  base = tmp_path_factory.mktemp('pristine')
  return dict(optsar=synthetic.make_synthetic_dataset(str(base / 'optsar'), 'optsar', 6, 9),
              dior=synthetic.make_synthetic_dataset(str(base / 'dior'), 'dior', 3, 9))


@pytest.fixture
def optsar(pristine, tmp_path):
  return shutil.copytree(pristine['optsar'], str(tmp_path / 'optsar'))


@pytest.fixture
def dior(pristine, tmp_path):
  return shutil.copytree(pristine['dior'], str(tmp_path / 'dior'))


def _expect(fn, *parts):
  with pytest.raises(release.DatasetError) as info:
    fn()
  message = str(info.value)
  assert '\n' not in message
  for part in parts:
    assert part in message, (part, message)
  return message


def _edit_json(root, split, edit):
  path = os.path.join(root, f'{split}.json')
  with open(path) as f:
    coco = json.load(f)
  edit(coco)
  with open(path, 'w') as f:
    json.dump(coco, f)
  return path


def _first_image(root, split='train', domain='opt'):
  with open(os.path.join(root, f'{split}.json')) as f:
    coco = json.load(f)
  return next(im for im in coco['images'] if im['file_name'].startswith(domain))


def test_pristine_copies_are_valid(optsar, dior):
  assert release.read_optsar(optsar, strict=True)['train']
  assert sum(len(r) for r in release.read_dior(dior).values()) >= 1
  wrapped = os.path.join(os.path.dirname(optsar), 'download')
  os.makedirs(wrapped)
  os.rename(optsar, os.path.join(wrapped, 'OptSAR-RSVG'))
  assert release.find_optsar_root(wrapped) == os.path.join(wrapped, 'OptSAR-RSVG')
  assert release.find_optsar_root(os.path.join(wrapped, 'OptSAR-RSVG')) == os.path.join(wrapped, 'OptSAR-RSVG')


def test_missing_files(optsar):
  name = _first_image(optsar)['file_name']
  os.remove(os.path.join(optsar, 'images', 'train', name))
  _expect(lambda: release.read_optsar(optsar), name, 'not found')
  os.remove(os.path.join(optsar, 'val.json'))
  _expect(lambda: release.read_optsar_split(optsar, 'val'), 'val.json', 'not found')
  _expect(lambda: release.read_release('optsar_rsvg', os.path.join(optsar, 'nope')), 'nope', 'not found')


def test_missing_label_file(optsar):
  stem = os.path.splitext(_first_image(optsar)['file_name'])[0]
  os.remove(os.path.join(optsar, 'labels', 'train', stem + '.txt'))
  _expect(lambda: release.read_optsar(optsar), stem + '.txt', 'YOLO label file not found')


def test_malformed_label_line(optsar):
  stem = os.path.splitext(_first_image(optsar)['file_name'])[0]
  with open(os.path.join(optsar, 'labels', 'train', stem + '.txt'), 'a') as f:
    f.write('3 0.5 0.5\n')
  _expect(lambda: release.read_optsar(optsar), stem + '.txt', 'line', 'fields')


def test_malformed_json(optsar):
  path = os.path.join(optsar, 'train.json')
  with open(path, 'w') as f:
    f.write('{"images": [\n  {"id": 1,,}\n')
  _expect(lambda: release.read_optsar(optsar), path, 'malformed JSON', 'line 2')
  with open(path, 'w') as f:
    json.dump({'images': []}, f)
  _expect(lambda: release.read_optsar(optsar), path, '"annotations"')


def test_box_outside_image(optsar):
  def edit(coco):
    im = coco['images'][0]
    ann = next(a for a in coco['annotations'] if a['image_id'] == im['id'])
    ann['bbox'] = [im['width'] - 5, 0, 10, 10]
  path = _edit_json(optsar, 'train', edit)
  _expect(lambda: release.read_optsar(optsar), path, 'annotations[', 'outside')


@pytest.mark.parametrize('bbox,words', [([1, 1, 0, 5], 'non-positive'), ([1, 1, 'a', 5], '4 numbers'),
                                        ([1, 1, 5], '4 numbers'), ([1, float('nan'), 5, 5], 'not finite')])
def test_invalid_boxes(optsar, bbox, words):
  def edit(coco):
    coco['annotations'][0]['bbox'] = bbox
  path = _edit_json(optsar, 'train', edit)
  _expect(lambda: release.read_optsar(optsar), path, words)


def test_bad_file_name(optsar):
  def edit(coco):
    coco['images'][0]['file_name'] = 'image_1.jpg'
  path = _edit_json(optsar, 'train', edit)
  _expect(lambda: release.read_optsar(optsar), path, 'images[0]', "'image_1.jpg'", 'opt_NNNNNN')


def test_prefix_category_disagreement(optsar):
  def edit(coco):
    im = next(i for i in coco['images'] if i['file_name'].startswith('opt_'))
    ann = next(a for a in coco['annotations'] if a['image_id'] == im['id'])
    ann['category_id'], ann['category_name'] = 15, 'sar ship'
  path = _edit_json(optsar, 'train', edit)
  _expect(lambda: release.read_optsar(optsar), path, "'sar ship'", 'prefix')


def test_empty_caption(optsar):
  def edit(coco):
    coco['annotations'][1]['caption'] = '   '
  path = _edit_json(optsar, 'train', edit)
  _expect(lambda: release.read_optsar(optsar), path, 'annotations[1]', 'caption')


def test_unknown_category(optsar):
  def edit(coco):
    coco['annotations'][0]['category_name'] = 'optical spaceship'
  path = _edit_json(optsar, 'train', edit)
  _expect(lambda: release.read_optsar(optsar), path, "unknown category 'optical spaceship'")


def test_category_id_and_name_disagree(optsar):
  def edit(coco):
    a = coco['annotations'][0]
    a['category_id'] = (a['category_id'] + 1) % 14
  path = _edit_json(optsar, 'train', edit)
  _expect(lambda: release.read_optsar(optsar), path, 'disagrees with category_id')


def test_unreadable_image(optsar):
  name = _first_image(optsar)['file_name']
  with open(os.path.join(optsar, 'images', 'train', name), 'wb') as f:
    f.write(b'this is not an image')
  _expect(lambda: release.read_optsar(optsar), name, 'unreadable image')


def test_size_disagrees_with_file(optsar):
  def edit(coco):
    coco['images'][0]['width'] += 1
  path = _edit_json(optsar, 'train', edit)
  _expect(lambda: release.read_optsar(optsar), path, 'disagree with the image file')


def test_duplicates_across_splits(optsar):
  def edit(coco):
    coco['annotations'][0]['id'] = 1
  _edit_json(optsar, 'val', edit)
  _expect(lambda: release.read_optsar(optsar), 'val.json', 'annotation id 1', 'train')


def test_strict_release_rules(optsar):
  name = _first_image(optsar, 'test')['file_name']
  os.rename(os.path.join(optsar, 'images', 'test', name),
            os.path.join(optsar, 'images', 'test', 'opt_000099.jpg'))
  os.rename(os.path.join(optsar, 'labels', 'test', name[:-4] + '.txt'),
            os.path.join(optsar, 'labels', 'test', 'opt_000099.txt'))
  def edit(coco):
    im = next(i for i in coco['images'] if i['file_name'].startswith('opt_'))
    im['file_name'] = 'opt_000099.jpg'
  _edit_json(optsar, 'test', edit)
  release.read_optsar(optsar)  # fine unless strict
  _expect(lambda: release.read_optsar(optsar, strict=True), 'test.json', 'contiguous')


def test_iscrowd_is_dropped(optsar):
  def edit(coco):
    coco['annotations'][0]['iscrowd'] = 1
  _edit_json(optsar, 'train', edit)
  with open(os.path.join(optsar, 'train.json')) as f:
    dropped = json.load(f)['annotations'][0]['id']
  ids = {o.id for r in release.read_optsar(optsar)['train'] for o in r.objects}
  assert dropped not in ids and ids


def test_malformed_xml(dior):
  path = os.path.join(dior, 'Annotations', '00002.xml')
  with open(path, 'a') as f:
    f.write('<object><name>ship</name>')
  _expect(lambda: release.read_dior(dior), path, 'malformed XML')


def _edit_xml(dior, old, new):
  path = os.path.join(dior, 'Annotations', '00001.xml')
  with open(path) as f:
    text = f.read()
  assert old in text
  with open(path, 'w') as f:
    f.write(text.replace(old, new, 1))
  return path


def test_dior_unknown_class_missing_description_box_outside(dior):
  path = os.path.join(dior, 'Annotations', '00001.xml')
  with open(path) as f:
    original = f.read()
  name = re.search(r'<name>(.*?)</name>', original).group(1)
  _edit_xml(dior, f'<name>{name}</name>', '<name>spaceport</name>')
  _expect(lambda: release.read_dior(dior), path, 'object 0', "unknown class 'spaceport'")
  with open(path, 'w') as f:
    f.write(re.sub(r'<description>.*?</description>', '<description> </description>', original, count=1))
  _expect(lambda: release.read_dior(dior), path, 'object 0', 'description')
  with open(path, 'w') as f:
    f.write(re.sub(r'<xmax>\d+</xmax>', '<xmax>9999</xmax>', original, count=1))
  _expect(lambda: release.read_dior(dior), path, 'object 0', 'outside')
  with open(path, 'w') as f:
    f.write(re.sub(r'<ymin>\d+</ymin>', '<ymin>abc</ymin>', original, count=1))
  _expect(lambda: release.read_dior(dior), path, 'ymin', 'not a number')


def test_dior_split_files(dior):
  path = os.path.join(dior, 'val.txt')
  with open(path, 'a') as f:
    f.write('100000\n')
  _expect(lambda: release.read_dior(dior), path, 'out of range')
  with open(os.path.join(dior, 'train.txt')) as f:
    first = f.readline().strip()
  with open(path, 'w') as f:
    f.write(first + '\n')
  _expect(lambda: release.read_dior(dior), path, f'object index {first}', 'train.txt')
  with open(path, 'w') as f:
    f.write('x\n')
  _expect(lambda: release.read_dior(dior), path, 'line 1', 'not an integer')
  os.remove(path)
  _expect(lambda: release.read_dior(dior), path, 'not found')


def test_dior_missing_image(dior):
  path = os.path.join(dior, 'JPEGImages', '00003.jpg')
  os.remove(path)
  _expect(lambda: release.read_dior(dior), path, 'not found')


@pytest.mark.parametrize('mode,fmt', [('L', 'PNG'), ('L', 'TIFF'), ('I;16', 'TIFF'), ('P', 'PNG'),
                                      ('RGBA', 'PNG'), ('L', 'JPEG'), ('RGB', 'TIFF'), ('RGB', 'JPEG')])
def test_images_of_any_mode_become_3_channels(tmp_path, mode, fmt):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (20, 30)).astype(np.uint8)
  if mode == 'I;16':
    im = Image.fromarray(gray.astype(np.uint16) * 200)
  elif mode in ('RGB', 'RGBA'):
    im = Image.fromarray(np.stack([gray] * len(mode), -1), mode)
  else:
    im = Image.fromarray(gray, 'L').convert(mode)
  path = str(tmp_path / f'img.{fmt.lower()}')
  im.save(path, format=fmt)
  pixels = release.load_image_rgb(path)
  assert pixels.shape == (20, 30, 3) and pixels.dtype == np.uint8
  with Image.open(io.BytesIO(release.encode_image_for_tfds(path))) as back:
    assert back.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(back), pixels)
  if fmt in ('PNG', 'TIFF') and mode in ('L', 'P', 'RGB', 'RGBA'):
    np.testing.assert_array_equal(pixels[..., 0], gray)  # lossless formats keep the pixels
  if mode == 'I;16':
    assert pixels.max() == 255


def test_categories():
  assert len(cats.OPTSAR_CATEGORIES) == 16 and len(cats.DIOR_CLASSES) == 20
  assert cats.OPTSAR_CATEGORY_IDS['optical T junction'] == 3 and cats.OPTSAR_CATEGORY_IDS['sar ship'] == 15
  assert cats.domain_of_category('SAR ship') == 'sar' and cats.domain_of_category('optical ship') == 'optical'
  assert cats.domain_of_category('harbor') == 'optical'
  assert cats.canonical_dior_class('expressway-service-area') == 'Expressway-Service-area'
