"""What every kernel module shares: input checks, the device rule, the one
interpreter-versus-GPU policy, and constants (not part of the public API).

Input checks (each raises one error whose message starts with the op's name and
names the argument and what was expected, e.g.
``layer_norm: weight has shape (5,); expected (768,)``):

- ``check_tensor(op, arg, t, *, dtypes=, dim=, min_dim=, shape=, layout=,
  last_stride_one=, optional=)``: type, dtype, rank, shape and last-dimension
  stride of one tensor (TypeError for type and dtype, ValueError for the rest).
- ``check_same_device(op, **tensors)``: every tensor given (None skipped) on the
  first one's device, and that device allowed by ``check_device``.
- ``check_same_dtype(op, **tensors)``: every tensor given (None skipped) in the
  first one's dtype.
- ``check_device(op, arg, device)``: CUDA, or CPU under Triton's working interpreter.
- ``check_dtype(op, arg, dtype, dtypes)``: a dtype argument (e.g. ``out_dtype``).
- ``check_real(op, arg, value, *, at_least=, below=)``,
  ``check_int(op, arg, value, *, at_least=, at_most=)`` (returns a Python int)
  and ``check_bool(op, arg, value)``: scalars.
- ``check_dropout_p(op, dropout_p)``: the one rule for a dropout probability
  (below).
- ``dropout_seed(op, device, dropout_p, seed)``: the one seed rule of every
  kernel with dropout (below).
- ``contiguous(t)``: a parameter vector the kernels index as flat memory
  (LayerNorm's weight and bias, the GELU matmul's bias), copied where its
  strides are anything else: a slice, an expanded (stride 0) tensor.

Autograd:

- ``once_differentiable(op)``: the decorator for every kernel's backward: a
  backward asked to build a graph (``create_graph=True``, double backward)
  raises one error naming the op, also when the loss is linear in the kernel's
  output (where torch's own ``once_differentiable`` lets it through with a
  silently wrong, zero, second-order term).

Gradients: ``grad_buffer(param, accumulate)`` is the one rule of the kernels
whose backward can add a parameter's gradient into its existing ``.grad``
(``accumulate_grad``, gpt2_kernels/linear.py): which .grad may be added to.

Running kernels:

- ``interpreting()``: whether Triton runs kernels in its CPU interpreter
  (``TRITON_INTERPRET=1``). Read at call time, never frozen at import.
- ``pick(gpu=..., interpreter=...)``: the value meant for how kernels run now;
  every launch setting that differs between the two comes through it.
- ``launch_autotuned(tuned, grid, args, meta, interpreter_config=)``: launches a
  ``triton.autotune`` wrapper over GPU configs; under the interpreter, which
  cannot benchmark, its plain kernel with one small config.
- ``on_device(t)``: makes t's CUDA device the current one for a launch.
- ``with_descriptor_scratch(device, fn, *args)``: runs launches of kernels that
  build TMA descriptors on the device, which need scratch memory from an allocator.
- ``round_to(x, dtype)`` (in kernels): fp32 to a storage dtype, rounded to
  nearest even under the interpreter as on the GPU.
- ``interpreter_problem()``: why this Triton's interpreter cannot run here, or None.

Dropout probability: a finite real p with 0 <= p < 1 whose float32 rounding is
below 1 too (the kernels compare and scale in float32: p = 1 - 1e-8 rounds to
1.0 there, dropping everything and scaling by 1 / 0), so p <= 1 - 2**-24.

Dropout seeds: a kernel with dropout draws its mask from Philox keyed by a seed
that lives in a (1,) int64 tensor on the inputs' device and is read inside the
kernel, never on the host. A caller may pass one (the same seed, the same mask);
without one, ``dropout_seed`` draws it from the device's default generator, so
``torch.manual_seed`` makes runs reproducible and each replay of a captured CUDA
graph draws fresh masks.

Constants: ``FLOAT_DTYPES`` (what the kernels compute in) and
``SMEM_BUDGET_BYTES`` (the shared memory a tile configuration may plan for).
"""
import contextlib
import functools
import math
import numbers
import os
import re
import struct
from typing import TypeVar

import torch
import triton
import triton.language as tl

T = TypeVar("T")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Shared memory one block may plan for: an H100/H200 allows 227 KiB per block;
# the rest is left for Triton's own scratch (reductions, layout conversions).
SMEM_BUDGET_BYTES = 200 * 1024


# ----------------------------------------------------------------------------- how kernels run

