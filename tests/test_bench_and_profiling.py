"""The benchmark machinery (bench/harness.py with bench/work.py, timing.py and
results.py; bench/cases.py; bench/report.py) and engine.profiling: what they
measure, check and write. Timing is exercised on calls whose duration is known
(sleeps), never to judge the speed of project code."""
import json
import pathlib
import shutil
import subprocess
import sys
import time

import pytest
import torch
from torch.profiler import record_function

from bench import cases
from bench.harness import (Case, CheckFailed, Unavailable, compare, measure_case, measure_variant)
from bench.results import Registry, Result, best_peers, metrics_for, slug
from bench.timing import Block, Ceilings, OwnRounds, Spread, cpu_threads, time_block
from bench.work import attention_flops, gpt_flops_per_token, rotation_count
from engine import GPT, GPTConfig
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
    for T, peer_ms, ours_ms in ((512, 1.0, 0.8), (2048, 4.0, 3.0)):
        case = Case("attention-fwdbwd", f"T={T}", ["ours", "sdpa-flash", "sdpa-cudnn"], "sdpa-flash",
                    make=lambda v: None, flops=1e12, bytes=1e9)
        for variant, ms in (("ours", ours_ms), ("sdpa-flash", peer_ms), ("sdpa-cudnn", 2 * peer_ms)):
            r = Result(case.group, case.params, variant, case.subject, ms / 1e3, "pass",
                       metrics_for(case, ms / 1e3, None), meta={"T": T, "D": 64})
            if variant != "ours":
                r.set_speedup(Spread(ms / ours_ms, 0.95 * ms / ours_ms, 1.05 * ms / ours_ms))
            rs.append(r)
        rs.append(Result(case.group, case.params, "liger", case.subject,
                         check="skipped: liger-kernel is not installed"))
    train = Case("train-step", "gpt2 B=16 T=1024 bf16", ["triton", "torch-eager"], "torch-eager",
                 subject="triton", make=lambda v: None, tokens=16384, flops_per_token=1e9)
    rs.append(Result(train.group, train.params, "triton", "triton", None, "error: OutOfMemoryError"))
    eager = Result(train.group, train.params, "torch-eager", "triton", 0.2, "pass", metrics_for(train, 0.2, None))
    rs.append(eager)
    return rs


def test_report_writes_json_markdown_and_plots(tmp_path):
    from bench import report
    env = {"device": "Fake GPU", "date": "2026-01-01 00:00 UTC", "torch": torch.__version__}
    written = report.write_outputs(tmp_path, env, None, _fake_results(), {"quick": True}, 1.0)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["environment"]["device"] == "Fake GPU" and len(data["results"]) == 10
    md = (tmp_path / "results.md").read_text()
    assert "## Ours beside the best peer" in md and "| op | shape | variant | ms |" in md
    assert "error: OutOfMemoryError" in md
    # T=2048: the best peer is sdpa-flash, 4.0 ms against ours 3.0: 1.33x, with its spread.
    best = [line for line in md.splitlines() if line.startswith("| attention-fwdbwd | T=2048 | 3 |")]
    assert len(best) == 1 and "| sdpa-flash | 4 | 1.33x [1.27-1.40] faster |" in best[0], md
    assert "liger: skipped: liger-kernel is not installed" in best[0]
    if HAS_MATPLOTLIB:  # the plots are an optional extra; the tables never are
        assert {"attention_tflops.png", "training_tokens_per_s.png"} <= set(written)
        for name in ("attention_tflops.png", "training_tokens_per_s.png"):
            assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    table = report.text_table(_fake_results())
    assert table.splitlines()[0].split()[:3] == ["op", "shape", "variant"]


def test_best_peer_is_the_one_closest_to_ours():
    rows = best_peers(_fake_results())
    by_shape = {subject.params: (subject, best, missing) for subject, best, missing in rows}
    subject, best, missing = by_shape["T=512"]
    assert subject.variant == "ours" and best.variant == "sdpa-flash"
    assert [r.variant for r in missing] == ["liger"]
    subject, best, _ = by_shape["gpt2 B=16 T=1024 bf16"]
    assert not subject.ok and best is None  # ours failed: no ratio to show


