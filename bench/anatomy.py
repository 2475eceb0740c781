"""What one training micro-step launches and moves, recorded on any machine.

`Recorder` is a context manager that records, for everything run inside it:
- every aten op that reaches the dispatcher (a `TorchDispatchMode`, so forward and
  backward alike, autocast's casts included), and
- every Triton kernel launch (a hook on the launch entry points that the kernels'
  `kernel[grid](...)` and `triton.autotune` objects go through, compiled or
  interpreted). With `run_triton=False` a launch is recorded and not executed:
  its outputs stay as the launcher allocated them, which is all a count needs
  (Triton's CPU interpreter takes minutes for a GPT-2-wide step).
Under `fake=True` (torch's FakeTensorMode) nothing runs at all, only shapes flow,
so the real sizes (GPT-2 124M at B16 T1024) are recorded in a fraction of a second.

Each record is classified: `matmul` (aten's mm family and SDPA kernels), `triton`
(a kernel launch; `dot` marks kernels that contain a `tl.dot`), `copy` (a copy or
a dtype cast: `_to_copy`, `copy_`), `stack` (`stack`, `cat`, `clone`), `sync` (a
value read back to the host), `other` (elementwise ops, reductions, fills), and
`free` (views and allocations: no kernel). `launches` counts every record that
starts a device kernel. `bytes` is what the op reads and writes, from its tensors'
sizes (each input read once and each output written once; a Triton launch moves
each tensor argument once). Bytes "outside matmuls" leave out the matmul records
and the Triton kernels with a `tl.dot`.

*Activation-sized*: a tensor whose element count is a multiple of the micro-batch's
token count (B*T) and at least one residual stream (B*T*C). Choose a token count
with a prime factor that no model dimension has (e.g. T=37): then no parameter is
mistaken for an activation, and `token_bytes` (the bytes of tensors that scale
with B*T) extrapolate exactly to other batch shapes (see `extrapolate`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("matmul", "triton", "copy", "stack", "sync", "other", "free")

_MATMUL_OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addbmm", "addbmm_", "matmul",
               "mv", "addmv", "addmv_", "dot", "vdot", "linear", "_scaled_mm", "_int_mm"}
_COPY_OPS = {"_to_copy", "copy_", "copy", "_copy_from", "_copy_from_and_resize"}
_STACK_OPS = {"stack", "cat", "clone", "_cat"}
_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}
_ALLOCATION_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                   "_unsafe_view", "lift_fresh", "alias", "set_", "resize_", "_reshape_alias"}
# Ops that write their output without reading their tensor arguments' values.
_WRITE_ONLY_OPS = {"zero_", "fill_", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like",
                   "new_zeros", "new_ones", "new_full", "normal_", "uniform_", "arange", "randint"}


@dataclass(frozen=True)
class Op:
    """One recorded op or kernel launch."""
    name: str              # "aten.mm.default" or "triton:_ln_fwd_kernel"
    category: str          # one of CATEGORIES
    phase: str             # forward | backward | step
    launches: int          # kernels it starts on a GPU (0 for views and allocations)
    bytes: int             # read + written, from tensor sizes
    token_bytes: int       # the part of `bytes` in tensors that scale with B*T
    activation_sized: bool  # touches a tensor of at least one residual stream (B*T*C)
    dot: bool = False      # a Triton kernel with tl.dot (compute-bound, counted with matmuls)
    shapes: str = ""       # "bf16[37, 768] -> fp32[37, 768]", for messages
    sizes: tuple = ()      # the shapes of the tensors it reads and writes
    param_sized: bool = False  # touches a tensor of a parameter's shape (not one that scales with B*T)

    @property
    def matmul_class(self) -> bool:
        return self.category == "matmul" or self.dot

    def __str__(self) -> str:
        return f"{self.phase} {self.name} {self.shapes}"


def _dtype(t: torch.Tensor) -> str:
    return (str(t.dtype).removeprefix("torch.").replace("bfloat16", "bf16")
            .replace("float", "fp").replace("int64", "i64"))


def _describe(tensors) -> str:
    return ", ".join(f"{_dtype(t)}{list(t.shape)}" for t in tensors)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _source_uses_dot(fn, seen: set) -> bool:
    """Whether a @triton.jit function, or one it calls, contains tl.dot."""
    py = fn
    while not inspect.isfunction(py) and hasattr(py, "fn"):
        py = py.fn
    if not inspect.isfunction(py) or py in seen:
        return False
    seen.add(py)
    try:
        src = inspect.getsource(py)
    except (OSError, TypeError):
        return False
    if re.search(r"\btl\.dot\(|\.dot\(", src):
        return True
    for name, value in py.__globals__.items():
        if re.search(rf"\b{re.escape(name)}\(", src) and hasattr(value, "fn") and value is not fn:
            if _source_uses_dot(value, seen):
                return True
    return False


def _named_args(kernel, args, kwargs) -> dict:
    py = kernel
    while not inspect.isfunction(py) and hasattr(py, "fn"):
        py = py.fn
    names = list(inspect.signature(py).parameters)
    return {**dict(zip(names, args)), **kwargs}


def _cross_entropy_traffic(a: dict) -> dict:
    # The row kernel overwrites its logits with their gradient: read once (with
    # the log-sum-exp from the matmul's pieces) or twice, then written.
    reads = 1 if a.get("LSE_FROM_PARTS") else 2
    return {"logits_ptr": reads + (1 if a.get("COMPUTE_GRAD") else 0)}


def _gather_rows(table: str, rows: str):
    # A gather or scatter touches the rows it is given, not its whole table: at
    # most one row per id (read, and written back where it accumulates).
    def traffic(a: dict) -> dict:
        t = a[table]
        row_bytes = t.shape[-1] * t.element_size()
        times = 2 if a.get("ACCUMULATE") else 1
        return {table: min(a[rows].numel() * row_bytes * times, _nbytes(t) * times) / _nbytes(t)}
    return traffic


# Kernels whose tensors do not each move once: how many times each named one does.
_KERNEL_TRAFFIC = {
    "_ce_fwd_grad_kernel": _cross_entropy_traffic,
    "_embedding_fwd_kernel": _gather_rows("WTE", "IDX"),
    "_token_grad_kernel": _gather_rows("DWTE", "SORTED_IDS"),
}


def _kernel_traffic(name, kernel, args, kwargs, tensors) -> list[int] | None:
    model = _KERNEL_TRAFFIC.get(name)
    if model is None:
        return None
    named = _named_args(kernel, args, kwargs)
    times = model(named)
    by_id = {id(t): times[arg] for arg, t in named.items() if arg in times and isinstance(t, torch.Tensor)}
    return [int(_nbytes(t) * by_id.get(id(t), 1)) for t in tensors]


@functools.lru_cache(maxsize=None)
def _kernel_info(kernel) -> tuple[str, bool]:
    py = kernel
    while not inspect.isfunction(py) and hasattr(py, "fn"):
        py = py.fn
    name = getattr(py, "__name__", type(kernel).__name__)
    return name, _source_uses_dot(kernel, set())


class Recorder(TorchDispatchMode):
    """Records aten ops and Triton launches (see the module docstring).

    tokens, width: the micro-batch's B*T and the model width C, which define what
    is activation-sized. `phase` labels what runs outside autograd's backward
    (which is always "backward"); the caller sets it."""

    def __init__(self, tokens: int, width: int, run_triton: bool = False, param_shapes=()):
        super().__init__()
        self.tokens = tokens
        self.width = width
        self.run_triton = run_triton
        self.param_shapes = {tuple(s) for s in param_shapes}
        self.phase = "step"
        self.ops: list[Op] = []
        self._in_launch = 0
        self._patches: list[tuple[object, str, object]] = []

    # -- classification ---------------------------------------------------------------
    def _phase(self) -> str:
        return "backward" if torch._C._current_autograd_node() is not None else self.phase

    def _scales(self, t: torch.Tensor) -> bool:
        return t.numel() > 0 and t.numel() % self.tokens == 0

    def _add(self, name, category, launches, reads, writes, dot=False, moved_bytes=None):
        """moved_bytes: what each tensor of reads + writes moves, where it is not
        its size once (a Triton kernel's traffic model, _KERNEL_TRAFFIC)."""
        moved = reads + writes
        sizes = moved_bytes if moved_bytes is not None else [_nbytes(t) for t in moved]
        self.ops.append(Op(
            name=name, category=category, phase=self._phase(), launches=launches,
            bytes=sum(sizes),
            token_bytes=sum(n for t, n in zip(moved, sizes) if self._scales(t)),
            activation_sized=any(self._scales(t) and t.numel() >= self.tokens * self.width for t in moved),
            dot=dot, shapes=f"{_describe(reads)} -> {_describe(writes)}" if writes else _describe(reads),
            sizes=tuple(tuple(t.shape) for t in moved),
            param_sized=any(tuple(t.shape) in self.param_shapes and not self._scales(t) for t in moved)))

    # -- aten ops -------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._in_launch:
            return out
        base = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        namespace = getattr(func, "namespace", "aten")
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs and base.endswith("_") and args:
            # In-place ops that return nothing (the _foreach_*_ family) write their first argument.
            outputs = [t for t in tree_flatten(args[0])[0] if isinstance(t, torch.Tensor)]
        if namespace != "aten" or getattr(func, "is_view", False) or base in _ALLOCATION_OPS:
            if not self.run_triton and base.startswith(("empty", "new_empty")):
                # A skipped launch leaves its outputs as allocated: zeros keep the values
                # that decide control flow (a finite loss, say) those of a real step.
                with torch.utils._python_dispatch._disable_current_modes():
                    for t in outputs:
                        if not isinstance(t, FakeTensor):
                            t.zero_()
            self._add(str(func), "free", 0, [], [])
            return out
        if base in _WRITE_ONLY_OPS:
            inputs = []
        else:
            skip = {"out"}
            named = dict(kwargs)
            inputs = [t for k, v in named.items() if k not in skip
                      for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
            positional = [t for t in tree_flatten(list(args))[0] if isinstance(t, torch.Tensor)]
            if base == "copy_":  # the destination is written, not read
                positional = positional[1:]
            inputs = positional + inputs
        if base in _MATMUL_OPS or base.startswith(("_scaled_dot_product", "_flash_attention",
                                                   "_efficient_attention")):
            category = "matmul"
        elif base in _COPY_OPS:
            category = "copy"
        elif base in _STACK_OPS:
            category = "stack"
        elif base in _SYNC_OPS:
            category = "sync"
        else:
            category = "other"
        self._add(str(func), category, 1, inputs, outputs)
        return out

    # -- Triton launches --------------------------------------------------------------
    def _launch(self, original, kernel, args, kwargs):
        if self._in_launch:
            return original(kernel, *args, **kwargs)
        if kwargs.get("warmup"):
            return original(kernel, *args, **kwargs)
        name, dot = _kernel_info(kernel)
        tensors = [t for t in tree_flatten((list(args), kwargs))[0] if isinstance(t, torch.Tensor)]
        self._add(f"triton:{name}", "triton", 1, tensors, [], dot=dot,
                  moved_bytes=_kernel_traffic(name, kernel, args, kwargs, tensors))
        if not self.run_triton:
            return None
        self._in_launch += 1
        try:
            with torch.utils._python_dispatch._disable_current_modes():
                return original(kernel, *args, **kwargs)
        finally:
            self._in_launch -= 1

    def _hook(self, cls):
        original = cls.__dict__["run"]
        recorder = self

        def run(kernel, *args, **kwargs):
            return recorder._launch(original, kernel, args, kwargs)
        self._patches.append((cls, "run", original))
        setattr(cls, "run", run)

    def __enter__(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
        # An autotuner is one launch of the configuration it picks: record it there,
        # so that its trial runs (on a GPU) and the inner launch are not counted.
        classes = [Autotuner, JITFunction]
        try:
            from triton.runtime.interpreter import InterpretedFunction
            classes.append(InterpretedFunction)
        except ImportError:
            pass
        for cls in classes:
            self._hook(cls)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for cls, attr, original in reversed(self._patches):
                setattr(cls, attr, original)
            self._patches.clear()


# --------------------------------------------------------------------------
# A recorded step and its summaries
# --------------------------------------------------------------------------

@dataclass
class Anatomy:
    """The records of one run, with the shape they were taken at."""
    ops: list[Op]
    n_layer: int
    tokens: int
    width: int
    label: str = ""

    def select(self, phase: str | None = None, category: str | None = None) -> list[Op]:
        return [o for o in self.ops if (phase is None or o.phase == phase)
                and (category is None or o.category == category)]

    def launches(self, phase: str | None = None) -> int:
        return sum(o.launches for o in self.select(phase))

    def activation_copies(self, phase: str | None = None) -> list[Op]:
        """Copies, casts, stacks and clones of activation-sized tensors."""
        return [o for o in self.select(phase) if o.category in ("copy", "stack") and o.activation_sized]

    def param_casts(self, phase: str | None = None) -> list[Op]:
        """Copies and casts of parameter-sized tensors (autocast's weight casts,
        their gradients' casts back)."""
        return [o for o in self.select(phase) if o.category == "copy" and o.param_sized and o.launches]

    def grad_adds(self) -> list[Op]:
        """In-place adds onto parameter-sized tensors in the backward: autograd
        accumulating a gradient that a kernel handed over into .grad."""
        return [o for o in self.select("backward") if o.param_sized and o.launches
                and o.name in ("aten.add_.Tensor", "aten.add.Tensor")]

    def bytes_outside_matmuls(self, token_part: bool | None = None) -> int:
        ops = [o for o in self.ops if not o.matmul_class and o.launches]
        if token_part is None:
            return sum(o.bytes for o in ops)
        return sum(o.token_bytes if token_part else o.bytes - o.token_bytes for o in ops)

    def _launches_by(self, key: str, phase: str | None) -> Counter:
        c: Counter = Counter()
        for o in self.select(phase):
            if o.launches:
                c[getattr(o, key)] += o.launches
        return c

    def counts(self, phase: str | None = None) -> Counter:
        """Launches per category."""
        return self._launches_by("category", phase)

    def names(self, phase: str | None = None) -> Counter:
        """Launches per op or kernel name."""
        return self._launches_by("name", phase)


def per_layer(shallow: Anatomy, deep: Anatomy, value) -> tuple[float, float]:
    """(per layer, fixed) of value(anatomy), from two records that differ only in depth:
    every block adds the same ops, so each count is fixed + per_layer * n_layer."""
    dl = deep.n_layer - shallow.n_layer
    if dl <= 0 or shallow.tokens != deep.tokens:
        raise ValueError("per_layer: the deeper record must have more layers and the same tokens")
    slope = (value(deep) - value(shallow)) / dl
    return slope, value(shallow) - slope * shallow.n_layer


@dataclass
class StepFigures:
    """Launches and bytes of a training step of GPT-2's widths at `n_layer` layers and
    `tokens` tokens per micro-batch (see `step_figures` for how they are obtained)."""
    n_layer: int
    tokens: int
    n_params: int
    launches_per_layer: float            # model forward + backward, per block
    launches_fixed: float                # embeddings, final LayerNorm, head and loss
    step_launches_per_micro_step: float  # the step's own, per micro-step (loss scaling, sum)
    step_launches_once: float            # zeroing gradients, clipping, optimizer: once per step
    bytes_per_micro_step: float          # outside matmuls, model forward + backward
    step_bytes_once: float               # outside matmuls, once per step
    activation_copies_per_micro_step: float
    param_casts_per_micro_step: float    # casts of weights or their gradients
    grad_adds_per_micro_step: float      # gradients handed over, then added into .grad
    host_syncs_per_step: int             # values read back to the host (0 lets a CUDA graph capture it)
    variant: str = ""                    # the residual dtype and fusions recorded
    micro_steps: tuple[Anatomy, Anatomy] | None = None  # the two small records, shallow then deep
    direct: Anatomy | None = None        # the micro-step recorded at the full size, shapes only

    @property
    def launches_per_micro_step_from_small_records(self) -> float:
        """fixed + per layer * n_layer: blind to launches that grow with the rows,
        such as the cross-entropy's chunks (the small records make one)."""
        return self.launches_fixed + self.launches_per_layer * self.n_layer + self.step_launches_per_micro_step

    @property
    def launches_per_micro_step(self) -> float:
        """The full-size record's launches where there is one, plus the step's own."""
        if self.direct is None:
            return self.launches_per_micro_step_from_small_records
        return self.direct.launches() + self.step_launches_per_micro_step

    def launches_per_step(self, accum: int = 1) -> float:
        return accum * self.launches_per_micro_step + self.step_launches_once

    def bytes_per_step(self, accum: int = 1) -> float:
        return accum * self.bytes_per_micro_step + self.step_bytes_once


def _n_params(cfg) -> int:
    from engine import GPT
    with torch.device("meta"):
        return GPT(cfg).num_parameters()


def step_figures(n_layer: int = 12, batch_size: int = 16, seq_len: int = 1024, *,
                 depths: tuple[int, int] = (2, 3), record_seq_len: int = 37, dtype: str = "bf16",
                 direct: bool = True, device: str = "cpu", residual_dtype: str = "bf16",
                 fusions: str = "all") -> StepFigures:
    """A bf16 training step of GPT-2 124M's structure (`n_layer` layers, micro-batch
    `batch_size` x `seq_len`), triton backend, FusedAdamW, as the trainer runs it on
    a GPU (by default a bf16 residual stream and every fusion; `residual_dtype` and
    `fusions` as GPTConfig takes them select the paths beside them), from small records:

    - the model's micro-step (forward + backward, gradients already allocated) at two
      depths (`depths`), B=1 and T=`record_seq_len` (prime, see the module docstring),
      shapes only: launches = fixed + per layer * depth; bytes outside matmuls split
      into the part that scales with the tokens (scaled to batch_size * seq_len) and
      the part that does not (per layer + fixed);
    - the step's own ops: `engine.step.train_step` run for real (Triton launches
      recorded, not run) with accum 1 and 2 on a narrow model of the same depths
      (`narrow_config`: the same parameter tensors, so the same ops; fp32 to keep
      it fast): what accum 2 adds beyond a model micro-step is per micro-step, the
      rest once per step. Its bytes are per parameter (zeroing, norms, clipping and
      AdamW touch each parameter a fixed number of times), scaled to the full
      model's parameter count;
    - with `direct`, the full-size micro-step recorded as well, shapes only (a check
      of the extrapolation that also sees size-dependent launches, such as the
      cross-entropy's chunks over rows).

    Recorded with fake tensors on any machine, the launchers take their GPU path
    (the cross-entropy's fp32-output GEMM has a meta kernel, which a CPU build
    of torch lacks for real tensors), so the figures are the GPU's."""
    shallow_l, deep_l = depths
    tokens, rec_tokens = batch_size * seq_len, record_seq_len
    scale = tokens / rec_tokens
    variant = dict(residual_dtype=residual_dtype, fusions=fusions)
    micro = {L: record_micro_step(gpt2_width_config(L, **variant), 1, rec_tokens, dtype=dtype, device=device)
             for L in depths}
    lpl, lfix = per_layer(micro[shallow_l], micro[deep_l], lambda a: a.launches())
    tpl, tfix = per_layer(micro[shallow_l], micro[deep_l], lambda a: a.bytes_outside_matmuls(True))
    ppl, pfix = per_layer(micro[shallow_l], micro[deep_l], lambda a: a.bytes_outside_matmuls(False))
    cpl, cfix = per_layer(micro[shallow_l], micro[deep_l], lambda a: len(a.activation_copies()))
    casts_pl, casts_fix = per_layer(micro[shallow_l], micro[deep_l],
                                    lambda a: sum(o.launches for o in a.param_casts()))
    adds_pl, adds_fix = per_layer(micro[shallow_l], micro[deep_l],
                                  lambda a: sum(o.launches for o in a.grad_adds()))

    per_micro, once, once_bytes_per_param, syncs = [], {}, [], 0
    for L in depths:
        small = narrow_config(L, **variant)
        m = record_micro_step(small, 1, rec_tokens, dtype="fp32", device=device)
        s1 = record_train_step(small, 1, rec_tokens, accum=1, dtype="fp32", device=device)
        s2 = record_train_step(small, 1, rec_tokens, accum=2, dtype="fp32", device=device)
        per_micro.append(s2.launches() - s1.launches() - m.launches())
        once[L] = 2 * s1.launches() - s2.launches()
        once_bytes = 2 * s1.bytes_outside_matmuls() - s2.bytes_outside_matmuls()
        syncs = len(s1.select(category="sync"))
        once_bytes_per_param.append(once_bytes / _n_params(small))
    opl = (once[deep_l] - once[shallow_l]) / (deep_l - shallow_l)
    full_cfg = gpt2_width_config(n_layer, **variant)
    n_params = _n_params(full_cfg)
    return StepFigures(
        n_layer=n_layer, tokens=tokens, n_params=n_params,
        launches_per_layer=lpl, launches_fixed=lfix,
        step_launches_per_micro_step=per_micro[-1],
        step_launches_once=once[shallow_l] + opl * (n_layer - shallow_l),
        bytes_per_micro_step=(tfix + tpl * n_layer) * scale + pfix + ppl * n_layer,
        step_bytes_once=once_bytes_per_param[-1] * n_params,
        activation_copies_per_micro_step=cfix + cpl * n_layer,
        variant=f"residual stream {residual_dtype}, fusions {fusions}",
        param_casts_per_micro_step=casts_fix + casts_pl * n_layer,
        grad_adds_per_micro_step=adds_fix + adds_pl * n_layer,
        host_syncs_per_step=syncs,
        micro_steps=(micro[shallow_l], micro[deep_l]),
        direct=record_micro_step(full_cfg, batch_size, seq_len, dtype=dtype, device=device) if direct else None,
    )


# --------------------------------------------------------------------------
# Driving the model
# --------------------------------------------------------------------------

def gpt2_width_config(n_layer: int, backend: str = "triton", block_size: int = 1024, **overrides):
    """GPT-2 124M's widths (C=768, 12 heads, 50257-token vocabulary padded to 50304)
    at another depth."""
    from engine import GPTConfig
    return GPTConfig.from_preset("gpt2", n_layer=n_layer, vocab_multiple=64, backend=backend,
                                 block_size=block_size, **overrides)


def narrow_config(n_layer: int, backend: str = "triton", **overrides):
    """A model with GPT-2's parameter tensors at a tiny width: for counting what a
    step does per parameter tensor, fast."""
    from engine import GPTConfig
    return GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, vocab_size=64, block_size=64, backend=backend,
                     **overrides)


def _autocast(dtype: str, device_type: str):
    from engine.step import autocast_factory
    return autocast_factory(dtype, device_type)


def _batch(cfg, batch_size, seq_len, device, accum=None):
    shape = (batch_size, seq_len) if accum is None else (accum, batch_size, seq_len)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, shape, generator=gen)
    y = torch.randint(0, cfg.vocab_size, shape, generator=gen)
    return x.to(device), y.to(device)


def record_micro_step(cfg, batch_size: int, seq_len: int, *, device: str = "cpu", dtype: str = "bf16",
                      fake: bool = True, run_triton: bool = False, grads_allocated: bool = True,
                      step_path: bool = True) -> Anatomy:
    """Forward and backward of one micro-batch of a freshly built model of `cfg`
    (the loss as the trainer computes it, return_logits=False), under the engine's
    autocast rule for `dtype`. `fake`: shapes only (nothing runs); otherwise real
    tensors, with Triton launches executed only when `run_triton`.

    `step_path`: as the training step runs it, `GPT.forward_backward` (with the bf16
    weight copies the optimizer keeps, under bf16 on the triton backend); otherwise
    the model called, then `loss.backward()`, as any autograd user would.
    `grads_allocated`: the parameters' gradients exist (zeroed) before the backward,
    as in every step of the trainer after its first (it zeroes them in place so that
    their addresses stay fixed): a kernel then adds into them, or autograd adds
    what a kernel hands over, one extra launch and pass per parameter."""
    from engine import GPT
    from engine.config import Fusions
    from engine.weight_copies import WeightCopies
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    tokens = batch_size * seq_len
    with mode:
        torch.manual_seed(0)
        with torch.device(device):
            model = GPT(cfg)
        if grads_allocated:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        if (step_path and dtype == "bf16" and model.backend == "triton"
                and Fusions.parse(cfg.fusions).bf16_weights):
            model.weight_copies = WeightCopies(model.matmul_weights())
        x, y = _batch(cfg, batch_size, seq_len, device)
        autocast = _autocast(dtype, torch.device(device).type)
        shapes = [p.shape for p in model.parameters()]
        with Recorder(tokens, cfg.n_embd, run_triton=run_triton, param_shapes=shapes) as rec:
            rec.phase = "forward"
            if step_path:
                model.forward_backward(x, y, grad_scale=1.0, autocast=autocast, check_targets=False)
            else:
                with autocast():
                    _, loss = model(x, y, return_logits=False, check_targets=False)
                rec.phase = "backward"
                loss.backward()
    return Anatomy(rec.ops, cfg.n_layer, tokens, cfg.n_embd,
                   label=f"micro-step L={cfg.n_layer} B={batch_size} T={seq_len} {dtype}"
                         + (" (shapes only)" if fake else ""))


def record_train_step(cfg, batch_size: int, seq_len: int, *, accum: int = 1, device: str = "cpu",
                      dtype: str = "bf16", optimizer: str = "triton", grad_clip: float = 1.0,
                      warmup_steps: int = 1) -> Anatomy:
    """One whole training step (`engine.step.train_step`: `accum` micro-steps,
    clipping, the optimizer) of a freshly built model, on real tensors with Triton
    launches recorded but not executed. The step's own ops (zeroing gradients,
    clipping, the update) are what it adds to its micro-steps. `warmup_steps` run
    unrecorded first: the first step has no gradients to zero yet and builds the
    optimizer's state, which later steps do not."""
    from engine import GPT
    from engine.optim import configure_optimizer
    from engine.step import train_step
    tokens = batch_size * seq_len
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg)
    from engine.config import Fusions
    copies = dtype == "bf16" and model.backend == "triton" and Fusions.parse(cfg.fusions).bf16_weights
    opt = configure_optimizer(model, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, device=device,
                              kind=optimizer, weight_copies=copies, log=lambda *a, **k: None)
    xs, ys = _batch(cfg, batch_size, seq_len, device, accum=accum)
    autocast = _autocast(dtype, torch.device(device).type)
    with Recorder(tokens, cfg.n_embd) as warm:  # launches recorded, not run, as below
        for _ in range(warmup_steps):
            train_step(model, opt, xs, ys, grad_clip=grad_clip, autocast=autocast)
    del warm
    with Recorder(tokens, cfg.n_embd) as rec:
        train_step(model, opt, xs, ys, grad_clip=grad_clip, autocast=autocast)
    return Anatomy(rec.ops, cfg.n_layer, tokens, cfg.n_embd,
                   label=f"step accum={accum} L={cfg.n_layer} B={batch_size} T={seq_len} {dtype} {optimizer}")