def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter. Read at every call:
    tests switch it with monkeypatch.setenv. (Whether a kernel object itself is
    interpreted was fixed when `@triton.jit` decorated it.)"""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick(*, gpu: T, interpreter: T) -> T:
    """`interpreter` under Triton's CPU interpreter, else `gpu`, decided now.

    The interpreter runs programs one after another through numpy, so it wants
    few, small programs and one config; the GPU wants the tuned ones."""
    return interpreter if interpreting() else gpu


def launch_autotuned(tuned, grid, args, meta: dict, *, interpreter_config) -> None:
    """Launch `tuned` (a `triton.autotune` wrapper over the GPU configs) with
    grid(meta) programs. Under the interpreter, where autotuning over more than
    one config fails ("0 active drivers"), its plain kernel runs with
    `interpreter_config` (a triton.Config) instead."""
    if not interpreting():
        tuned[grid](*args, **meta)
        return
    cfg = interpreter_config
    meta = {**meta, **cfg.kwargs}
    tuned.fn[grid(meta)](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device, which need not be t's: make it so."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def with_descriptor_scratch(device: torch.device, fn, *args, **kwargs):
    """fn(*args, **kwargs), for launches of kernels that build TMA descriptors
    on the device (`tl.make_tensor_descriptor`): those write the descriptors to
    global scratch memory, which Triton asks the allocator of
    `triton.set_allocator` for at each launch. Here PyTorch's caching allocator
    on `device` serves it (stream-ordered, and from the graph's pool while a
    CUDA graph is captured), set in a copy of the current context so that the
    caller's own allocator setting is left as it was."""
    import contextvars

    import triton

    def run():
        triton.set_allocator(
            lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
        return fn(*args, **kwargs)
    return contextvars.copy_context().run(run)


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


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x in `dtype`, rounded to nearest even. For bf16 by integer arithmetic
    (NaN to its quiet NaN), exactly as torch's .to(torch.bfloat16) and the GPU's
    conversion round, because the interpreter's own conversion truncates: a
    bf16 residual stream or weight copy then holds the same bits on a CPU as on
    a GPU."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


# ----------------------------------------------------------------------------- input checks

def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape_text(shape) -> str:
    items = ["*" if s is None else str(s) for s in shape]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def check_device(op: str, arg: str, device: torch.device) -> None:
    """Kernels run on CUDA tensors, and on CPU tensors only in Triton's interpreter
    (TRITON_INTERPRET=1), provided that interpreter works with the installed numpy."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(f"{op}: {problem}")
        return
    raise ValueError(f"{op}: {arg} is on {device}; a CUDA tensor is needed "
                     "(CPU tensors only under TRITON_INTERPRET=1)")


def check_tensor(op: str, arg: str, t, *, dtypes=None, dim: int | None = None,
                 min_dim: int | None = None, shape=None, layout: str | None = None,
                 last_stride_one: bool = False, optional: bool = False) -> None:
    """One tensor argument of a public kernel entry.

    dtypes: the dtypes allowed. dim / min_dim: the exact / least number of
    dimensions. shape: the exact shape, None entries matching any size.
    layout: the dimensions' names for messages, e.g. "(V, C)".
    last_stride_one: the last dimension must have stride 1.
    optional: None is accepted (and nothing else is checked)."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {arg} has dtype {dtype_name(t.dtype)}; supported: "
                        + ", ".join(dtype_name(d) for d in dtypes))
    named = f" {layout}" if layout else ""
    got = f"{arg} has shape {tuple(t.shape)}"
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {got}; expected {dim}-d{named}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{op}: {got}; expected at least {min_dim} dimension"
                         f"{'s' if min_dim != 1 else ''}{named}")
    if shape is not None and (t.dim() != len(shape)
                              or any(e is not None and s != e for s, e in zip(t.shape, shape))):
        raise ValueError(f"{op}: {got}; expected {_shape_text(shape)}{named}")
    if last_stride_one and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {arg} has last-dimension stride {t.stride(-1)}; it must be 1 "
                         "(other strides may be anything)")


def check_same_device(op: str, **tensors) -> None:
    """All tensors given (None skipped) on the first one's device, and that
    device one the kernels run on (`check_device`)."""
    present = [(arg, t) for arg, t in tensors.items() if t is not None]
    first_arg, first = present[0]
    for arg, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{op}: {arg} is on {t.device} but {first_arg} is on {first.device}; "
                             "all tensors must be on one device")
    check_device(op, first_arg, first.device)


def check_same_dtype(op: str, **tensors) -> None:
    """All tensors given (None skipped) in the first one's dtype."""
    present = [(arg, t) for arg, t in tensors.items() if t is not None]
    first_arg, first = present[0]
    for arg, t in present[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{op}: {arg} has dtype {dtype_name(t.dtype)} but {first_arg} has "
                            f"{dtype_name(first.dtype)}; they must match")


def check_dtype(op: str, arg: str, dtype, dtypes) -> None:
    """A dtype argument (e.g. out_dtype) that must be one of `dtypes`."""
    if dtype not in dtypes:
        shown = dtype_name(dtype) if isinstance(dtype, torch.dtype) else repr(dtype)
        raise TypeError(f"{op}: {arg} is {shown}; supported: "
                        + ", ".join(dtype_name(d) for d in dtypes))


