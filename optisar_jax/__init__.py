"""optisar-jax: OptiSAR-Net++ (cross-domain optical/SAR visual grounding) in JAX and flax.nnx."""

__version__ = "0.1.0"
