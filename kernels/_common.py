"""Launch plumbing shared by the kernel modules (not part of the public API)."""
import contextlib
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter. Read at call time: tests
    switch it with monkeypatch.setenv; config lists read it once, at import."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device, which need not be t's: make it so."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
