"""Every Triton kernel in kernels/ compiles for Hopper (sm_90), checked without a GPU.

The CPU interpreter accepts code the real compiler rejects (type mismatches
across loop iterations, unsupported casts, tiles that need more shared memory
than an H100 has), so the interpreted unit tests alone cannot show that the
kernels build on the GPU. Triton compiles ahead of time for a target given by
hand, with the ptxas its wheel bundles; this file does that.

How the compile list is made: the launchers themselves run on `meta` tensors
at GPT-2 shapes (B=8, T=1024, C=768, 12 heads, V=50304), through the same
autograd Functions the model uses, with every kernel object of kernels/
replaced by a recorder. Each recorded launch becomes one compile per autotune
config, its signature specialised exactly as Triton's JIT would specialise
those arguments (pointer dtypes, i32/i64, divisibility by 16, ints equal to 1).
Configs the kernel's own pruner drops are not compiled (with --full they are,
to show whether pruning them was needed).

Run as a script it prints one JSON object per compile on stdout:
    python tests/test_sm90_compile.py            # the CI subset
    python tests/test_sm90_compile.py --full     # every launch x every config
The test below runs the subset in a subprocess: pytest's own process has
TRITON_INTERPRET=1 set by the root conftest and the kernel modules already
imported in interpreter mode, whereas the compile needs them imported without it.
"""
import json
import os
import pathlib
import platform
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# Dynamic shared memory one block may use on H100/H200 (227 KiB).
H100_SMEM_LIMIT = 232448
# Stack bytes per thread (register spills) a config may use before we call it
# a defect. Measured for sm_90: with Triton 3.6 several 16-bit attention tiles
# spill 1-7 KB (BLOCK_M=16 with 4 warps, and D=128) -- a tuning matter the
# autotuner's timing settles; fp32 attention with the 16-bit (wgmma-sized)
# tiles spilled 8-20 KB and took up to 80 s per compile.
_STACK_LIMIT = 8192
_KERNEL_MODULES = ("kernels.attention", "kernels.layernorm", "kernels.mlp",
                   "kernels.cross_entropy", "kernels.adamw")


# ============================================================================
# The compile script (runs in its own process, TRITON_INTERPRET unset)
# ============================================================================
class _Launch:
    """One launch a launcher made: which module-level kernel object, with what."""

    def __init__(self, module, attr, args, kwargs, label):
        self.module, self.attr, self.args, self.kwargs, self.label = module, attr, args, kwargs, label


class _Recorder:
    """Stands in for a kernel object: `kernel[grid](*args, **kwargs)` is recorded."""

    def __init__(self, module, attr, sink, label_ref):
        self._module, self._attr, self._sink, self._label_ref = module, attr, sink, label_ref

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self._sink.append(_Launch(self._module, self._attr, args, kwargs, self._label_ref[0]))
        return launch


def _kernel_objects(module):
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction
    return {name: obj for name, obj in vars(module).items()
            if isinstance(obj, (JITFunction, Autotuner, Heuristics))}


def _unwrap(obj):
    """Autotuner / Heuristics -> the JITFunction underneath."""
    from triton.runtime.jit import JITFunction
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _meta(shape, dtype, requires_grad=False):
    import torch
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=requires_grad)