def test_own_paths_are_timed_but_never_the_best_peer():
    """"ours-..." rows (our other kernel paths) stay in the tables but are not
    peers: the best peer of T=512 is still sdpa-flash, though ours-pointer came closer."""
    rs = _fake_results()
    own = Result("attention-fwdbwd", "T=512", "ours-pointer", "ours", 0.81e-3, "pass", {},
                 meta={"T": 512, "D": 64})
    own.set_speedup(Spread(0.81 / 0.8, 1.0, 1.02))
    rows = {subject.params: best for subject, best, _ in best_peers(rs + [own])}
    assert rows["T=512"].variant == "sdpa-flash"


def test_report_intermediate_writes_keep_tables_and_autotune_choices(tmp_path, monkeypatch):
    import triton
    from triton.runtime.autotuner import Autotuner

    import gpt2_kernels  # noqa: F401 - loads every kernel module
    from bench import report
    tuners = [(name, attr, obj) for name, mod in sorted(sys.modules.items())
              if name.startswith("gpt2_kernels.") and mod is not None
              for attr, obj in sorted(vars(mod).items()) if isinstance(obj, Autotuner)]
    assert tuners, "no triton.autotune object in the kernel modules"
    name, attr, tuner = tuners[0]
    # What a GPU run's autotuner holds after tuning one key: the report must carry it.
    config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    monkeypatch.setattr(tuner, "cache", {(1024, 64, True): config}, raising=False)
    choices = report.autotune_choices()
    assert choices[f"{name}.{attr}"] == [{"key": ["1024", "64", "True"], "config": str(config)}]
    env = {"device": "Fake GPU", "date": "2026-01-01 00:00 UTC"}
    written = report.write_outputs(tmp_path, env, None, _fake_results()[:2], {}, 1.0,
                                   plots=False, autotune=choices)
    assert set(written) == {"json", "markdown"} and not list(tmp_path.glob("*.png"))
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["results"]) == 2 and data["autotune"] == choices
    # A later write replaces the tables whole, leaving no temp files behind.
    report.write_outputs(tmp_path, env, None, _fake_results(), {}, 2.0, plots=False)
    assert len(json.loads((tmp_path / "results.json").read_text())["results"]) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


@pytest.mark.skipif(ON_GPU, reason="checks the session script's no-CUDA path")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_session_script_records_the_environment_and_fails_without_cuda(tmp_path):
    script = str(ROOT / "bench" / "gpu_session.sh")
    for bad_args in (["everything"], ["--deadline", "soon"], ["--tiktoken-cache", "/no/such/folder"]):
        bad = subprocess.run(["bash", script, *bad_args], cwd=ROOT, capture_output=True, text=True)
        assert bad.returncode == 2 and "gpu_session" in bad.stderr, bad_args
    out = tmp_path / "out"
    (tmp_path / "bpe").mkdir()
    # Relative paths are taken from where the script is run, not from the repository.
    proc = subprocess.run(["bash", script, "--out", "out", "--tiktoken-cache", "bpe", "--deadline", "120",
                           "--commit", "abc1234", "report"], cwd=tmp_path, capture_output=True, text=True,
                          env=child_env(PYTHON=sys.executable), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    env_lines = (out / "environment.txt").read_text()
    assert "| torch " in env_lines and "commit: abc1234" in env_lines
    assert "no CUDA GPU" in (out / "report.log").read_text()
    assert "--quick --budget" in proc.stdout and proc.stdout.rstrip().endswith("exit 1")
    assert f"results in {out}" in proc.stdout
    assert not (out / "pytest.log").exists()  # the report phase alone ran


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("git") is None,
                    reason="needs bash and git")
