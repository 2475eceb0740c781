"""Ahead-of-time compile check: every Triton kernel the public functions launch,
built for Hopper (sm_90) without a GPU, with what each build costs.

The CPU interpreter accepts code the GPU compiler rejects (type mismatches
across loop iterations, unsupported casts, tiles that need more shared memory
than an H100 has), and it says nothing about registers, so the interpreted unit
tests alone cannot show that the kernels build well on the GPU. Triton compiles
ahead of time for a target given by hand, with the ptxas its wheel bundles;
this tool does that.

How the list of builds is made: the public functions (`flash_attention`,
`flash_attention_qkvpacked`, `layer_norm`, `add_layer_norm`, `linear_gelu`,
`linear`, `mlp`, `embedding`, `linear_cross_entropy`, `FusedAdamW.step`) run
forward and backward on `meta`
tensors (shapes and strides, no data) at GPT-2 shapes, while a recorder stands
in for Triton's launch: each launch is specialised exactly as Triton's JIT
would specialise it for an sm_90 device (pointer dtypes, i32/i64, divisibility
by 16, ints equal to 1), and an autotuned launch becomes one build per
configuration its pruner keeps (with --full, per configuration it has). For
that run `meta` tensors pass the kernels' device rule, the torch.cuda queries
answer as an idle H100 would, and autocast is off on `meta`; nothing of the
kernels themselves is replaced.

Each build reports its shared memory, registers, stack, the bytes of register
spills (local-memory stores and loads in the SASS) and how many of them sit
inside a loop -- a kernel's main loop -- and which `tl.dot`s became Hopper's
warp-group MMA (wgmma); and per main loop (a loop that multiplies matrices):
its matmuls (loop_dots, from the TTGIR), its TMA bulk copies
(`cp.async.bulk.tensor`, loop_tma) and the fewest wgmma groups still in
flight at any of its exponentials (overlap, from the PTX's commits and
waits). The check fails (exit status 1) when a build fails, needs more shared
memory than an H100 has, spills inside a loop, or leaves a 16-bit dot on 64
rows or more off wgmma; and, in 16 bits, when the TMA attention kernels'
main loops load without TMA, when the TMA forward waits for all its wgmma
before the softmax (overlap 0), or when the atomic backward does other than 5
matmuls per block pair (LOOP_EXPECTATIONS). float32 kernels run IEEE dots on
CUDA cores by design: for them spills are reported, not judged.

    python -m bench.compile_check                 # the fast set (CI)
    python -m bench.compile_check --full          # every launch x every config
    python -m bench.compile_check --grep attn --json out/compile.json

The fast set covers every kernel in every dtype and constexpr variant, and
every configuration a pruner keeps for every 16-bit variant (head dim,
causality, dropout, epilogue, ...) in bf16 or fp16, which build alike; the rest
of the cross product (fp16 beside bf16, pruned configs, head dims 16 and 32,
decoding, LayerNorm 8192 wide) only with --full. Run it where TRITON_INTERPRET
is unset.
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent

# Dynamic shared memory one block may use on an H100/H200 (227 KiB).
H100_SMEM_LIMIT = 232448
H100_SM_COUNT = 132
# A dot on this many rows or more must run on wgmma (a warp group's 64-row MMA).
WGMMA_MIN_ROWS = 64
SIXTEEN_BIT = ("bf16", "fp16")


# ============================================================================
# A Hopper stand-in for meta tensors, and the launch recorder
# ============================================================================
@dataclasses.dataclass(frozen=True)
class _DeviceProperties:
    name: str = "NVIDIA H100 80GB HBM3 (simulated)"
    major: int = 9
    minor: int = 0
    multi_processor_count: int = H100_SM_COUNT
    total_memory: int = 80 * 2**30
    shared_memory_per_block_optin: int = H100_SMEM_LIMIT


@contextlib.contextmanager
def simulated_hopper():
    """Within: `meta` tensors pass the kernels' device rule, and the torch.cuda
    queries the launchers make answer as an idle H100 would."""
    import torch

    from gpt2_kernels import _common
    real_check = _common.check_device

    def check_device(op, arg, device):
        if torch.device(device).type != "meta":
            real_check(op, arg, device)

    # The rule is imported by name into the kernel modules: replace every binding.
    modules = [m for name, m in list(sys.modules.items())
               if m is not None and (name == "gpt2_kernels" or name.startswith("gpt2_kernels."))]
    bindings = [(m, attr) for m in modules for attr, value in list(vars(m).items())
                if value is real_check]
    saved = (torch.cuda.get_device_properties, torch.cuda.is_current_stream_capturing,
             torch.is_autocast_enabled, torch.autocast)
    real_is_autocast_enabled, real_autocast = torch.is_autocast_enabled, torch.autocast

    # Autocast knows no `meta` device: it is off there, and turning it off is a no-op.
    def is_autocast_enabled(*args):
        if args and str(args[0]) == "meta":
            return False
        return real_is_autocast_enabled(*args)

    def autocast(device_type, *args, **kwargs):
        if str(device_type) == "meta" and not kwargs.get("enabled", args[1] if len(args) > 1 else True):
            return contextlib.nullcontext()
        return real_autocast(device_type, *args, **kwargs)

    try:
        for m, attr in bindings:
            setattr(m, attr, check_device)
        torch.cuda.get_device_properties = lambda *a, **k: _DeviceProperties()
        torch.cuda.is_current_stream_capturing = lambda: False
        torch.is_autocast_enabled = is_autocast_enabled
        torch.autocast = autocast
        yield
    finally:
        for m, attr in bindings:
            setattr(m, attr, real_check)
        (torch.cuda.get_device_properties, torch.cuda.is_current_stream_capturing,
         torch.is_autocast_enabled, torch.autocast) = saved


@dataclasses.dataclass
class Launch:
    kernel: Any          # the JITFunction or Autotuner that was launched
    args: tuple
    kwargs: dict
    case: str            # which public call made it


@contextlib.contextmanager
def recording_launches(sink: list, case_ref: list):
    """Within: `kernel[grid](...)` appends a Launch to `sink` and runs nothing."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    def record(self, *args, grid=None, warmup=None, **kwargs):
        sink.append(Launch(self, args, kwargs, case_ref[0]))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run = record
    Autotuner.run = record
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


