"""kernels/_common.py: the one device rule every public kernel entry applies, and the
clear error for a Triton interpreter that cannot run with the installed numpy."""
import numpy
import pytest
import torch
import triton

from kernels import _common
from kernels.layernorm import layer_norm


@pytest.mark.parametrize("triton_version,numpy_version,broken", [
    ("3.6.0", "2.4.0", True),
    ("3.5.1", "2.5.2", True),
    ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False),
    ("3.9.0", "2.5.2", False),
    ("3.10.0+git1234", "2.10.0", False),
])
def test_interpreter_problem_names_the_versions_and_the_fix(monkeypatch, triton_version, numpy_version,
                                                           broken):
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = _common.interpreter_problem()
    if not broken:
        assert problem is None
        return
    assert f"Triton {triton_version}" in problem and f"numpy {numpy_version}" in problem
    assert "pip install 'numpy<2.4' or 'triton>=3.7'" in problem


def test_a_kernel_on_cpu_with_a_broken_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    x, w, b = torch.randn(2, 8), torch.ones(8), torch.zeros(8)
    with pytest.raises(RuntimeError, match=r"^layer_norm: Triton 3.6.0's CPU interpreter does not "
                                           r"work with numpy 2.4.1"):
        layer_norm(x, w, b)


@pytest.mark.parametrize("device,interpret,error", [
    ("cpu", "0", "layer_norm: x is on cpu; a CUDA tensor is needed (CPU tensors only under TRITON_INTERPRET=1)"),
    ("meta", "1", "layer_norm: x is on meta; a CUDA tensor is needed"),
    ("cpu", "1", None),
])
def test_check_device_rule(monkeypatch, device, interpret, error):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setattr(_common, "interpreter_problem", lambda: None)
    if error is None:
        _common.check_device("layer_norm", "x", torch.device(device))
        return
    with pytest.raises(ValueError) as info:
        _common.check_device("layer_norm", "x", torch.device(device))
    assert str(info.value).startswith(error)
    _common.check_device("layer_norm", "x", torch.device("cuda"))  # CUDA always passes the rule
