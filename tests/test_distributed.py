"""DDP: `torchrun --nproc_per_node=2` (gloo on CPU) equals one process with the same
global batch (2 accumulation micro-steps); only rank 0 logs and writes files.
Faults: divergence and a signal to one rank end every rank with the same status;
a stalled rank ends the job within --ddp-timeout-s."""
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import checkpoint as ckpt_lib
from engine.distributed import DistInfo, env_dist_info
from engine.errors import UserInputError
from engine.train_config import TrainConfig
from engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMON = dict(tokenizer="bytes", device="cpu", backend="torch", n_layer=1, n_embd=32, batch_size=2,
              seq_len=16, total_batch_size=64, max_steps=4, warmup_steps=1, max_lr=1e-3,
              eval_interval=3, eval_batches=2, sample_interval=0, checkpoint_interval=4, seed=7)


def as_flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_env_dist_info(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert env_dist_info() == DistInfo()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = env_dist_info()
    assert info.ddp and info.rank == 1 and info.world_size == 2 and not info.master
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UserInputError, match="inconsistent"):
        env_dist_info()


def test_torchrun_matches_one_process(corpus, tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    # eval_batches counts per process: 2 ranks x 2 batches read the val batches 1 process x 4 reads
    single = train(TrainConfig(data=str(corpus), run_dir=str(tmp_path / "single"),
                               **dict(COMMON, eval_batches=4)), log=lambda *a: None)
    assert single.accum == 2

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(ROOT / "train.py"),
           "--data", str(corpus), "--run-dir", str(tmp_path / "ddp"), *as_flags(COMMON)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "DDP, world size 2" in out and "1 accumulation step(s)" in out
    assert sum(ln.startswith("step     0/") for ln in out.splitlines()) == 1  # rank 0 logs alone

    ddp_rows = read_csv(tmp_path / "ddp" / "metrics.csv")
    one_rows = read_csv(tmp_path / "single" / "metrics.csv")
    assert len(ddp_rows) == len(one_rows) == 4
    for a, b in zip(one_rows, ddp_rows):
        for key in ("loss", "grad_norm"):
            x, y = float(a[key]), float(b[key])
            assert abs(x - y) <= 1e-5 * abs(x), f"step {a['step']} {key}: one process {x}, DDP {y}"
        if a["val_loss"]:
            assert abs(float(a["val_loss"]) - float(b["val_loss"])) <= 1e-5 * float(a["val_loss"])
    assert [r["val_loss"] != "" for r in ddp_rows] == [True, False, False, True]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        ["ckpt_000004.pt", "config.json", "log.txt", "loss.png", "metrics.csv"])


def launch_ranks(args, cwd, world_size=2):
    """The processes torchrun would start (its environment, no agent): each rank's
    exit status is then our own to check."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   CUDA_VISIBLE_DEVICES="", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def test_ddp_divergence_exits_3_on_every_rank(corpus, tmp_path):
    """loss and norm are all-reduced: every rank sees the same non-finite steps and
    stops at the same one, none waiting in a collective."""
    flags = as_flags(dict(COMMON, max_lr=1e30, warmup_steps=0, max_steps=20, eval_interval=0,
                          checkpoint_interval=1, keep_checkpoints=1))
    procs = launch_ranks(["--data", str(corpus), "--run-dir", str(tmp_path / "run"), *flags], tmp_path)
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [3, 3], [err[-2000:] for _, _, err in results]
    for rc, out, err in results:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "training diverged: step 3" in lines[0], err[-2000:]
        assert f"Last good checkpoint: {tmp_path / 'run' / 'ckpt_000003.pt'}" in lines[0]


def test_a_stalled_rank_ends_the_job_within_the_ddp_timeout(corpus, tmp_path):
    """Rank 1 stops (SIGSTOP) mid-run: rank 0's next collective gives up after
    --ddp-timeout-s and the job ends with one line and exit 5, not 30 minutes later."""
    timeout_s = 8  # long enough for both processes to start and meet under load
    flags = as_flags(dict(COMMON, max_steps=100_000, eval_interval=0, checkpoint_interval=0,
                          ddp_timeout_s=timeout_s))
    rank0, rank1 = launch_ranks(["--data", str(corpus), "--run-dir", str(tmp_path / "run"), *flags], tmp_path)
    try:
        for line in rank0.stdout:
            if line.startswith("step     3/"):
                break
        rank1.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _, err = rank0.communicate(timeout=timeout_s + 60)
        waited = time.monotonic() - stopped
    finally:
        rank1.kill()
        rank1.wait()
    assert rank0.returncode == 5, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: DDP rank 0: a collective failed ("), err[-2000:]
    assert f"stalled longer than --ddp-timeout-s {timeout_s}" in lines[0]
    assert waited < timeout_s + 30, waited


def test_sigterm_to_one_rank_stops_every_rank_with_one_checkpoint(corpus, tmp_path):
    """The ranks agree on a pending signal when they log (one tiny all-reduce), so a
    signal to any one of them stops all after the same step: rank 0 writes the
    checkpoint, every rank exits 143 naming it, none is left in a collective."""
    run = tmp_path / "run"
    flags = as_flags(dict(COMMON, max_steps=100_000, eval_interval=0, checkpoint_interval=100_000))
    rank0, rank1 = launch_ranks(["--data", str(corpus), "--run-dir", str(run), *flags], tmp_path)
    for line in rank0.stdout:
        if line.startswith("step     3/"):
            break
    rank1.send_signal(signal.SIGTERM)
    results = [(p.wait(timeout=120), p.communicate()[1]) for p in (rank0, rank1)]
    assert [rc for rc, _ in results] == [143, 143], [err[-2000:] for _, err in results]
    (ckpt,) = ckpt_lib.list_checkpoints(run)
    step = ckpt_lib.load_checkpoint(ckpt)["step"]
    for _, err in results:
        assert err.strip().splitlines()[-1] == (f"interrupted by SIGTERM after step {step - 1}: wrote {ckpt}; "
                                                f"continue with: python train.py --resume {run}")
