"""The comparisons: each builder returns a `Case` (bench/harness.py) whose subject
is ours and whose peers are what a user would pick instead, on the same inputs:
PyTorch's own op (and for attention SDPA with each of its backends), Liger-Kernel's
Triton kernels where that package is installed (the optional `peers` extra),
torch's fused AdamW, and for the training step the PyTorch path eager and under
torch.compile.

Used by the pytest-benchmark suites (one file per op) and by `bench/report.py`,
so a shape or a check lives in one place. Kernels are reached only through the
names `gpt2_kernels/__init__.py` exports, the model only through `engine`'s public API,
and both inside `make`: a variant that cannot be built here is `Unavailable`, with
the reason.

GPU cases are bf16 at GPT-2 124M training shapes; their references are computed
in fp32 (fp64 for the optimizer) from the same inputs. The CPU group measures the
engine's own Python-side pieces (model on the torch path, data loader, tokenizer).
"""
from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F

from bench.harness import Case, CheckFailed, Unavailable, flatten
from bench.work import (adamw_bytes, attention_bytes, attention_flops, cross_entropy_work,
                        gpt_flops_per_token, layernorm_bytes, linear_gelu_work, mlp_work, rotation_count)

EPS = 1e-5
ROWS = 16 * 1024                       # B*T of a GPT-2 micro-batch of 16 x 1024
LN_WIDTHS = (768, 1024, 2048, 4096, 8192)
ATTN_MAIN = dict(B=16, H=12, T=1024, D=64)
ATTN_SWEEP_T = (256, 512, 1024, 2048, 4096, 8192)
ATTN_SWEEP_D = (64, 128)
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION"}
# Our attention's other kernel paths, timed beside the default ("ours": the TMA
# forward with the atomic 5-matmul backward on Hopper): the TMA forward with the
# deterministic two-kernel backward, and the pointer kernels (forward and
# deterministic backward) of before TMA. The forward of "ours-deterministic" is
# ours, so forward-only cases leave it out.
ATTN_OWN_PATHS = {"ours-deterministic": {"deterministic": True}, "ours-pointer": {"tma": False}}
ATTN_VARIANTS = ["ours", *ATTN_OWN_PATHS, *SDPA_BACKENDS]
ATTN_SWEEP_VARIANTS = ["ours", *SDPA_BACKENDS]
LN_VARIANTS = ["ours", "torch", "liger"]
MLP_SHAPE = dict(M=ROWS, K=768, N=3072)
CE_SHAPE = dict(N=ROWS, C=768, V=50304, classes=50257)
CE_VARIANTS = ["ours", "ours-two-pass", "torch", "liger"]
MLP_VARIANTS = ["ours", "ours-before", "torch"]
ADAMW_VARIANTS = ["ours", "torch-fused", "torch-foreach"]
# The triton step as the trainer runs it, beside the paths it replaced (GPTConfig's
# residual_dtype and fusions), and the PyTorch path.
TRAIN_TRITON_VARIANTS = {
    "triton": dict(residual_dtype="bf16", fusions="all"),
    "triton-fp32-stream": dict(residual_dtype="fp32", fusions="all"),
    "triton-no-epilogues": dict(residual_dtype="bf16", fusions="cross_entropy,grad_accumulation,bf16_weights"),
    "triton-before": dict(residual_dtype="fp32", fusions="none"),
}
TRAIN_VARIANTS = [*TRAIN_TRITON_VARIANTS, "torch-eager", "torch-compile"]
ADAMW_HYPER = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _gen(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, dtype, device, gen, scale=1.0, shift=0.0, grad=False):
    t = torch.randn(shape, device=device, generator=gen, dtype=torch.float32)
    t = (t * scale + shift).to(dtype)
    return t.requires_grad_(grad)


def _leaf32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().requires_grad_(t.requires_grad)


def _kernels(*names):
    """Public functions of the `gpt2_kernels` package, or Unavailable saying why not."""
    try:
        import gpt2_kernels
        return [getattr(gpt2_kernels, n) for n in names]
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"gpt2_kernels is not usable here ({type(e).__name__}: {e})") from None


