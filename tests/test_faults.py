"""Faults as a user's runs meet them, driven through train.py in real processes:
divergence, Ctrl-C and SIGTERM, a second signal during a checkpoint write, a
full disk, runs started in the same second, a run folder in use or holding a run.
Each ends in one line, the right exit status, and every good checkpoint kept."""
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine import checkpoint as ckpt_lib
from engine.cli import parse_train_args
from engine.trainer import train
from tests.helpers import REPO_ROOT, child_env

TRAIN_PY = REPO_ROOT / "train.py"


def tiny_args(corpus, run_dir, *extra, steps=3, ckpt=0):
    args = ["--data", str(corpus), "--tokenizer", "bytes", "--device", "cpu", "--n-layer", "1",
            "--n-embd", "32", "--batch-size", "2", "--seq-len", "16", "--max-steps", str(steps),
            "--warmup-steps", "0", "--eval-interval", "0", "--sample-interval", "0",
            "--checkpoint-interval", str(ckpt)]
    return args + (["--run-dir", str(run_dir)] if run_dir is not None else []) + list(extra)


def env():
    # One thread per process: the machine's cores are shared, and idle spinning
    # threads would make each tiny step take long. No PYTHONUNBUFFERED: train.py
    # itself must flush each log line into a pipe as it prints it (the tests below
    # wait for lines of a run that is still going).
    environment = child_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    environment.pop("PYTHONUNBUFFERED", None)
    return environment


class Child:
    """A process whose stdout and stderr lines are collected as they come."""

    def __init__(self, cmd, cwd, preexec_fn=None):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=preexec_fn)
        self.out, self.err = [], []
        self._threads = [threading.Thread(target=self._pump, args=(s, buf), daemon=True)
                         for s, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        for line in stream:
            buf.append(line.rstrip("\n"))

    def wait_for(self, pattern, timeout=120, stream="out"):
        buf = self.out if stream == "out" else self.err
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(buf):
                if re.search(pattern, line):
                    return line
            if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads):
                break
            time.sleep(0.02)
        self.proc.kill()
        raise AssertionError(f"no line matching {pattern!r}; stdout tail {self.out[-5:]}, stderr {self.err[-5:]}")

    def finish(self, timeout=120):
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        for t in self._threads:
            t.join(10)
        return rc


def run_train(args, cwd, timeout=180, preexec_fn=None):
    child = Child([sys.executable, str(TRAIN_PY), *args], cwd, preexec_fn)
    return child.finish(timeout), child.out, child.err