def table(anatomy: Anatomy, minus: Anatomy | None = None) -> list[str]:
    """Launches per category and phase; with `minus`, what `anatomy` launches beyond
    it (the deeper of two records minus the shallower: one layer's launches)."""
    rows = [("category", "forward", "backward", "step")]
    for cat in CATEGORIES:
        if cat == "free":
            continue
        vals = [anatomy.counts(p)[cat] - (minus.counts(p)[cat] if minus is not None else 0)
                for p in ("forward", "backward", "step")]
        if any(vals):
            rows.append((cat, *(f"{v:g}" for v in vals)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def figures_lines(fig: StepFigures, accums: tuple[int, ...] = (1, 32)) -> list[str]:
    """The figures as text, for the benchmark's output and bench/NOTES.md."""
    gb = 1e9
    lines = [
        f"GPT-2 widths, {fig.n_layer} layers, {fig.n_params / 1e6:.1f}M parameters, "
        f"{fig.tokens} tokens per micro-step, bf16 autocast, triton backend, FusedAdamW, {fig.variant}",
        f"launches per layer (forward + backward): {fig.launches_per_layer:g}",
        f"launches outside the layers (embeddings, final LayerNorm, head, loss): {fig.launches_fixed:g}",
        f"launches the step adds per micro-step: {fig.step_launches_per_micro_step:g}",
        f"launches per micro-step: {fig.launches_per_micro_step:g}"
        + (" (recorded at the full size, below)" if fig.direct is not None else ""),
        f"launches once per step (zeroing gradients, clipping, optimizer): {fig.step_launches_once:g}",
    ]
    lines += [f"launches per step at accum={a}: {fig.launches_per_step(a):g}" for a in accums]
    lines += [
        f"activation-sized copies, casts, stacks and clones per micro-step: "
        f"{fig.activation_copies_per_micro_step:g}",
        f"parameter-sized casts per micro-step: {fig.param_casts_per_micro_step:g}; gradient adds "
        f"per micro-step: {fig.grad_adds_per_micro_step:g}",
        f"host syncs per step (accum=1): {fig.host_syncs_per_step}",
        f"bytes outside matmuls per micro-step: {fig.bytes_per_micro_step / gb:.2f} GB; "
        f"once per step: {fig.step_bytes_once / gb:.2f} GB",
    ]
    lines += [f"bytes outside matmuls per step at accum={a}: {fig.bytes_per_step(a) / gb:.2f} GB"
              for a in accums]
    if fig.direct is not None:
        d = fig.direct
        lines.append(f"check, the full-size model micro-step recorded directly (shapes only): "
                     f"{d.launches()} launches (the small records' per-layer figures make "
                     f"{fig.launches_per_micro_step_from_small_records - fig.step_launches_per_micro_step:g}: "
                     f"they see one cross-entropy chunk of rows, the full size several), "
                     f"{d.bytes_outside_matmuls() / gb:.2f} GB outside matmuls")
    return lines
