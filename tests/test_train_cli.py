"""train.py: flags generated from TrainConfig, --config TOML, clean errors (exit 2),
an end-to-end run, resume through the CLI. Most checks run main() in-process;
two subprocesses check the real exit status and that no traceback is printed."""
import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"


def _load_train_module():
    spec = importlib.util.spec_from_file_location("train_cli", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _load_train_module()



def small_args(corpus, run_dir, *extra):
    return ["--data", str(corpus), "--tokenizer", "bytes", "--device", "cpu", "--n-layer", "1",
            "--n-embd", "32", "--batch-size", "2", "--seq-len", "16", "--max-steps", "3",
            "--warmup-steps", "1", "--eval-interval", "0", "--sample-interval", "0",
            "--checkpoint-interval", "0", "--run-dir", str(run_dir), *extra]


def run_main(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(err, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's wrapping
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
    assert "--config FILE.toml" in text
    # every option's help carries its default, and auto ones say what auto means
    assert text.count("(default:") == len(dataclasses.fields(TrainConfig))
    assert "--batch-size BATCH_SIZE micro-batch size B (sequences per forward) (default: auto; auto: " \
           "CPU/MPS: 16, CUDA: 64)" in text
    assert "(default: 0.1)" in text and "(default: 1337)" in text
    # what --resume accepts besides the checkpoint's own configuration
    assert "only --backend, --compile, --deterministic, --fusions, --max-steps" in text


@pytest.mark.parametrize("argv, needle", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--batch", "4"], "unrecognized arguments: --batch"),  # no abbreviations
    (["--batch-size", "four"], "--batch-size: expected an integer or auto, got 'four'"),
    (["--batch-size", "3.5"], "--batch-size: expected an integer or auto, got '3.5'"),
    (["--dtype", "fp16"], "dtype (--dtype) must be one of auto, fp32, bf16, bf16-params, got 'fp16'"),
    (["--max-lr", "-1e-3"], "max_lr (--max-lr) must be >= 0, got -0.001"),
    (["--seed", "-1"], "seed (--seed) must be >= 0, got -1"),
    (["--seed", str(2 ** 63)], "seed (--seed) must be < 2**63"),
    (["--max-lr"], "argument --max-lr: expected one argument"),
    (["--compile=yes"], "--compile"),
    (["--residual-dtype", "fp16"], "residual_dtype (--residual-dtype) must be one of auto, fp32, bf16, got 'fp16'"),
    (["--fusions", "epilogues,gelu"], "fusions (--fusions): 'epilogues,gelu' is not all, none or a comma-separated list of"),
])
def test_malformed_flags_are_one_error_line(argv, needle, capsys):
    rc, _, err = run_main(argv, capsys)
    assert rc == 2
    assert_one_error_line(err, needle)


def test_bad_total_batch_divisibility(corpus, tmp_path, capsys):
    rc, _, err = run_main(small_args(corpus, tmp_path / "r", "--total-batch-size", "100"), capsys)
    assert rc == 2
    assert_one_error_line(err, "total_batch_size (--total-batch-size) 100 is not divisible by",
                          "2 * 16 * 1 = 32")


def test_missing_data_file(tmp_path, capsys):
    rc, _, err = run_main(small_args(tmp_path / "missing.txt", tmp_path / "r"), capsys)
    assert rc == 2
    assert_one_error_line(err, "missing.txt", "no such file")


def test_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc, _, err = run_main(small_args(empty, tmp_path / "r"), capsys)
    assert rc == 2
    assert_one_error_line(err, "empty.txt", "empty")


def test_resume_path_missing(corpus, tmp_path, capsys):
    rc, _, err = run_main(small_args(corpus, tmp_path / "r", "--resume", str(tmp_path / "nope")), capsys)
    assert rc == 2
    assert_one_error_line(err, "resume:", "nope", "does not exist")


def test_cuda_graphs_on_without_a_gpu_is_a_clear_error(corpus, tmp_path, capsys):
    rc, _, err = run_main(small_args(corpus, tmp_path / "r", "--cuda-graphs", "on"), capsys)
    assert rc == 2
    assert_one_error_line(err, "cuda_graphs=on but the device is cpu")


def test_toml_config_and_flag_precedence(tmp_path):
    conf = tmp_path / "run.toml"
    conf.write_text('batch_size = 4\nseq_len = 16\nmax_lr = 0.002\ndtype = "fp32"\n'
                    'betas = [0.8, 0.9]\ncompile = false\nmax_steps = "auto"\n')
    from engine.cli import parse_train_args
    cfg, explicit = parse_train_args(["--config", str(conf), "--seq-len", "32"])
    assert explicit == {"batch_size", "seq_len", "max_lr", "dtype", "betas", "compile", "max_steps"}
    assert (cfg.batch_size, cfg.seq_len, cfg.max_lr, cfg.dtype, cfg.betas) == (4, 32, 0.002, "fp32",
                                                                             (0.8, 0.9))
    assert cfg.max_steps is None  # auto
    assert cfg.weight_decay == 0.1  # neither given: the default


@pytest.mark.parametrize("content, needle", [
    ("batch_sise = 4\nfoo = 1\n", "unknown key(s) batch_sise, foo"),
    ("batch-size = 4\n", "keys use underscores, e.g. batch_size"),
    ("batch_size = 'x'\n", "key batch_size: expected an integer or auto, got 'x'"),
    ("seq_len = 32.9\n", "key seq_len: expected an integer or auto, got 32.9"),
    ("max_lr = true\n", "key max_lr: expected a number or auto, got True"),
    ("compile = 1\n", "key compile: expected true or false, got 1"),
    ("data = 3\n", "key data: expected a string, got 3"),
    ("betas = [0.9]\n", "key betas: expected two numbers"),
    ("seed = -5\n", "seed (--seed) must be >= 0, got -5"),
    ("dtype = 'fp16'\n", "dtype (--dtype) must be one of"),
    ("batch_size = [\n", "not valid TOML"),
])
def test_bad_toml(tmp_path, content, needle, capsys):
    conf = tmp_path / "bad.toml"
    conf.write_text(content)
    rc, _, err = run_main(["--config", str(conf)], capsys)
    assert rc == 2
    assert_one_error_line(err, str(conf), needle)


def test_missing_toml(tmp_path, capsys):
    rc, _, err = run_main(["--config", str(tmp_path / "none.toml")], capsys)
    assert rc == 2
    assert_one_error_line(err, "none.toml", "no such file")


def test_run_then_resume_through_the_cli(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = run_main(small_args(corpus, run, "--checkpoint-interval", "3"), capsys)
    assert rc == 0, err
    assert sum(ln.startswith("step ") for ln in out.splitlines()) == 3
    assert (run / "ckpt_000003.pt").is_file()
    rc, out, err = run_main(small_args(corpus, run, "--resume", str(run), "--max-steps", "5",
                                       "--checkpoint-interval", "5"), capsys)
    assert rc == 0, err
    steps = [ln.split("|")[0].split()[1].split("/")[0] for ln in out.splitlines() if ln.startswith("step ")]
    assert steps == ["3", "4"]
    assert "resumed from" in out
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["step", "0", "1", "2", "3", "4"]


def test_compile_runs_and_its_checkpoint_resumes_without_compile(corpus, tmp_path, capsys):
    """--compile wraps the model in torch.compile: training, eval and sampling run through
    it, and the checkpoint holds the plain module's keys (no `_orig_mod.`), so a run
    without --compile resumes from it."""
    import torch

    run = tmp_path / "run"
    try:
        rc, out, err = run_main(small_args(corpus, run, "--compile", "--max-steps", "2",
                                           "--eval-interval", "2", "--sample-interval", "2",
                                           "--checkpoint-interval", "2"), capsys)
    finally:
        torch._dynamo.reset()
    assert rc == 0, err
    assert sum(ln.startswith("step ") for ln in out.splitlines()) == 2
    state = torch.load(run / "ckpt_000002.pt", map_location="cpu", weights_only=True)
    keys = list(state["model"])
    assert keys and not any("_orig_mod" in k for k in keys), keys[:5]
    rc, out, err = run_main(small_args(corpus, run, "--resume", str(run), "--max-steps", "3"), capsys)
    assert rc == 0, err
    assert [ln.split("|")[0].split()[1].split("/")[0] for ln in out.splitlines() if ln.startswith("step ")] == ["2"]


def _subprocess(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(TRAIN_PY), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_end_to_end_subprocess(corpus, tmp_path):
    proc = _subprocess(small_args(corpus, tmp_path / "run", "--eval-interval", "2",
                                  "--sample-interval", "2", "--checkpoint-interval", "2"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("device: cpu", "tokenizer: bytes", "validation loss", "sample 0:", "step     2/3 |",
                   "checkpoint:", "loss curve:"):
        assert needle in out, needle
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        ["ckpt_000002.pt", "ckpt_000003.pt", "config.json", "log.txt", "loss.png", "metrics.csv"])
    assert (tmp_path / "run" / "log.txt").read_text() == out


def test_user_error_subprocess_has_no_traceback(tmp_path):
    proc = _subprocess(small_args(tmp_path / "missing.txt", tmp_path / "run"), tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert_one_error_line(proc.stderr, "missing.txt")


def test_resume_alone_continues_as_configured(corpus, tmp_path, capsys):
    """`--resume RUN` alone: the checkpoint's configuration (data, tokenizer, batch,
    schedule) is the run's, not the defaults; a changed fixed value is refused in one
    line; a finished run says so in one line and exits 0."""
    run = tmp_path / "run"
    rc, out, err = run_main(small_args(corpus, run, "--max-lr", "2e-3", "--checkpoint-interval", "3"), capsys)
    assert rc == 0, err
    rc, out, err = run_main(["--resume", str(run)], capsys)
    assert rc == 0 and err == ""
    assert out == f"{run}: this run is finished (step 3 of max_steps 3); give --max-steps N with N > 3 to " \
                  "train further\n"
    rc, out, err = run_main(["--resume", str(run), "--max-lr", "1e-2", "--max-steps", "5"], capsys)
    assert rc == 2
    assert_one_error_line(err, "resume: --max-lr 0.01 would change the run in", "max_lr = 0.002",
                          "drop these flags")
    rc, out, err = run_main(["--resume", str(run), "--max-steps", "5"], capsys)
    assert rc == 0, err
    assert "tokenizer: bytes" in out and "B=2 T=16" in out and str(corpus) in out
    lrs = [float(ln.split("lr ")[1].split(" |")[0]) for ln in out.splitlines() if ln.startswith("step ")]
    from engine.optim import lr_at
    # The schedule is kept: the cosine ended at step 3, so the added steps run at
    # min_lr (the log prints 5 significant digits).
    assert lrs == pytest.approx([lr_at(s, max_lr=2e-3, min_lr=2e-4, warmup_steps=1, max_steps=3) for s in (3, 4)],
                                rel=1e-4)
    assert "resume: max_steps 3 -> 5: the learning rate keeps its schedule" in out


def test_resume_skips_a_damaged_latest_checkpoint(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = run_main(small_args(corpus, run, "--max-steps", "4", "--checkpoint-interval", "2"), capsys)
    assert rc == 0, err
    latest = run / "ckpt_000004.pt"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0x10
    latest.write_bytes(bytes(data))
    rc, out, err = run_main(["--resume", str(run), "--max-steps", "5"], capsys)
    assert rc == 0, err
    assert f"resume: skipping {latest}: damaged checkpoint (sha256 mismatch" in out
    assert f"resume: using the newest valid checkpoint, {run / 'ckpt_000002.pt'}" in out
    steps = [ln.split("|")[0].split()[1] for ln in out.splitlines() if ln.startswith("step ")]
    assert steps == ["2/5", "3/5", "4/5"]
    assert len(list((run / "superseded").glob("*/ckpt_000004.pt"))) == 1  # set aside, not deleted


def _step_lines(out):
    """The log's step lines without their timings: what a continued run must repeat."""
    return [ln.split(" | dt")[0] for ln in out.splitlines() if ln.startswith("step ")]


def test_a_moved_corpus_resumes_when_its_content_is_the_same(corpus, tmp_path, capsys):
    """After the corpus moved, --resume says where the data went missing and what
    to do; --data NEWPATH (a moved copy, or a symlink of another name) is accepted
    because its content hash is the run's, and the run continues exactly as it
    would have where it was; later checkpoints record the new path."""
    data = tmp_path / "old" / "corpus.txt"
    data.parent.mkdir()
    shutil.copy(corpus, data)
    first = tmp_path / "first"
    rc, _, err = run_main(small_args(data, first, "--max-steps", "2", "--checkpoint-interval", "2"), capsys)
    assert rc == 0, err
    for name in ("moved", "linked"):
        shutil.copytree(first, tmp_path / name)
    rc, out, err = run_main(["--resume", str(first), "--max-steps", "4"], capsys)
    assert rc == 0, err
    expected = _step_lines(out)
    assert len(expected) == 2

    new = tmp_path / "new" / "renamed.txt"
    new.parent.mkdir()
    os.replace(data, new)
    rc, out, err = run_main(["--resume", str(tmp_path / "moved"), "--max-steps", "4"], capsys)
    assert rc == 2
    assert_one_error_line(err, f"resume: the run's data {data} is no longer there (moved or deleted?)",
                          "give --data NEWPATH")
    link = tmp_path / "link.txt"
    link.symlink_to(new)
    for name, path in (("moved", new), ("linked", link)):
        rc, out, err = run_main(["--resume", str(tmp_path / name), "--max-steps", "4", "--data", str(path)], capsys)
        assert rc == 0, err
        assert f"resume: the run's data has moved: {data} -> {path} (same content hash)" in out
        assert _step_lines(out) == expected, name
        from engine import checkpoint as ckpt_lib
        assert ckpt_lib.load_checkpoint(tmp_path / name)["train_config"]["data"] == str(path)


def test_an_interrupt_during_set_up_leaves_nothing_behind(corpus, tmp_path, capsys, monkeypatch):
    """Ctrl-C (or SIGTERM) after set-up has written config.json and metrics.csv but
    before the first step: a new run removes them again (and the folders it made),
    so "nothing was written" is true; a resumed run says how to continue, and can."""
    import signal

    from engine.run_errors import RunAborted
    from engine.run_log import RunLog
    start = RunLog.start
    run = tmp_path / "new" / "run"
    rc, _, err = run_main(small_args(corpus, tmp_path / "done", "--max-steps", "2", "--checkpoint-interval", "2"),
                          capsys)
    assert rc == 0, err

    def interrupted(signum):
        def patched(self, *args, **kwargs):
            start(self, *args, **kwargs)
            if signum == signal.SIGINT:
                os.kill(os.getpid(), signal.SIGINT)  # Python's own handler: KeyboardInterrupt
            raise RunAborted(signum)  # what SIGTERM raises during set-up
        return patched

    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        monkeypatch.setattr(RunLog, "start", interrupted(signum))
        rc, out, err = run_main(small_args(corpus, run), capsys)
        assert rc == status and err.strip().splitlines()[-1] == (
            f"interrupted by {signum.name} during set-up, before the first step: nothing was written")
        assert not (tmp_path / "new").exists()
    monkeypatch.setattr(RunLog, "start", interrupted(signal.SIGINT))
    rc, out, err = run_main(["--resume", str(tmp_path / "done"), "--max-steps", "3"], capsys)
    assert rc == 130 and err.strip().splitlines()[-1] == (
        "interrupted by SIGINT during set-up, before the first step: the run can continue: "
        f"python train.py --resume {tmp_path / 'done'}")
    monkeypatch.setattr(RunLog, "start", start)
    rc, out, err = run_main(["--resume", str(tmp_path / "done"), "--max-steps", "3"], capsys)
    assert rc == 0 and _step_lines(out)[0].startswith("step     2/"), err


@pytest.mark.parametrize("command", [["train.py"], ["sample.py"], ["-m", "engine.eval"],
                                     ["-m", "engine.eval", "hellaswag"]])
def test_help_answers_without_importing_torch(command):
    """--help is read before torch is imported (which takes seconds, more on a busy machine)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *command, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imported and not [m for m in imported if m == "torch" or m.startswith("torch.")], "torch was imported"
