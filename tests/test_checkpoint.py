"""Checkpoint files: atomic saves, a save killed midway, keep-K, discovery, RNG states."""
import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt_lib
from engine.errors import UserInputError


def state(value: float) -> dict:
    return {"step": int(value), "model": {"w": torch.full((64, 64), value)}, "note": "x",
            "nested": [1, 2.5, None, {"a": "b"}]}


def test_save_then_load_round_trips(tmp_path):
    path = ckpt_lib.save_checkpoint(tmp_path, 7, state(7.0))
    assert path.name == "ckpt_000007.pt"
    loaded = ckpt_lib.load_checkpoint(path)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.full((64, 64), 7.0))
    assert loaded["nested"] == [1, 2.5, None, {"a": "b"}]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_000007.pt"]  # no temp file left


def test_loading_is_weights_only(tmp_path):
    import datetime
    path = tmp_path / "ckpt_000001.pt"
    torch.save({"obj": datetime.date(2020, 1, 1)}, path)  # any non-allowlisted object
    with pytest.raises(UserInputError, match="cannot be loaded"):
        ckpt_lib.load_checkpoint(path)


def test_keeps_the_last_k(tmp_path):
    for step in range(1, 6):
        ckpt_lib.save_checkpoint(tmp_path, step, state(step), keep=2)
    assert [p.name for p in ckpt_lib.list_checkpoints(tmp_path)] == ["ckpt_000004.pt", "ckpt_000005.pt"]
    for step in range(6, 8):
        ckpt_lib.save_checkpoint(tmp_path, step, state(step), keep=0)  # 0 keeps all
    assert len(ckpt_lib.list_checkpoints(tmp_path)) == 4


def test_latest_discovery_by_listing(tmp_path):
    for step in (3, 12, 100):
        ckpt_lib.save_checkpoint(tmp_path, step, state(step))
    (tmp_path / ".ckpt_000200.abc.tmp").write_bytes(b"partial")  # a killed save
    (tmp_path / "ckpt_notes.txt").write_text("not a checkpoint")
    assert ckpt_lib.latest_checkpoint(tmp_path).name == "ckpt_000100.pt"
    assert ckpt_lib.resolve_checkpoint(tmp_path).name == "ckpt_000100.pt"
    assert ckpt_lib.load_checkpoint(tmp_path)["step"] == 100
    f = tmp_path / "ckpt_000003.pt"
    assert ckpt_lib.resolve_checkpoint(f) == f


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nope.pt", "does not exist"),
    (lambda p: p, "holds no checkpoint"),
])
def test_resolve_errors(tmp_path, make, message):
    with pytest.raises(UserInputError, match=message):
        ckpt_lib.resolve_checkpoint(make(tmp_path))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = ckpt_lib.save_checkpoint(tmp_path, 1, state(1.0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match="truncated or damaged"):
        ckpt_lib.load_checkpoint(path)


def test_a_save_failing_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    good = ckpt_lib.save_checkpoint(tmp_path, 1, state(1.0))
    before = good.read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="simulated"):
        ckpt_lib.save_checkpoint(tmp_path, 2, state(2.0))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000001.pt"]  # temp file removed
    assert good.read_bytes() == before
    assert ckpt_lib.load_checkpoint(tmp_path)["step"] == 1


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    ckpt_lib.save_checkpoint(tmp_path, 1, state(1.0))
    # The child starts saving step 2 and is SIGKILLed while the bytes are being written.
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        from engine import checkpoint as c
        real = torch.save
        def slow(obj, f, *a, **k):
            f.write(b"PK partial bytes")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = slow
        c.save_checkpoint({str(tmp_path)!r}, 2, {{"w": torch.zeros(4)}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the killed save should have left its temp file"
    assert ckpt_lib.latest_checkpoint(tmp_path).name == "ckpt_000001.pt"  # temp file ignored
    assert ckpt_lib.load_checkpoint(tmp_path)["step"] == 1
    ckpt_lib.save_checkpoint(tmp_path, 3, state(3.0))  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000001.pt", "ckpt_000003.pt"]


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    ckpt_lib.save_checkpoint(tmp_path, 1, {"rng": ckpt_lib.rng_state()})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ckpt_lib.set_rng_state(ckpt_lib.load_checkpoint(tmp_path)["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]


def test_saved_files_are_not_private(tmp_path):
    path = ckpt_lib.save_checkpoint(tmp_path, 1, state(1.0))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