def _record(full):
    """Runs the launchers at GPT-2 shapes on meta tensors; returns the launches."""
    import importlib

    import torch

    mods = {name: importlib.import_module(name) for name in _KERNEL_MODULES}
    attn, ln, mlp, ce, adamw = (mods[n] for n in _KERNEL_MODULES)
    sink, label = [], [""]
    saved = {}
    for mname, mod in mods.items():
        for attr, obj in _kernel_objects(mod).items():
            saved[(mname, attr)] = obj
            setattr(mod, attr, _Recorder(mname, attr, sink, label))
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    B, T, C = 8, 1024, 768
    try:
        # --- attention: D=64 (GPT-2) and D=128, causal and not, fwd + bwd.
        att_cases = [(12, 64), (6, 128)] + ([(24, 32)] if full else [])
        for dtype in (bf16, fp16, fp32):
            for H, D in att_cases:
                for causal in (True, False):
                    label[0] = f"attention {dtype} H={H} D={D} causal={causal}"
                    q, k, v = (_meta((B, T, H, D), dtype, True).transpose(1, 2) for _ in range(3))
                    o = attn._FlashAttention.apply(q, k, v, causal, D ** -0.5, None)
                    o.backward(torch.empty_like(o))
            if full:
                # Decoding with a KV cache: one query against T keys.
                label[0] = f"attention decode {dtype}"
                q = _meta((B, 12, 1, 64), dtype)
                kv = _meta((B, 12, T, 64), dtype)
                attn._FlashAttention.apply(q, kv, kv, True, 0.125, None)

        # --- layernorm / fused add+layernorm, widths 768 and 8192 (and the limit).
        for dtype in (bf16, fp16, fp32):
            widths = [768, 8192] + ([65536 // torch.empty((), dtype=dtype).element_size()]
                                    if full else [])
            for width in widths:
                rows = B * T if width == C else 1024
                for bias in (True, False):
                    label[0] = f"layer_norm {dtype} C={width} bias={bias}"
                    x = _meta((rows, width), dtype, True)
                    w = _meta((width,), dtype, True)
                    b = _meta((width,), dtype, True) if bias else None
                    y = ln._LayerNormFn.apply(x, w, b, 1e-5, dtype)
                    y.backward(torch.empty_like(y))
                    label[0] = f"add_layer_norm {dtype} C={width} bias={bias}"
                    r = _meta((rows, width), dtype, True)
                    h, y = ln._AddLayerNormFn.apply(x, r, w, b, 1e-5, dtype)
                    torch.autograd.backward([h, y], [torch.empty_like(h), torch.empty_like(y)])
                    # The last block's h feeds nothing but the final LayerNorm.
                    h, y = ln._AddLayerNormFn.apply(x, r, w, b, 1e-5, dtype)
                    y.backward(torch.empty_like(y))
                    if dtype == fp32:  # the autocast path: fp32 stream, bf16 y
                        label[0] = f"add_layer_norm fp32->bf16 C={width} bias={bias}"
                        h, y = ln._AddLayerNormFn.apply(x, r, w, b, 1e-5, bf16)
                        torch.autograd.backward([h, y], [torch.empty_like(h), torch.empty_like(y)])

        # --- linear_gelu: stored and recomputed pre-activation, cuBLAS pieces.
        for dtype in (bf16, fp16, fp32):
            for recompute in (False, True):
                label[0] = f"linear_gelu {dtype} recompute={recompute}"
                x = _meta((B * T, C), dtype, True)
                w = _meta((4 * C, C), dtype, True)
                b = _meta((4 * C,), dtype, True)
                y = mlp._LinearGelu.apply(x, w, b, recompute, mlp.MatmulBackends())
                y.backward(torch.empty_like(y))
            label[0] = f"linear_gelu {dtype} inference"
            mlp._forward(x.detach(), w.detach(), b.detach(), store_pre=False, backend="triton")
            label[0] = f"linear_gelu {dtype} torch forward"
            y = mlp._LinearGelu.apply(x, w, b, True, mlp.MatmulBackends(forward="torch"))
            y.backward(torch.empty_like(y))

        # --- linear + cross-entropy over GPT-2's padded vocabulary. Autocast
        # knows no `meta` device; the launcher asks whether it is on.
        real_autocast = torch.is_autocast_enabled
        torch.is_autocast_enabled = lambda *a: False if a and a[0] == "meta" else real_autocast(*a)
        for dtype in (bf16, fp16, fp32):
            for grad in (True, False):
                label[0] = f"linear_cross_entropy {dtype} grad={grad}"
                x = _meta((B * T, C), dtype, grad)
                w = _meta((50304, C), dtype, grad)
                targets = _meta((B * T,), torch.int64)
                with torch.set_grad_enabled(grad):
                    ce._LinearCrossEntropy.apply(x, w, targets, -100, 50257, None, grad, grad)
        label[0] = "linear_cross_entropy int32 targets"
        ce._LinearCrossEntropy.apply(x, w, _meta((B * T,), torch.int32), -100, 50257, None,
                                     False, False)
        torch.is_autocast_enabled = real_autocast

        # --- FusedAdamW over fp32 and bf16 parameters. Its constructor refuses
        # meta tensors; the device rule is lifted for construction only.
        for dtype in (fp32, bf16):
            label[0] = f"FusedAdamW {dtype}"
            params = [torch.nn.Parameter(_meta(s, dtype)) for s in ((50304, C), (C,), (C, 3 * C))]
            for p in params:
                p.grad = torch.empty_like(p)
            real = adamw._check_device
            adamw._check_device = lambda *args: None
            try:
                opt = adamw.FusedAdamW(params, lr=6e-4, weight_decay=0.1)
            finally:
                adamw._check_device = real
            opt.step()
    finally:
        for (mname, attr), obj in saved.items():
            setattr(mods[mname], attr, obj)
    return sink, {n: m for n, m in mods.items()}


def _specialize(value, specialize, align):
    """(signature type, divisibility attribute) as Triton's JIT gives them."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend
        return native_specialize_impl(CUDABackend, value, False, specialize, align)
    except ImportError:
        pass
    # Fallback mirroring Triton 3.6/3.9's rules.
    import torch
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        ty = "i32" if -2**31 <= value < 2**31 else "i64"
        return ty, "D" if specialize and align and value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    if isinstance(value, torch.Tensor):
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32"}
        return "*" + names[value.dtype], "D" if align else ""
    raise TypeError(f"cannot specialise {type(value).__name__}")


def _job(launch, jit, kwargs, options, config_index, pruned, n_configs):
    """A compile job: a picklable description of one kernel specialisation."""
    bound = jit.signature.bind(*launch.args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    dtypes = set()
    for i, param in enumerate(jit.params):
        value = bound.arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        ty, attr = _specialize(value, not param.do_not_specialize,
                               not getattr(param, "do_not_specialize_on_alignment", False))
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[param.name] = value
        elif isinstance(attr, str) and "D" in attr:
            attrs[i] = True
        if ty.startswith("*") and ty[1:] in ("bf16", "fp16", "fp32"):
            dtypes.add(ty[1:])
    # The data dtype: the first floating pointer that is not an fp32 statistic.
    data = next((t[1:] for t in signature.values() if t in ("*bf16", "*fp16")), "fp32")
    return {
        "module": launch.module, "attr": launch.attr, "kernel": jit.__name__,
        "label": launch.label, "dtype": data,
        "signature": signature, "constexprs": constexprs, "divisible16": sorted(attrs),
        "options": options, "config": config_index, "n_configs": n_configs, "pruned": pruned,
    }


def _jobs(launches, mods):
    from triton.runtime.autotuner import Autotuner
    jobs, seen = [], set()
    for launch in launches:
        obj = getattr(mods[launch.module], launch.attr)
        jit = _unwrap(obj)
        kwargs = dict(launch.kwargs)
        if isinstance(obj, Autotuner):
            nargs = dict(zip(obj.arg_names, launch.args))
            prune = getattr(obj, "early_config_prune", None)
            kept = prune(obj.configs, nargs, **kwargs) if prune else obj.configs
            variants = []
            for i, cfg in enumerate(obj.configs):
                options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                variants.append(({**kwargs, **cfg.kwargs}, options, i, cfg not in kept))
        else:
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            variants = [(kwargs, options, None, False)]
        for kw, options, index, pruned in variants:
            job = _job(launch, jit, kw, options, index, pruned,
                       len(obj.configs) if isinstance(obj, Autotuner) else None)
            key = json.dumps([job["module"], job["attr"], job["signature"], job["constexprs"],
                              job["divisible16"], job["options"]], sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                jobs.append(job)
    return jobs


# Constexprs that follow from the dtype or the config, not from the variant.
_NOT_VARIANT = {"PRECISION", "INPUT_PRECISION", "UPCAST", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}


def _features(job):
    variant = json.dumps({k: v for k, v in job["constexprs"].items()
                          if k not in _NOT_VARIANT or job["config"] is None},
                         sort_keys=True, default=str)
    features = {("dtype", job["attr"], job["dtype"]), ("variant", job["attr"], variant)}
    if job["config"] is not None:
        features.add(("config", job["attr"], job["config"]))
    return features


def _subset(jobs):
    """The CI subset: every kernel; each kernel in every dtype and every
    constexpr variant (epilogue, causal, head dim, ...) at least once; every
    autotune config the pruner keeps at least once. Greedy set cover: each
    pick covers the most features not yet covered, so few compiles cover all."""
    todo = [(job, _features(job)) for job in jobs if not job["pruned"]]
    covered, chosen = set(), []
    while todo:
        best = max(range(len(todo)), key=lambda i: len(todo[i][1] - covered))
        job, features = todo.pop(best)
        if not features - covered:
            break
        covered |= features
        chosen.append(job)
    return chosen


def _resource_usage(cubin):
    """Registers, stack and local (spill) bytes per thread from the cubin, via
    the cuobjdump that Triton bundles; {} when it cannot be run."""
    import re
    import tempfile

    import triton
    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True,
                                 text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
    usage = {}
    for name in ("REG", "STACK", "LOCAL"):
        m = re.search(rf"\b{name}:(\d+)", out)
        if m:
            usage[name.lower()] = int(m.group(1))
    return usage


def _compile(job):
    import importlib
    import time

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = _unwrap(getattr(importlib.import_module(job["module"]), job["attr"]))
    attrs = {(i,): [["tt.divisibility", 16]] for i in job["divisible16"]}
    result = {k: job[k] for k in ("kernel", "label", "dtype", "constexprs", "options",
                                  "config", "n_configs", "pruned")}
    start = time.time()
    try:
        src = ASTSource(jit, job["signature"], constexprs=dict(job["constexprs"]), attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(job["options"]))
    except Exception as exc:  # any compile failure is the finding, reported as data
        msg = f"{type(exc).__name__}: {exc}"
        result.update(ok=False, error=msg[-3000:], seconds=round(time.time() - start, 2))
        return result
    result.update(ok=True, shared=int(k.metadata.shared), seconds=round(time.time() - start, 2))
    result.update(_resource_usage(k.asm["cubin"]))
    return result


def main(argv):
    import argparse
    import concurrent.futures
    import shutil
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="every launch x every autotune config (pruned ones too)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--list", action="store_true", help="print the jobs, compile nothing")
    parser.add_argument("--grep", action="append", default=[],
                        help="keep only jobs whose JSON matches this regex (repeatable: all must match)")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the kernels must be built for the GPU")
    # A fresh cache: every kernel is really compiled, every run.
    cache = tempfile.mkdtemp(prefix="sm90-triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, str(REPO))
    try:
        launches, mods = _record(args.full)
        jobs = _jobs(launches, mods)
        if not args.full:
            jobs = _subset(jobs)
        for pattern in args.grep:
            jobs = [j for j in jobs if re.search(pattern, json.dumps(j, default=str))]
        if args.list:
            for job in jobs:
                print(json.dumps(job, default=str))
            return
        # Forked workers inherit the imported kernel modules.
        ctx = __import__("multiprocessing").get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx) as pool:
            for result in pool.map(_compile, jobs):
                print(json.dumps(result, default=str), flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ============================================================================
# The test
# ============================================================================
def _skip_reason():
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"this triton cannot compile ahead of time ({exc})"
    if platform.system() != "Linux":
        return f"triton bundles ptxas only for Linux, not {platform.system()}"
    ptxas = os.environ.get("TRITON_PTXAS_PATH") or str(
        pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")
    if not os.access(ptxas, os.X_OK):
        return f"no ptxas at {ptxas}"
    return None


def _run_compile_script(*extra, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), *extra],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"compile script failed:\n{proc.stderr[-4000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _describe(r):
    return f"{r['kernel']} [{r['label']}] {r['constexprs']} {r['options']}"


@pytest.fixture(scope="module")
def results():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    return _run_compile_script()


def test_every_kernel_dtype_and_config_was_compiled(results):
    kernels = {r["kernel"] for r in results}
    expected = {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq",
                "_ln_fwd_kernel", "_ln_bwd_kernel", "_ln_bwd_reduce_kernel",
                "_matmul_kernel", "_gelu_fwd_kernel", "_gelu_bwd_kernel", "_column_sum_kernel",
                "_ce_fwd_grad_kernel", "_adamw_kernel"}
    assert expected <= kernels, f"never compiled: {sorted(expected - kernels)}"
    for kernel in expected - {"_adamw_kernel"}:
        dtypes = {r["dtype"] for r in results if r["kernel"] == kernel}
        assert dtypes == {"bf16", "fp16", "fp32"}, f"{kernel}: dtypes compiled {dtypes}"
    assert {r["dtype"] for r in results if r["kernel"] == "_adamw_kernel"} == {"bf16", "fp32"}
    for kernel in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        variants = {(r["constexprs"]["HEAD_DIM"], r["constexprs"]["CAUSAL"])
                    for r in results if r["kernel"] == kernel}
        assert variants == {(64, True), (64, False), (128, True), (128, False)}, kernel
    epilogues = {r["constexprs"]["EPILOGUE"] for r in results if r["kernel"] == "_matmul_kernel"}
    assert epilogues == {0, 1, 2}
    # Every config of each autotuned kernel's GPU list.
    tuned = {r["kernel"]: r["n_configs"] for r in results if r["config"] is not None}
    assert set(tuned) == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_matmul_kernel"}
    for kernel, n_configs in tuned.items():
        seen = {r["config"] for r in results if r["kernel"] == kernel}
        assert seen == set(range(n_configs)), f"{kernel}: configs compiled {sorted(seen)}"


def test_every_kernel_compiles_for_sm90(results):
    failed = [f"{_describe(r)}: {r['error']}" for r in results if not r["ok"]]
    assert not failed, "failed to compile for sm_90:\n" + "\n\n".join(failed)


def test_every_kept_config_fits_h100_shared_memory(results):
    too_big = [f"{_describe(r)}: {r['shared']} bytes" for r in results
               if r["ok"] and r["shared"] > H100_SMEM_LIMIT]
    assert not too_big, (f"configs the pruners keep need more than {H100_SMEM_LIMIT} bytes of "
                         "shared memory:\n" + "\n".join(too_big))


def test_no_config_spills_pathologically(results):
    """Some spilling at 255 registers is a tuning matter (see _STACK_LIMIT);
    more than 8 KB per thread makes a config useless and its compile slow."""
    spills = [f"{_describe(r)}: {r['stack']} bytes of stack, {r.get('local', 0)} local"
              for r in results if r["ok"] and (r.get("stack", 0) > _STACK_LIMIT
                                               or r.get("local", 0) > _STACK_LIMIT)]
    assert not spills, "register spills:\n" + "\n".join(spills)


if __name__ == "__main__":
    main(sys.argv[1:])
