"""Token shards in the formats users already have: ours, llm.c's `.bin` (written
here as its dev/data/data_common.py writes them) and build-nanogpt's `.npy`
(np.save of uint16, as its fineweb.py writes them): each read memory-mapped,
validated alike, and trained on."""
import numpy as np
import pytest

from engine import data as D
from engine.errors import UserInputError
from tests.test_train_cli import run_main, small_args

LLMC_MAGIC, LLMC_VERSION = 20240520, 1


def write_llmc(path, tokens):
    """llm.c's write_datafile for GPT-2: a 256-int32 header (magic, version, token
    count, the rest zero), then the tokens as uint16."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = LLMC_MAGIC, LLMC_VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(tokens, dtype=np.uint16).tobytes())


def write_nanogpt(path, tokens):
    """build-nanogpt's write_datafile: np.save of the uint16 array (`path` without .npy)."""
    np.save(path, np.array(tokens, dtype=np.uint16))


def write_ours(path, tokens):
    D.write_shard(path, tokens, vocab_size=256)


# Each writer with the names its project gives its shards (build-nanogpt's train
# shards are numbered after the val shard 0).
FORMATS = {
    "ours": (write_ours, ["bytes_val_000000.bin", "bytes_train_000000.bin", "bytes_train_000001.bin"]),
    "llm.c": (write_llmc, ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]),
    "build-nanogpt": (write_nanogpt, ["edufineweb_val_000000", "edufineweb_train_000001",
                                      "edufineweb_train_000002"]),
}


def make_shards(folder, fmt, sizes=(120, 200, 150), seed=0):
    """Shards of `fmt` holding a few hundred random byte-tokens; returns the tokens per file."""
    writer, names = FORMATS[fmt]
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in zip(names, sizes):
        tokens = rng.integers(0, 256, n)
        writer(folder / name, tokens)
        out[name if fmt != "build-nanogpt" else name + ".npy"] = tokens
    return out


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_loads_memory_mapped(tmp_path, fmt):
    written = make_shards(tmp_path / "d", fmt)
    train = D.build_loader(tmp_path / "d", 2, 8, tokenizer="bytes", shuffle=False)
    val = D.build_loader(tmp_path / "d", 2, 8, split="val", tokenizer="bytes")
    names = sorted(written)
    want_train = np.concatenate([written[n] for n in names if "_train_" in n])
    want_val = np.concatenate([written[n] for n in names if "_val_" in n])
    assert all(isinstance(a, np.memmap) for a in train._arrays + val._arrays)
    np.testing.assert_array_equal(np.concatenate(train._arrays), want_train)
    np.testing.assert_array_equal(np.concatenate(val._arrays), want_val)
    x, y = train.next_batch()
    np.testing.assert_array_equal(x.numpy().ravel(), want_train[:16])
    np.testing.assert_array_equal(y.numpy().ravel(), want_train[1:17])
    # a single file names its split's shard, as a folder does
    single = D.build_loader(tmp_path / "d" / names[0], 1, 4, tokenizer="bytes")
    assert single.num_tokens == len(written[names[0]])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_training_runs_on_each_format(tmp_path, fmt, capsys):
    make_shards(tmp_path / "d", fmt)
    rc, out, err = run_main(small_args(tmp_path / "d", tmp_path / "run", "--eval-interval", "3"), capsys)
    assert rc == 0, err
    assert sum(line.startswith("step ") for line in out.splitlines()) == 3
    assert "2 train shards" in out and "validation loss" in out


def test_ids_beyond_the_vocabulary_are_named(tmp_path):
    """np.save and llm.c's header record no vocabulary: ids are checked per batch."""
    for fmt in ("llm.c", "build-nanogpt"):
        d = tmp_path / fmt
        written = make_shards(d, fmt)
        name = sorted(n for n in written if "_train_" in n)[0]
        bad = written[name].copy()
        bad[5] = 300
        FORMATS[fmt][0](d / (name.removesuffix(".npy") if fmt == "build-nanogpt" else name), bad)
        loader = D.build_loader(d, 2, 8, tokenizer="bytes", shuffle=False)
        with pytest.raises(UserInputError, match=rf"{name} holds token id 300, outside the tokenizer's vocabulary of 256"):
            loader.next_batch()


