"""Data: categories, release readers/validators, the synthetic generator, TFDS building.

`build_tfds(dataset, manual_dir, data_dir)` builds `optsar_rsvg` or `dior_rsvg` (ArrayRecord) from a
release on disk; read it back with `tfds.data_source(name, split=..., data_dir=...)`.
"""

from optisar_jax.data.categories import DIOR_CLASSES, DOMAINS, OPTSAR_CATEGORIES, domain_of_category
from optisar_jax.data.release import DatasetError, ImageRecord, ObjectRecord, read_dior, read_optsar
from optisar_jax.data.sources import build_tfds
from optisar_jax.data.synthetic import make_synthetic_dataset

__all__ = [
    'DIOR_CLASSES', 'DOMAINS', 'OPTSAR_CATEGORIES', 'DatasetError', 'ImageRecord', 'ObjectRecord',
    'build_tfds', 'domain_of_category', 'make_synthetic_dataset', 'read_dior', 'read_optsar',
]
