"""Multi-node torchrun that survives a lost worker: two torchrun agents on
127.0.0.1 (c10d rendezvous, one worker each, FSDP) train one run into a shared
run folder with `--resume auto`; a worker is killed mid-run, both agents restart
their workers (--max-restarts), the run resumes from its newest checkpoint and
ends with the losses of an uninterrupted run."""
import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.train_config import TrainConfig
from engine.trainer import train
from tests.helpers import REPO_ROOT, child_env

FLAGS = dict(tokenizer="bytes", device="cpu", backend="torch", n_layer=1, n_embd=32, batch_size=2, seq_len=16,
             total_batch_size=2 * 16 * 2, warmup_steps=2, max_lr=1e-3, eval_interval=0, sample_interval=0,
             checkpoint_interval=5, keep_checkpoints=2, max_steps=40, seed=11, ddp_timeout_s=60.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers through /proc (Linux)")
def test_two_agents_survive_a_killed_worker(corpus, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    train(TrainConfig(data=str(corpus), run_dir=str(tmp_path / "ref"), **FLAGS), log=lambda *a: None)

    run = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=elastic-test",
           "--max-restarts=3", "--monitor-interval=0.2", str(REPO_ROOT / "train.py"), "--parallel=fsdp",
           "--resume=auto", f"--run-dir={run}", f"--data={corpus}", *flags]
    # The rendezvous store is not shared with the workers, so a restarted round
    # starts from a fresh one (with the shared one, torchrun's restart fails).
    env = child_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    logs = [open(tmp_path / f"agent{i}.log", "w+") for i in range(2)]
    agents = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    try:
        deadline = time.monotonic() + 240
        while not (run / "ckpt_000005").is_dir():
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            assert all(a.poll() is None for a in agents), "an agent ended before the first checkpoint"
            time.sleep(0.02)
        (worker,) = children(agents[1].pid)
        os.kill(worker, signal.SIGKILL)
        codes = [a.wait(timeout=300) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait()
    output = "".join(log.seek(0) or log.read() for log in logs)
    for log in logs:
        log.close()
    assert codes == [0, 0], output[-4000:]
    assert "| resumed from" in output, "the worker was killed after the run ended: " + output[-2000:]
    got, want = read_rows(run), read_rows(tmp_path / "ref")
    assert [r["step"] for r in got] == [str(s) for s in range(40)]
    for a, b in zip(want, got):
        for key in ("loss", "grad_norm"):
            x, y = float(a[key]), float(b[key])
            assert abs(x - y) <= 1e-6 * abs(x), f"step {a['step']} {key}: uninterrupted {x}, restarted {y}"
