"""Checkpoint files: atomic checksummed saves, a save killed or failing midway,
keep-K, discovery, damaged and foreign files, RNG states."""
import io
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from engine import checkpoint as ckpt_lib
from engine.errors import UserInputError
from engine.run_dir import RunFolder
from engine.run_errors import RunFileError


def state(value: float) -> dict:
    """A state with every entry a training checkpoint holds."""
    return {"version": ckpt_lib.FORMAT_VERSION, "step": int(value), "model": {"w": torch.full((64, 64), value)},
            "optimizer": {"state": {}, "param_groups": []}, "train_loader": {}, "val_loader": {},
            "rng": {"torch": torch.get_rng_state()}, "train_config": {}, "model_config": {},
            "nested": [1, 2.5, None, {"a": "b"}]}


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def with_trailer(payload: bytes) -> bytes:
    """Bytes as save_checkpoint frames them: a forged file with a valid checksum."""
    import hashlib
    return payload + struct.pack("<16sQ32s", ckpt_lib.TRAILER_MAGIC, len(payload),
                                 hashlib.sha256(payload).digest())


@pytest.mark.smoke
def test_save_then_load_round_trips(tmp_path):
    path = ckpt_lib.save_checkpoint(tmp_path, 7, state(7.0))
    assert path.name == "ckpt_000007.pt"
    loaded = ckpt_lib.load_checkpoint(path)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["w"], torch.full((64, 64), 7.0))
    assert loaded["nested"] == [1, 2.5, None, {"a": "b"}]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_000007.pt"]  # no temp file left


def test_loading_is_weights_only(tmp_path):
    """An object outside torch's allowlist is refused, even behind a valid checksum,
    and the message never suggests weights_only=False."""
    import datetime
    buf = io.BytesIO()
    torch.save({**state(1.0), "obj": datetime.date(2020, 1, 1)}, buf)
    path = tmp_path / "ckpt_000001.pt"
    path.write_bytes(with_trailer(buf.getvalue()))
    with pytest.raises(UserInputError, match="not a training checkpoint of this engine") as e:
        ckpt_lib.load_checkpoint(path)
    assert str(path) in str(e.value) and "weights_only=False" not in str(e.value)


@pytest.mark.parametrize("make, reason", [
    (lambda buf: torch.save({"w": torch.zeros(3)}, buf), "no checksum trailer"),  # a plain torch file
    (lambda buf: buf.write(with_trailer(b"not a zip file")), "cannot be loaded safely"),
    (lambda buf: torch.save([1, 2], buf), "it holds a list, not a dict"),
])
def test_foreign_files_are_not_training_checkpoints(tmp_path, make, reason):
    buf = io.BytesIO()
    make(buf)
    if reason.startswith("it holds"):
        buf = io.BytesIO(with_trailer(buf.getvalue()))
    path = tmp_path / "ckpt_000003.pt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ckpt_lib.CheckpointError, match=reason) as e:
        ckpt_lib.load_checkpoint(path)
    assert str(e.value).startswith(f"{path}: not a training checkpoint of this engine")


def test_a_tampered_checkpoint_with_a_recomputed_checksum_is_refused(tmp_path):
    """Entries removed and the trailer forged to match: refused by what it holds, not a KeyError."""
    buf = io.BytesIO()
    forged = state(1.0)
    del forged["optimizer"], forged["rng"]
    forged["step"] = "7"
    torch.save(forged, buf)
    path = tmp_path / "ckpt_000001.pt"
    path.write_bytes(with_trailer(buf.getvalue()))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"missing or malformed: step, optimizer, rng"):
        ckpt_lib.load_checkpoint(path)


@pytest.mark.parametrize("where", ["tensor bytes", "trailer", "truncated", "appended"])
def test_damaged_checkpoints_fail_their_checksum(tmp_path, where):
    path = ckpt_lib.save_checkpoint(tmp_path, 1, state(1.0))
    size = path.stat().st_size
    if where == "tensor bytes":
        flip_byte(path, size // 2)  # inside the 16 KB tensor: torch.load alone would not notice
    elif where == "trailer":
        flip_byte(path, size - 1)
    elif where == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ckpt_lib.load_checkpoint(path)
    if where == "truncated" or where == "appended":
        # the trailer is then read from the wrong place: either way the file is unusable
        assert str(path) in str(e.value)
    else:
        assert e.value.damaged and "damaged checkpoint (sha256 mismatch" in str(e.value)


def test_resume_from_a_folder_skips_a_damaged_latest_checkpoint(tmp_path):
    for step in (1, 2, 3):
        ckpt_lib.save_checkpoint(tmp_path, step, state(step))
    flip_byte(tmp_path / "ckpt_000003.pt", 1000)
    lines = []
    path, loaded = ckpt_lib.load_for_resume(tmp_path, log=lines.append)
    assert path.name == "ckpt_000002.pt" and loaded["step"] == 2
    assert "ckpt_000003.pt: damaged checkpoint" in lines[0]
    assert lines[1].endswith("using the newest valid checkpoint, " + str(tmp_path / "ckpt_000002.pt"))
    # named explicitly, the damaged file is refused, naming the valid one beside it
    with pytest.raises(UserInputError, match=r"ckpt_000003.pt: damaged checkpoint .*newest valid checkpoint "
                                             r"beside it is .*ckpt_000002.pt: --resume .*ckpt_000002.pt"):
        ckpt_lib.load_for_resume(tmp_path / "ckpt_000003.pt")
    flip_byte(tmp_path / "ckpt_000002.pt", 1000)
    flip_byte(tmp_path / "ckpt_000001.pt", 1000)
    with pytest.raises(UserInputError, match=r"no valid checkpoint in .*ckpt_000003.pt: damaged .*\(and 2 more\)"):
        ckpt_lib.load_for_resume(tmp_path)


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
    with pytest.raises(UserInputError, match="ckpt_000001.pt: not a training checkpoint of this engine"):
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
    with pytest.raises(RunFileError, match=r"could not write .*ckpt_000002.pt \(disk full \(simulated\)\); "
                                           r"the earlier checkpoints are intact \(latest: .*ckpt_000001.pt\)"):
        ckpt_lib.save_checkpoint(tmp_path, 2, state(2.0), keep=1)
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
        c.save_checkpoint({str(tmp_path)!r}, 2, {{"w": torch.zeros(4)}}, token="dead-1")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the killed save should have left its temp file"
    assert ckpt_lib.latest_checkpoint(tmp_path).name == "ckpt_000001.pt"  # temp file ignored
    assert ckpt_lib.load_checkpoint(tmp_path)["step"] == 1
    assert "dead-1" in leftovers[0]  # temp files carry the writing process's token
    # A temp file of another live process is never touched; the next run that claims
    # the folder (and so knows no other process writes there) removes the dead one's
    # once it starts writing (a run refused at set-up changes nothing).
    ckpt_lib.save_checkpoint(tmp_path, 3, state(3.0), token="next-2")
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 1
    folder = RunFolder(tmp_path, token="next-2")
    folder.claim()
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 1
    folder.start_writing()
    folder.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000001.pt", "ckpt_000003.pt"]


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    ckpt_lib.save_checkpoint(tmp_path, 1, dict(state(1.0), rng=ckpt_lib.rng_state()))
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
