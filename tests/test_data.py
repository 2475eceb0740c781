"""Data pipeline: text and shard sources, ranks, shuffling, resume, bad input."""
import os
import re
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import data as D
from engine.errors import UserInputError
from engine.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
BYTES = get_tokenizer("bytes")


def positions(n, start=0):
    """Tokens equal to their stream position: batches reveal where they came from."""
    return np.arange(start, start + n, dtype=np.int64)


def batches(loader, k):
    return [tuple(t.clone() for t in loader.next_batch()) for _ in range(k)]


def write_text(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- text source

def test_text_batches_in_order_and_wrap(tmp_path):
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefgh \n"), size=500))
    f = write_text(tmp_path / "t.txt", text)
    B, T = 2, 8
    loader = D.build_loader(f, B, T, tokenizer="bytes", val_fraction=0.1)
    train = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)[:500 - 50]
    assert loader.num_tokens == 450
    assert loader.batches_per_epoch == (450 - 1) // (B * T) == 28
    assert loader.tokens_per_epoch == 28 * B * T
    for i in range(loader.batches_per_epoch + 3):
        x, y = loader.next_batch()
        j = i % loader.batches_per_epoch
        chunk = train[j * B * T: j * B * T + B * T + 1]
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == y.shape == (B, T)
        np.testing.assert_array_equal(x.numpy().ravel(), chunk[:-1])
        np.testing.assert_array_equal(y.numpy().ravel(), chunk[1:])
        assert loader.epoch == i // loader.batches_per_epoch
    assert "t.txt" in loader.description and "bytes" in loader.description