def _bounds_text(at_least, below=None, at_most=None) -> str:
    parts = []
    if at_least is not None:
        parts.append(f">= {at_least}")
    if below is not None:
        parts.append(f"< {below}")
    if at_most is not None:
        parts.append(f"<= {at_most}")
    return " and ".join(parts)


def check_real(op: str, arg: str, value, *, at_least: float | None = None,
               below: float | None = None) -> None:
    """A finite real Python number (not a bool, not a tensor) within the bounds."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or (at_least is not None and not value >= at_least)
            or (below is not None and not value < below)):
        bounds = _bounds_text(at_least, below=below)
        raise ValueError(f"{op}: {arg} must be a finite real number{' ' + bounds if bounds else ''}, "
                         f"got {value!r}")


def check_int(op: str, arg: str, value, *, at_least: int | None = None,
              at_most: int | None = None) -> int:
    """A Python or numpy integer (not a bool) within the bounds, returned as a
    Python int: what a kernel launch takes (Triton refuses numpy scalars)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {arg} must be an int, got {type(value).__name__}")
    value = int(value)
    if (at_least is not None and value < at_least) or (at_most is not None and value > at_most):
        raise ValueError(f"{op}: {arg} is {value}; expected an int "
                         f"{_bounds_text(at_least, at_most=at_most)}")
    return value


def check_bool(op: str, arg: str, value) -> None:
    """A Python bool: a string such as "no" would otherwise read as true."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {arg} must be a bool, got {type(value).__name__} {value!r}")


def check_dropout_p(op: str, dropout_p) -> None:
    """A dropout probability the kernels can use: 0 <= p < 1, also once rounded
    to float32 (their precision), so that 1 / (1 - p) stays finite."""
    check_real(op, "dropout_p", dropout_p, at_least=0.0, below=1.0)
    if struct.unpack("f", struct.pack("f", dropout_p))[0] >= 1.0:
        raise ValueError(f"{op}: dropout_p {dropout_p!r} rounds to 1.0 in float32, the kernels' "
                         "precision (1 / (1 - p) would be infinite); the largest usable p is 1 - 2**-24")


def contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` as a kernel indexes a parameter vector, flat from its first element:
    itself when contiguous, else a contiguous copy (autograd maps the gradient
    back to the original's strides, summing over an expanded dimension)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


# ----------------------------------------------------------------------------- autograd

def once_differentiable(op: str):
    """Decorator for an autograd Function's backward that refuses to build a
    graph of the gradients (create_graph=True), in one line naming the op.

    torch.autograd.function.once_differentiable marks the gradients lazily, and
    only when an incoming gradient itself requires grad: it assumes the backward
    is linear in the forward's inputs. A kernel's gradient depends on its inputs
    (LayerNorm, GELU, softmax are not linear), so when the loss is linear in the
    output (the incoming gradient a constant, as in a gradient penalty on
    y.sum()) torch's version returns plain tensors and the second-order term
    through the kernel is silently dropped. Marking every gradient lazily is not
    enough either: autograd.grad(..., inputs) never runs a marking node that has
    no path to those inputs. So the backward refuses when it runs with a graph
    being built -- which is exactly when, and only when, second-order gradients
    can be asked for -- and the first-order backward is untouched."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            if torch.is_grad_enabled():  # autograd turns grad mode on only for create_graph=True
                raise RuntimeError(
                    f"{op}: cannot differentiate twice: its backward is once-differentiable, so a "
                    "gradient through it cannot be taken with create_graph=True (double backward); "
                    "use the PyTorch op (backend torch) for second-order gradients")
            return backward(ctx, *grad_outputs)
        return wrapper
    return decorate


def dropout_seed(op: str, device: torch.device, dropout_p: float, seed):
    """The seed tensor a dropout kernel reads, or None without dropout: `seed` as
    given (checked: int64, shape (1,), on `device`), else one drawn per call."""
    if seed is not None:
        check_tensor(op, "seed", seed, dtypes=(torch.int64,), shape=(1,))
        if seed.device != device:
            raise ValueError(f"{op}: seed is on {seed.device} but the inputs are on {device}; "
                             "it must be on their device")
    if dropout_p == 0:
        return None
    if seed is None:
        seed = torch.randint(0, 2**63 - 1, (1,), device=device, dtype=torch.int64)
    return seed


# ----------------------------------------------------------------------------- gradients

def grad_buffer(param: torch.Tensor | None, accumulate: bool) -> torch.Tensor | None:
    """The `.grad` a backward may add `param`'s gradient into, or None (then the
    gradient goes to autograd): with `accumulate`, the existing .grad of a leaf
    parameter, of its shape, dtype and device and contiguous (the kernels index
    it as flat memory). A tensor computed from a parameter (a contiguous copy
    of a strided one) has no .grad of its own: its gradient goes to autograd."""
    if not accumulate or param is None or not param.is_leaf:
        return None
    g = param.grad
    if (g is None or g.shape != param.shape or g.dtype != param.dtype or g.device != param.device
            or not g.is_contiguous()):
        return None
    return g