def _liger(*names):
    """Liger-Kernel's functional ops, or Unavailable when the package is not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise Unavailable("liger-kernel is not installed (pip install -e '.[peers]')")
    try:
        from liger_kernel.transformers import functional
        return [getattr(functional, n) for n in names]
    except (ImportError, AttributeError) as e:
        raise Unavailable(f"liger-kernel is not usable here ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------
# LayerNorm and residual-add + LayerNorm
# --------------------------------------------------------------------------

def layernorm_case(kind: str, width: int, rows: int = ROWS, fused: bool = False,
                   dtype=torch.bfloat16, device="cuda") -> Case:
    """kind: fwd or fwdbwd. fused: add_layer_norm(x, residual) against x + r then F.layer_norm."""
    if kind not in ("fwd", "fwdbwd"):
        raise ValueError(f"layernorm_case: kind must be fwd or fwdbwd, got {kind!r}")
    grad = kind == "fwdbwd"
    e = torch.tensor([], dtype=dtype).element_size()
    act = rows * width * e
    n_in = (2 if fused else 1) * (2 if grad else 1)  # x (+ residual), (+ dy (+ dh))
    n = rotation_count(n_in * act)
    gen = _gen(device, 0)
    xs = [_randn((rows, width), dtype, device, gen, grad=grad) for _ in range(n)]
    rs = [_randn((rows, width), dtype, device, gen, grad=grad) for _ in range(n)] if fused else None
    dys = [_randn((rows, width), dtype, device, gen) for _ in range(n)] if grad else None
    dhs = [_randn((rows, width), dtype, device, gen) for _ in range(n)] if grad and fused else None
    w = _randn((width,), dtype, device, gen, scale=0.1, shift=1.0, grad=grad)
    b = _randn((width,), dtype, device, gen, scale=0.1, grad=grad)

    def torch_ln(x, w, b):
        return F.layer_norm(x, (width,), w, b, EPS)

    def torch_add_ln(x, r, w, b):
        h = x + r
        return h, F.layer_norm(h, (width,), w, b, EPS)

    def run(ln, add_ln, x, r, w, b, dy, dh):
        if not grad:
            with torch.no_grad():
                return add_ln(x, r, w, b) if fused else ln(x, w, b)
        if fused:
            h, y = add_ln(x, r, w, b)
            return (h, y, *torch.autograd.grad((h, y), (x, r, w, b), (dh, dy)))
        y = ln(x, w, b)
        return (y, *torch.autograd.grad(y, (x, w, b), dy))

    def make(variant):
        if variant == "ours":
            layer_norm, add_layer_norm = _kernels("layer_norm", "add_layer_norm")
            ln = lambda x, w, b: layer_norm(x, w, b, EPS)  # noqa: E731
            add_ln = lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS)  # noqa: E731
        elif variant == "liger":
            # Liger has no residual-add + LayerNorm fusion: its peer adds, then normalises.
            liger_ln = _liger("liger_layer_norm")[0]
            ln = lambda x, w, b: liger_ln(x, w, b, EPS)  # noqa: E731

            def add_ln(x, r, w, b):
                h = x + r
                return h, liger_ln(h, w, b, EPS)
        else:
            ln, add_ln = torch_ln, torch_add_ln

        def fn(i):
            return run(ln, add_ln, xs[i], rs[i] if fused else None, w, b,
                       dys[i] if grad else None, dhs[i] if dhs else None)
        return fn

    def reference():
        return run(torch_ln, torch_add_ln, _leaf32(xs[0]), _leaf32(rs[0]) if fused else None,
                   _leaf32(w), _leaf32(b), dys[0].float() if grad else None,
                   dhs[0].float() if dhs else None)

    name = "add_layernorm" if fused else "layernorm"
    return Case(group=f"{name}-{kind}", params=f"rows={rows} C={width} {_dt(dtype)}",
                variants=list(LN_VARIANTS), baseline="torch", make=make, n_inputs=n,
                reference=reference, bytes=layernorm_bytes(rows, width, e, fused, grad), device=device)


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float", "fp")


# --------------------------------------------------------------------------
# Linear + GELU (the MLP's first half)
# --------------------------------------------------------------------------

def linear_gelu_case(kind: str, M: int = MLP_SHAPE["M"], K: int = MLP_SHAPE["K"],
                     N: int = MLP_SHAPE["N"], dtype=torch.bfloat16, device="cuda") -> Case:
    if kind not in ("fwd", "fwdbwd"):
        raise ValueError(f"linear_gelu_case: kind must be fwd or fwdbwd, got {kind!r}")
    grad = kind == "fwdbwd"
    e = torch.tensor([], dtype=dtype).element_size()
    n = rotation_count((M * K + N * K + (M * N if grad else 0)) * e, limit=4)
    gen = _gen(device, 1)
    xs = [_randn((M, K), dtype, device, gen, grad=grad) for _ in range(n)]
    dys = [_randn((M, N), dtype, device, gen) for _ in range(n)] if grad else None
    w = _randn((N, K), dtype, device, gen, scale=0.02, grad=grad)
    b = _randn((N,), dtype, device, gen, scale=0.02, grad=grad)

    def torch_op(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    def run(op, x, w, b, dy):
        if not grad:
            with torch.no_grad():
                return op(x, w, b)
        y = op(x, w, b)
        return (y, *torch.autograd.grad(y, (x, w, b), dy))

    def make(variant):
        op = _kernels("linear_gelu")[0] if variant == "ours" else torch_op
        return lambda i: run(op, xs[i], w, b, dys[i] if grad else None)

    def reference():
        return run(torch_op, _leaf32(xs[0]), _leaf32(w), _leaf32(b), dys[0].float() if grad else None)

    flops, moved = linear_gelu_work(M, K, N, e, grad)
    return Case(group=f"linear_gelu-{kind}", params=f"{M}x{K}->{N} {_dt(dtype)}",
                variants=["ours", "torch"], baseline="torch", make=make, n_inputs=n,
                reference=reference, flops=flops, bytes=moved, device=device)


def mlp_case(kind: str, M: int = MLP_SHAPE["M"], C: int = MLP_SHAPE["K"], H: int = MLP_SHAPE["N"],
             dtype=torch.bfloat16, device="cuda") -> Case:
    """GPT-2's whole MLP: ours (two Triton matmuls forward, four backward, the GELU
    derivative and the bias gradients in their epilogues) beside the path before it
    (linear_gelu, then cuBLAS for the projection) and PyTorch's three ops."""
    if kind not in ("fwd", "fwdbwd"):
        raise ValueError(f"mlp_case: kind must be fwd or fwdbwd, got {kind!r}")
    grad = kind == "fwdbwd"
    e = torch.tensor([], dtype=dtype).element_size()
    n = rotation_count((2 * M * C + (M * C if grad else 0)) * e, limit=4)
    gen = _gen(device, 7)
    xs = [_randn((M, C), dtype, device, gen, grad=grad) for _ in range(n)]
    dys = [_randn((M, C), dtype, device, gen) for _ in range(n)] if grad else None
    params = [_randn((H, C), dtype, device, gen, scale=0.02, grad=grad),
              _randn((H,), dtype, device, gen, scale=0.02, grad=grad),
              _randn((C, H), dtype, device, gen, scale=0.02, grad=grad),
              _randn((C,), dtype, device, gen, scale=0.02, grad=grad)]

    def torch_op(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)

    def run(op, x, ps, dy):
        if not grad:
            with torch.no_grad():
                return op(x, *ps)
        y = op(x, *ps)
        return (y, *torch.autograd.grad(y, (x, *ps), dy))

    def make(variant):
        if variant == "ours":
            op = _kernels("mlp")[0]
        elif variant == "ours-before":
            linear_gelu = _kernels("linear_gelu")[0]
            op = lambda x, w1, b1, w2, b2: F.linear(linear_gelu(x, w1, b1), w2, b2)  # noqa: E731
        else:
            op = torch_op
        return lambda i: run(op, xs[i], params, dys[i] if grad else None)

    def reference():
        return run(torch_op, _leaf32(xs[0]), [_leaf32(p) for p in params], dys[0].float() if grad else None)

    flops, moved = mlp_work(M, C, H, C, e, grad)
    return Case(group=f"mlp-{kind}", params=f"{M}x{C}->{H}->{C} {_dt(dtype)}",
                variants=list(MLP_VARIANTS), baseline="torch", make=make, n_inputs=n,
                reference=reference, flops=flops, bytes=moved, device=device)


