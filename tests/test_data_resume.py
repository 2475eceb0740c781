"""An interrupted prepare resumes: the shards it finished are kept in its work
folder, the same command continues from them (its inputs and settings checked)
and the result is byte for byte what an uninterrupted prepare writes; --out never
shows a half-finished dataset. Interrupted in-process at each stage for every
kind of input, and once for real: a prepare SIGKILLed in the middle."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from engine import data as D
from engine.data import work_folder
from engine.errors import UserInputError
from tests.document_files import documents, write_hf_folder, write_jsonl, write_parquet
from tests.helpers import child_env

SHARD = 400  # tokens per shard: a few dozen shards from a small corpus


class Stop(KeyboardInterrupt):
    """What a Ctrl-C would raise, at a chosen point."""


def write_input(tmp_path, kind, docs):
    if kind == "text":
        d = tmp_path / "texts"
        d.mkdir()
        for i in range(0, len(docs), 10):
            (d / f"{i:04d}.txt").write_text("\n\n".join(docs[i:i + 10]) or "x", encoding="utf-8")
        return [d], {}
    if kind == "hf":
        pytest.importorskip("datasets", reason="the data extra (datasets) is not installed")
        return [], {"hf_dataset": str(write_hf_folder(tmp_path / "hf", docs))}
    pytest.importorskip("pyarrow", reason="the data extra (pyarrow) is not installed")
    if kind == "parquet":
        return [write_parquet(tmp_path / "docs.parquet", docs)], {}
    return [write_jsonl(tmp_path / f"docs.{kind}", docs)], {}


def folder_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def visible(folder) -> list:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def interrupt_at(monkeypatch, target, name, calls: int) -> list:
    """Make `target.name` raise Stop on its `calls`-th call, before doing anything;
    returns the list of the arguments of every call."""
    original, seen = getattr(target, name), []

    def stop(*args, **kwargs):
        seen.append(args)
        if len(seen) == calls:
            raise Stop
        return original(*args, **kwargs)
    monkeypatch.setattr(target, name, stop)
    return seen


SETTINGS = dict(shard_tokens=SHARD, chunk_bytes=700, progress=False, tokenizer="gpt2")


@pytest.fixture(scope="module")
def docs():
    return documents(n=400, long_chars=3000)


@pytest.mark.parametrize("kind", ["text", "parquet", "jsonl", "jsonl.zst", "hf"])
def test_resume_after_an_interrupt_while_tokenizing(tmp_path, gpt2, docs, kind, monkeypatch):
    """Stopped after a shard was written but before progress.json said so: that
    shard is written again; the stream continues inside the task it stopped in."""
    inputs, where = write_input(tmp_path, kind, docs)
    reference = D.prepare(inputs, tmp_path / "ref", workers=1, **SETTINGS, **where)
    assert len(reference["train"]) > 10
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        saves = interrupt_at(m, work_folder.WorkFolder, "save_progress", calls=4)
        with pytest.raises(Stop):
            D.prepare(inputs, out, workers=2, **SETTINGS, **where)
    assert visible(out) == []
    work = out / ".prepare-work"
    recorded, finished = saves[-2][1]["shards"], saves[-1][1]["shards"]
    assert json.loads((work / "progress.json").read_text())["shards"] == recorded
    assert (work / f"stream_{finished - 1:06d}.bin").exists()  # finished, not yet recorded
    s = D.prepare(inputs, out, workers=2, **SETTINGS, **where)
    assert s["resumed_tokens"] == recorded * SHARD and s["documents"] == reference["documents"]
    assert folder_bytes(out) == folder_bytes(tmp_path / "ref")


@pytest.mark.parametrize("stage,target,name,calls", [
    ("splitting the shard at the val/train boundary", "work_folder", "write_shard", 2),
    ("moving the shards into --out", "os", "replace", -3),
])
def test_resume_after_an_interrupt_while_finishing(tmp_path, gpt2, docs, stage, target, name, calls, monkeypatch):
    inputs, where = write_input(tmp_path, "jsonl", docs)
    D.prepare(inputs, tmp_path / "ref", workers=1, **SETTINGS, **where)
    out = tmp_path / "out"
    if target == "os":  # the third rename into --out, after the manifest is there
        original, moved = os.replace, []

        def replace(src, dst):
            if str(dst).startswith(str(out / "gpt2_")):
                moved.append(dst)
                if len(moved) == -calls:
                    raise Stop
            return original(src, dst)
        monkeypatch.setattr(work_folder.os, "replace", replace)
    else:
        interrupt_at(monkeypatch, work_folder, name, calls)
    with pytest.raises(Stop):
        D.prepare(inputs, out, workers=1, **SETTINGS, **where)
    monkeypatch.undo()
    if target == "os":
        # the loader refuses the half-moved folder instead of training on part of it
        assert len(visible(out)) == 3  # the manifest and two shards
        with pytest.raises(UserInputError, match=r"out: incomplete: manifest.json lists \d+ shards and \d+ are "
                                                 "missing .*: an interrupted prepare; run the same prepare command"):
            D.build_loader(out, 1, 8, tokenizer="gpt2")
    else:
        assert visible(out) == []
    s = D.prepare(inputs, out, workers=1, **SETTINGS, **where)
    assert s["resumed_tokens"] == s["train_tokens"] + s["val_tokens"]
    assert folder_bytes(out) == folder_bytes(tmp_path / "ref")


def test_a_resume_with_other_inputs_or_settings_is_refused(tmp_path, gpt2, docs, monkeypatch, capsys):
    inputs, _ = write_input(tmp_path, "jsonl", docs)
    out = tmp_path / "out"
    with monkeypatch.context() as m:  # as the command line would run it
        interrupt_at(m, work_folder.WorkFolder, "save_progress", calls=3)
        with pytest.raises(Stop):
            D.prepare(inputs, out, workers=1, shard_tokens=SHARD, progress=False)
    kept = folder_bytes(out / ".prepare-work")
    args = ["prepare", str(inputs[0]), "--out", str(out), "--quiet"]
    assert D.main(args + ["--shard-tokens", "500"]) == 2
    assert capsys.readouterr().err == (
        f"error: {out}: holds an unfinished prepare of other inputs or settings (--shard-tokens was 400, now 500); "
        f"run that prepare again to finish it, or delete {out / '.prepare-work'} to start this one\n")
    time.sleep(0.01)  # a modification time of its own
    with open(inputs[0], "ab") as f:
        f.write(b'{"text": "one more document"}\n')
    assert D.main(args + ["--shard-tokens", "400"]) == 2
    assert f"other inputs or settings ({inputs[0].resolve()} changed since)" in capsys.readouterr().err
    assert folder_bytes(out / ".prepare-work") == kept and visible(out) == []


def corpus_parquet(path, copies: int):
    """A few MB of prose as FineWeb-like rows: seconds of tokenizing here."""
    docs = documents(n=10 ** 6)
    return write_parquet(path, docs * copies, row_group_size=64), len(docs) * copies


def test_a_killed_prepare_resumes_to_identical_shards(tmp_path, gpt2):
    """SIGKILL in the middle (nothing runs after it: no clean-up, workers killed
    with it): --out shows nothing, the finished shards stay in the work folder, the
    same command continues from them and writes what an uninterrupted prepare does."""
    pytest.importorskip("pyarrow", reason="the data extra (pyarrow) is not installed")
    if not sys.platform.startswith("linux"):
        pytest.skip("reads the workers' pids from /proc (Linux)")
    src, n_docs = corpus_parquet(tmp_path / "docs.parquet", copies=4)
    out, work = tmp_path / "out", tmp_path / "out" / ".prepare-work"
    cmd = [sys.executable, "-m", "engine.data", "prepare", str(src), "--out", str(out), "--shard-tokens", "20000",
           "--workers", "2", "--quiet"]
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:  # until the third shard is recorded, then kill at once
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            try:
                if json.loads((work / "progress.json").read_text())["shards"] >= 3:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        workers = [int(c) for c in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
        proc.communicate()
    assert visible(out) == []
    done = json.loads((work / "progress.json").read_text())
    assert not done.get("finished") and done["shards"] >= 3
    assert all((work / f"stream_{i:06d}.bin").is_file() for i in range(done["shards"]))
    time.sleep(0.5)
    for pid in workers:  # they die with their parent
        state = open(f"/proc/{pid}/stat").read().split()[2] if os.path.exists(f"/proc/{pid}") else "gone"
        assert state in ("gone", "Z"), f"worker {pid} outlived its killed parent ({state})"
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{n_docs:,} documents" in r.stdout and "resumed after" in r.stdout
    resumed = int(r.stdout.rsplit("resumed after ", 1)[1].split()[0].replace(",", ""))
    assert resumed >= done["shards"] * 20000
    D.prepare([src], tmp_path / "ref", shard_tokens=20000, workers=1, progress=False)
    assert folder_bytes(out) == folder_bytes(tmp_path / "ref")
    loader = D.build_loader(out, 4, 64, tokenizer="gpt2")
    assert loader.num_tokens == np.sum([len(D.open_shard(p)) for p in out.glob("gpt2_train_*.bin")])
