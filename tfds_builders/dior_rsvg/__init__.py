"""TFDS builder `dior_rsvg` (DIOR-RSVG, optical visual grounding)."""

from tfds_builders.dior_rsvg.dior_rsvg import DiorRsvg

__all__ = ['DiorRsvg']
