"""Hand-written Triton kernels, one op per module; this file only re-exports them."""
from kernels.adamw import FusedAdamW
from kernels.attention import flash_attention
from kernels.cross_entropy import linear_cross_entropy
from kernels.layernorm import add_layer_norm, layer_norm
from kernels.mlp import MatmulBackends, linear_gelu

__all__ = [
    "FusedAdamW",
    "MatmulBackends",
    "add_layer_norm",
    "flash_attention",
    "layer_norm",
    "linear_cross_entropy",
    "linear_gelu",
]
