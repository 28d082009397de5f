"""TFDS builders of optisar-jax. Importing this package registers `optsar_rsvg` and `dior_rsvg`.

Both are built from a manually downloaded (or generated) release; see `scripts/build_dataset.py` or
`optisar_jax.data.build_tfds`.
"""

from tfds_builders.dior_rsvg.dior_rsvg import DiorRsvg
from tfds_builders.optsar_rsvg.optsar_rsvg import OptsarRsvg

__all__ = ['DiorRsvg', 'OptsarRsvg']
