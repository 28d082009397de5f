"""Reading and validating the OptSAR-RSVG and DIOR-RSVG releases (the TFDS builders' readers).

Both readers turn a release on disk into plain per-image records (`ImageRecord` holding `ObjectRecord`s),
checking everything the release promises (docs/training-and-data.md sections 1 and 2). Any problem ends in ONE
`DatasetError` whose one-line message names the file (and the key or line) and what is wrong.

OptSAR-RSVG (`read_optsar`): `images/{split}/`, `labels/{split}/` (YOLO txt), `{split}.json` (COCO with
`caption` and `category_name`), split in {train, val, test}. One record per image.

DIOR-RSVG (`read_dior`): `Annotations/*.xml`, `JPEGImages/*.jpg`, `{train,val,test}.txt` holding GLOBAL
object indices, counted over the XML files sorted by name and, inside a file, in document order. One
record per (image, split) holding only the objects of that split; an object's id is its global index.

Records hold boxes as COCO [x, y, w, h] in pixels of the original image. `tfds_example(record)` converts a
record into the example of the TFDS datasets (docs/interfaces.md section 4); `data/sources.py` builds
and opens those datasets.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
from PIL import Image

from optisar_jax.data import categories as cats
from optisar_jax.runtime import paths

SPLITS = ('train', 'val', 'test')
DATASETS = ('optsar_rsvg', 'dior_rsvg')
TFDS_VERSION = '1.0.0'
BOX_TOLERANCE = 1e-6
OPTSAR_NAME_RE = re.compile(r'^(opt|sar)_(\d{6})\.([A-Za-z0-9]+)$')
_PREFIX_DOMAIN = {'opt': 'optical', 'sar': 'sar'}

# Keep PIL from refusing big (remote-sensing) images; the release's largest images are far below this.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, 400_000_000)


class DatasetError(ValueError):
  """A problem with a dataset on disk; the message is one line naming the file (and key/line)."""

  def __init__(self, message: str):
    super().__init__(' '.join(str(message).split()))


@dataclasses.dataclass(frozen=True)
class ObjectRecord:
  """One referring expression and its box. bbox = COCO (x, y, w, h), pixels of the original image."""
  id: int
  category: str
  bbox: tuple[float, float, float, float]
  caption: str


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image (one image and split for DIOR-RSVG) with its objects, in annotation order."""
  path: str          # the image file
  filename: str      # its name without directory
  image_id: int      # COCO image id / DIOR XML file number
  width: int
  height: int
  domain: str        # 'optical' | 'sar'
  objects: tuple[ObjectRecord, ...]

  def normalized_boxes(self) -> np.ndarray:
    """float32 (n, 4) boxes as (ymin, xmin, ymax, xmax) in [0, 1] (the TFDS BBoxFeature convention)."""
    if not self.objects:
      return np.zeros((0, 4), np.float32)
    b = np.asarray([o.bbox for o in self.objects], np.float64)
    yxyx = np.stack([b[:, 1] / self.height, b[:, 0] / self.width,
                     (b[:, 1] + b[:, 3]) / self.height, (b[:, 0] + b[:, 2]) / self.width], axis=1)
    return np.clip(yxyx, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------ images

def image_size(path: str) -> tuple[int, int]:
  """(width, height) of an image file, read from its header; DatasetError if missing or unreadable."""
  if not os.path.isfile(path):
    raise DatasetError(f'{path}: image file not found')
  try:
    with Image.open(path) as im:
      return im.size
  except Exception as e:  # PIL raises many types for broken files.
    raise DatasetError(f'{path}: unreadable image ({type(e).__name__}: {e})') from e


def _to_rgb(im: Image.Image, path: str) -> Image.Image:
  """RGB version of a decoded image; single-band (SAR) images are replicated to 3 channels."""
  if im.mode == 'RGB':
    return im
  if im.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I', 'F'):
    # 16/32-bit single band (e.g. SAR GeoTIFF): linear map of [0, max] to [0, 255] when above 8 bits.
    a = np.asarray(im, dtype=np.float64)
    if not np.all(np.isfinite(a)):
      a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    a = np.clip(a, 0, None)
    peak = float(a.max()) if a.size else 0.0
    if peak > 255.0:
      a = a * (255.0 / peak)
    im = Image.fromarray(np.round(a).astype(np.uint8), 'L')
  if im.mode in ('1', 'L', 'LA', 'P;L'):
    im = im.convert('L')
    return Image.merge('RGB', (im, im, im))
  try:
    return im.convert('RGB')
  except Exception as e:
    raise DatasetError(f'{path}: cannot convert image mode {im.mode} to RGB ({e})') from e


def load_image_rgb(path: str) -> np.ndarray:
  """uint8 (H, W, 3) pixels of an image file (PNG/JPG/TIF/..., a local path or a gs:// URL); grayscale
  replicated to 3 channels."""
  if not paths.isfile(path):
    raise DatasetError(f'{path}: image file not found')
  try:
    with Image.open(io.BytesIO(paths.path(path).read_bytes())) as im:
      im.load()
      return np.asarray(_to_rgb(im, path), dtype=np.uint8)
  except DatasetError:
    raise
  except Exception as e:
    raise DatasetError(f'{path}: unreadable image ({type(e).__name__}: {e})') from e


def encode_image_for_tfds(path: str) -> bytes:
  """Encoded bytes that decode to the file's pixels as 3-channel uint8.

  A 3-channel JPEG is passed through unchanged (its decoded pixels ARE the original file's pixels, and
  re-encoding would lose quality or grow it ~10x); anything else (grayscale SAR, PNG, TIF, palette, ...)
  is decoded, converted to RGB and stored as lossless PNG. Both decode with PIL or OpenCV, which detect
  the format from the bytes.
  """
  if not os.path.isfile(path):
    raise DatasetError(f'{path}: image file not found')
  try:
    with Image.open(path) as im:
      im.load()
      if im.format == 'JPEG' and im.mode == 'RGB':
        with open(path, 'rb') as f:
          return f.read()
      rgb = _to_rgb(im, path)
      buf = io.BytesIO()
      rgb.save(buf, format='PNG', compress_level=6)
      return buf.getvalue()
  except DatasetError:
    raise
  except Exception as e:
    raise DatasetError(f'{path}: unreadable image ({type(e).__name__}: {e})') from e


def _check_image(path: str, width, height, where: str) -> None:
  w, h = image_size(path)
  if (w, h) != (width, height):
    raise DatasetError(f'{where}: width/height {width}x{height} disagree with the image file {path} '
                       f'({w}x{h})')


# -------------------------------------------------------------------------------------------- utilities

def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _check_box_xywh(box, width: float, height: float, where: str) -> tuple[float, float, float, float]:
  """Validated COCO box: four finite numbers, w, h > 0, inside the image with BOX_TOLERANCE."""
  if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
    raise DatasetError(f'{where}: bbox must be a list of 4 numbers [x, y, w, h], got {box!r}')
  x, y, w, h = (float(v) for v in box)
  if not all(math.isfinite(v) for v in (x, y, w, h)):
    raise DatasetError(f'{where}: bbox {list(box)} is not finite')
  if w <= 0 or h <= 0:
    raise DatasetError(f'{where}: bbox {list(box)} has non-positive width or height')
  tol = BOX_TOLERANCE
  if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
    raise DatasetError(f'{where}: bbox {list(box)} lies outside the {width}x{height} image')
  return (x, y, w, h)


def _load_json(path: str):
  if not os.path.isfile(path):
    raise DatasetError(f'{path}: annotation file not found')
  try:
    with open(path, 'rb') as f:
      return json.loads(f.read().decode('utf-8'))
  except json.JSONDecodeError as e:
    raise DatasetError(f'{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg})') from e
  except UnicodeDecodeError as e:
    raise DatasetError(f'{path}: not UTF-8 text ({e.reason} at byte {e.start})') from e


def _find_root(manual_dir: str, marker: str, subdirs: tuple[str, ...]) -> str:
  manual_dir = os.fspath(manual_dir)
  if not os.path.isdir(manual_dir):
    raise DatasetError(f'{manual_dir}: manual_dir not found')
  if os.path.exists(os.path.join(manual_dir, marker)):
    return manual_dir
  for sub in subdirs:
    if os.path.exists(os.path.join(manual_dir, sub, marker)):
      return os.path.join(manual_dir, sub)
  raise DatasetError(f'{os.path.join(manual_dir, marker)}: not found (manual_dir must hold the extracted '
                     f'release, or one of the folders {", ".join(subdirs)})')


# ------------------------------------------------------------------------------------------ OptSAR-RSVG

def find_optsar_root(manual_dir: str) -> str:
  """The release root (the folder holding train.json) in `manual_dir` or its OptSAR-RSVG/ subfolder."""
  return _find_root(manual_dir, 'train.json', ('OptSAR-RSVG', 'OptSAR_RSVG'))


def _parse_optsar_name(name, where: str) -> tuple[str, int]:
  if not isinstance(name, str) or os.path.basename(name) != name:
    raise DatasetError(f'{where}: file_name must be a bare file name, got {name!r}')
  m = OPTSAR_NAME_RE.match(name)
  if not m:
    raise DatasetError(f'{where}: file_name {name!r} does not match opt_NNNNNN.ext or sar_NNNNNN.ext '
                       '(six digits)')
  return _PREFIX_DOMAIN[m.group(1)], int(m.group(2))


def _check_yolo_labels(path: str, category_ids: set[int]) -> None:
  if not os.path.isfile(path):
    raise DatasetError(f'{path}: YOLO label file not found')
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = f.read().splitlines()
  tol = BOX_TOLERANCE
  for n, line in enumerate(lines, 1):
    fields = line.split()
    if not fields:
      continue
    where = f'{path}: line {n}'
    if len(fields) not in (5, 6):
      raise DatasetError(f'{where}: expected "class_id cx cy w h", got {len(fields)} fields')
    try:
      cls = int(fields[0])
      cx, cy, w, h = (float(v) for v in fields[1:5])
    except ValueError as e:
      raise DatasetError(f'{where}: not numbers ({line.strip()!r})') from e
    if cls not in category_ids:
      raise DatasetError(f'{where}: class id {cls} is not a category id of the COCO JSON')
    if not all(math.isfinite(v) for v in (cx, cy, w, h)) or w <= 0 or h <= 0:
      raise DatasetError(f'{where}: invalid box {fields[1:5]}')
    if cx - w / 2 < -tol or cy - h / 2 < -tol or cx + w / 2 > 1 + tol or cy + h / 2 > 1 + tol:
      raise DatasetError(f'{where}: box {fields[1:5]} lies outside [0, 1]')


def read_optsar_split(root: str, split: str, *, check_labels: bool = True) -> list[ImageRecord]:
  """Validated records of one split of an OptSAR-RSVG release (one per image, JSON order)."""
  path = os.path.join(root, f'{split}.json')
  data = _load_json(path)
  if not isinstance(data, dict):
    raise DatasetError(f'{path}: top level must be a JSON object with images, annotations, categories')
  for key in ('images', 'annotations', 'categories'):
    if not isinstance(data.get(key), list):
      raise DatasetError(f'{path}: key "{key}" missing or not a list')

  # categories: id -> canonical name
  cat_names: dict[int, str] = {}
  for i, c in enumerate(data['categories']):
    where = f'{path}: categories[{i}]'
    if not isinstance(c, dict) or not _is_int(c.get('id')) or not isinstance(c.get('name'), str):
      raise DatasetError(f'{where}: needs an integer "id" and a string "name"')
    name = _canonical_optsar_category(c['name'], where)
    if c['id'] in cat_names:
      raise DatasetError(f'{where}: duplicate category id {c["id"]}')
    cat_names[c['id']] = name

  images_dir = os.path.join(root, 'images', split)
  labels_dir = os.path.join(root, 'labels', split)
  if not os.path.isdir(images_dir):
    raise DatasetError(f'{images_dir}: images folder not found')
  if check_labels and not os.path.isdir(labels_dir):
    raise DatasetError(f'{labels_dir}: labels folder not found')

  images: dict[int, dict] = {}
  order: list[int] = []
  seen_names: set[str] = set()
  for i, im in enumerate(data['images']):
    where = f'{path}: images[{i}]'
    if not isinstance(im, dict):
      raise DatasetError(f'{where}: must be an object')
    for key in ('id', 'width', 'height'):
      if not _is_int(im.get(key)):
        raise DatasetError(f'{where}: "{key}" missing or not an integer')
    if im['width'] <= 0 or im['height'] <= 0:
      raise DatasetError(f'{where}: width/height must be positive')
    name = im.get('file_name')
    domain, _ = _parse_optsar_name(name, where)
    if im['id'] in images:
      raise DatasetError(f'{where}: duplicate image id {im["id"]}')
    if name in seen_names:
      raise DatasetError(f'{where}: file_name {name} appears twice')
    seen_names.add(name)
    image_path = os.path.join(images_dir, name)
    _check_image(image_path, im['width'], im['height'], where)
    if check_labels:
      _check_yolo_labels(os.path.join(labels_dir, os.path.splitext(name)[0] + '.txt'), set(cat_names))
    images[im['id']] = dict(path=image_path, filename=name, width=im['width'], height=im['height'],
                            domain=domain, objects=[])
    order.append(im['id'])

  ann_ids: set[int] = set()
  for i, a in enumerate(data['annotations']):
    if not isinstance(a, dict):
      raise DatasetError(f'{path}: annotations[{i}]: must be an object')
    aid = a.get('id')
    where = f'{path}: annotations[{i}] (id {aid})'
    if not _is_int(aid):
      raise DatasetError(f'{where}: "id" missing or not an integer')
    if aid in ann_ids:
      raise DatasetError(f'{where}: duplicate annotation id')
    ann_ids.add(aid)
    if a.get('image_id') not in images:
      raise DatasetError(f'{where}: image_id {a.get("image_id")!r} is not an image of this file')
    image = images[a['image_id']]
    cid = a.get('category_id')
    if not _is_int(cid) or cid not in cat_names:
      raise DatasetError(f'{where}: category_id {cid!r} is not in "categories"')
    if 'category_name' in a:
      category = _canonical_optsar_category(a['category_name'], where)
      if category != cat_names[cid]:
        raise DatasetError(f'{where}: category_name {a["category_name"]!r} disagrees with category_id {cid} '
                           f'({cat_names[cid]!r})')
    else:
      category = cat_names[cid]
    if cats.domain_of_category(category) != image['domain']:
      raise DatasetError(f'{where}: category {category!r} disagrees with the file name prefix of '
                         f'{image["filename"]}')
    caption = a.get('caption')
    if not isinstance(caption, str) or not caption.strip():
      raise DatasetError(f'{where}: caption missing or empty')
    box = _check_box_xywh(a.get('bbox'), image['width'], image['height'], where)
    if a.get('iscrowd'):
      continue
    image['objects'].append(ObjectRecord(id=aid, category=category, bbox=box, caption=caption.strip()))

  return [ImageRecord(path=images[k]['path'], filename=images[k]['filename'], image_id=k,
                      width=images[k]['width'], height=images[k]['height'], domain=images[k]['domain'],
                      objects=tuple(images[k]['objects'])) for k in order]


def _canonical_optsar_category(name, where: str) -> str:
  if isinstance(name, str):
    key = name.strip().lower()
    for c in cats.OPTSAR_CATEGORIES:
      if c.lower() == key:
        return c
  raise DatasetError(f'{where}: unknown category {name!r} (expected one of the 16 OptSAR-RSVG categories)')


def read_optsar(root: str, splits=SPLITS, *, strict: bool = False,
                check_labels: bool = True) -> dict[str, list[ImageRecord]]:
  """Validated records of every split; checks across splits too.

  Always: no file name in two splits, no image or annotation id reused across splits, no two files with
  the same domain and number. With `strict=True` also the release's own rules: exactly the five top-level
  entries, numbers contiguous per domain from 000001 running across train, val, test, and every file in
  images/{split} listed in the JSON.
  """
  root = os.fspath(root)
  if strict:
    expected = {'images', 'labels'} | {f'{s}.json' for s in splits}
    present = {e for e in os.listdir(root) if not e.startswith('.')} - {'train.cache'}
    if present != expected:
      raise DatasetError(f'{root}: top-level entries {sorted(present)} differ from {sorted(expected)}')
  result: dict[str, list[ImageRecord]] = {}
  file_split: dict[str, str] = {}
  number_file: dict[tuple[str, int], str] = {}
  image_ids: dict[int, str] = {}
  ann_ids: dict[int, str] = {}
  for split in splits:
    records = read_optsar_split(root, split, check_labels=check_labels)
    where = os.path.join(root, f'{split}.json')
    for r in records:
      if r.filename in file_split:
        raise DatasetError(f'{where}: {r.filename} also appears in split {file_split[r.filename]}')
      file_split[r.filename] = split
      key = (r.domain, int(OPTSAR_NAME_RE.match(r.filename).group(2)))
      if key in number_file:
        raise DatasetError(f'{where}: {r.filename} reuses the number of {number_file[key]}')
      number_file[key] = r.filename
      if r.image_id in image_ids:
        raise DatasetError(f'{where}: image id {r.image_id} ({r.filename}) is also used in split '
                           f'{image_ids[r.image_id]}')
      image_ids[r.image_id] = split
      for o in r.objects:
        if o.id in ann_ids:
          raise DatasetError(f'{where}: annotation id {o.id} is also used in split {ann_ids[o.id]}')
        ann_ids[o.id] = split
    if strict:
      listed = {r.filename for r in records}
      for f in sorted(os.listdir(os.path.join(root, 'images', split))):
        if f not in listed:
          raise DatasetError(f'{os.path.join(root, "images", split, f)}: image not listed in {where}')
    result[split] = records
  if strict:
    for domain in ('optical', 'sar'):
      expected_next = 1
      for split in splits:
        numbers = sorted(n for (d, n), f in number_file.items() if d == domain and file_split[f] == split)
        for n in numbers:
          if n != expected_next:
            raise DatasetError(f'{os.path.join(root, split + ".json")}: {domain} file numbers are not '
                               f'contiguous across train, val, test (expected {expected_next:06d}, '
                               f'found {n:06d})')
          expected_next += 1
  return result


# ------------------------------------------------------------------------------------------- DIOR-RSVG

def find_dior_root(manual_dir: str) -> str:
  """The release root (holding Annotations/) in `manual_dir` or its DIOR_RSVG/ subfolder."""
  return _find_root(manual_dir, 'Annotations', ('DIOR_RSVG', 'DIOR-RSVG'))


def _xml_text(elem, tag: str, where: str) -> str:
  child = elem.find(tag)
  if child is None or child.text is None or not child.text.strip():
    raise DatasetError(f'{where}: <{tag}> missing or empty')
  return child.text.strip()


def _xml_number(elem, tag: str, where: str) -> float:
  text = _xml_text(elem, tag, where)
  try:
    value = float(text)
  except ValueError as e:
    raise DatasetError(f'{where}: <{tag}> is not a number ({text!r})') from e
  if not math.isfinite(value):
    raise DatasetError(f'{where}: <{tag}> is not finite ({text!r})')
  return value


def _read_dior_xml(path: str, images_dir: str) -> tuple[dict, list[ObjectRecord]]:
  """Image info and objects (id = -1, assigned by the caller) of one DIOR XML file."""
  try:
    root = ET.parse(path).getroot()
  except ET.ParseError as e:
    raise DatasetError(f'{path}: malformed XML ({e})') from e
  except OSError as e:
    raise DatasetError(f'{path}: cannot read ({e})') from e
  filename_el = root.find('filename')
  stem = os.path.splitext(os.path.basename(path))[0]
  filename = filename_el.text.strip() if filename_el is not None and filename_el.text else stem + '.jpg'
  if os.path.basename(filename) != filename:
    raise DatasetError(f'{path}: <filename> must be a bare file name, got {filename!r}')
  image_path = os.path.join(images_dir, filename)
  size = root.find('size')
  if size is not None and size.find('width') is not None:
    width = _xml_number(size, 'width', f'{path}: size')
    height = _xml_number(size, 'height', f'{path}: size')
    if width != int(width) or height != int(height) or width <= 0 or height <= 0:
      raise DatasetError(f'{path}: size {width}x{height} is not a positive integer size')
    width, height = int(width), int(height)
    _check_image(image_path, width, height, path)
  else:
    width, height = image_size(image_path)
  objects = []
  for k, obj in enumerate(root.findall('object')):
    where = f'{path}: object {k}'
    name = _xml_text(obj, 'name', where)
    category = cats.canonical_dior_class(name)
    if category is None:
      raise DatasetError(f'{where}: unknown class {name!r} (expected one of the 20 DIOR classes)')
    bnd = obj.find('bndbox')
    if bnd is None:
      raise DatasetError(f'{where}: <bndbox> missing')
    x0, y0, x1, y1 = (_xml_number(bnd, t, f'{where} bndbox') for t in ('xmin', 'ymin', 'xmax', 'ymax'))
    box = _check_box_xywh([x0, y0, x1 - x0, y1 - y0], width, height, f'{where} (xmin,ymin,xmax,ymax '
                          f'{x0:g},{y0:g},{x1:g},{y1:g})')
    desc = obj.find('description')
    if desc is None or desc.text is None or not desc.text.strip():
      raise DatasetError(f'{where}: <description> (the expression) missing or empty')
    objects.append(ObjectRecord(id=-1, category=category, bbox=box, caption=desc.text.strip()))
  info = dict(path=image_path, filename=filename, image_id=int(stem), width=width, height=height)
  return info, objects


def _read_split_file(path: str, total: int) -> list[int]:
  if not os.path.isfile(path):
    raise DatasetError(f'{path}: split file not found')
  indices, seen = [], set()
  with open(path, encoding='utf-8', errors='replace') as f:
    for n, line in enumerate(f, 1):
      text = line.strip()
      if not text:
        continue
      try:
        value = int(text)
      except ValueError as e:
        raise DatasetError(f'{path}: line {n}: not an integer object index ({text!r})') from e
      if not 0 <= value < total:
        raise DatasetError(f'{path}: line {n}: object index {value} out of range (the XML files hold '
                           f'{total} objects)')
      if value in seen:
        raise DatasetError(f'{path}: line {n}: object index {value} listed twice')
      seen.add(value)
      indices.append(value)
  return indices


def read_dior(root: str, splits=SPLITS) -> dict[str, list[ImageRecord]]:
  """Validated DIOR-RSVG records per split: one per (image, split) with that split's objects.

  The split files index a global object counter over the XML files sorted by name (not filesystem order)
  and, inside a file, document order; that index is the object's id.
  """
  root = os.fspath(root)
  ann_dir = os.path.join(root, 'Annotations')
  images_dir = os.path.join(root, 'JPEGImages')
  if not os.path.isdir(ann_dir):
    raise DatasetError(f'{ann_dir}: Annotations folder not found')
  if not os.path.isdir(images_dir):
    raise DatasetError(f'{images_dir}: JPEGImages folder not found')
  xml_files = sorted(f for f in os.listdir(ann_dir) if f.lower().endswith('.xml'))
  if not xml_files:
    raise DatasetError(f'{ann_dir}: no XML files')
  parsed = []  # (info, objects with global ids)
  counter = 0
  seen_ids: dict[int, str] = {}
  for f in xml_files:
    path = os.path.join(ann_dir, f)
    stem = os.path.splitext(f)[0]
    if not stem.isdigit():
      raise DatasetError(f'{path}: annotation file name must be a number such as 00001.xml')
    if int(stem) in seen_ids:
      raise DatasetError(f'{path}: same number as {seen_ids[int(stem)]}')
    seen_ids[int(stem)] = f
    info, objects = _read_dior_xml(path, images_dir)
    objects = [dataclasses.replace(o, id=counter + k) for k, o in enumerate(objects)]
    counter += len(objects)
    parsed.append((info, objects))
  split_of: dict[int, str] = {}
  for split in splits:
    path = os.path.join(root, f'{split}.txt')
    for idx in _read_split_file(path, counter):
      if idx in split_of:
        raise DatasetError(f'{path}: object index {idx} is also listed in {split_of[idx]}.txt')
      split_of[idx] = split
  result = {}
  for split in splits:
    records = []
    for info, objects in parsed:
      mine = tuple(o for o in objects if split_of.get(o.id) == split)
      if mine:
        records.append(ImageRecord(domain='optical', objects=mine, **info))
    result[split] = records
  return result


# -------------------------------------------------------------------------------------------------- TFDS

def read_release(dataset: str, manual_dir: str) -> dict[str, list[ImageRecord]]:
  """Validated records per split of `dataset` ('optsar_rsvg' | 'dior_rsvg') found in `manual_dir`."""
  if dataset == 'optsar_rsvg':
    return read_optsar(find_optsar_root(manual_dir))
  if dataset == 'dior_rsvg':
    return read_dior(find_dior_root(manual_dir))
  raise DatasetError(f'--dataset {dataset!r}: unknown dataset (expected one of {", ".join(DATASETS)})')


def tfds_features(dataset: str):
  """The FeaturesDict of the TFDS dataset (docs/interfaces.md section 4)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  names = {'optsar_rsvg': cats.OPTSAR_CATEGORIES, 'dior_rsvg': cats.DIOR_CLASSES}[dataset]
  # encoding_format=None: the bytes are the original RGB JPEG or lossless PNG (see encode_image_for_tfds);
  # the decoders detect which from the bytes.
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format=None),
      'image/filename': tfds.features.Text(),
      'image/id': tfds.features.Scalar(dtype=np.int64),
      'domain': tfds.features.ClassLabel(names=list(cats.DOMAINS)),
      'objects': tfds.features.Sequence({
          'id': tfds.features.Scalar(dtype=np.int64),
          'bbox': tfds.features.BBoxFeature(),
          'category': tfds.features.ClassLabel(names=list(names)),
          'caption': tfds.features.Text(),
      }),
  })


def tfds_example(record: ImageRecord) -> dict:
  """The TFDS example of one record (image bytes encoded here, boxes normalised yxyx)."""
  boxes = record.normalized_boxes().astype(np.float64)
  return {
      'image': encode_image_for_tfds(record.path),
      'image/filename': record.filename,
      'image/id': record.image_id,
      'domain': record.domain,
      'objects': {
          'id': [o.id for o in record.objects],
          'bbox': [b for b in boxes],
          'category': [o.category for o in record.objects],
          'caption': [o.caption for o in record.objects],
      },
  }
