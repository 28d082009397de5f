"""OptiSAR-Net++ model: backbone with PL-MoE, TGDF-SSA neck, contrastive grounding head (flax.nnx, NHWC)."""

from optisar_jax.models.detector import ImageFeatures, OptiSARNet

__all__ = ['ImageFeatures', 'OptiSARNet']