# --------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------

def attention_sweep_shape(T: int, D: int) -> dict:
    """FlashAttention's sweep: 16k tokens per batch, model width 2048."""
    return dict(B=max(1, 16384 // T), H=2048 // D, T=T, D=D)


def attention_case(kind: str, B: int, H: int, T: int, D: int, causal: bool = True,
                   dtype=torch.bfloat16, device="cuda", dropout_p: float = 0.0,
                   own_paths: bool = True) -> Case:
    """kind: fwd, bwd (backward of a retained forward) or fwdbwd. own_paths:
    our other kernel paths (ATTN_OWN_PATHS) beside ours. With dropout_p,
    ours and SDPA both drop attention probabilities; no two draw the same mask, so
    each variant is checked for being unbiased instead: averaged over every
    element, its outputs differ from the no-dropout reference by no more than
    chance allows (dropout's expectation, gradients included, is the plain op)."""
    if kind not in ("fwd", "bwd", "fwdbwd"):
        raise ValueError(f"attention_case: kind must be fwd, bwd or fwdbwd, got {kind!r}")
    grad = kind != "fwd"
    e = torch.tensor([], dtype=dtype).element_size()
    n = rotation_count((4 if grad else 3) * B * H * T * D * e)
    gen = _gen(device, 2)
    qkv = [tuple(_randn((B, H, T, D), dtype, device, gen, grad=grad) for _ in range(3)) for _ in range(n)]
    dos = [_randn((B, H, T, D), dtype, device, gen) for _ in range(n)] if grad else None

    def sdpa(q, k, v, p=dropout_p):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=p)

    def make(variant):
        if variant == "ours" or variant in ATTN_OWN_PATHS:
            flash = _kernels("flash_attention")[0]
            choice = ATTN_OWN_PATHS.get(variant, {})

            def op(q, k, v):
                return flash(q, k, v, causal=causal, dropout_p=dropout_p, **choice)
            ctx = contextlib.nullcontext
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            backend = getattr(SDPBackend, SDPA_BACKENDS[variant])
            op, ctx = sdpa, (lambda: sdpa_kernel(backend))
            try:
                # Forward and backward: a backend may have one and not the other.
                with ctx():
                    o = op(*qkv[0])
                    if grad:
                        torch.autograd.grad(o, qkv[0], dos[0])
                del o
            except (RuntimeError, NotImplementedError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise Unavailable(f"SDPA backend {SDPA_BACKENDS[variant]} cannot run this shape "
                                  f"here: {first}") from None
        if kind == "fwd":
            def fn(i):
                with ctx(), torch.no_grad():
                    return op(*qkv[i])
        elif kind == "bwd":
            with ctx():
                outs = [op(*qkv[i]) for i in range(n)]

            def fn(i):
                with ctx():
                    return torch.autograd.grad(outs[i], qkv[i], dos[i], retain_graph=True)
        else:
            def fn(i):
                with ctx():
                    o = op(*qkv[i])
                    return (o, *torch.autograd.grad(o, qkv[i], dos[i]))
        return fn

    def reference():
        q, k, v = (_leaf32(t) for t in qkv[0])
        o = sdpa(q, k, v, p=0.0)
        if kind == "fwd":
            return o.detach()
        grads = torch.autograd.grad(o, (q, k, v), dos[0].float())
        return grads if kind == "bwd" else (o, *grads)

    def unbiased(variant, outs):
        # E[dropout(P) V] = P V, and so for the gradients: got - ref is noise around 0,
        # neither offset nor proportional to ref (a missing 1 / (1 - p) would make it
        # -p * ref). Both within 6 standard errors, over every element.
        for i, (got, ref) in enumerate(zip(flatten(outs), flatten(case.reference_outputs()))):
            ref = ref.double()
            diff = got.double() - ref
            if not bool(torch.isfinite(diff).all()):
                raise CheckFailed(f"attention {variant} dropout_p={dropout_p}: output {i} is not finite")
            noise = diff.std().item()
            offset, offset_se = diff.mean().item(), noise / diff.numel() ** 0.5
            scale = ((diff * ref).sum() / (ref * ref).sum()).item()
            scale_se = noise / (ref * ref).sum().sqrt().item()
            if abs(offset) > 6 * offset_se or abs(scale) > 6 * scale_se:
                raise CheckFailed(f"attention {variant} dropout_p={dropout_p}: output {i} is biased "
                                  f"(offset {offset:.2e} +- {offset_se:.1e}, relative scale error "
                                  f"{scale:.2e} +- {scale_se:.1e})")

    params = f"B={B} H={H} T={T} D={D}" + (" causal" if causal else "") + (f" p={dropout_p}" if dropout_p else "")
    variants = [v for v in (ATTN_VARIANTS if own_paths else ATTN_SWEEP_VARIANTS)
                if not (kind == "fwd" and v == "ours-deterministic")]
    case = Case(group=f"attention-{kind}" + ("-dropout" if dropout_p else ""), params=f"{params} {_dt(dtype)}",
                variants=variants, baseline="sdpa-flash", make=make, n_inputs=n,
                reference=reference, verify=unbiased if dropout_p else None,
                flops=attention_flops(B, H, T, D, causal, kind),
                bytes=attention_bytes(B, H, T, D, e, kind), device=device,
                meta=dict(B=B, H=H, T=T, D=D, causal=causal, dropout_p=dropout_p))
    return case


# --------------------------------------------------------------------------
# LM head + cross-entropy
# --------------------------------------------------------------------------

def cross_entropy_case(kind: str, N: int = CE_SHAPE["N"], C: int = CE_SHAPE["C"],
                       V: int = CE_SHAPE["V"], classes: int = CE_SHAPE["classes"],
                       dtype=torch.bfloat16, device="cuda") -> Case:
    """linear_cross_entropy against F.linear then F.cross_entropy on fp32 logits
    (what the torch backend does), with V padded rows and `classes` real ones."""
    if kind not in ("fwd", "fwdbwd"):
        raise ValueError(f"cross_entropy_case: kind must be fwd or fwdbwd, got {kind!r}")
    grad = kind == "fwdbwd"
    gen = _gen(device, 3)
    x = _randn((N, C), dtype, device, gen, grad=grad)
    w = _randn((V, C), dtype, device, gen, scale=0.02, grad=grad)
    targets = torch.randint(0, classes, (N,), device=device, generator=gen)
    targets[torch.rand(N, device=device, generator=gen) < 1 / 64] = -100  # a few ignored positions

    def torch_op(x, w, t):
        logits = F.linear(x, w)[:, :classes]
        return F.cross_entropy(logits.float(), t, ignore_index=-100)

    def run(op, x, w):
        if not grad:
            with torch.no_grad():
                return op(x, w, targets)
        loss = op(x, w, targets)
        return (loss, *torch.autograd.grad(loss, (x, w)))

    def make(variant):
        if variant in ("ours", "ours-two-pass"):
            lce = _kernels("linear_cross_entropy")[0]
            # As the model calls it: the ids are checked once upstream, not per call
            # (that check reads a flag back to the host: a sync in every timed call).
            # Two-pass: the logits from cuBLAS, read twice by the loss kernel.
            op = lambda x, w, t: lce(x, w, t, ignore_index=-100, num_classes=classes,  # noqa: E731
                                     check_targets=False, one_pass=variant == "ours")
        elif variant == "liger":
            liger_lce = _liger("liger_fused_linear_cross_entropy")[0]
            # Liger normalises over every row of the weight it is given: the real classes'
            # rows (a view; the padded rows get a zero gradient through the slice).
            op = lambda x, w, t: liger_lce(x, w[:classes], t, ignore_index=-100)  # noqa: E731
        else:
            op = torch_op
        return lambda i: run(op, x, w)

    def reference():
        return run(torch_op, _leaf32(x), _leaf32(w))

    e = torch.tensor([], dtype=dtype).element_size()
    ce_flops, ce_bytes = cross_entropy_work(N, C, V, e, grad)
    return Case(group=f"linear_cross_entropy-{kind}", params=f"N={N} C={C} V={V} ({classes} classes) {_dt(dtype)}",
                variants=list(CE_VARIANTS), baseline="torch", make=make, n_inputs=1,
                reference=reference, flops=ce_flops, bytes=ce_bytes, track_memory=True, device=device)


# --------------------------------------------------------------------------
# AdamW over GPT-2's parameters
# --------------------------------------------------------------------------

def gpt2_param_shapes(preset: str = "gpt2") -> list[tuple[tuple[int, ...], bool]]:
    """(shape, decayed?) of every parameter of a GPT preset (tied weights once)."""
    from engine import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset(preset, vocab_multiple=64, backend="torch"))
    return [(tuple(p.shape), p.dim() >= 2) for p in model.parameters()]


def adamw_case(preset: str = "gpt2", device="cuda", shapes=None) -> Case:
    """One optimizer step over fp32 parameters of GPT-2's shapes, fixed gradients."""
    shapes = shapes or gpt2_param_shapes(preset)
    numel = sum(torch.Size(s).numel() for s, _ in shapes)
    hp = ADAMW_HYPER

    def fresh(dtype):
        gen = _gen(device, 4)
        params = []
        for shape, _ in shapes:
            p = torch.nn.Parameter(_randn(shape, dtype, device, gen, scale=0.02))
            p.grad = _randn(shape, dtype, device, gen, scale=1e-2)
            params.append(p)
        decay = [p for p, (_, d) in zip(params, shapes) if d]
        no_decay = [p for p, (_, d) in zip(params, shapes) if not d]
        groups = [{"params": decay, "weight_decay": hp["weight_decay"]},
                  {"params": no_decay, "weight_decay": 0.0}]
        return params, groups

    def make(variant):
        params, groups = fresh(torch.float32)
        kw = dict(lr=hp["lr"], betas=hp["betas"], eps=hp["eps"])
        if variant == "ours":
            fused_adamw = _kernels("FusedAdamW")[0]
            opt = fused_adamw(groups, weight_decay=hp["weight_decay"], **kw)
        elif variant == "torch-fused":
            opt = torch.optim.AdamW(groups, fused=True, **kw)
        else:
            opt = torch.optim.AdamW(groups, foreach=True, **kw)

        def fn(i):
            opt.step()
            return params
        return fn

    def reference():
        params, groups = fresh(torch.float64)
        torch.optim.AdamW(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], foreach=False).step()
        return params

    return Case(group="adamw-step", params=f"{preset} {numel / 1e6:.1f}M params fp32",
                variants=list(ADAMW_VARIANTS), baseline="torch-fused",
                make=make, reference=reference, bytes=adamw_bytes(numel), tol_floor=1e-6, device=device)


