"""Every Triton kernel the public functions launch builds well for Hopper (sm_90),
checked without a GPU by `python -m bench.compile_check` (see its docstring).

The tool runs in a child process: pytest's own process has TRITON_INTERPRET=1
set by the root conftest and the kernel modules imported as interpreted
functions, whereas the builds need them imported without it.
"""
import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

from bench.compile_check import problems

REPO = pathlib.Path(__file__).resolve().parent.parent
# A few minutes of compiling: the fast set is a couple of hundred builds.
pytestmark = pytest.mark.slow

# Every kernel and the dtypes it must build in; every autotuned kernel's
# constexpr variants that training reaches.
EXPECTED_DTYPES = {
    "_attn_fwd": {"bf16", "fp16", "fp32"}, "_attn_bwd_preprocess": {"bf16", "fp16", "fp32"},
    "_attn_bwd_dkdv": {"bf16", "fp16", "fp32"}, "_attn_bwd_dq": {"bf16", "fp16", "fp32"},
    # float32 on a GPU takes the pointer kernels (tma=True aside).
    "_attn_fwd_tma": {"bf16", "fp16"}, "_attn_bwd_atomic": {"bf16", "fp16"},
    "_attn_bwd_dq_store": {"bf16", "fp16"},
    "_ln_fwd_kernel": {"bf16", "fp16", "fp32"}, "_ln_bwd_kernel": {"bf16", "fp16", "fp32"},
    "_ln_bwd_reduce_kernel": {"bf16", "fp16", "fp32"},
    "_matmul_kernel": {"bf16", "fp16", "fp32"}, "_gelu_bwd_kernel": {"bf16", "fp16", "fp32"},
    "_column_sum_kernel": {"bf16", "fp16", "fp32"}, "_ce_fwd_grad_kernel": {"bf16", "fp16", "fp32"},
    "_adamw_kernel": {"bf16", "fp32"},
    "_embedding_fwd_kernel": {"bf16", "fp16", "fp32"}, "_token_grad_kernel": {"bf16", "fp16", "fp32"},
    "_position_grad_kernel": {"bf16", "fp16", "fp32"},
}
ATTENTION = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_fwd_tma", "_attn_bwd_atomic")


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


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("compile") / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "bench.compile_check", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=1800,
                          check=False)
    if not out.exists():
        pytest.fail(f"bench.compile_check wrote no report (exit {proc.returncode}):\n"
                    f"{proc.stderr[-4000:]}")
    data = json.loads(out.read_text())
    data["exit_status"] = proc.returncode
    data["stdout"] = proc.stdout
    return data


def _describe(r):
    return f"{r['kernel']} {r['dtype']} {r['constexprs']} w{r['num_warps']} s{r['num_stages']}"


def test_every_public_call_ran(report):
    assert not report["failed_calls"], "public calls that failed on meta tensors:\n" + "\n".join(
        f"{c['case']}: {c['error']}" for c in report["failed_calls"])


def test_every_kernel_dtype_variant_and_config_was_built(report):
    results = report["results"]
    for kernel, dtypes in EXPECTED_DTYPES.items():
        built = {r["dtype"] for r in results if r["kernel"] == kernel}
        assert built == dtypes, f"{kernel}: built in {sorted(built)}, expected {sorted(dtypes)}"
    for kernel in ATTENTION:
        variants = {(r["constexprs"]["HEAD_DIM"], r["constexprs"]["CAUSAL"], r["constexprs"]["DROPOUT"])
                    for r in results if r["kernel"] == kernel}
        assert variants == {(d, c, p) for d in (64, 128) for c in (True, False)
                            for p in (True, False)}, kernel
    # Every configuration a pruner keeps for a 16-bit variant, built in one of
    # the 16-bit dtypes (they build alike): these are judged for spills and wgmma.
    sixteen = ("bf16", "fp16")
    for entry in report["kept_configs"]:
        if entry["dtype"] not in sixteen:
            continue
        built = {r["config"] for r in results if r["kernel"] == entry["kernel"]
                 and r["variant"] == entry["variant"] and r["dtype"] in sixteen}
        missing = set(entry["configs"]) - built
        assert not missing, f"{entry['kernel']} {entry['variant']}: configs {sorted(missing)} not built"


def test_hopper_features_of_the_attention_kernels(report):
    """Every 16-bit build of the TMA forward and of the atomic backward at
    GPT-2's head dim (D=64, causal) -- each configuration their pruners offer
    there -- loads its main loops' tiles by TMA; the forward keeps a wgmma
    group in flight across the softmax, the backward does 5 matmuls per block
    pair; the deterministic path's kernels do the 7 between them (4 + 3)."""
    gpt2 = [r for r in report["results"] if r["ok"] and r["dtype"] in ("bf16", "fp16")
            and r["constexprs"].get("HEAD_DIM") == 64 and r["constexprs"].get("CAUSAL")]
    for kernel, dots in (("_attn_fwd_tma", 2), ("_attn_bwd_atomic", 5), ("_attn_bwd_dkdv", 4),
                         ("_attn_bwd_dq", 3)):
        builds = [r for r in gpt2 if r["kernel"] == kernel]
        assert builds, f"no 16-bit build of {kernel} at D=64, causal"
        for r in builds:
            assert r["loop_dots"] and set(r["loop_dots"]) == {dots}, (_describe(r), r["loop_dots"])
            if kernel in ("_attn_fwd_tma", "_attn_bwd_atomic"):
                assert r["main_loops"] and all(loop["tma"] > 0 for loop in r["main_loops"]), \
                    _describe(r)
            if kernel == "_attn_fwd_tma":
                assert all((loop["overlap"] or 0) >= 1 for loop in r["main_loops"]), _describe(r)


def test_no_build_fails_spills_in_a_loop_or_misses_wgmma(report):
    found = [f"{_describe(r)}: {p}" for r in report["results"] for p in problems(r)]
    assert not found, "\n".join(found) + "\n\n" + report["stdout"][-6000:]
    assert report["exit_status"] == 0, report["stdout"][-6000:]
