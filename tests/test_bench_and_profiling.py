"""The benchmark machinery (bench/common.py, bench/cases.py, bench/report.py) and
engine.profiling: what they measure, check and write, without timing anything."""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from torch.profiler import record_function

from bench import cases
from bench.common import (Case, CheckFailed, Registry, Result, Unavailable, attention_flops, compare,
                          gpt_flops_per_token, metrics_for, rotation_count, slug, time_call)
from engine.config import GPTConfig
from engine.model import GPT
from engine.profiling import profile_training
from tests.helpers import DEVICE, HAS_MATPLOTLIB, ON_GPU, child_env

ROOT = pathlib.Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------

def _tiny_step():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32, backend="torch")
    model = GPT(cfg)
    x = torch.randint(0, 64, (2, 16))
    calls = []

    def run_step(i):
        calls.append(i)
        with record_function("forward"):
            _, loss = model(x, x, return_logits=False)
        with record_function("backward"):
            loss.backward()
    return run_step, calls


def test_profile_training_writes_a_chrome_trace_with_the_step_ranges(tmp_path, capsys):
    run_step, calls = _tiny_step()
    path = profile_training(run_step, tmp_path / "prof", "cpu", wait=1, warmup=1, active=2)
    assert calls == [0, 1, 2, 3]
    assert path == tmp_path / "prof" / "trace.json" and path.is_file()
    trace = json.loads(path.read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "backward"} <= names
    # Only the active steps are recorded: two forward ranges, not four.
    assert sum(1 for e in trace["traceEvents"] if e.get("name") == "forward" and e.get("ph") == "X") == 2
    out = capsys.readouterr().out
    assert "Chrome trace" in out and "aten::" in out
    assert (tmp_path / "prof" / "top_ops.txt").read_text().count("\n") > 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(active=0), "active must be an integer >= 1"),
    (dict(wait=-1), "wait must be an integer >= 0"),
    (dict(warmup=1.5), "warmup must be an integer >= 0"),
])
def test_profile_training_rejects_bad_schedules(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        profile_training(lambda i: None, tmp_path, "cpu", **kwargs)


def test_profile_training_needs_a_callable(tmp_path):
    with pytest.raises(TypeError, match="run_step must be callable"):
        profile_training(None, tmp_path, "cpu")


@pytest.mark.skipif(ON_GPU, reason="checks the error raised where CUDA is absent")
def test_profile_training_cuda_without_a_gpu_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no CUDA device"):
        profile_training(lambda i: None, tmp_path, "cuda")


def test_train_py_profile_writes_the_trace_in_the_run_folder(tmp_path):
    help_text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, env=child_env(),
                               capture_output=True, text=True, timeout=120).stdout
    if "--profile" not in help_text:
        pytest.skip("train.py has no --profile flag")
    data = tmp_path / "corpus.txt"
    data.write_text(cases.corpus_text(20_000))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--model", "tiny", "--n-layer", "1", "--n-head", "2",
           "--n-embd", "32", "--batch-size", "2", "--seq-len", "16", "--max-steps", "10",
           "--data", str(data), "--tokenizer", "bytes", "--device", "cpu", "--backend", "torch",
           "--run-dir", str(run_dir), "--eval-interval", "0", "--sample-interval", "0",
           "--checkpoint-interval", "0", "--profile"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(CUDA_VISIBLE_DEVICES=""), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    trace = run_dir / "trace.json"
    assert trace.is_file(), proc.stdout[-2000:]
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"forward", "backward"} <= names


# --------------------------------------------------------------------------
# The report's entry point and outputs
# --------------------------------------------------------------------------