# --------------------------------------------------------------------------
# End-to-end training step
# --------------------------------------------------------------------------

def training_case(batch_size: int = 16, seq_len: int = 1024, preset: str = "gpt2",
                  device="cuda", dropout: float = 0.0) -> Case:
    """One optimizer step of GPT (bf16 autocast, grad clip 1.0, AdamW) through the
    engine's one step function (`engine.step.train_step`), on the same model, batch
    and initial weights: ours is the triton backend with FusedAdamW, its bf16 weight
    copies and, on CUDA, the whole step in a CUDA graph
    (`engine.cuda_graph.GraphedTrainStep`), as the trainer runs it; beside it the
    same with an fp32 residual stream, without the matmul epilogues, and the path
    before every fusion (TRAIN_TRITON_VARIANTS); its peers are the PyTorch path
    (torch backend, torch's fused AdamW) eager and under torch.compile. With
    `dropout` (fine-tuning's setting) every variant drops out as the model does."""
    from engine import GPT, GPTConfig
    from engine.config import Fusions
    B, T = batch_size, seq_len
    base_cfg = GPTConfig.from_preset(preset, vocab_multiple=64, block_size=max(1024, T), dropout=dropout)
    with torch.device("meta"):
        n_params = GPT(GPTConfig.from_dict({**base_cfg.to_dict(), "backend": "torch"})).num_parameters()
    gen = _gen("cpu", 5)
    # (accum=1, B, T) batches, two of them so that consecutive steps see different data.
    xs = [torch.randint(0, base_cfg.vocab_size, (1, B, T), generator=gen) for _ in range(2)]
    ys = [torch.randint(0, base_cfg.vocab_size, (1, B, T), generator=gen) for _ in range(2)]
    opt_kw = dict(lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, device=device)
    device_type = torch.device(device).type
    meta: dict = dict(preset=preset, batch_size=B, seq_len=T, dropout=dropout)

    def build(backend, **variant):
        cfg = GPTConfig.from_dict({**base_cfg.to_dict(), "backend": backend, **variant})
        torch.manual_seed(0)  # the same initial weights for every variant
        with torch.device(device):
            return GPT(cfg)

    def quiet(*a, **k):
        pass

    def eager(model, opt, forward=None):
        from engine.step import autocast_factory, train_step
        autocast = autocast_factory("bf16", device_type)
        xd = [x.to(device) for x in xs]
        yd = [y.to(device) for y in ys]
        forward = model if forward is None else forward  # `or` would call len() on a compiled module

        def fn(i):
            loss, _ = train_step(forward, opt, xd[i], yd[i], grad_clip=1.0, autocast=autocast)
            return loss
        return fn

    def make(variant):
        from engine.optim import configure_optimizer
        if variant not in TRAIN_TRITON_VARIANTS:
            model = build("torch")
            opt = configure_optimizer(model, **opt_kw, kind="torch", log=quiet)
            return eager(model, opt, torch.compile(model) if variant == "torch-compile" else None)
        try:
            model = build("triton", **TRAIN_TRITON_VARIANTS[variant])
            _kernels("FusedAdamW")
        except (ImportError, RuntimeError) as e:
            raise Unavailable(f"triton backend unavailable ({type(e).__name__}: {e})") from None
        meta["optimizer"] = "FusedAdamW"
        graphs = device_type == "cuda"
        copies = Fusions.parse(model.config.fusions).bf16_weights
        opt = configure_optimizer(model, **opt_kw, kind="triton", capturable=graphs, weight_copies=copies,
                                  log=quiet)
        meta["cuda_graphs"] = graphs
        if not graphs:
            return eager(model, opt)
        from engine.cuda_graph import GraphedTrainStep
        from engine.step import autocast_factory
        step = GraphedTrainStep(model, opt, accum=1, batch_size=B, seq_len=T, device=torch.device(device),
                                autocast=autocast_factory("bf16", "cuda", cache_enabled=False),
                                grad_clip=1.0, log=quiet)

        def fn(i):
            loss, _ = step.step(xs[i], ys[i])
            meta["cuda_graphs"] = step.captured
            return loss
        return fn

    def reference():
        from engine.step import autocast_factory
        model = build("torch").eval()  # no dropout: the loss the dropped-out ones scatter around
        with torch.no_grad(), autocast_factory("bf16", device_type)():
            _, loss = model(xs[0][0].to(device), ys[0][0].to(device), return_logits=False)
        return loss.float()

    def verify(variant, loss):
        ref = float(case.reference_outputs())
        got = float(loss)
        # bf16 autocast: the first loss (ln 50257 ~ 10.8 at init) agrees to ~1e-3 relative;
        # dropout moves it by up to ~1e-2 at init.
        if not abs(got - ref) <= (2e-2 if dropout else 3e-3) * abs(ref):
            raise CheckFailed(f"training {variant}: first-step loss {got:.5f} != torch eager's {ref:.5f}")

    def release(variant):
        if variant == "torch-compile":
            torch._dynamo.reset()  # compiled graphs hold the model's memory otherwise

    params = f"{preset} B={B} T={T} bf16" + (f" dropout {dropout}" if dropout else "")
    case = Case(group="train-step", params=params, variants=list(TRAIN_VARIANTS),
                subject="triton", baseline="torch-eager", make=make, reference=reference, verify=verify,
                tokens=B * T, flops_per_token=gpt_flops_per_token(n_params, base_cfg.n_layer,
                                                                  base_cfg.n_embd, T),
                track_memory=True, device=device, release=release, meta=meta)
    return case