# ============================================================================
# The public calls, at GPT-2 shapes
# ============================================================================
B, T, C, VOCAB, VOCAB_PADDED = 8, 1024, 768, 50257, 50304  # GPT-2 small


def _meta(shape, dtype, requires_grad=False):
    import torch
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=requires_grad)


def _backward(*outputs):
    import torch
    torch.autograd.backward(outputs, [torch.empty_like(o) for o in outputs])


def _cases(full):
    """(label, call) pairs: each call runs public functions forward and backward."""
    import torch

    import gpt2_kernels
    from gpt2_kernels.attention import flash_attention_qkvpacked

    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    dtypes = (bf16, fp16, fp32)
    cases = []

    # Attention: D=64 (GPT-2) and D=128, causal and not; q, k, v as the model
    # makes them, strided views of the qkv projection's output. Each kernel
    # path: the default (TMA forward, atomic backward; float32's is the
    # pointer kernels), deterministic=True (the two-kernel backward) and
    # tma=False (the pointer kernels).
    heads = [(12, 64), (6, 128)] + ([(24, 32), (48, 16)] if full else [])
    paths = {"": {}, " deterministic": {"deterministic": True}, " tma=False": {"tma": False}}
    for dtype in dtypes:
        for H, D in heads:
            for causal in (True, False):
                for path, choice in paths.items():
                    def packed(dtype=dtype, H=H, D=D, causal=causal, choice=choice, p=0.0):
                        qkv = _meta((B, T, 3, H, D), dtype, True)
                        _backward(flash_attention_qkvpacked(qkv, causal=causal, dropout_p=p,
                                                            **choice))

                    def unpacked(dtype=dtype, H=H, D=D, causal=causal, choice=choice):
                        qkv = _meta((B, T, 3, H, D), dtype, True)
                        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
                        _backward(gpt2_kernels.flash_attention(q, k, v, causal=causal, **choice))
                    name = f"{str(dtype)[6:]} H={H} D={D} causal={causal}{path}"
                    cases.append((f"flash_attention_qkvpacked {name}", packed))
                    cases.append((f"flash_attention {name}", unpacked))
                    cases.append((f"flash_attention_qkvpacked dropout_p=0.1 {name}",
                                  lambda packed=packed: packed(p=0.1)))
        if full:
            def decode(dtype=dtype):  # one query against a KV cache
                q = _meta((B, 12, 1, 64), dtype)
                kv = _meta((B, 12, T, 64), dtype)
                gpt2_kernels.flash_attention(q, kv, kv, causal=True)
            cases.append((f"flash_attention decode {str(dtype)[6:]}", decode))

    # LayerNorm and the fused residual add + LayerNorm at the widths of GPT-2
    # small and XL (with --full, wider ones too); under autocast the branch is
    # bf16 and the residual stream fp32.
    widths = [C, 1600] + ([8192] if full else [])
    for dtype in dtypes:
        for width in widths:
            rows = B * T if width == C else 1024
            for bias in (True, False):
                def ln(dtype=dtype, width=width, rows=rows, bias=bias):
                    x = _meta((rows, width), dtype, True)
                    w = _meta((width,), dtype, True)
                    b = _meta((width,), dtype, True) if bias else None
                    _backward(gpt2_kernels.layer_norm(x, w, b))

                def add_ln(dtype=dtype, width=width, rows=rows, bias=bias):
                    x = _meta((rows, width), dtype, True)
                    r = _meta((rows, width), fp32 if dtype != fp32 else dtype, True)
                    w = _meta((width,), fp32, True)
                    b = _meta((width,), fp32, True) if bias else None
                    h, y = gpt2_kernels.add_layer_norm(x, r, w, b, out_dtype=dtype)
                    _backward(h, y)
                    # The last block's h feeds nothing but the final LayerNorm.
                    h, y = gpt2_kernels.add_layer_norm(x, r, w, b, out_dtype=dtype)
                    _backward(y)
                    # Residual dropout, and the first block (no residual yet).
                    seed = _meta((1,), torch.int64)
                    _backward(*gpt2_kernels.add_layer_norm(x, r, w, b, out_dtype=dtype, dropout_p=0.1,
                                                      seed=seed))
                    _backward(*gpt2_kernels.add_layer_norm(x, None, w, b, out_dtype=dtype,
                                                      dropout_p=0.1, seed=seed))
                name = f"{str(dtype)[6:]} C={width} bias={bias}"
                cases.append((f"layer_norm {name}", ln))
                cases.append((f"add_layer_norm {name}", add_ln))

    # The MLP's first linear with GELU, forward and backward, and inference.
    for dtype in dtypes:
        def linear_gelu(dtype=dtype, grad=True):
            x = _meta((B * T, C), dtype, grad)
            w = _meta((4 * C, C), dtype, grad)
            b = _meta((4 * C,), dtype, grad)
            with torch.set_grad_enabled(grad):
                y = gpt2_kernels.linear_gelu(x, w, b)
            if grad:
                _backward(y)
        cases.append((f"linear_gelu {str(dtype)[6:]}", linear_gelu))
        cases.append((f"linear_gelu inference {str(dtype)[6:]}",
                      lambda dtype=dtype: linear_gelu(dtype, grad=False)))

    # The LM head with cross-entropy over GPT-2's padded vocabulary. Meta
    # targets hold no values to check.
    for dtype in dtypes:
        for grad in (True, False):
            def ce(dtype=dtype, grad=grad):
                x = _meta((B * T, C), dtype, grad)
                w = _meta((VOCAB_PADDED, C), dtype, grad)
                targets = _meta((B * T,), torch.int64)
                with torch.set_grad_enabled(grad):
                    loss = gpt2_kernels.linear_cross_entropy(x, w, targets, num_classes=VOCAB,
                                                        check_targets=False)
                if grad:
                    _backward(loss)
            cases.append((f"linear_cross_entropy {str(dtype)[6:]} grad={grad}", ce))

    # The training step's fused path: linear layers and the MLP with fp32 master
    # weights read through 16-bit copies and gradients added into .grad, the
    # embedding, the add+LayerNorm on a bf16 stream, the one-pass cross-entropy
    # with its gradient for a known loss scale. fp32 runs them without copies.
    for dtype in dtypes:
        def params(*shapes, dtype=dtype):
            out = []
            for shape in shapes:
                p = _meta(shape, fp32, True)
                p.grad = torch.empty_like(p)
                out.append(p)
            return out

        def copy(p, dtype=dtype):
            return None if dtype == fp32 else _meta(p.shape, dtype)

        def linear(dtype=dtype):
            for n_out, n_in in ((3 * C, C), (C, C)):
                w, b = params((n_out, n_in), (n_out,))
                x = _meta((B * T, n_in), dtype, True)
                _backward(gpt2_kernels.linear(x, w, b, compute_weight=copy(w), accumulate_grad=True))
            w, b = params((C, C), (C,))  # autograd's path: the gradients handed over
            _backward(gpt2_kernels.linear(_meta((B * T, C), dtype, True), w, b))

        def mlp(dtype=dtype):
            w1, b1, w2, b2 = params((4 * C, C), (4 * C,), (C, 4 * C), (C,))
            x = _meta((B * T, C), dtype, True)
            _backward(gpt2_kernels.mlp(x, w1, b1, w2, b2, fc_compute_weight=copy(w1),
                                       proj_compute_weight=copy(w2), accumulate_grad=True))

        def embedding(dtype=dtype):
            wte, wpe = params((VOCAB_PADDED, C), (T, C))
            idx = _meta((B, T), torch.int64)
            _backward(gpt2_kernels.embedding(idx, wte, wpe, 0, out_dtype=dtype, accumulate_grad=True))

        def stream(dtype=dtype):
            w, b = params((C,), (C,))
            x = _meta((B * T, C), dtype, True)
            r = _meta((B * T, C), dtype, True)
            _backward(*gpt2_kernels.add_layer_norm(x, r, w, b, accumulate_grad=True))

        def ce_step(dtype=dtype):
            (w,) = params((VOCAB_PADDED, C))
            x = _meta((B * T, C), dtype, True)
            targets = _meta((B * T,), torch.int64)
            _backward(gpt2_kernels.linear_cross_entropy(x, w, targets, num_classes=VOCAB, check_targets=False,
                                                        compute_weight=copy(w), grad_output=0.125,
                                                        accumulate_grad=True))
            _backward(gpt2_kernels.linear_cross_entropy(x, w, targets, num_classes=VOCAB, check_targets=False,
                                                        one_pass=False))
        name = str(dtype)[6:]
        cases += [(f"linear {name}", linear), (f"mlp {name}", mlp), (f"embedding {name}", embedding),
                  (f"add_layer_norm {name} stream, accumulate_grad", stream),
                  (f"linear_cross_entropy {name} training step", ce_step)]

    # FusedAdamW over fp32 and bf16 parameters of GPT-2's shapes.
    for dtype in (fp32, bf16):
        def adamw(dtype=dtype):
            params = [torch.nn.Parameter(_meta(s, dtype)) for s in ((VOCAB_PADDED, C), (C,), (C, 3 * C))]
            for p in params:
                p.grad = torch.empty_like(p)
            opt = gpt2_kernels.FusedAdamW(params, lr=6e-4, weight_decay=0.1)
            opt.step()
            if dtype == fp32:  # the training step's: bf16 copies of the matrices, the found_inf flag
                opt.bf16_copies(params[::2])
                opt.found_inf = torch.zeros((), device="meta")
                opt.step()
        cases.append((f"FusedAdamW {str(dtype)[6:]}", adamw))
    return cases