def the_error_line(err):
    lines = [ln for ln in err if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


def no_temp_files(folder):
    return not [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ divergence

def test_divergence_exits_3_and_names_the_last_good_checkpoint(corpus, tmp_path):
    """--max-lr 1e30: step 0 blows the weights up, every later loss is NaN. Steps 1-3
    are skipped, the third stops the run; with --keep-checkpoints 1 the last good
    checkpoint survives rotation and no checkpoint is written after the stop."""
    run = tmp_path / "run"
    rc, out, err = run_train(tiny_args(corpus, run, "--max-lr", "1e30", "--keep-checkpoints", "1", steps=8,
                                       ckpt=1), tmp_path)
    assert rc == 3, err
    line = the_error_line(err)
    assert line.startswith("error: training diverged: step 3 has loss nan") and "--max-bad-steps 3" in line
    assert line.split("Last good checkpoint: ")[1].startswith(str(run / "ckpt_000003.pt"))
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["ckpt_000003.pt"]
    assert ckpt_lib.load_checkpoint(run)["step"] == 3
    assert sum("skipped (non-finite" in ln for ln in out) == 3


# ------------------------------------------------------------------ interrupts

@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_stops_after_a_step_and_writes_a_checkpoint(corpus, tmp_path, sig, status):
    run = tmp_path / "run"
    child = Child([sys.executable, str(TRAIN_PY), *tiny_args(corpus, run, steps=100_000, ckpt=50_000)], tmp_path)
    child.wait_for(r"^step +3/")
    child.proc.send_signal(sig)
    assert child.finish() == status, child.err
    line = [ln for ln in child.err if ln.strip()][-1]
    m = re.match(rf"interrupted by {sig.name} after step (\d+): wrote (\S+); continue with: "
                 rf"python train.py --resume {re.escape(str(run))}$", line)
    assert m, child.err
    steps_done = int(m.group(1)) + 1
    assert m.group(2) == str(run / ckpt_lib.checkpoint_name(steps_done))
    assert ckpt_lib.load_checkpoint(m.group(2))["step"] == steps_done
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(steps_done))
    assert no_temp_files(run)


SLOW_SECOND_SAVE = """
import runpy, sys, time, torch
real_save, calls = torch.save, []
def slow_save(obj, f, *args, **kwargs):
    calls.append(1)
    real_save(obj, f, *args, **kwargs)
    if len(calls) == 2:
        print("SAVING", flush=True)
        time.sleep(60)  # all bytes in the temp file, not yet renamed
torch.save = slow_save
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_a_second_signal_aborts_a_checkpoint_write_and_keeps_the_earlier_ones(corpus, tmp_path):
    run = tmp_path / "run"
    script = SLOW_SECOND_SAVE.format(train=str(TRAIN_PY))
    child = Child([sys.executable, "-c", script, *tiny_args(corpus, run, steps=100, ckpt=2)], tmp_path)
    child.wait_for("^SAVING")  # the checkpoint of step 4 is being written
    child.proc.send_signal(signal.SIGINT)
    child.wait_for("SIGINT: stopping after this step", stream="err")
    child.proc.send_signal(signal.SIGINT)
    assert child.finish() == 130
    line = the_error_line([ln for ln in child.err if "stopping after this step" not in ln])
    assert line.startswith("aborted by a second SIGINT: stopped at once"), child.err
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["ckpt_000002.pt"]
    assert ckpt_lib.load_checkpoint(run)["step"] == 2
    assert no_temp_files(run), list(run.iterdir())


# ------------------------------------------------------------------ full disk

def _limit_file_size(limit):
    def preexec():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_failed_checkpoint_write_keeps_the_earlier_ones(corpus, tmp_path):
    """A resumed run whose next checkpoint cannot be written (the file-size limit
    stands in for a full disk, as a user without root meets it): one line, exit 4,
    the temp file gone, the earlier checkpoint intact."""
    run = tmp_path / "run"
    train(parse_train_args(tiny_args(corpus, run, steps=2, ckpt=2))[0], log=lambda *a: None)
    size = (run / "ckpt_000002.pt").stat().st_size
    rc, out, err = run_train(["--resume", str(run), "--max-steps", "4"], tmp_path,
                             preexec_fn=_limit_file_size(size // 2))
    assert rc == 4, err
    assert the_error_line(err) == (
        f"error: checkpoint: could not write {run / 'ckpt_000004.pt'} (File too large); the earlier "
        f"checkpoints are intact (latest: {run / 'ckpt_000002.pt'})")
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["ckpt_000002.pt"]
    assert ckpt_lib.load_checkpoint(run)["step"] == 2 and no_temp_files(run)


def _mount_tmpfs(path, size):
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_during_checkpoints_keeps_the_earlier_ones(corpus, tmp_path):
    """A real full file system (a 1 MB tmpfs; needs root): checkpoints every step
    until the disk is full."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("mounting a tmpfs needs root on Linux; test_a_failed_checkpoint_write_keeps_the_earlier_ones "
                    "covers the failing write")
    try:
        run = disk / "run"
        rc, out, err = run_train(tiny_args(corpus, run, "--keep-checkpoints", "0", steps=20, ckpt=1), tmp_path)
        assert rc == 4, err
        line = the_error_line(err)
        written = ckpt_lib.list_checkpoints(run)
        assert written, "the first checkpoints fit on the disk"
        failed = run / ckpt_lib.checkpoint_name(ckpt_lib.checkpoint_step(written[-1]) + 1)
        assert line.startswith(f"error: checkpoint: could not write {failed} (No space left on device); the "
                               f"earlier checkpoints are intact (latest: {written[-1]})"), line
        assert all(ckpt_lib.load_checkpoint(p)["step"] == ckpt_lib.checkpoint_step(p) for p in written)
        assert no_temp_files(run)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ------------------------------------------------------------------ run folders