# --------------------------------------------------------------------------
# The CPU group
# --------------------------------------------------------------------------

def corpus_text(n_chars: int) -> str:
    """English prose that ships with CPython (pydoc's topics), repeated to n_chars."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    while len(text) < n_chars:
        text += "\n\n" + text
    return text[:n_chars]


def cpu_model_case(tmp_dir, B: int = 4, T: int = 128) -> Case:
    """Forward + backward of the engine's GPT (torch backend) against transformers'
    GPT2LMHeadModel holding the same weights (written by GPT.save_pretrained), on one
    torch thread: about 20 ms a call, so that framework overhead does not dominate."""
    from engine import GPT, GPTConfig
    cfg = GPTConfig(block_size=T, vocab_size=512, n_layer=2, n_head=4, n_embd=128, backend="torch")
    torch.manual_seed(0)
    ours = GPT(cfg)
    gen = _gen("cpu", 6)
    tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen)
    idx = tokens[:, :T].contiguous()
    # transformers shifts labels inside; ignoring our last position makes both
    # losses average the same B*(T-1) predictions.
    targets = tokens[:, 1:].clone()
    targets[:, -1] = -100

    def hf_model():
        try:
            from transformers import GPT2LMHeadModel
        except ImportError as e:
            raise Unavailable(f"transformers is not installed ({e})") from None
        path = f"{tmp_dir}/hf-gpt2"
        ours.save_pretrained(path)
        return GPT2LMHeadModel.from_pretrained(path)

    def make(variant):
        if variant == "engine-torch":
            def fn(i):
                ours.zero_grad(set_to_none=True)
                _, loss = ours(idx, targets, return_logits=False)
                loss.backward()
                return loss.detach()
            return fn
        hf = hf_model()

        def fn(i):
            hf.zero_grad(set_to_none=True)
            loss = hf(input_ids=idx, labels=idx).loss
            loss.backward()
            return loss.detach()
        return fn

    def reference():
        with torch.no_grad():
            return ours(idx, targets, return_logits=False)[1]

    def verify(variant, loss):
        ref = float(case.reference_outputs())
        if not abs(float(loss) - ref) <= 1e-4 * abs(ref):
            raise CheckFailed(f"cpu model {variant}: loss {float(loss):.6f} != engine's {ref:.6f}")

    case = Case(group="cpu-model-fwdbwd", params=f"L=2 C=128 V=512 B={B} T={T} fp32",
                variants=["engine-torch", "transformers"], subject="engine-torch",
                baseline="transformers", make=make,
                reference=reference, verify=verify, tokens=B * T, device="cpu")
    return case


def cpu_loader_case(tmp_dir, B: int = 8, T: int = 256, n_chars: int = 300_000) -> Case:
    """Batches from a memory-mapped uint16 shard against the same tokens held in memory
    (the text source), both through engine.data.build_loader."""
    import numpy as np
    text = corpus_text(n_chars)
    tokens = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)
    text_path = f"{tmp_dir}/corpus.txt"
    shard_path = f"{tmp_dir}/bench_train_000000.bin"

    def make(variant):
        try:
            from engine.data import build_loader, write_shard
        except ImportError as e:
            raise Unavailable(f"engine.data is not usable here ({e})") from None
        if variant == "shard":
            write_shard(shard_path, tokens, vocab_size=256)
            loader = build_loader(shard_path, B, T, split="train", tokenizer="bytes")
        else:
            with open(text_path, "w", encoding="utf-8") as f:
                f.write(text)
            loader = build_loader(text_path, B, T, split="train", tokenizer="bytes", val_fraction=0.0)
        return lambda i: loader.next_batch()

    def verify(variant, batch):
        x, y = batch
        want = torch.from_numpy(tokens[:B * T + 1].astype(np.int64))
        if x.shape != (B, T) or y.shape != (B, T) or x.dtype != torch.int64:
            raise CheckFailed(f"loader {variant}: batch shapes {tuple(x.shape)}, {tuple(y.shape)} "
                              f"dtype {x.dtype}; expected ({B}, {T}) int64")
        if not (torch.equal(x.reshape(-1), want[:-1]) and torch.equal(y.reshape(-1), want[1:])):
            raise CheckFailed(f"loader {variant}: the first batch is not the first B*T+1 tokens")

    return Case(group="cpu-data-loader", params=f"B={B} T={T} bytes tokens", variants=["shard", "text"],
                subject="shard", baseline="text", make=make, verify=verify, tokens=B * T, device="cpu",
                meta={"per_call": "batches"})


def cpu_tokenizer_case(name: str, n_chars: int = 50_000) -> Case:
    """Encoding English prose with one tokenizer (gpt2: the GPT-2 BPE via tiktoken;
    bytes: UTF-8 bytes), timed alone: the two do different work for different models,
    so their throughputs sit side by side without a ratio between them."""
    text = corpus_text(n_chars)

    def make(variant):
        from engine.tokenizer import TokenizerUnavailableError, get_tokenizer
        try:
            tok = get_tokenizer(variant)
        except TokenizerUnavailableError as e:
            raise Unavailable(str(e)) from None
        return lambda i: tok.encode(text)

    def verify(variant, ids):
        from engine.tokenizer import get_tokenizer
        if not ids or get_tokenizer(variant).decode(ids) != text:
            raise CheckFailed(f"tokenizer {variant}: decode(encode(text)) != text")

    return Case(group="cpu-tokenizer", params=f"{name}: {len(text.encode())} bytes of prose",
                variants=[name], subject=name, baseline=name, make=make, verify=verify,
                bytes=len(text.encode()), device="cpu")


# --------------------------------------------------------------------------
# The report's plan
# --------------------------------------------------------------------------

def gpu_plan(quick: bool = False) -> list[tuple[str, object]]:
    """(section, zero-argument builder) for every GPU comparison, cheapest first;
    `quick` keeps the GPT-2 shapes and a short attention sweep."""
    widths = (768,) if quick else LN_WIDTHS
    plan = []
    for fused in (False, True):
        for kind in ("fwd", "fwdbwd"):
            for wd in widths:
                plan.append(("layernorm", lambda k=kind, w=wd, f=fused: layernorm_case(k, w, fused=f)))
    for kind in ("fwd", "fwdbwd"):
        plan.append(("linear_gelu", lambda k=kind: linear_gelu_case(k)))
    for kind in ("fwd", "fwdbwd"):
        plan.append(("mlp", lambda k=kind: mlp_case(k)))
    for kind in ("fwd", "fwdbwd"):
        plan.append(("cross_entropy", lambda k=kind: cross_entropy_case(k)))
    plan.append(("adamw", adamw_case))
    for kind in ("fwd", "bwd", "fwdbwd"):
        plan.append(("attention", lambda k=kind: attention_case(k, **ATTN_MAIN)))
    plan.append(("training", lambda: training_case(16)))
    plan.append(("attention-dropout", lambda: attention_case("fwdbwd", **ATTN_MAIN, dropout_p=0.1)))
    plan.append(("training", lambda: training_case(16, dropout=0.1)))
    sweep_t = (512, 2048, 8192) if quick else ATTN_SWEEP_T
    for kind in (("fwdbwd",) if quick else ("fwd", "fwdbwd")):
        for D in ATTN_SWEEP_D:
            for T in sweep_t:
                plan.append(("attention-sweep",
                             lambda k=kind, t=T, d=D: attention_case(k, **attention_sweep_shape(t, d),
                                                                     own_paths=False)))
    if not quick:
        plan.append(("training", lambda: training_case(32)))
    return plan
