"""Flax NNX modules of Deformable DETR."""

from ddetr_jax.models.detector import DeformableDETR, ModelConfig, count_parameters

__all__ = ["DeformableDETR", "ModelConfig", "count_parameters"]