def test_runs_started_in_the_same_second_get_their_own_folders(corpus, tmp_path):
    """Two processes with automatic run folders: the names of this second (and the
    next few) are taken in advance, so both must find a free name at once."""
    now = time.time()
    for dt in range(30):
        (tmp_path / "runs" / time.strftime("%Y%m%d-%H%M%S", time.localtime(now + dt))).mkdir(parents=True,
                                                                                            exist_ok=True)
    taken = set(os.listdir(tmp_path / "runs"))
    children = [Child([sys.executable, str(TRAIN_PY), *tiny_args(corpus, None, steps=4, ckpt=4)], tmp_path)
                for _ in range(2)]
    assert [c.finish() for c in children] == [0, 0], [c.err for c in children]
    folders = sorted(set(os.listdir(tmp_path / "runs")) - taken)
    assert len(folders) == 2 and all(re.fullmatch(r"\d{8}-\d{6}-\d+", f) for f in folders), folders
    for f in folders:
        rows = (tmp_path / "runs" / f / "metrics.csv").read_text().splitlines()
        assert [r.split(",")[0] for r in rows] == ["step", "0", "1", "2", "3"]
        assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path / "runs" / f)] == ["ckpt_000004.pt"]
    assert {line.split("run folder: ")[1] for c in children for line in c.out if "run folder:" in line} == \
        {f"runs/{f}" for f in folders}


def test_a_run_folder_in_use_or_holding_a_run_is_refused(corpus, tmp_path):
    run = tmp_path / "run"
    first = Child([sys.executable, str(TRAIN_PY), *tiny_args(corpus, run, steps=100_000, ckpt=2)], tmp_path)
    first.wait_for(r"^checkpoint: .*ckpt_000002.pt")
    # a second process may not write into the folder of a running one, even to resume it
    for args in (tiny_args(corpus, run, steps=3), ["--resume", str(run)]):
        rc, out, err = run_train(args, tmp_path)
        assert rc == 2 and the_error_line(err) == (
            f"error: run_dir (--run-dir) {run}: in use by another running process; wait for it to end or "
            "choose another --run-dir"), err
    first.proc.kill()  # SIGKILL: the kernel releases the folder's lock
    first.finish()
    rc, out, err = run_train(tiny_args(corpus, run, steps=3), tmp_path)
    assert rc == 2 and the_error_line(err).startswith(
        f"error: run_dir (--run-dir) {run}: already holds a run (ckpt_"), err
    assert f"resume it with --resume {run}" in err[0] and "--overwrite" in err[0]
    # --resume alone continues the killed run as it was configured (its 100,000 steps)
    latest = ckpt_lib.checkpoint_step(ckpt_lib.latest_checkpoint(run))
    rc, out, err = run_train(["--resume", str(run), "--max-steps", str(latest + 1)], tmp_path)
    assert rc == 0, err
    assert [ln.split("|")[0].split()[1].split("/")[0] for ln in out if ln.startswith("step ")] == [str(latest)]
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(latest + 1))  # the whole run, once
    # --overwrite replaces it
    rc, out, err = run_train(tiny_args(corpus, run, "--overwrite", steps=2, ckpt=2), tmp_path)
    assert rc == 0, err
    assert any("--overwrite removed the previous run's files" in ln for ln in out)
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == ["ckpt_000002.pt"]
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