def test_report_without_cuda_exits_2_with_one_clear_line():
    proc = subprocess.run([sys.executable, "-m", "bench.report", "--quick"], cwd=ROOT,
                          env=child_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and lines[0].startswith("bench.report:")


def _fake_results():
    rs = []
    for T, base_ms, ours_ms in ((512, 1.0, 0.8), (2048, 4.0, 3.0)):
        case = Case("attention-fwdbwd", f"T={T}", ["sdpa-flash", "ours"], "sdpa-flash",
                    make=lambda v: None, flops=1e12, bytes=1e9)
        for variant, ms in (("sdpa-flash", base_ms), ("ours", ours_ms)):
            r = Result(case.group, case.params, variant, case.baseline, ms / 1e3, "pass",
                       metrics_for(case, ms / 1e3, None), base_ms / ms, {"T": T, "D": 64})
            rs.append(r)
    train = Case("train-step", "gpt2 B=16 T=1024 bf16", ["torch-eager", "triton"], "torch-eager",
                 make=lambda v: None, tokens=16384, flops_per_token=1e9)
    rs.append(Result(train.group, train.params, "torch-eager", train.baseline, 0.2, "pass",
                     metrics_for(train, 0.2, None), 1.0))
    rs.append(Result(train.group, train.params, "triton", train.baseline, None, "error: OutOfMemoryError"))
    return rs


def test_report_writes_json_markdown_and_plots(tmp_path):
    from bench import report
    env = {"device": "Fake GPU", "date": "2026-01-01 00:00 UTC", "torch": torch.__version__}
    written = report.write_outputs(tmp_path, env, None, _fake_results(), {"quick": True}, 1.0)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["environment"]["device"] == "Fake GPU" and len(data["results"]) == 6
    md = (tmp_path / "results.md").read_text()
    assert "| op | shape | variant | ms |" in md and "error: OutOfMemoryError" in md
    assert "1.33x" in md  # 4.0 / 3.0
    if HAS_MATPLOTLIB:  # the plots are an optional extra; the tables never are
        assert {"attention_tflops.png", "training_tokens_per_s.png"} <= set(written)
        for name in ("attention_tflops.png", "training_tokens_per_s.png"):
            assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    table = report.text_table(_fake_results())
    assert table.splitlines()[0].split()[:3] == ["op", "shape", "variant"]


def test_report_intermediate_writes_keep_tables_and_autotune_choices(tmp_path, monkeypatch):
    import triton

    from bench import report
    from kernels import attention
    # What a GPU run's autotuner holds after tuning one key: the report must carry it.
    fake = {(1024, 1024, 64, True): triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8,
                                                  num_stages=3)}
    monkeypatch.setattr(attention._attn_fwd_tuned, "cache", fake, raising=False)
    choices = report.autotune_choices()
    assert choices["attention_fwd"] == [{"key": ["1024", "1024", "64", "True"],
                                         "config": str(fake[(1024, 1024, 64, True)])}]
    assert "BLOCK_M: 128" in choices["attention_fwd"][0]["config"]
    env = {"device": "Fake GPU", "date": "2026-01-01 00:00 UTC"}
    written = report.write_outputs(tmp_path, env, None, _fake_results()[:2], {}, 1.0,
                                   plots=False, autotune=choices)
    assert set(written) == {"json", "markdown"} and not list(tmp_path.glob("*.png"))
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["results"]) == 2 and data["autotune"] == choices
    # A later write replaces the tables whole, leaving no temp files behind.
    report.write_outputs(tmp_path, env, None, _fake_results(), {}, 2.0, plots=False)
    assert len(json.loads((tmp_path / "results.json").read_text())["results"]) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


