"""GPT-2 training engine: model, data, training loop; kernels via the op layer."""
from engine.config import GPTConfig
from engine.generate import generate
from engine.model import GPT

__all__ = ["GPT", "GPTConfig", "generate"]
