"""Hand-written Triton kernels, one op per module; this file only re-exports the
public functions.

The modules are named for their ops (gpt2_kernels/linear_gelu.py holds linear_gelu),
so after this import `gpt2_kernels.linear_gelu` is the function: reach a module
itself with `importlib.import_module("gpt2_kernels.linear_gelu")` or
`from gpt2_kernels.linear_gelu import name`.
"""
from gpt2_kernels.adamw import FusedAdamW, ShardedFusedAdamW
from gpt2_kernels.attention import flash_attention, flash_attention_qkvpacked
from gpt2_kernels.embedding import embedding
from gpt2_kernels.layernorm import add_layer_norm, layer_norm
from gpt2_kernels.linear import linear
from gpt2_kernels.linear_cross_entropy import linear_cross_entropy
from gpt2_kernels.linear_gelu import linear_gelu
from gpt2_kernels.mlp import mlp

__all__ = [
    "FusedAdamW",
    "ShardedFusedAdamW",
    "add_layer_norm",
    "embedding",
    "flash_attention",
    "flash_attention_qkvpacked",
    "layer_norm",
    "linear",
    "linear_cross_entropy",
    "linear_gelu",
    "mlp",
]
