"""gpt2_kernels/_common.py: the shared input checks every public kernel entry calls, the one
device rule, the interpreter-versus-GPU policy read at call time, and the clear error
for a Triton interpreter that cannot run with the installed numpy."""
import numpy
import pytest
import torch
import triton
import triton.language as tl

from gpt2_kernels import _common
from gpt2_kernels.layernorm import layer_norm


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


# ----------------------------------------------------------------------------- the shared checks

def _raises(exc, text, fn, *args, **kwargs):
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    assert str(info.value) == text
    return info


@pytest.mark.parametrize("kwargs,t,exc,text", [
    ({}, [1.0], TypeError, "op: w must be a torch.Tensor, got list"),
    ({}, None, TypeError, "op: w must be a torch.Tensor, got NoneType"),
    ({"dtypes": _common.FLOAT_DTYPES}, torch.zeros(3, dtype=torch.float64), TypeError,
     "op: w has dtype float64; supported: float32, float16, bfloat16"),
    ({"dim": 2, "layout": "(V, C)"}, torch.zeros(3), ValueError,
     "op: w has shape (3,); expected 2-d (V, C)"),
    ({"dim": 2}, torch.zeros(1, 2, 3), ValueError, "op: w has shape (1, 2, 3); expected 2-d"),
    ({"min_dim": 1, "layout": "(..., C)"}, torch.zeros(()), ValueError,
     "op: w has shape (); expected at least 1 dimension (..., C)"),
    ({"min_dim": 2}, torch.zeros(4), ValueError, "op: w has shape (4,); expected at least 2 dimensions"),
    ({"shape": (768,)}, torch.zeros(5), ValueError, "op: w has shape (5,); expected (768,)"),
    ({"shape": (None, 8)}, torch.zeros(4, 7), ValueError, "op: w has shape (4, 7); expected (*, 8)"),
    ({"shape": (4,)}, torch.zeros(4, 1), ValueError, "op: w has shape (4, 1); expected (4,)"),
    ({"last_stride_one": True}, torch.zeros(4, 6).t(), ValueError,
     "op: w has last-dimension stride 6; it must be 1 (other strides may be anything)"),
])
def test_check_tensor_refuses_with_one_clear_line(kwargs, t, exc, text):
    _raises(exc, text, _common.check_tensor, "op", "w", t, **kwargs)


@pytest.mark.parametrize("kwargs,t", [
    ({"dtypes": (torch.float16,), "dim": 2, "shape": (None, 8), "last_stride_one": True},
     torch.zeros(3, 8, dtype=torch.float16)),
    ({"min_dim": 1, "last_stride_one": True}, torch.zeros(5, 9)[:, :4]),  # row-strided view
    ({"last_stride_one": True}, torch.zeros(4, 1).expand(4, 1)),  # size-1 dim: stride irrelevant
    ({"optional": True, "dim": 1}, None),
])
def test_check_tensor_accepts(kwargs, t):
    _common.check_tensor("op", "w", t, **kwargs)