def test_session_script_dry_run_prepare_and_deadlines(tmp_path):
    """A tree copied without .git to a machine without network: `prepare` (run where
    git is) records the commit and the tiktoken cache; the dry run there shows the
    plan, budgets that stay positive, and what is present; a deadline too short for
    a phase is refused in one line."""
    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "gpu_session.sh", tree / "bench")
    git = ["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)
    rev = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    cache = tmp_path / "bpe"
    cache.mkdir()
    (cache / "0123abcd").write_text("x")
    script = ["bash", str(tree / "bench" / "gpu_session.sh")]
    env = child_env(PYTHON=sys.executable, TIKTOKEN_CACHE_DIR="")
    prep = subprocess.run(script + ["prepare", "--tiktoken-cache", str(cache)], capture_output=True, text=True,
                          env=env, timeout=60)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    assert (tree / ".gpu-session" / "commit").read_text().strip() == rev
    assert (tree / ".gpu-session" / "tiktoken" / "0123abcd").is_file()
    shutil.rmtree(tree / ".git")

    dry = subprocess.run(script + ["--dry-run", "--deadline", "390"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"commit: {rev} (from {tree / '.gpu-session' / 'commit'})" in dry.stdout
    assert f"tiktoken cache: {tree / '.gpu-session' / 'tiktoken'} (1 files" in dry.stdout
    assert "(60 s at most)" in dry.stdout and "--quick --budget 260 (320 s at most)" in dry.stdout
    assert "cuda device:" in dry.stdout and "xdist:" in dry.stdout
    assert not (tree / "bench" / "results").exists()  # nothing ran
    given = subprocess.run(script + ["--dry-run", "--commit", "abc1234", "tests", "--deadline", "70"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert "commit: abc1234 (from --commit)" in given.stdout and "(60 s at most)" in given.stdout
    for phase, deadline, least in (("all", "389", 390), ("tests", "69", 70), ("report", "0", 110)):
        short = subprocess.run(script + ["--dry-run", "--deadline", deadline, phase], capture_output=True,
                               text=True, env=env, timeout=60)
        assert short.returncode == 2 and short.stdout == "", (phase, short.stdout)
        assert short.stderr.count("\n") == 1 and f"needs at least {least} s" in short.stderr, short.stderr
    help_text = subprocess.run(script + ["--help"], capture_output=True, text=True, timeout=60).stdout
    for needed in ("tiktoken", "liger-kernel", "pytest-xdist", "prepare", ".gpu-session"):
        assert needed in help_text, needed


def test_report_main_keeps_measurements_when_interrupted(tmp_path, monkeypatch):
    """The whole entry point on CPU with a fake plan: the second comparison is
    interrupted (a deadline's SIGINT); the first stays in the written tables."""
    from bench import report

    def toy():
        return Case("toy", "n=4", ["ours"], "ours", lambda v: (lambda i: torch.ones(4)),
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


@pytest.fixture
def fake_clock(monkeypatch):
    """time.sleep advances a fake time.perf_counter instead of waiting: the timings a
    test measures are then exact, whatever else the machine is doing."""
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(time, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    return now


def _sleeper(seconds: dict):
    """make(variant) -> fn(i) that sleeps seconds[variant] and returns ones."""
    def make(variant):
        if variant not in seconds:
            raise Unavailable("no such variant here")

        def fn(i):
            time.sleep(seconds[variant])
            return torch.ones(4)
        return fn
    return make


def test_measure_case_pairs_each_peer_with_ours_and_records_failures(fake_clock):
    def make(variant):
        if variant == "crash":
            raise RuntimeError("boom\nsecond line")
        if variant == "wrong":
            return lambda i: torch.ones(4) * 1.5
        return _sleeper({"ours": 2e-3, "slow": 4e-3})(variant)

    def build():
        return Case("toy", "n=4", ["ours", "slow", "wrong", "missing", "crash"], "slow", make,
                    reference=lambda: torch.ones(4), device="cpu", bytes=16)
    rows = {r.variant: r for r in measure_case(build, None, log=lambda s: None)}
    assert list(rows) == ["ours", "slow", "wrong", "missing", "crash"]
    ours, slow = rows["ours"], rows["slow"]
    assert ours.check.startswith("pass") and ours.subject_speedup is None and ours.seconds >= 2e-3
    # The peer sleeps twice as long: ours is ~2x faster, measured in paired rounds.
    assert slow.check.startswith("pass (baseline")
    assert slow.subject_speedup == pytest.approx(2.0) and slow.subject_speedup_q1 <= slow.subject_speedup_q3
    assert slow.rounds >= 7 and slow.calls_per_round >= 1
    assert rows["wrong"].check.startswith("FAIL") and rows["wrong"].seconds is None
    assert rows["missing"].check == "skipped: no such variant here"
    assert rows["crash"].check == "error: RuntimeError: boom"
    broken = measure_case(lambda: 1 / 0, None, section="toy", log=lambda s: None)
    assert len(broken) == 1 and broken[0].check.startswith("error: ZeroDivisionError")


def test_a_peer_is_timed_alone_when_ours_cannot_run():
    case = Case("toy", "n=4", ["ours", "peer"], "peer", _sleeper({"peer": 1e-3}),
                reference=lambda: torch.ones(4), device="cpu")
    notes = []
    r = measure_variant(case, "peer", log=notes.append)
    assert r.check.startswith("pass") and r.seconds >= 1e-3 and r.subject_speedup is None
    assert "timed alone" in notes[0] and "no such variant here" in notes[0]


def test_a_variant_whose_baseline_cannot_run_says_so():
    case = Case("toy", "n=4", ["ours", "gone"], "gone", _sleeper({"ours": 0.0}),
                reference=lambda: torch.ones(4), device="cpu")
    r = measure_variant(case, "ours")
    assert r.check == ("skipped: ours cannot be checked: the baseline gone it is judged against "
                       "cannot run here (no such variant here)") and r.seconds is None


def test_report_plan_lists_every_comparison_lazily():
    full, quick = cases.gpu_plan(False), cases.gpu_plan(True)
    sections = {s for s, _ in full}
    assert sections == {"layernorm", "linear_gelu", "mlp", "cross_entropy", "adamw", "attention",
                        "attention-dropout", "attention-sweep", "training"}
    assert len(quick) < len(full) and all(callable(b) for _, b in full)
    assert sum(s == "attention-sweep" for s, _ in full) == 2 * 2 * len(cases.ATTN_SWEEP_T)


# --------------------------------------------------------------------------
# Measuring: counts, timing, checks, results
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
    c = Ceilings(copy_bytes_per_s=2e12, matmul_flops_per_s=500e12)
    mem = Case("g", "p", ["a"], "a", make=None, subject="a", bytes=2e9)
    m = metrics_for(mem, 2e-3, c)
    assert m["GB_per_s"] == pytest.approx(1000) and m["pct_of_ceiling"] == pytest.approx(50)
    assert m["floor_ms"] == pytest.approx(1.0)
    train = Case("t", "p", ["a"], "a", make=None, subject="a", tokens=1000, flops_per_token=1e9)
    m = metrics_for(train, 0.01, c)
    assert m["tokens_per_s"] == pytest.approx(1e5) and m["MFU_pct"] == pytest.approx(20)


def test_check_rejects_a_wrong_variant_and_judges_by_the_baselines_error():
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    outputs = {"torch": x.half().double(), "close": x.half().double() + 1e-4, "off": x * 1.01,
               "nan": x * float("nan"), "short": (x, x)}

    case = Case("toy", "n=101", list(outputs), "torch", lambda v: (lambda i: outputs[v]),
                subject="close", reference=lambda: x, device="cpu")
    assert case.check("torch", case.make("torch")).startswith("pass (baseline")
    assert case.check("close", case.make("close")).startswith("pass")
    for bad in ("off", "nan", "short"):
        with pytest.raises(CheckFailed):
            case.check(bad, case.make(bad))
    ok, detail, _ = compare((x, None), (x, None), (x, None))
    assert ok
    ok, detail, _ = compare((x, x), (x, x), (x, None))
    assert not ok and "expected None" in detail
    with pytest.raises(ValueError, match="subject 'mine' is not among"):
        Case("toy", "n", ["torch"], "torch", make=None, subject="mine")


def test_registry_summary_lists_ratios_with_their_spread():
    reg = Registry()
    assert not reg
    reg.add(Result("g", "p", "ours", "ours", 1e-3, "pass", {"GB_per_s": 200.0}, rounds=9, calls_per_round=20))
    peer = Result("g", "p", "torch", "ours", 2e-3, "pass", {"GB_per_s": 100.0}, rounds=9, calls_per_round=10)
    peer.set_speedup(Spread(2.0, 1.9, 2.1))
    reg.add(peer)
    lines = reg.summary_lines()
    assert lines[0].split()[:4] == ["group", "params", "variant", "ms/call"]
    assert "(subject)" in lines[1] and "9x20" in lines[1] and "200 GB/s" in lines[1]
    assert "2.00x [1.90-2.10] faster" in lines[2] and "9x10" in lines[2]
    peers = reg.peer_lines()
    assert "torch" in peers[1] and "2.00x [1.90-2.10] faster" in peers[1]
    slower = Result("g", "p", "fast-peer", "ours", 5e-4, "pass", {}, rounds=9, calls_per_round=40)
    slower.set_speedup(Spread(0.5, 0.4, 0.625))  # the peer in half our time: ours 2x slower
    assert slower.speedup_text() == "2.00x [1.60-2.50] slower"
    only_notes = Registry()  # titled sections alone are worth printing
    only_notes.sections["notes"] = ["a line"]
    assert only_notes


def test_timing_blocks_pairs_and_spread(fake_clock):
    calls = []

    def work(name, seconds):
        calls.append(name)
        time.sleep(seconds)

    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert time_block(lambda: work("one", 1e-3), 3, "cpu") == pytest.approx(1e-3)
    calls.clear()
    fast = Block(lambda: work("fast", 1e-3), 2)
    slow = Block(lambda: work("slow", 2e-3), 1)
    mine, theirs = OwnRounds().paired(fast, slow, "cpu", rounds=4)
    assert mine == pytest.approx([1e-3] * 4) and theirs == pytest.approx([2e-3] * 4)
    # Blocks alternate which goes first: after the warm-up pair, slow opens rounds 0 and 2.
    rounds = "".join("F" if c == "fast" else "S" for c in calls[3:])
    assert rounds == "SFF" + "FFS" + "SFF" + "FFS"
    spread = Spread.of([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (spread.median, spread.q1, spread.q3) == (3.0, 2.0, 4.0) and spread.text() == "3.00x [2.00-4.00]"
    before = torch.get_num_threads()
    with cpu_threads("cpu", 1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_cpu_benchmarks_report_per_call_statistics_and_paired_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "--benchmark-only", "bench/test_bench_cpu.py",
                           "-p", "no:cacheprovider", "-q", f"--benchmark-json={out}"],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "benchmark ratios" in proc.stdout and "ours beside the best peer" in proc.stdout
    assert "cpu-model-fwdbwd" in proc.stdout and "cpu-data-loader" in proc.stdout
    data = json.loads(out.read_text())
    by_name = {b["name"]: b for b in data["benchmarks"]}
    for bench in by_name.values():
        info, stats = bench["extra_info"], bench["stats"]
        # pytest-benchmark's statistics are per call: iterations = calls per block,
        # and its median is the harness's per-call time.
        assert stats["iterations"] == info["calls_per_round"]
        assert stats["median"] * 1e3 == pytest.approx(info["ms"], rel=1e-9)
    hf = by_name["test_cpu_model_fwdbwd[transformers]"]["extra_info"]
    low, high = hf["engine-torch_speedup_iqr"]
    assert 0 < low <= hf["engine-torch_speedup"] <= high
    assert by_name["test_cpu_model_fwdbwd[engine-torch]"]["extra_info"]["tokens_per_s"] > 0
    text = by_name["test_cpu_data_loader[text]"]["extra_info"]
    assert text["batches_per_s"] > 0 and text["shard_speedup"] > 0
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
        "mlp": lambda: cases.mlp_case("fwdbwd", M=16, C=32, H=64, dtype=dt, device=d),
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
    assert case.subject == "ours"
    try:
        fn = case.make("ours")
    except Unavailable as e:
        pytest.skip(str(e))
    assert case.check("ours", fn).startswith("pass")
    call = case.rotating(fn)
    call()  # the next input set, as timing would use it


@pytest.mark.parametrize("name,variant", [("cross_entropy", "ours-two-pass"), ("mlp", "ours-before")])
def test_the_paths_before_ours_check_too(name, variant):
    """The earlier paths the report times beside ours pass the same check."""
    case = _small_cases()[name]()
    assert variant in case.peers
    try:
        fn = case.make(variant)
    except Unavailable as e:
        pytest.skip(str(e))
    assert case.check(variant, fn).startswith("pass")


@pytest.mark.parametrize("name", ["layernorm", "add_layernorm", "cross_entropy"])
def test_liger_peers_run_or_say_why_not(name):
    import importlib.util
    case = _small_cases()[name]()
    assert "liger" in case.peers
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(Unavailable, match="liger-kernel is not installed"):
            case.make("liger")
        return
    assert case.check("liger", case.make("liger")).startswith("pass")


def test_small_attention_case_reports_unavailable_sdpa_backends():
    case = _small_cases()["attention"]()
    assert set(case.peers) == set(cases.ATTN_OWN_PATHS) | set(cases.SDPA_BACKENDS)
    verdicts = {}
    for variant in case.peers:
        try:
            verdicts[variant] = case.check(variant, case.make(variant))
        except Unavailable as e:
            verdicts[variant] = f"unavailable: {e}"
    assert verdicts["sdpa-flash"].startswith("pass")
    assert all(verdicts[v].startswith("pass") for v in cases.ATTN_OWN_PATHS), verdicts
    assert all(v.startswith(("pass", "unavailable: SDPA backend")) for v in verdicts.values()), verdicts


@pytest.mark.parametrize("variant", ["torch-eager", "torch-compile"])
def test_training_case_torch_variants_check_their_first_loss(variant):
    device = DEVICE.type
    case = cases.training_case(batch_size=1, seq_len=16, preset="tiny", device=device)
    assert case.subject == "triton" and set(case.peers) == {"triton-fp32-stream", "triton-no-epilogues",
                                                            "triton-before", "torch-eager", "torch-compile"}
    try:
        fn = case.make(variant)
        assert case.check(variant, fn) == "pass"
        second = float(fn(1))
    finally:
        case.released(variant)
    assert 0 < second < 20


@pytest.mark.gpu
def test_gpu_report_runs_a_small_comparison():
    from bench.timing import measure_ceilings
    ceilings = measure_ceilings("cuda", copy_bytes=1 << 28, n=4096)
    assert ceilings.copy_bytes_per_s > 1e11 and ceilings.matmul_flops_per_s > 1e13
    rows = measure_case(lambda: cases.layernorm_case("fwdbwd", 768, rows=4096), ceilings, log=lambda s: None)
    assert [r.variant for r in rows] == ["ours", "torch", "liger"]
    assert all(r.check.startswith("pass") and r.seconds > 0 for r in rows[:2]), [r.check for r in rows]
    assert rows[0].metrics["GB_per_s"] > 0 and rows[1].subject_speedup > 0


def test_attention_dropout_case_checks_for_bias():
    """With dropout no two variants share a mask: the case judges each by being
    unbiased against the no-dropout reference, and a missing 1 / (1 - p) fails."""
    pytest.importorskip("triton")
    from bench.cases import attention_case
    from bench.harness import CheckFailed
    case = attention_case("fwdbwd", B=1, H=2, T=64, D=16, dtype=torch.float32, device=DEVICE.type,
                          dropout_p=0.1)
    assert case.group == "attention-fwdbwd-dropout" and "p=0.1" in case.params
    ours = case.make("ours")
    assert case.check("ours", ours) == "pass"
    with pytest.raises(CheckFailed, match="is biased"):
        case.check("ours", lambda i: tuple(t * 0.9 for t in ours(i)))
