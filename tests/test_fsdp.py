"""FSDP (--parallel fsdp) on CPU with gloo, in forked process groups: training
equals one process; sharded checkpoints reshard across world sizes and formats
(2 -> 3 processes -> one process -> 2 processes from a single file -> export);
FusedAdamW on DTensor shards equals torch's AdamW; async saves equal a snapshot."""
import csv
import os
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt_lib
from engine.train_config import TrainConfig
from engine.trainer import train
from tests.helpers import run_in_group

COMMON = dict(tokenizer="bytes", device="cpu", backend="torch", n_layer=1, n_embd=32, batch_size=2, seq_len=16,
              total_batch_size=2 * 16 * 6, warmup_steps=1, max_lr=1e-3, eval_interval=0, eval_batches=1,
              sample_interval=0, checkpoint_interval=2, keep_checkpoints=0, seed=7)
QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture
def single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _train_ranks(rank, world_size, cfg_values):
    lines = []
    trainer = train(TrainConfig(**cfg_values), log=lines.append)
    return {"lines": lines, "steps": [r["step"] for r in trainer.history]}


# FSDP against one process: the reductions add in another order (~1e-7 relative);
# AdamW turns the rounding noise of near-zero gradients (the attention's key bias,
# which the softmax ignores) into updates of up to ~1e-6 in those weights.
LOSS_RTOL = 1e-6
WEIGHT_TOL = dict(rtol=1e-5, atol=2e-6)


def assert_same_rows(got: list[dict], want: list[dict], keys=("loss", "grad_norm"), rtol=LOSS_RTOL):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(want, got):
        for key in keys:
            x, y = float(a[key]), float(b[key])
            assert abs(x - y) <= rtol * abs(x), f"step {a['step']} {key}: one process {x}, FSDP {y}"


def test_fsdp_trains_like_one_process_across_world_sizes_and_formats(corpus, tmp_path, single_process):
    """One run, continued: 2 processes (FSDP, sharded checkpoint), 3 processes
    (resharded; the Triton FusedAdamW on the shards; async save), one process (DDP-less, single-file checkpoint), 2
    processes again from that single file (broadcast from rank 0). Its losses and
    grad norms are those of one uninterrupted process, and its last checkpoint,
    exported as one file, holds that process's weights and optimizer state."""
    data = dict(COMMON, data=str(corpus))
    # The reference stops and resumes at the same steps (max_steps shapes the schedule).
    train(TrainConfig(**data, run_dir=str(tmp_path / "ref"), max_steps=2), **QUIET)
    for max_steps in (4, 5, 6):
        train(TrainConfig(resume=str(tmp_path / "ref"), max_steps=max_steps), **QUIET)
    run = tmp_path / "run"

    (first, _) = run_in_group(_train_ranks, 2, tmp_path, dict(data, run_dir=str(run), max_steps=2, parallel="fsdp",
                                                              eval_interval=1))
    assert any("(FSDP, world size 2)" in line for line in first["lines"])
    assert (run / "ckpt_000002" / "manifest.json").is_file()
    assert sorted(p.name for p in (run / "ckpt_000002").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "manifest.json", "train_state.pt"]

    resumed = dict(resume=str(run), parallel="fsdp")
    (second, *_) = run_in_group(_train_ranks, 3, tmp_path, dict(resumed, max_steps=4, checkpoint_async=True,
                                                                 sample_interval=3, optimizer="triton"))
    assert any("triton FusedAdamW on each process's shards" in line for line in second["lines"])
    assert second["steps"] == [0, 1, 2, 3]
    assert any("written by 2 process(es); continuing at 3" in line for line in second["lines"])
    assert any(line.startswith("sample 0:") for line in second["lines"])

    # One process without FSDP (ddp of one process is none), from the sharded ckpt_000004.
    train(TrainConfig(resume=str(run), max_steps=5, parallel="ddp"), **QUIET)
    assert (run / "ckpt_000005.pt").is_file()
    run_in_group(_train_ranks, 2, tmp_path, dict(resumed, max_steps=6))  # FSDP from the single file
    assert [p.name for p in ckpt_lib.list_checkpoints(run)] == [
        "ckpt_000002", "ckpt_000004", "ckpt_000005.pt", "ckpt_000006"]

    assert_same_rows(read_rows(run), read_rows(tmp_path / "ref"))
    from engine.sharded_checkpoint import export
    exported = ckpt_lib.load_checkpoint(export(run))
    want = ckpt_lib.load_checkpoint(tmp_path / "ref" / "ckpt_000006.pt")
    assert exported["step"] == 6 and exported["world_size"] == 2
    for name, tensor in want["model"].items():
        torch.testing.assert_close(exported["model"][name], tensor, **WEIGHT_TOL, msg=name)
    for i, st in want["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(exported["optimizer"]["state"][i][key], st[key], rtol=1e-5, atol=1e-9)
        assert float(exported["optimizer"]["state"][i]["step"]) == float(st["step"]) == 6
    assert exported["train_loader"]["token_offset"] == want["train_loader"]["token_offset"]