def test_check_same_device_names_both_tensors_and_applies_the_device_rule(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_common, "interpreter_problem", lambda: None)
    x, w = torch.zeros(2), torch.zeros(2, device="meta")
    _raises(ValueError, "op: w is on meta but x is on cpu; all tensors must be on one device",
            _common.check_same_device, "op", x=x, w=w)
    _common.check_same_device("op", x=x, bias=None, w=torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^op: x is on cpu; a CUDA tensor is needed"):
        _common.check_same_device("op", x=x, bias=None)


def test_check_same_dtype():
    x, w = torch.zeros(2), torch.zeros(2, dtype=torch.float16)
    _raises(TypeError, "op: weight has dtype float16 but x has float32; they must match",
            _common.check_same_dtype, "op", x=x, bias=None, weight=w)
    _common.check_same_dtype("op", x=x, bias=None, weight=torch.ones(3))


def test_check_dtype():
    _raises(TypeError, "op: out_dtype is int32; supported: float32, float16, bfloat16",
            _common.check_dtype, "op", "out_dtype", torch.int32, _common.FLOAT_DTYPES)
    _raises(TypeError, "op: out_dtype is 'float16'; supported: float16",
            _common.check_dtype, "op", "out_dtype", "float16", (torch.float16,))
    _common.check_dtype("op", "out_dtype", torch.bfloat16, _common.FLOAT_DTYPES)


@pytest.mark.parametrize("value,kwargs,text", [
    (True, {}, "op: eps must be a finite real number, got True"),
    ("1", {}, "op: eps must be a finite real number, got '1'"),
    (float("nan"), {"at_least": 0.0}, "op: eps must be a finite real number >= 0.0, got nan"),
    (float("inf"), {}, "op: eps must be a finite real number, got inf"),
    (-1e-9, {"at_least": 0.0}, "op: eps must be a finite real number >= 0.0, got -1e-09"),
    (1.0, {"at_least": 0.0, "below": 1.0}, "op: eps must be a finite real number >= 0.0 and < 1.0, got 1.0"),
    (torch.tensor(0.5), {}, "op: eps must be a finite real number, got tensor(0.5000)"),
])
def test_check_real(value, kwargs, text):
    _raises(ValueError, text, _common.check_real, "op", "eps", value, **kwargs)


@pytest.mark.parametrize("value", [0, 0.0, 1e-5, 0.999])
def test_check_real_accepts(value):
    _common.check_real("op", "p", value, at_least=0.0, below=1.0)


def test_check_int():
    _raises(TypeError, "op: n must be an int, got bool", _common.check_int, "op", "n", True)
    _raises(TypeError, "op: n must be an int, got float", _common.check_int, "op", "n", 3.0)
    _raises(ValueError, "op: n is 0; expected an int >= 1 and <= 9", _common.check_int, "op", "n", 0,
            at_least=1, at_most=9)
    _raises(ValueError, "op: n is 10; expected an int <= 9", _common.check_int, "op", "n", 10, at_most=9)
    _common.check_int("op", "n", 9, at_least=1, at_most=9)
    _common.check_int("op", "n", -7)


# ----------------------------------------------------------------------------- the mode policy

def test_pick_reads_the_mode_at_call_time(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _common.interpreting() and _common.pick(gpu="big", interpreter="small") == "small"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _common.interpreting() and _common.pick(gpu="big", interpreter="small") == "big"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _common.pick(gpu="big", interpreter="small") == "big"


def test_smem_budget_fits_an_h100_block():
    assert 0 < _common.SMEM_BUDGET_BYTES <= 227 * 1024


@triton.jit
def _add_one_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)


# Two configs: autotuning them fails under the interpreter, so this only runs
# when launch_autotuned takes the interpreter's config.
_add_one_tuned = triton.autotune([triton.Config({"BLOCK": 64}, num_warps=4),
                                  triton.Config({"BLOCK": 128}, num_warps=8)], key=["n"])(_add_one_kernel)


# On a CUDA machine the kernels are compiled, not interpreted: there the test
# below (the autotuner path) covers launch_autotuned.
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only where there is no GPU")
def test_launch_autotuned_under_the_interpreter_runs_its_one_config():
    assert _common.interpreting(), "the root conftest sets TRITON_INTERPRET=1 without a GPU"
    x = torch.zeros(100)
    grids = []

    def grid(meta):
        grids.append(meta["BLOCK"])
        return (triton.cdiv(100, meta["BLOCK"]),)
    _common.launch_autotuned(_add_one_tuned, grid, (x, 100), {},
                             interpreter_config=triton.Config({"BLOCK": 16}, num_warps=1))
    assert grids == [16] and torch.equal(x, torch.ones(100))


def test_launch_autotuned_on_the_gpu_goes_through_the_autotuner(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []

    class FakeTuner:
        def __getitem__(self, grid):
            return lambda *args, **meta: calls.append((grid, args, meta))
    grid = lambda meta: (1,)  # noqa: E731
    _common.launch_autotuned(FakeTuner(), grid, (1, 2), {"CAUSAL": True},
                             interpreter_config=triton.Config({"BLOCK": 16}))
    assert calls == [(grid, (1, 2), {"CAUSAL": True})]