def npy_bytes(array) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("content,needle", [
    (npy_bytes(np.arange(50, dtype=np.int64)),
     r"holds <i8 \(int64\) values; token shards are uint16 \(build-nanogpt's np.save of a uint16 array\)$"),
    (npy_bytes(np.arange(50, dtype=np.int32)), r"holds <i4 \(int32\) values"),
    (npy_bytes(np.arange(50, dtype=np.uint16).astype(">u2")), r"holds >u2 \(uint16\) values"),
    (npy_bytes(np.zeros((5, 10), dtype=np.uint16)),
     r"is 2-dimensional \(shape \(5, 10\)\); token shards are one-dimensional$"),
    (npy_bytes(np.arange(50, dtype=np.uint16))[:-7],
     r"truncated or corrupt .npy shard: its header says 50 tokens \(228 bytes\) but the file has 221 bytes$"),
    (npy_bytes(np.arange(50, dtype=np.uint16)) + b"\0\0", r"truncated or corrupt .npy shard: .* but the file has 230 bytes"),
    (b"PK\x03\x04 not an array at all" * 4, r"not a readable .npy file \(the magic string is not correct"),
    (b"\x93NUMPY\x01", r"not a readable .npy file"),
])
def test_bad_npy_shards_are_named(tmp_path, content, needle):
    d = tmp_path / "d"
    make_shards(d, "build-nanogpt")
    bad = d / "edufineweb_train_000002.npy"
    bad.write_bytes(content)
    with pytest.raises(UserInputError, match=rf"^{bad}: {needle}"):
        D.build_loader(d, 1, 4, tokenizer="bytes")


@pytest.mark.parametrize("fmt", ["ours", "llm.c"])
def test_bad_bin_shards_are_named(tmp_path, fmt):
    d = tmp_path / "d"
    written = make_shards(d, fmt)
    name = sorted(n for n in written if "_train_" in n)[-1]
    raw = bytearray((d / name).read_bytes())
    raw[0:4] = np.int32(20240801).tobytes()  # llm.c's llama-3 magic: uint32 tokens
    (d / name).write_bytes(bytes(raw))
    with pytest.raises(UserInputError, match=rf"{name}: not a token shard: header magic is 20240801, expected 20240520"):
        D.build_loader(d, 1, 4, tokenizer="bytes")
    raw[0:4] = np.int32(LLMC_MAGIC).tobytes()
    raw[8:12] = np.int32(10_000).tobytes()  # more tokens than the file holds
    (d / name).write_bytes(bytes(raw))
    with pytest.raises(UserInputError, match=rf"{name}: truncated or corrupt shard: header says 10,000 tokens "
                                             r"\(21,024 bytes\) but the file has 1,324 bytes"):
        D.build_loader(d, 1, 4, tokenizer="bytes")


def test_a_folder_of_both_kinds_is_refused(tmp_path):
    d = tmp_path / "d"
    make_shards(d, "llm.c")
    make_shards(d, "build-nanogpt")
    with pytest.raises(UserInputError, match=r"d: holds both .bin shards \(fineweb_train_000001.bin, ...\) and "
                                             r".npy shards \(edufineweb_train_000001.npy, ...\); keep one dataset"):
        D.build_loader(d, 1, 4, tokenizer="bytes")
    # other arrays beside text files are not shards: the folder stays a text folder
    t = tmp_path / "t"
    t.mkdir()
    (t / "a.txt").write_text("some text to train on " * 20)
    np.save(t / "embeddings", np.zeros(4))
    assert D.build_loader(t, 1, 4, tokenizer="bytes").kind == "text"
