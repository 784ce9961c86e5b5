"""ddetr-jax: Deformable DETR in JAX and Flax NNX."""

__version__ = "0.1.0"
