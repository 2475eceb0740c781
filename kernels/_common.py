"""Launch plumbing shared by the kernel modules (not part of the public API)."""
import contextlib
import os
import re

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter. Read at call time: tests
    switch it with monkeypatch.setenv; config lists read it once, at import."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run here, or None. Triton <= 3.6 turns
    one-element arrays into Python scalars, which numpy >= 2.4 refuses: every kernel
    with a loop then dies deep inside the interpreter with "only 0-dimensional arrays
    can be converted to Python scalars" (Triton 3.7 fixed it)."""
    import numpy
    import triton
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter does not work with numpy "
                f"{numpy.__version__} (numpy >= 2.4 needs Triton >= 3.7): "
                "pip install 'numpy<2.4' or 'triton>=3.7'")
    return None


def check_device(name: str, arg: str, device: torch.device) -> None:
    """Kernels run on CUDA tensors, and on CPU tensors only in Triton's interpreter
    (TRITON_INTERPRET=1), provided that interpreter works with the installed numpy."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(f"{name}: {problem}")
        return
    raise ValueError(f"{name}: {arg} is on {device}; a CUDA tensor is needed "
                     "(CPU tensors only under TRITON_INTERPRET=1)")


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device, which need not be t's: make it so."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
