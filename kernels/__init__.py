"""Hand-written Triton kernels, one op per module; this file only re-exports the
public functions.

The modules are named for their ops (kernels/linear_gelu.py holds linear_gelu),
so after this import `kernels.linear_gelu` is the function: reach a module
itself with `importlib.import_module("kernels.linear_gelu")` or
`from kernels.linear_gelu import name`.
"""
from kernels.adamw import FusedAdamW
from kernels.attention import flash_attention, flash_attention_qkvpacked
from kernels.layernorm import add_layer_norm, layer_norm
from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.linear_gelu import linear_gelu

__all__ = [
    "FusedAdamW",
    "add_layer_norm",
    "flash_attention",
    "flash_attention_qkvpacked",
    "layer_norm",
    "linear_cross_entropy",
    "linear_gelu",
]
