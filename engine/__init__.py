"""GPT-2 training engine: model, data, training loop; kernels via the op layer.

The public names load on first use, so that the command-line tools (train.py,
sample.py, `python -m engine.eval`) parse their flags and answer --help before
torch is imported."""
import importlib
import sys
import types

_PUBLIC = {"GPT": "engine.model", "GPTConfig": "engine.config", "generate": "engine.generate"}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


class _Engine(types.ModuleType):
    # Importing the submodule engine.generate would bind the package attribute
    # `generate` to that module; the public name is the function (the module stays
    # importable as engine.generate).
    def __setattr__(self, name, value):
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Engine