def record(full):
    """Runs the public calls; returns their launches and the cases that failed."""
    sink, case_ref, failed = [], [""], []
    with simulated_hopper(), recording_launches(sink, case_ref):
        for label, call in _cases(full):
            case_ref[0] = label
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - reported as a finding, like a failed build
                failed.append({"case": label, "error": f"{type(exc).__name__}: {exc}"})
    return sink, failed


# ============================================================================
# Builds: one per (launch, autotune configuration), specialised as the JIT would
# ============================================================================
def _jit_of(kernel):
    from triton.runtime.jit import JITFunction
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", 90, 32)


def _specialise(jit, args, kwargs):
    """(signature, constexprs, attrs, options) exactly as JITFunction.run makes
    them, for an sm_90 device."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(_target())
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args,
                                                           specialization, options)
    return signature, constexprs, attrs, options


@dataclasses.dataclass
class Build:
    kernel: str
    jit: Any
    signature: dict
    constexprs: dict
    attrs: dict
    options: Any
    cases: list
    config: int | None        # index in the autotuner's list; None when not autotuned
    n_configs: int | None
    pruned: bool              # the pruner drops it at these shapes (--full only)
    variant: str = ""         # its constexprs, less those the autotune config sets (JSON)

    @property
    def dtype(self):
        """The data dtype: the first 16-bit pointer, else fp32."""
        types = list(self.signature.values())
        return next((t[1:] for t in types if t in ("*bf16", "*fp16")), "fp32")

    def public_constexprs(self):
        """The constexpr arguments by name (Triton keys them by path)."""
        names = [p.name for p in self.jit.params]
        return {names[path[0]]: value for path, value in self.constexprs.items()
                if len(path) == 1 and names[path[0]] in self.signature
                and self.signature[names[path[0]]] == "constexpr"
                and value is not None}

    def key(self):
        return json.dumps([self.kernel, self.signature, {str(k): v for k, v in self.constexprs.items()},
                           {str(k): v for k, v in self.attrs.items()},
                           self.options.num_warps, self.options.num_stages], sort_keys=True, default=str)

    def describe(self):
        consts = self.public_constexprs()
        return (f"{self.kernel} {self.dtype} {consts} warps={self.options.num_warps} "
                f"stages={self.options.num_stages}")


def builds(launches, full):
    """The builds the launches need, deduplicated, and for each autotuned
    (kernel, dtype, variant) the configurations its pruner keeps."""
    from triton.runtime.autotuner import Autotuner
    out, index, kept_configs = [], {}, {}
    for launch in launches:
        jit = _jit_of(launch.kernel)
        variants = []
        if isinstance(launch.kernel, Autotuner):
            tuner = launch.kernel
            tuner.nargs = dict(zip(tuner.arg_names, launch.args))
            kept = tuner.prune_configs(dict(launch.kwargs))
            for i, cfg in enumerate(tuner.configs):
                if cfg in kept or full:
                    variants.append(({**launch.kwargs, **cfg.all_kwargs()}, i, len(tuner.configs),
                                     cfg not in kept, set(cfg.kwargs)))
        else:
            variants.append((dict(launch.kwargs), None, None, False, set()))
        for kwargs, i, n, pruned, tuned_names in variants:
            signature, constexprs, attrs, options = _specialise(jit, launch.args, kwargs)
            build = Build(jit.__name__, jit, signature, constexprs, attrs, options, [launch.case],
                          i, n, pruned)
            build.variant = json.dumps({k: v for k, v in build.public_constexprs().items()
                                        if k not in tuned_names}, sort_keys=True, default=str)
            if i is not None and not pruned:
                kept_configs.setdefault((build.kernel, build.dtype, build.variant), set()).add(i)
            key = build.key()
            if key in index:
                if launch.case not in index[key].cases:
                    index[key].cases.append(launch.case)
            else:
                index[key] = build
                out.append(build)
    return out, kept_configs


def fast_set(all_builds):
    """Every kernel in every dtype and constexpr variant, every configuration
    the pruners keep at least once, and -- where spills and wgmma are judged --
    every kept configuration of every 16-bit variant in one of the two 16-bit
    dtypes (bf16 and fp16 build alike). Greedy set cover over those features,
    so few builds cover them all."""
    def features(b):
        f = {("dtype", b.kernel, b.dtype), ("variant", b.kernel, b.variant)}
        if b.config is not None:
            f.add(("config", b.kernel, b.config))
            if b.dtype in SIXTEEN_BIT:
                f.add(("16-bit variant x config", b.kernel, b.variant, b.config))
        return f
    todo = [(b, features(b)) for b in all_builds if not b.pruned]
    covered, chosen = set(), []
    while todo:
        best = max(range(len(todo)), key=lambda i: len(todo[i][1] - covered))
        b, f = todo.pop(best)
        if not f - covered:
            break
        covered |= f
        chosen.append(b)
    return chosen


# ============================================================================
# Compiling and reading the SASS
# ============================================================================
def _nvidia_tool(name):
    import triton
    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LOCAL_ACCESS = re.compile(r"\b(STL|LDL)((?:\.[A-Z0-9]+)*)")
_BRANCH = re.compile(r"\bBRA\b(?:\.\w+)*\s+(?:`\(([^)]+)\)|(0x[0-9a-f]+))")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}  # else 4 bytes


def sass_report(cubin: bytes):
    """Spill bytes (local stores + loads, per thread, as ptxas counts them) in
    all and inside loops, from the cubin's SASS; None when nvdisasm is missing."""
    tool = _nvidia_tool("nvdisasm")
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-c", f.name], capture_output=True, text=True,
                              timeout=120, check=True).stdout
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label[1])
            continue
        m = _SASS_LINE.search(line)
        if not m:
            continue
        addr = int(m[1], 16)
        for name in pending:
            labels[name] = addr
        pending = []
        instructions.append((addr, m[2]))
    loops = []
    for addr, text in instructions:
        b = _BRANCH.search(text)
        if b:
            target = labels.get(b[1]) if b[1] else int(b[2], 16)
            if target is not None and target <= addr:
                loops.append((target, addr))
    spill = {"STL": 0, "LDL": 0}
    in_loop = 0
    for addr, text in instructions:
        for op, modifiers in _LOCAL_ACCESS.findall(text):
            nbytes = next((_WIDTH[m] for m in modifiers.split(".") if m in _WIDTH), 4)
            spill[op] += nbytes
            if any(lo <= addr <= hi for lo, hi in loops):
                in_loop += nbytes
    return {"spill_store_bytes": spill["STL"], "spill_load_bytes": spill["LDL"],
            "loop_spill_bytes": in_loop, "loops": len(loops)}


