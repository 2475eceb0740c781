"""Data preparation under faults, in real processes: two prepares into one folder,
an interrupted prepare, a huge single-line file (bounded memory), and the
loader refusing what an interrupted prepare leaves. (Resuming: test_data_resume.py.)"""
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from engine import data as D
from engine.data.shards import MANIFEST_NAME
from engine.errors import UserInputError
from tests.helpers import child_env

LINE_MB = 20


@pytest.fixture(scope="module")
def one_line_file(tmp_path_factory):
    """LINE_MB MB of English words separated by single spaces, and not one newline."""
    from pydoc_data.topics import topics
    words = sorted({w for t in topics.values() for w in t.split() if w.isascii() and w.isprintable()})
    rng = random.Random(0)
    text = " ".join(rng.choices(words, k=LINE_MB * 1_000_000 // 7))
    path = tmp_path_factory.mktemp("oneline") / "one_line.txt"
    path.write_text(text[:LINE_MB * 1_000_000].rstrip(), encoding="ascii")
    return path


def prepare_cmd(inputs, out, *extra):
    return [sys.executable, "-m", "engine.data", "prepare", *map(str, inputs), "--out", str(out), *extra]


class Progress:
    """A prepare process whose stderr (a progress line redrawn with \\r) is collected."""

    def __init__(self, cmd, cwd):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.err = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while chunk := self.proc.stderr.read1(4096):
            self.err += chunk

    def wait_for_progress(self, timeout=120):
        deadline = time.monotonic() + timeout
        while b"prepare: " not in self.err:
            assert self.proc.poll() is None and time.monotonic() < deadline, self.err[-2000:]
            time.sleep(0.02)

    def finish(self, timeout=300):
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc, self.err.decode(errors="replace")


def test_a_single_line_file_is_tokenized_in_bounded_memory(one_line_file, tmp_path, gpt2):
    """A file that is one long line used to be one piece (about 16x its size in
    memory); cut at spaces before words, it costs a few chunks plus the file's pages."""
    script = f"""
import json, resource, sys
from engine.data.prepare import prepare
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
s = prepare([{str(one_line_file)!r}], {str(tmp_path / "out")!r}, workers=1, tokenizer="gpt2", progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
json.dump({{"base_kb": base, "peak_kb": peak, "tokens": s["train_tokens"] + s["val_tokens"]}}, sys.stdout)
"""
    proc = subprocess.run([sys.executable, "-c", script], env=child_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    size_mb = one_line_file.stat().st_size / 1e6
    grown_mb = (r["peak_kb"] - r["base_kb"]) / 1e3  # ru_maxrss is in KiB on Linux
    # The file's mapped pages (1x) and the uint16 token stream (~0.5x) are expected.
    assert grown_mb < 3 * size_mb, f"peak memory grew by {grown_mb:.0f} MB for a {size_mb:.0f} MB line"
    assert r["tokens"] > size_mb * 1e6 / 8  # the whole line was tokenized


def test_cuts_inside_one_line_are_exact(gpt2, tmp_path):
    rng = random.Random(1)
    pieces = ["word", "Word", "it's", "x", "3.14", "é", "  ", "--", "a\u00a0b", "'s", "\t", "🎉", "can't"]
    text = " ".join(rng.choice(pieces) for _ in range(20_000))
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    got = D.tokenize_file(path, gpt2, chunk_bytes=500)
    np.testing.assert_array_equal(got, np.array(gpt2.encode(text), dtype=np.int64))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_prepare_leaves_the_folder_as_it_was(one_line_file, tmp_path, gpt2, sig):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    child = Progress(prepare_cmd([one_line_file], out, "--workers", "2", "--shard-tokens", "100000"), tmp_path)
    child.wait_for_progress()
    child.proc.send_signal(sig)
    rc, err = child.finish()
    assert rc == 128 + sig, err[-2000:]
    work = out / ".prepare-work"
    assert re.fullmatch(rf"prepare: interrupted by {sig.name}; {out} is left as it was; \d+ finished shards are kept "
                        rf"in {work}: run the same command again to continue", err.strip().splitlines()[-1])
    # no shard, manifest or temp file in sight; the work so far kept, hidden, to be resumed
    assert sorted(p.name for p in out.iterdir()) == [".prepare-work", "notes.txt"]
    assert not [p for p in work.iterdir() if p.name.endswith(".partial")]


def test_two_prepares_into_one_folder_never_mix(one_line_file, corpus, tmp_path, gpt2):
    out = tmp_path / "out"
    first = Progress(prepare_cmd([one_line_file], out, "--workers", "1"), tmp_path)
    first.wait_for_progress()
    first.proc.send_signal(signal.SIGSTOP)  # held mid-prepare, however fast this machine is
    try:
        second = subprocess.run(prepare_cmd([corpus], out, "--tokenizer", "bytes"), cwd=tmp_path,
                                env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    finally:
        first.proc.send_signal(signal.SIGCONT)
    rc, err = first.finish()
    assert rc == 0, err[-2000:]
    assert second.returncode == 2
    assert second.stderr == f"error: {out}: another prepare is writing into this folder; wait for it to end or " \
                            "choose another --out\n"
    # the folder holds the first dataset alone, complete
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["tokenizer"] == "gpt2"
    assert sorted(e["name"] for e in manifest["shards"]) == sorted(p.name for p in out.glob("*.bin"))
    loader = D.build_loader(out, 2, 8, tokenizer="gpt2")
    assert loader.num_tokens == sum(e["tokens"] for e in manifest["shards"] if e["split"] == "train")
    # and one after it is refused, as any prepare into a prepared folder
    third = subprocess.run(prepare_cmd([corpus], out, "--tokenizer", "bytes"), cwd=tmp_path,
                           env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert third.returncode == 2 and f"{out}: already holds shards (manifest.json, " in third.stderr


def test_the_loader_refuses_what_an_interrupted_prepare_leaves(corpus, tmp_path):
    """Killed (SIGKILL) between writing the manifest and moving the last shard: the
    loader names the folder as incomplete instead of training on part of it; the
    work folder of a killed prepare is removed by the next prepare into the folder."""
    out = tmp_path / "out"
    D.prepare([corpus], out, tokenizer="bytes", shard_tokens=20_000, val_fraction=0.1, progress=False, workers=1)
    shards = sorted(out.glob("*_train_*.bin"))
    assert len(shards) > 3
    shards[-1].unlink()
    with pytest.raises(UserInputError, match=r"out: incomplete: manifest.json lists \d+ shards and 1 are missing"):
        D.build_loader(out, 2, 8, tokenizer="bytes")
    D.write_shard(shards[-1], np.arange(10), 256)  # back, but not the shard the manifest lists
    with pytest.raises(UserInputError, match="incomplete"):
        D.build_loader(out, 2, 8, tokenizer="bytes")
    stray = tmp_path / "shards"
    stray.mkdir()
    killed = stray / ".prepare-abc123"  # a SIGKILLed prepare's work folder
    killed.mkdir()
    (killed / "tokens.u16").write_bytes(b"\0" * 100)
    D.prepare([corpus], stray, tokenizer="bytes", progress=False, workers=1)
    assert not killed.exists()
    assert D.build_loader(stray, 2, 8, tokenizer="bytes").num_tokens > 100_000


@pytest.mark.parametrize("tty", [True, False])
def test_progress_redraws_on_a_terminal_and_writes_lines_into_a_log(tty):
    """A carriage return in a log file runs the reports together: there each report
    is a line of its own."""
    import io

    from engine.data.prepare import _Progress

    class Stream(io.StringIO):
        def isatty(self):
            return tty

    stream = Stream()
    bar = _Progress(2_000_000, "bytes", True, {}, stream=stream)
    bar.update(1_000_000, 3, 500)
    bar.update(1_000_000, 2, 500, force=True)
    bar.close()
    text = stream.getvalue()
    assert text.count("prepare: ") == 3 and text.endswith("\n") and "1,000 tokens" in text
    assert ("\r" in text) == tty and (text.count("\n") == 1) == tty
