"""TFDS builder `optsar_rsvg` (OptSAR-RSVG, optical + SAR visual grounding)."""

from tfds_builders.optsar_rsvg.optsar_rsvg import OptsarRsvg

__all__ = ['OptsarRsvg']
