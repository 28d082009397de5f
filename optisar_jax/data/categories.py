"""Category names of OptSAR-RSVG (16, ids 0-15) and DIOR-RSVG (20 classes).

The OptSAR-RSVG ids are the release's COCO `category_id`s (docs/training-and-data.md 1.5). The DIOR-RSVG names
are spelled as in the DIOR XML files (section 2); their ids here are positions in `DIOR_CLASSES`, which is
also the order of the `objects/category` ClassLabel of the `dior_rsvg` TFDS dataset.
"""

from __future__ import annotations

OPTSAR_CATEGORIES = (
    'optical vehicle',             # 0
    'optical bridge',              # 1
    'optical crossroad',           # 2
    'optical T junction',          # 3
    'optical ground track field',  # 4
    'optical baseball diamond',    # 5
    'optical swimming pool',       # 6
    'optical tennis court',        # 7
    'optical parking lot',         # 8
    'optical basketball court',    # 9
    'optical storage tank',        # 10
    'optical ship',                # 11
    'optical airplane',            # 12
    'optical harbor',              # 13
    'sar transmission tower',      # 14
    'sar ship',                    # 15
)

OPTSAR_CATEGORY_IDS = {name: i for i, name in enumerate(OPTSAR_CATEGORIES)}

DIOR_CLASSES = (
    'vehicle', 'overpass', 'chimney', 'Expressway-Service-area', 'harbor', 'basketballcourt',
    'baseballfield', 'groundtrackfield', 'bridge', 'stadium', 'windmill', 'airplane', 'tenniscourt',
    'airport', 'ship', 'trainstation', 'storagetank', 'golffield', 'dam', 'Expressway-toll-station',
)

DIOR_CLASS_IDS = {name: i for i, name in enumerate(DIOR_CLASSES)}

# The `domain` ClassLabel of both TFDS datasets.
DOMAINS = ('optical', 'sar')

# Plain-English words for a category, as a caption would say them ('optical ship' -> 'ship',
# 'basketballcourt' -> 'basketball court'). Used by the synthetic generator.
_DIOR_WORDS = {
    'Expressway-Service-area': 'expressway service area',
    'Expressway-toll-station': 'expressway toll station',
    'basketballcourt': 'basketball court',
    'baseballfield': 'baseball field',
    'groundtrackfield': 'ground track field',
    'tenniscourt': 'tennis court',
    'trainstation': 'train station',
    'storagetank': 'storage tank',
    'golffield': 'golf field',
}


def domain_of_category(name: str) -> str:
  """'sar' iff the category name starts with 'sar' (case-insensitive), else 'optical'."""
  return 'sar' if name.lower().startswith('sar') else 'optical'


def category_words(name: str) -> str:
  """The object noun a caption uses for category `name` ('optical T junction' -> 'T junction')."""
  for prefix in ('optical ', 'sar '):
    if name.lower().startswith(prefix):
      return name[len(prefix):]
  return _DIOR_WORDS.get(name, name)


def canonical_dior_class(name: str) -> str | None:
  """The DIOR class spelled as in `DIOR_CLASSES` for `name` (case and surrounding space ignored), or None."""
  key = name.strip().lower()
  for cls in DIOR_CLASSES:
    if cls.lower() == key:
      return cls
  return None