@pytest.mark.parametrize("B,T", [(1, 1), (2, 5), (3, 7)])
def test_targets_are_inputs_shifted(B, T):
    loader = D.TokenLoader([("p", positions(100))], B, T)
    for _ in range(loader.batches_per_epoch + 1):
        x, y = loader.next_batch()
        np.testing.assert_array_equal(y.numpy(), x.numpy() + 1)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_slices_are_disjoint(world_size):
    """Rank r reads global row i*world_size + r; rows wrap into the next epoch one
    by one, so the ranks together read every row of an epoch once, whatever
    their number."""
    B, T, n = 2, 4, 203
    rows = (n - 1) // (B * T)  # 25 rows of 8 tokens per epoch
    seen = []
    for rank in range(world_size):
        loader = D.TokenLoader([("p", positions(n))], B, T, rank=rank, world_size=world_size)
        assert loader.rows_per_epoch == rows and loader.tokens_per_epoch == rows * B * T
        assert loader.batches_per_epoch == (n - 1) // (B * T * world_size)
        for i in range(2 * rows // world_size + 1):
            x, _ = loader.next_batch()
            epoch, row = divmod(i * world_size + rank, rows)
            np.testing.assert_array_equal(x.numpy().ravel(), positions(B * T, row * B * T))
            assert loader.epoch == epoch
            if epoch == 0:
                seen.append(x.numpy().ravel())
    seen = np.concatenate(seen)
    assert len(np.unique(seen)) == len(seen) == rows * B * T


def test_text_rank_slices_disjoint(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    f = write_text(tmp_path / "a.txt", text)
    raw = np.frombuffer(text.encode(), dtype=np.uint8)
    for rank in range(2):
        loader = D.build_loader(f, 2, 8, rank=rank, world_size=2, tokenizer="bytes")
        for step in range(2):
            x, _ = loader.next_batch()
            start = (2 * step + rank) * 16
            np.testing.assert_array_equal(x.numpy().ravel(), raw[start:start + 16])


def test_split_sizes(tmp_path, gpt2):
    f = write_text(tmp_path / "s.txt", "The quick brown fox jumps over the lazy dog.\n" * 40)
    whole = np.array(gpt2.encode(f.read_text()))
    n = len(whole)
    for vf in (0.1, 0.25):
        tr = D.build_loader(f, 1, 4, split="train", tokenizer=gpt2, val_fraction=vf)
        va = D.build_loader(f, 1, 4, split="val", tokenizer=gpt2, val_fraction=vf)
        assert va.num_tokens == int(n * vf) and tr.num_tokens == n - int(n * vf)
        both = np.concatenate([tr._arrays[0], va._arrays[0]])
        np.testing.assert_array_equal(both, whole)
    with pytest.raises(UserInputError, match="val split is empty"):
        D.build_loader(f, 1, 4, split="val", tokenizer=gpt2, val_fraction=0.0)


def test_text_folder_source(tmp_path, gpt2):
    (tmp_path / "sub").mkdir()
    write_text(tmp_path / "b.txt", "second document\n" * 20)
    write_text(tmp_path / "sub" / "c.md", "third document\n" * 20)
    write_text(tmp_path / "a.txt", "first document\n" * 20)
    (tmp_path / "skip.png").write_bytes(b"\x89PNG\0\0")
    loader = D.build_loader(tmp_path, 1, 8, tokenizer=gpt2, val_fraction=0.0)
    expected = []
    for name in ("a.txt", "b.txt", "sub/c.md"):
        expected += [50256] + gpt2.encode((tmp_path / name).read_text())
    np.testing.assert_array_equal(loader._arrays[0], expected)


def test_tinyshakespeare_token_count(gpt2, tinyshakespeare):
    tokens = D.tokenize_file(tinyshakespeare, gpt2)
    assert len(tokens) == 338_025
    # chunked (parallel) tokenization must give exactly the whole-text tokens
    np.testing.assert_array_equal(D.tokenize_file(tinyshakespeare, gpt2, chunk_bytes=50_000), tokens)
    assert gpt2.decode(tokens[:3]) == "First Citizen:"
    loader = D.build_loader(tinyshakespeare, 4, 64, tokenizer=gpt2)
    assert loader.num_tokens == 338_025 - 33_802


_ALPHABET = list("ab Z'\n\n\t.,;:!?09") + ["é", "\u00a0", "\u2028", "🎉", "'s", " \n", "\r\n"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(_ALPHABET), max_size=120), st.integers(1, 12))
def test_chunked_tokenization_is_exact(gpt2, tmp_path_factory, pieces, chunk):
    text = "".join(pieces) or "x"
    f = tmp_path_factory.mktemp("hyp") / "t.txt"
    f.write_bytes(text.encode("utf-8"))
    got = D.tokenize_file(f, gpt2, chunk_bytes=chunk)
    np.testing.assert_array_equal(got, np.array(gpt2.encode(text), dtype=np.int64))


# ---------------------------------------------------------------- shards

def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = D.write_shard(tmp_path / "x_train_000000.bin", tokens, vocab_size=50257)
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[:4].tolist() == [20240520, 1, 5, 50257] and not header[4:].any()
    assert D.read_shard_header(path) == (5, 50257)
    np.testing.assert_array_equal(D.open_shard(path), tokens)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(UserInputError, match="uint16"):
        D.write_shard(tmp_path / "y_train_000000.bin", [1, 65536])


def make_corpus(root):
    root.mkdir()
    (root / "nested").mkdir()
    write_text(root / "b.txt", "To be, or not to be, that is the question:\n" * 30)
    write_text(root / "nested" / "c.txt", "Whether 'tis nobler in the mind to suffer\n" * 25)
    write_text(root / "a.txt", "The slings and arrows of outrageous fortune,\n" * 20)
    return [root / "a.txt", root / "b.txt", root / "nested" / "c.txt"]


def expected_stream(files, tok):
    out = []
    for f in files:
        out += ([tok.eot_token] if tok.eot_token is not None else []) + tok.encode(f.read_text())
    return np.array(out, dtype=np.int64)


def read_split(out, name, split):
    paths = sorted(out.glob(f"{name}_{split}_*.bin"))
    return paths, (np.concatenate([D.open_shard(p) for p in paths]).astype(np.int64)
                   if paths else np.zeros(0, np.int64))


@pytest.mark.parametrize("tok_name", ["gpt2", "bytes"])
def test_prepare_function_round_trip(tmp_path, tok_name, request):
    tok = request.getfixturevalue("gpt2") if tok_name == "gpt2" else BYTES
    files = make_corpus(tmp_path / "corpus")
    s = D.prepare([tmp_path / "corpus"], tmp_path / "out", shard_tokens=300, workers=2,
                  tokenizer=tok_name, val_fraction=0.2, progress=False, chunk_bytes=200)
    stream = expected_stream(files, tok)
    n_val = int(len(stream) * 0.2)
    val_paths, val = read_split(tmp_path / "out", tok_name, "val")
    train_paths, train = read_split(tmp_path / "out", tok_name, "train")
    np.testing.assert_array_equal(val, stream[:n_val])
    np.testing.assert_array_equal(train, stream[n_val:])
    assert s["val_tokens"] == n_val and s["train_tokens"] == len(stream) - n_val
    assert s["val"] == val_paths and s["train"] == train_paths and len(train_paths) > 1
    assert all(D.read_shard_header(p)[0] <= 300 for p in val_paths + train_paths)
    assert all(D.read_shard_header(p)[1] == tok.vocab_size for p in val_paths + train_paths)
    # the shards, their manifest, nothing else (no temp file, no work folder)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [p.name for p in val_paths + train_paths] + ["manifest.json"])
    assert s["manifest"] == tmp_path / "out" / "manifest.json"


def test_prepare_command_line(tmp_path, gpt2):
    files = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-m", "engine.data", "prepare", str(files[0]), str(tmp_path / "corpus" / "nested"),
         str(files[1]), "--out", str(out), "--workers", "2", "--shard-tokens", "250",
         "--val-fraction", "0.1", "--tokenizer", "gpt2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # into a pipe, each report is a line of its own
    assert re.match(r"prepare: 100% of \d+\.\d kB, 3 documents, [\d,]+ tokens, [\d,]+ tokens/s", last), last
    assert "train tokens" in r.stdout
    # inputs in the order given: a.txt, the nested folder, b.txt
    stream = expected_stream([files[0], files[2], files[1]], gpt2)
    n_val = int(len(stream) * 0.1)
    np.testing.assert_array_equal(read_split(out, "gpt2", "val")[1], stream[:n_val])
    np.testing.assert_array_equal(read_split(out, "gpt2", "train")[1], stream[n_val:])


def test_progress_line_says_documents_tokens_rate_and_time_left():
    import importlib
    import io
    P = importlib.import_module("engine.data.prepare")
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock = iter([100.0, 110.0, 130.0]).__next__
    stream = Terminal()
    bar = P._Progress(4_000_000, "bytes", True, {"units": 1_000_000, "documents": 7, "tokens": 500}, stream=stream,
                      clock=clock)
    bar.update(1_000_000, 40, 2_000_000)  # 10 s in: 1 MB of the 3 MB left, at 0.1 MB/s
    assert stream.getvalue() == ("\rprepare: 50% of 4.0 MB, 47 documents, 2,000,500 tokens, 200,000 tokens/s, "
                                 "ETA 0m20s\033[K")
    bar.update(2_000_000, 3, 10, force=True)
    assert stream.getvalue().endswith("prepare: 100% of 4.0 MB, 50 documents, 2,000,510 tokens, 66,667 tokens/s\033[K")
    hub = P._Progress(0, "documents", True, {}, stream=Terminal(), clock=iter([0.0, 1.0]).__next__)
    hub.update(0, 12, 345, force=True)
    assert hub.stream.getvalue().startswith("\rprepare: 12 documents, 345 tokens, ")


def test_command_line_user_error(tmp_path, capsys):
    # the same entry point in-process: one line on stderr, status 2, no traceback
    status = D.main(["prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and "nope.txt: no such file" in err
    assert err.count("\n") == 1


def shard_dir(tmp_path, sizes, split="train", start=0):
    d = tmp_path / "shards"
    d.mkdir(exist_ok=True)
    for i, n in enumerate(sizes):
        D.write_shard(d / f"t_{split}_{i:06d}.bin", positions(n, start) % 65536)
        start += n
    return d


def test_streams_across_shard_boundaries(tmp_path):
    d = shard_dir(tmp_path, [10, 25, 3, 40])
    loader = D.build_loader(d, 2, 5, shuffle=False, tokenizer=None)
    assert loader.num_tokens == 78 and loader.batches_per_epoch == 7
    for i in range(loader.batches_per_epoch):
        x, y = loader.next_batch()
        np.testing.assert_array_equal(x.numpy().ravel(), positions(10, i * 10))
        np.testing.assert_array_equal(y.numpy().ravel(), positions(10, i * 10 + 1))
    assert "4 train shards" in loader.description


def test_val_shards_are_not_shuffled_and_separate(tmp_path):
    d = shard_dir(tmp_path, [30, 30], split="train")
    shard_dir(tmp_path, [20, 20], split="val", start=1000)
    val = D.build_loader(d, 1, 4, split="val", seed=5, tokenizer=None)
    assert val.num_tokens == 40 and not val.shuffle
    x, _ = val.next_batch()
    assert x.numpy().ravel().tolist() == [1000, 1001, 1002, 1003]


def test_shuffle_per_epoch_is_deterministic(tmp_path):
    d = shard_dir(tmp_path, [16] * 8)

    def run(seed, rank=0):
        loader = D.build_loader(d, 1, 4, seed=seed, rank=rank, world_size=2, tokenizer=None)
        assert loader.shuffle
        out, orders, epochs = [], {}, []
        for _ in range(3 * loader.batches_per_epoch):
            out.append(loader.next_batch()[0].numpy().ravel())
            orders.setdefault(loader.epoch, loader.state_dict()["order"])
            epochs.append(loader.epoch)
        assert sorted(orders) == [0, 1, 2]
        return np.stack(out), list(orders.values()), np.array(epochs)

    a, orders_a, epochs_a = run(seed=1)
    b, _, _ = run(seed=1)
    np.testing.assert_array_equal(a, b)
    c, _, _ = run(seed=2)
    assert not np.array_equal(a, c)
    # the order changes from epoch to epoch and covers every shard
    assert len({tuple(o) for o in orders_a}) > 1
    assert all(sorted(o) == sorted(orders_a[0]) for o in orders_a)
    # every epoch's tokens are each shard's tokens exactly once across ranks
    r1, orders_r1, epochs_r1 = run(seed=1, rank=1)
    assert orders_r1 == orders_a
    for e in range(2):
        both = np.concatenate([a[epochs_a == e].ravel(), r1[epochs_r1 == e].ravel()])
        assert len(np.unique(both)) == len(both) == 31 * 4  # every row of the epoch once
    # in-order batches would be contiguous; shuffled ones jump between shards
    per_epoch = len(a) // 3
    assert not np.array_equal(a[:per_epoch].ravel(), positions(per_epoch * 4))


@pytest.mark.parametrize("source", ["text", "shards"])
def test_resume_at_another_world_size_continues_the_global_stream(tmp_path, source):
    """Read at 2 processes, saved, continued at 3, saved, continued at 1: the rows
    the ranks read, in global order, are the rows one process reads, across
    epoch ends (and shuffles of the shards)."""
    if source == "text":
        path = write_text(tmp_path / "r.txt", "".join(chr(97 + (i * 7) % 26) for i in range(300)))
    else:
        path = shard_dir(tmp_path, [13, 29, 7, 31, 19])
    tok = "bytes" if source == "text" else None

    def ranks(world):
        return [D.build_loader(path, 2, 3, rank=r, world_size=world, tokenizer=tok, seed=3) for r in range(world)]

    (single,) = ranks(1)
    expected = [x for x, _ in batches(single, 3 * single.rows_per_epoch)]
    got, state = [], None
    for world, steps in ((2, 7), (3, 9), (1, len(expected))):
        loaders = ranks(world)
        for loader in loaders:
            if state is not None:
                loader.load_state_dict(state)
        for _ in range(steps):
            got += [loader.next_batch()[0] for loader in loaders]
        state = loaders[-1].state_dict()
        assert state["token_offset"] == len(got) * 2 * 3
    for i, (want, have) in enumerate(zip(expected, got)):
        assert want.equal(have), f"global row {i}"


def test_loader_state_of_version_1_resumes_at_its_place(tmp_path):
    """A version-1 state (epoch, batch per rank, world size) continues at the same
    row of the stream, at any world size."""
    loader = D.TokenLoader([("p", positions(203))], 2, 4)
    rows = loader.rows_per_epoch
    state = dict(loader.state_dict(), version=1, world_size=2, epoch=1, batch=3)
    del state["token_offset"]
    loader.load_state_dict(state)
    x, _ = loader.next_batch()
    assert loader.epoch == 1 and x.numpy().ravel()[0] == 6 * 8
    assert loader.state_dict()["token_offset"] == (rows + 7) * 8


@pytest.mark.parametrize("source", ["text", "shards"])
def test_resume_gives_identical_batches(tmp_path, source):
    if source == "text":
        path = write_text(tmp_path / "r.txt", "".join(chr(97 + (i * 7) % 26) for i in range(300)))
    else:
        path = shard_dir(tmp_path, [13, 29, 7, 31, 19])
    tok = "bytes" if source == "text" else None

    def make(rank=0):
        return D.build_loader(path, 2, 3, rank=rank, world_size=2, tokenizer=tok, seed=3)

    loader = make()
    per_epoch = loader.batches_per_epoch
    batches(loader, per_epoch + 2)  # into the second epoch
    state = loader.state_dict()
    expected = batches(loader, 2 * per_epoch)  # crosses another epoch boundary
    fresh = make()
    fresh.load_state_dict(state)
    got = batches(fresh, 2 * per_epoch)
    for (x1, y1), (x2, y2) in zip(expected, got):
        assert x1.equal(x2) and y1.equal(y2)
    # rank 0's state resumes rank 1 where rank 1 would have been
    rank1 = make(rank=1)
    batches(rank1, per_epoch + 2)
    want = batches(rank1, 3)
    other = make(rank=1)
    other.load_state_dict(state)
    for (x1, _), (x2, _) in zip(want, batches(other, 3)):
        assert x1.equal(x2)
    other = D.build_loader(path, 3, 3, tokenizer=tok)
    with pytest.raises(UserInputError, match="cannot resume.*B=2"):
        other.load_state_dict(state)


def test_reset_restarts_epoch(tmp_path):
    loader = D.TokenLoader([("p", positions(50))], 2, 4)
    first = batches(loader, 3)
    loader.reset()
    assert loader.next_batch()[0].equal(first[0][0])


def test_single_bin_files(tmp_path):
    d = tmp_path / "one"
    d.mkdir()
    D.write_shard(d / "tiny_train.bin", positions(40))
    D.write_shard(d / "tiny_val.bin", positions(20, 100))
    val = D.build_loader(d / "tiny_train.bin", 1, 4, split="val", tokenizer=None)
    assert val.num_tokens == 20 and val.next_batch()[0].numpy().ravel()[0] == 100
    D.write_shard(d / "other_train.bin", positions(40))
    with pytest.raises(UserInputError, match=r"other_train.bin: is a train shard; the val split needs other_val\.bin.*does not exist"):
        D.build_loader(d / "other_train.bin", 1, 4, split="val")
    D.write_shard(d / "plain.bin", positions(100))
    tr = D.build_loader(d / "plain.bin", 1, 4, val_fraction=0.1, tokenizer=None)
    va = D.build_loader(d / "plain.bin", 1, 4, split="val", val_fraction=0.1, tokenizer=None)
    assert (tr.num_tokens, va.num_tokens) == (90, 10)
    assert va.next_batch()[0].numpy().ravel()[0] == 90


# ---------------------------------------------------------------- bad input

def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserInputError, match="nothere.txt: no such file"):
        D.build_loader(tmp_path / "nothere.txt", 1, 4, tokenizer="bytes")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(UserInputError, match="empty.txt: file is empty"):
        D.build_loader(tmp_path / "empty.txt", 1, 4, tokenizer="bytes")
    with pytest.raises(UserInputError, match="empty.txt: file is empty"):
        D.prepare([tmp_path / "empty.txt"], tmp_path / "out", progress=False, tokenizer="bytes")
    with pytest.raises(UserInputError, match="nothere.txt: no such file"):
        D.prepare([tmp_path / "nothere.txt"], tmp_path / "out", progress=False, tokenizer="bytes")


def test_corpus_shorter_than_a_batch(tmp_path):
    f = write_text(tmp_path / "short.txt", "x" * 100)
    with pytest.raises(UserInputError, match=r"short.txt.*90 tokens.*B\*T\*world_size\+1 = 97"):
        D.build_loader(f, 3, 32, tokenizer="bytes")
    with pytest.raises(UserInputError, match=r"90 tokens.*= 129 \(B=2, T=32, world_size=2\)"):
        D.build_loader(f, 2, 32, world_size=2, tokenizer="bytes")
    # exactly B*T+1 tokens is enough for one batch
    assert D.build_loader(f, 1, 89, tokenizer="bytes").batches_per_epoch == 1
    with pytest.raises(UserInputError, match="rank 2 is outside 0..1"):
        D.build_loader(f, 1, 4, rank=2, world_size=2, tokenizer="bytes")


def test_non_utf8_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("line one\nline two\ncaf".encode() + b"\xe9 au lait\n")
    with pytest.raises(UserInputError, match=r"latin1.txt: not valid UTF-8 at byte offset 21 \(line 3, byte 4"):
        D.build_loader(f, 1, 4, tokenizer="bytes")
    with pytest.raises(UserInputError, match=r"latin1.txt: not valid UTF-8 at byte offset 21 \(line 3"):
        D.prepare([f], tmp_path / "out", progress=False, tokenizer="bytes", workers=1)


def test_bad_shards(tmp_path):
    d = shard_dir(tmp_path, [50, 50])
    good = d / "t_train_000000.bin"
    raw = bytearray(good.read_bytes())

    bad = d / "t_train_000001.bin"
    bad.write_bytes(b"\x01\x02\x03\x04" + raw[4:])
    with pytest.raises(UserInputError, match=r"t_train_000001.bin: not a token shard: header magic"):
        D.build_loader(d, 1, 4, tokenizer=None)

    hdr = np.frombuffer(raw[:1024], dtype=np.int32).copy()
    hdr[1] = 7
    bad.write_bytes(hdr.tobytes() + raw[1024:])
    with pytest.raises(UserInputError, match=r"t_train_000001.bin: unsupported shard version 7"):
        D.build_loader(d, 1, 4, tokenizer=None)

    bad.write_bytes(raw[:-10])
    with pytest.raises(UserInputError, match=r"t_train_000001.bin: truncated or corrupt shard: header says "
                                             r"50 tokens \(1,124 bytes\) but the file has 1,114 bytes"):
        D.build_loader(d, 1, 4, tokenizer=None)

    bad.write_bytes(raw[:100])
    with pytest.raises(UserInputError, match=r"t_train_000001.bin: truncated shard: 100 bytes"):
        D.build_loader(d, 1, 4, tokenizer=None)


def test_shard_vocab_checks(tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    D.write_shard(d / "b_train_000000.bin", positions(40), vocab_size=256)
    with pytest.raises(UserInputError, match=r"b_train_000000.bin: holds bytes tokens \(vocab 256\), but this run "
                                             r"uses the gpt2 tokenizer \(vocab 50,257\); train with --tokenizer "
                                             r"bytes, or prepare the data again with --tokenizer gpt2$"):
        D.build_loader(d, 1, 4, tokenizer="gpt2")
    D.write_shard(d / "b_train_000000.bin", positions(40), vocab_size=50257)
    with pytest.raises(UserInputError, match=r"--tokenizer auto chose bytes because the GPT-2 BPE files are "
                                             r"unavailable: set TIKTOKEN_CACHE_DIR"):
        D.build_loader(d, 1, 4, tokenizer="bytes", requested_tokenizer="auto")
    # llm.c shards carry no vocab: ids beyond the tokenizer's are caught per batch
    D.write_shard(d / "c_train_000000.bin", positions(40, 250))
    loader = D.build_loader(d / "c_train_000000.bin", 2, 4, tokenizer="bytes")
    with pytest.raises(UserInputError, match=r"c_train_000000.bin: c_train_000000.bin holds token id 2\d\d, outside"):
        batches(loader, 2)


def test_folders_without_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "image.png").write_bytes(b"\x89PNG\0")
    with pytest.raises(UserInputError, match="empty: no token shards .* and no text files"):
        D.build_loader(empty, 1, 4, tokenizer=None)
    with pytest.raises(UserInputError, match="empty: no text files found"):
        D.prepare([empty], tmp_path / "out", progress=False, tokenizer="bytes")
    d = shard_dir(tmp_path, [50])
    with pytest.raises(UserInputError, match=r"shards: none of its 1 .bin files is a val shard"):
        D.build_loader(d, 1, 4, split="val", tokenizer=None)
    src = write_text(tmp_path / "x.txt", "hello there\n" * 10)
    with pytest.raises(UserInputError, match="shards: already holds shards"):
        D.prepare([src], d, progress=False, tokenizer="bytes")
    with pytest.raises(UserInputError, match="split must be 'train' or 'val'"):
        D.build_loader(src, 1, 4, split="test", tokenizer="bytes")


# ---------------------------------------------------------------- default corpus

def test_default_corpus_prefers_input_txt(tmp_path):
    write_text(tmp_path / "input.txt", "local corpus")
    path, desc = D.resolve_default_corpus(tmp_path / "cache", cwd=tmp_path,
                                          fetch=lambda *a: pytest.fail("must not download"))
    assert path == tmp_path / "input.txt" and "input.txt" in desc


def test_default_corpus_downloads_once(tmp_path):
    calls = []

    def fake_fetch(url, timeout):
        calls.append((url, timeout))
        return b"First Citizen:\nBefore we proceed any further, hear me speak.\n"

    cache = tmp_path / "cache"
    path, desc = D.resolve_default_corpus(cache, cwd=tmp_path, fetch=fake_fetch)
    assert path == cache / "tinyshakespeare.txt" and path.read_text().startswith("First Citizen")
    assert "tiny-shakespeare" in desc and "downloaded" in desc
    assert calls == [(D.TINY_SHAKESPEARE_URL, 5.0)]
    assert "karpathy/char-rnn" in D.TINY_SHAKESPEARE_URL
    path2, desc2 = D.resolve_default_corpus(cache, cwd=tmp_path, fetch=fake_fetch)
    assert path2 == path and "cached" in desc2 and len(calls) == 1
    assert [p.name for p in cache.iterdir()] == ["tinyshakespeare.txt"]


def test_default_corpus_offline_uses_pydoc_data(tmp_path, monkeypatch):
    from pydoc_data.topics import topics

    def offline(url, timeout):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path, desc = D.resolve_default_corpus(cwd=tmp_path, fetch=offline)
    assert path.parent == tmp_path / "xdg" / "gpt2-engine"
    text = path.read_text(encoding="utf-8")
    assert topics["assert"].strip() in text and len(text) > 100_000
    assert "pydoc_data" in desc and "could not be downloaded" in desc and "no network" in desc
    loader = D.build_loader(path, 4, 64, tokenizer="bytes")
    assert loader.batches_per_epoch > 100
