"""Pure array operations without parameters."""

from ddetr_jax.ops.ms_deform_attn import ms_deform_attn

__all__ = ["ms_deform_attn"]