def resource_usage(cubin: bytes):
    """Registers and stack frame per thread, from cuobjdump -res-usage."""
    tool = _nvidia_tool("cuobjdump")
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                             timeout=120, check=True).stdout
    usage = {}
    for name in ("REG", "STACK"):
        m = re.search(rf"\b{name}:(\d+)", out)
        if m:
            usage[name.lower()] = int(m.group(1))
    return usage


_DOT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s.*?:\s*(?:tensor|!ttg\.memdesc)<\d+x\d+x(\w+)"
                  r".*->\s*tensor<(\d+)x(\d+)x\w+")


def dots(ttgir: str):
    """Each dot of the kernel: (rows, cols, operand dtype, on wgmma)."""
    found = []
    for line in ttgir.splitlines():
        m = _DOT.search(line)
        if m:
            found.append({"rows": int(m[3]), "cols": int(m[4]), "operand": m[2],
                          "wgmma": m[1] == "ttng.warp_group_dot"})
    return found


_PTX_LABEL = re.compile(r"^\s*(\$L__\w+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_PTX_WGMMA_WAIT = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)")


def ptx_main_loops(ptx: str):
    """The loops of the PTX that multiply matrices (a backward branch's range
    that holds wgmma or mma), each as {"tma": its TMA bulk copies
    (cp.async.bulk.tensor), "overlap": the fewest wgmma groups in flight at any
    of its exp2 (None without both)}."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _PTX_LABEL.match(line)
        if m:
            labels[m[1]] = i
    loops = []
    for i, line in enumerate(lines):
        m = _PTX_BRANCH.search(line)
        if not m or m[1] not in labels or labels[m[1]] >= i:
            continue
        body = lines[labels[m[1]]:i + 1]
        text = "\n".join(body)
        if "wgmma.mma_async" not in text and "mma.sync" not in text:
            continue
        overlap = _pending_at_exp(body) if "wgmma.mma_async" in text else None
        loops.append({"tma": text.count("cp.async.bulk.tensor"), "overlap": overlap})
    return loops


def _pending_at_exp(body):
    """The fewest wgmma groups in flight at an exp2 of a loop body (None when it
    has none), from its commits and waits over two passes, so that groups an
    iteration leaves pending count in the next."""
    pending, fewest = 0, None
    for second in (False, True):
        for line in body:
            if "wgmma.commit_group" in line:
                pending += 1
            m = _PTX_WGMMA_WAIT.search(line)
            if m:
                pending = min(pending, int(m[1]))
            if second and "ex2.approx" in line:
                fewest = pending if fewest is None else min(fewest, pending)
    return fewest


def loop_dots(ttgir: str):
    """How many dots each innermost loop (scf.for) of the TTGIR holds, for the
    loops that hold any: the matrix multiplies one iteration does."""
    counts, open_loops, depth = [], [], 0
    for line in ttgir.splitlines():
        if re.search(r"\bscf\.for\b", line):
            open_loops.append([depth, 0])
        elif open_loops and re.search(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s", line):
            open_loops[-1][1] += 1
        depth += line.count("{") - line.count("}")
        while open_loops and depth <= open_loops[-1][0]:
            opened, n = open_loops.pop()
            if n:
                counts.append(n)
    return counts


def compile_build(b: Build):
    import triton
    from triton.compiler import ASTSource

    result = {"kernel": b.kernel, "dtype": b.dtype, "constexprs": b.public_constexprs(),
              "variant": b.variant,
              "num_warps": b.options.num_warps, "num_stages": b.options.num_stages,
              "config": b.config, "n_configs": b.n_configs, "pruned": b.pruned,
              "cases": b.cases}
    start = time.time()
    try:
        src = ASTSource(b.jit, b.signature, constexprs=b.constexprs, attrs=b.attrs)
        k = triton.compile(src, target=_target(), options=b.options.__dict__)
    except Exception as exc:  # noqa: BLE001 - a failed build is the finding, reported as data
        msg = f"{type(exc).__name__}: {exc}"
        result.update(ok=False, error=msg[-3000:], seconds=round(time.time() - start, 1))
        return result
    result.update(ok=True, shared=int(k.metadata.shared), seconds=round(time.time() - start, 1))
    result.update(resource_usage(k.asm["cubin"]))
    result.update(sass_report(k.asm["cubin"]) or {})
    result["dots"] = dots(k.asm["ttgir"])
    result["loop_dots"] = loop_dots(k.asm["ttgir"])
    result["main_loops"] = ptx_main_loops(k.asm["ptx"])
    return result


# What the main loops of these kernels must show in 16 bits, where their
# speed on Hopper comes from: tiles loaded by TMA; in the forward, a wgmma
# group (the previous block's P V) still running while the softmax's
# exponentials do; in the backward, the 5 matmuls of a block pair in one
# loop (dQ by atomics), where the deterministic path needs 7 in two kernels.
LOOP_EXPECTATIONS = {
    "_attn_fwd_tma": {"tma": True, "overlap": True},
    "_attn_bwd_atomic": {"tma": True, "dots": 5},
}


def _loop_problems(result):
    want = LOOP_EXPECTATIONS.get(result["kernel"], {})
    loops = result.get("main_loops", [])
    found = []
    if want and not loops:
        found.append("has no main loop that multiplies matrices")
    if want.get("tma") and any(loop["tma"] == 0 for loop in loops):
        found.append("a main loop loads without TMA (no cp.async.bulk.tensor)")
    if want.get("overlap") and any((loop["overlap"] or 0) < 1 for loop in loops):
        found.append("a main loop waits for every wgmma group before its softmax")
    if "dots" in want and any(n != want["dots"] for n in result.get("loop_dots", [])):
        found.append(f"{result['loop_dots']} matmuls per main loop, expected {want['dots']}")
    return found


def problems(result):
    """What is wrong with one build, as sentences (empty: nothing)."""
    if not result["ok"]:
        return [f"does not compile: {result['error']}"]
    found = []
    if result["shared"] > H100_SMEM_LIMIT:
        found.append(f"needs {result['shared']} bytes of shared memory (> {H100_SMEM_LIMIT})")
    sixteen = result["dtype"] in SIXTEEN_BIT
    if sixteen and not result["pruned"] and result.get("loop_spill_bytes", 0) > 0:
        found.append(f"spills {result['loop_spill_bytes']} bytes inside its loops")
    for d in result["dots"]:
        if sixteen and d["operand"] in SIXTEEN_BIT and d["rows"] >= WGMMA_MIN_ROWS and not d["wgmma"]:
            found.append(f"a {d['rows']}x{d['cols']} {d['operand']} dot does not use wgmma")
    if sixteen and not result["pruned"]:
        found += _loop_problems(result)
    return found


# ============================================================================
# Command line
# ============================================================================
_COLUMNS = ("kernel", "dtype", "variant", "tile", "warps", "stages", "smem", "regs", "stack",
            "spill", "loop_spill", "wgmma", "loop_dots", "loop_tma", "overlap", "s")


def _row(r):
    consts = dict(r["constexprs"])
    tile = "x".join(str(consts.pop(k)) for k in ("BLOCK_M", "BLOCK_N") if k in consts) or "-"
    variant = ",".join(f"{k}={v}" for k, v in consts.items() if k not in ("PRECISION",)) or "-"
    if not r["ok"]:
        return [r["kernel"], r["dtype"], variant, tile, r["num_warps"], r["num_stages"],
                "FAILED", "", "", "", "", "", "", "", "", r["seconds"]]
    big = [d for d in r["dots"] if d["rows"] >= WGMMA_MIN_ROWS]
    wg = f"{sum(d['wgmma'] for d in big)}/{len(big)}" if big else "-"
    spill = r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0)
    loops = r.get("main_loops", [])

    def per_loop(values):
        return ",".join("-" if v is None else str(v) for v in values) or "-"
    return [r["kernel"], r["dtype"], variant, tile, r["num_warps"], r["num_stages"],
            r["shared"], r.get("reg", ""), r.get("stack", ""), spill, r.get("loop_spill_bytes", ""),
            wg, per_loop(r.get("loop_dots", [])), per_loop(loop["tma"] for loop in loops),
            per_loop(loop["overlap"] for loop in loops), r["seconds"]]


def table(results):
    rows = [list(_COLUMNS)] + [[str(c) for c in _row(r)] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


_BUILDS: list = []  # filled before the workers fork; they compile by index


def _compile_index(i):
    return compile_build(_BUILDS[i])


def run(full=False, grep=(), jobs=None, list_only=False, progress=None):
    """Records, selects and compiles; returns (results, failed calls, the
    configurations each autotuned variant keeps)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench.compile_check: unset TRITON_INTERPRET (the kernels must be "
                         "built for the GPU, not interpreted)")
    launches, failed = record(full)
    selected, kept = builds(launches, full)
    kept = [{"kernel": k, "dtype": d, "variant": v, "configs": sorted(c)}
            for (k, d, v), c in kept.items()]
    if not full:
        selected = fast_set(selected)
    for pattern in grep:
        selected = [b for b in selected if re.search(pattern, b.describe() + " " + " ".join(b.cases))]
    if list_only:
        return [{"kernel": b.kernel, "describe": b.describe(), "cases": b.cases}
                for b in selected], failed, kept
    _BUILDS[:] = selected
    # Slowest first (attention, wide tiles), so the pool ends evenly.
    order = sorted(range(len(selected)), key=lambda i: (not selected[i].kernel.startswith("_attn"),
                                                        -(selected[i].options.num_warps or 0)))
    results = [None] * len(selected)
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max(1, jobs or os.cpu_count() or 1),
                                                mp_context=ctx) as pool:
        futures = {pool.submit(_compile_index, i): i for i in order}
        for fut in concurrent.futures.as_completed(futures):
            results[futures[fut]] = fut.result()
            if progress:
                progress(results[futures[fut]])
    return results, failed, kept


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.compile_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="every launch x every autotune config, pruned ones too, decoding, "
                             "more head dims")
    parser.add_argument("--grep", action="append", default=[], metavar="REGEX",
                        help="keep builds whose kernel, dtype, constexprs or calling case match "
                             "(repeatable: all must match)")
    parser.add_argument("--json", metavar="OUT", help="write every build's numbers to this file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel builds")
    parser.add_argument("--list", action="store_true", help="print the builds, compile nothing")
    args = parser.parse_args(argv)

    import numpy
    import torch
    import triton
    cache = tempfile.mkdtemp(prefix="compile-check-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every build really runs
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default, said aloud
    sys.path.insert(0, str(REPO))
    started = time.time()
    try:
        def progress(r):
            flag = "" if not problems(r) else "  <-- " + "; ".join(problems(r))[:200]
            print(f"  {r['seconds']:6.1f}s  {_describe(r)}{flag}", file=sys.stderr, flush=True)
        results, failed, kept = run(args.full, args.grep, args.jobs, args.list, progress)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if args.list:
        for r in results:
            print(f"{r['describe']}   <- {', '.join(r['cases'][:3])}")
        for case in failed:
            print(f"FAILED CALL {case['case']}: {case['error']}")
        return 1 if failed else 0
    bad = [(r, p) for r in results for p in problems(r)]
    print(f"triton {triton.__version__}, torch {torch.__version__}, numpy {numpy.__version__}; "
          f"target sm_90; {len(results)} builds in {time.time() - started:.0f} s "
          f"({'full' if args.full else 'fast set'})")
    print(table(results))
    for case in failed:
        print(f"FAILED CALL {case['case']}: {case['error']}")
    for r, p in bad:
        print(f"PROBLEM {_describe(r)}: {p}")
    if args.json:
        out = pathlib.Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"triton": triton.__version__, "torch": torch.__version__,
                                   "full": args.full, "grep": args.grep, "failed_calls": failed,
                                   "kept_configs": kept, "results": results}, indent=1, default=str) + "\n")
    return 1 if bad or failed else 0


def _describe(r):
    consts = ",".join(f"{k}={v}" for k, v in r["constexprs"].items() if k != "PRECISION")
    return f"{r['kernel']} {r['dtype']} [{consts}] w{r['num_warps']} s{r['num_stages']}"


if __name__ == "__main__":
    sys.exit(main())