@pytest.mark.skipif(ON_GPU, reason="checks the session script's no-CUDA path")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_gpu_session_script_records_the_environment_and_fails_without_cuda(tmp_path):
    script = str(ROOT / "bench" / "gpu_session.sh")
    bad = subprocess.run(["bash", script, "everything"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: bash bench/gpu_session.sh" in bad.stderr
    out = tmp_path / "out"
    proc = subprocess.run(["bash", script, "report"], cwd=ROOT, capture_output=True, text=True,
                          env=child_env(OUT=str(out), GPU_SESSION_SECONDS="120", PYTHON=sys.executable),
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    env_lines = (out / "environment.txt").read_text()
    assert "| torch " in env_lines and "commit: " in env_lines
    assert "no CUDA GPU" in (out / "report.log").read_text()
    assert "--quick --budget" in proc.stdout and proc.stdout.rstrip().endswith("exit 1")
    assert not (out / "pytest.log").exists()  # the report phase alone ran


def test_report_main_keeps_measurements_when_interrupted(tmp_path, monkeypatch):
    """The whole entry point on CPU with a fake plan: the second comparison is
    interrupted (a deadline's SIGINT); the first stays in the written tables."""
    from bench import report

    def toy():
        return Case("toy", "n=4", ["torch"], "torch", lambda v: (lambda i: torch.ones(4)),
                    reference=lambda: torch.ones(4), device="cpu", bytes=16)

    def interrupted():
        raise KeyboardInterrupt

    plan = [("toy", toy), ("toy-interrupted", interrupted), ("toy-after", toy)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(report, "environment", lambda: {"device": "Fake GPU", "torch": "x",
                                                        "triton": "y", "cuda_runtime": "z"})
    monkeypatch.setattr(report, "measure_ceilings", lambda device: 1 / 0)
    monkeypatch.setattr(cases, "gpu_plan", lambda quick: plan)
    assert report.main(["--out", str(tmp_path)]) == 130
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [(r["group"], r["check"][:4]) for r in rows] == [("toy", "pass"), ("toy-interrupted", "skip"),
                                                            ("toy-after", "skip")]
    assert rows[1]["check"] == "skipped: interrupted" and rows[0]["seconds"] > 0


def test_report_run_case_records_failures_and_continues():
    from bench import report

    def make(variant):
        if variant == "missing":
            raise Unavailable("no such kernel here")
        if variant == "crash":
            raise RuntimeError("boom\nsecond line")
        scale = 1.0 if variant == "torch" else 1.5
        return lambda i: torch.ones(4) * scale

    def build():
        return Case("toy", "n=4", ["torch", "wrong", "missing", "crash"], "torch", make,
                    reference=lambda: torch.ones(4), device="cpu", bytes=16)
    rows = report.run_case("toy", build, None, log=lambda s: None)
    checks = {r.variant: r.check for r in rows}
    assert checks["torch"].startswith("pass") and rows[0].seconds > 0 and rows[0].speedup == 1.0
    assert checks["wrong"].startswith("FAIL") and rows[1].seconds is None
    assert checks["missing"] == "skipped: no such kernel here"
    assert checks["crash"] == "error: RuntimeError: boom"
    broken = report.run_case("toy", lambda: 1 / 0, None, log=lambda s: None)
    assert len(broken) == 1 and broken[0].check.startswith("error: ZeroDivisionError")


def test_gpu_plan_lists_every_comparison_lazily():
    full, quick = cases.gpu_plan(False), cases.gpu_plan(True)
    sections = {s for s, _ in full}
    assert sections == {"layernorm", "linear_gelu", "cross_entropy", "adamw", "attention",
                        "attention-sweep", "training"}
    assert len(quick) < len(full) and all(callable(b) for _, b in full)
    assert sum(s == "attention-sweep" for s, _ in full) == 2 * 2 * len(cases.ATTN_SWEEP_T)


# --------------------------------------------------------------------------
# Measuring: counts, checks, results
# --------------------------------------------------------------------------

def test_work_counts():
    # FlashAttention's count: 4*B*H*T*T*D forward, halved when causal, backward 2.5x.
    assert attention_flops(2, 3, 8, 16, False, "fwd") == 4 * 2 * 3 * 8 * 8 * 16
    assert attention_flops(2, 3, 8, 16, True, "fwd") == 2 * 2 * 3 * 8 * 8 * 16
    assert attention_flops(1, 1, 4, 4, True, "fwdbwd") == 3.5 * attention_flops(1, 1, 4, 4, True, "fwd")
    with pytest.raises(ValueError):
        attention_flops(1, 1, 4, 4, True, "both")
    # llm.c: 6N + 6*L*C*T per token.
    assert gpt_flops_per_token(124_000_000, 12, 768, 1024) == 6 * 124e6 + 6 * 12 * 768 * 1024
    assert rotation_count(10 * 2 ** 20) == 8 and rotation_count(60 * 2 ** 20) == 2
    assert rotation_count(10 ** 9) == 1


def test_metrics_against_ceilings():
    from bench.common import Ceilings
    c = Ceilings(copy_bytes_per_s=2e12, matmul_flops_per_s=500e12)
    mem = Case("g", "p", ["a"], "a", make=None, bytes=2e9)
    m = metrics_for(mem, 2e-3, c)
    assert m["GB_per_s"] == pytest.approx(1000) and m["pct_of_ceiling"] == pytest.approx(50)
    assert m["floor_ms"] == pytest.approx(1.0)
    train = Case("t", "p", ["a"], "a", make=None, tokens=1000, flops_per_token=1e9)
    m = metrics_for(train, 0.01, c)
    assert m["tokens_per_s"] == pytest.approx(1e5) and m["MFU_pct"] == pytest.approx(20)


def test_check_rejects_a_wrong_variant_and_judges_by_the_baselines_error():
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    outputs = {"torch": x.half().double(), "close": x.half().double() + 1e-4, "off": x * 1.01,
               "nan": x * float("nan"), "short": (x, x)}

    case = Case("toy", "n=101", list(outputs), "torch", lambda v: (lambda i: outputs[v]),
                reference=lambda: x, device="cpu")
    assert case.check("torch", case.make("torch")).startswith("pass (baseline")
    assert case.check("close", case.make("close")).startswith("pass")
    for bad in ("off", "nan", "short"):
        with pytest.raises(CheckFailed):
            case.check(bad, case.make(bad))
    ok, detail, _ = compare((x, None), (x, None), (x, None))
    assert ok
    ok, detail, _ = compare((x, x), (x, x), (x, None))
    assert not ok and "expected None" in detail


def test_registry_summary_lists_ratios():
    reg = Registry()
    assert not reg
    reg.add(Result("g", "p", "torch", "torch", 2e-3, "pass", {"GB_per_s": 100.0}, 1.0))
    reg.add(Result("g", "p", "ours", "torch", 1e-3, "pass", {"GB_per_s": 200.0}, 2.0))
    lines = reg.summary_lines()
    assert lines[0].split() == ["group", "params", "variant", "ms", "vs", "baseline", "throughput"]
    assert "baseline" in lines[1] and "2.00x torch" in lines[2] and "200 GB/s" in lines[2]
    assert reg.seconds("g", "p", "ours") == 1e-3 and reg.seconds("g", "p", "x") is None


def test_time_call_and_slug():
    samples = time_call(lambda: sum(range(1000)), "cpu", min_time=0.01, min_reps=3)
    assert len(samples) >= 3 and all(s > 0 for s in samples)
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_cpu_benchmarks_time_and_record_the_cpu_group(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "--benchmark-only", "bench/test_bench_cpu.py",
                           "-p", "no:cacheprovider", "-q", f"--benchmark-json={out}"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "benchmark ratios" in proc.stdout
    assert "cpu-model-fwdbwd" in proc.stdout and "cpu-data-loader" in proc.stdout
    data = json.loads(out.read_text())
    by_name = {b["name"]: b for b in data["benchmarks"]}
    engine = by_name["test_cpu_model_fwdbwd[engine-torch]"]["extra_info"]
    assert engine["tokens_per_s"] > 0 and engine["speedup_vs_transformers"] > 0
    shard = by_name["test_cpu_data_loader[shard]"]["extra_info"]
    assert shard["batches_per_s"] > 0 and shard["speedup_vs_text"] > 0
    assert by_name["test_cpu_tokenizer[bytes]"]["extra_info"]["GB_per_s"] > 0


# --------------------------------------------------------------------------
# The comparisons wire the real kernels correctly (small shapes; the interpreter on CPU)
# --------------------------------------------------------------------------

def _small_cases():
    dt = torch.float32
    d = DEVICE.type
    return {
        "layernorm": lambda: cases.layernorm_case("fwdbwd", 48, rows=6, dtype=dt, device=d),
        "add_layernorm": lambda: cases.layernorm_case("fwdbwd", 48, rows=6, fused=True, dtype=dt, device=d),
        "linear_gelu": lambda: cases.linear_gelu_case("fwdbwd", M=16, K=32, N=32, dtype=dt, device=d),
        # On CUDA, SDPA's flash backend (the baseline) takes 16-bit inputs only.
        "attention": lambda: cases.attention_case("fwdbwd", B=1, H=2, T=32, D=16,
                                                  dtype=torch.bfloat16 if ON_GPU else dt, device=d),
        "cross_entropy": lambda: cases.cross_entropy_case("fwdbwd", N=16, C=32, V=128, classes=100,
                                                          dtype=dt, device=d),
        "adamw": lambda: cases.adamw_case(device=d, shapes=[((8, 16), True), ((16,), False)]),
    }


@pytest.mark.parametrize("name", list(_small_cases()))
def test_small_case_checks_ours_against_the_baseline(name):
    case = _small_cases()[name]()
    try:
        fn = case.make("ours")
    except Unavailable as e:
        pytest.skip(str(e))
    assert case.check("ours", fn).startswith("pass")
    call = case.rotating(fn)
    call()  # the next input set, as timing would use it


def test_small_attention_case_reports_unavailable_sdpa_backends():
    case = _small_cases()["attention"]()
    verdicts = {}
    for variant in (v for v in case.variants if v != "ours"):
        try:
            verdicts[variant] = case.check(variant, case.make(variant))
        except Unavailable as e:
            verdicts[variant] = f"unavailable: {e}"
    assert verdicts["sdpa-flash"].startswith("pass")
    assert all(v.startswith(("pass", "unavailable: SDPA backend")) for v in verdicts.values()), verdicts


@pytest.mark.parametrize("variant", ["torch-eager", "torch-compile"])
def test_training_case_torch_variants_check_their_first_loss(variant):
    device = DEVICE.type
    case = cases.training_case(batch_size=1, seq_len=16, preset="tiny", device=device)
    try:
        fn = case.make(variant)
        assert case.check(variant, fn) == "pass"
        second = float(fn(1))
    finally:
        torch._dynamo.reset()
    assert 0 < second < 20


@pytest.mark.gpu
def test_report_runs_a_small_comparison_on_the_gpu():
    from bench import report
    from bench.common import measure_ceilings
    ceilings = measure_ceilings("cuda", copy_bytes=1 << 28, n=4096)
    assert ceilings.copy_bytes_per_s > 1e11 and ceilings.matmul_flops_per_s > 1e13
    rows = report.run_case("layernorm", lambda: cases.layernorm_case("fwdbwd", 768, rows=4096), ceilings,
                           log=lambda s: None)
    assert [r.variant for r in rows] == ["torch", "ours"]
    assert all(r.check.startswith("pass") and r.seconds > 0 for r in rows), [r.check for r in rows]
    assert rows[1].metrics["GB_per_s"] > 0 and rows[1].speedup > 0
