"""OptiSAR-Net++ recipe on DIOR-RSVG (optical only, 800x800 images letterboxed to 640).

The release has no DIOR-RSVG recipe; we keep the OptSAR-RSVG numbers and change only the dataset.
"""

from optisar_jax.config import load_sibling


def get_config():
  c = load_sibling(__file__, 'optsar_rsvg')
  c.data.name = 'dior_rsvg'
  c.model.bias_init_nc = 20              # DIOR-RSVG has 20 object classes
  return c
