"""`prepare` of document-per-row sources: Parquet, JSON lines (plain, .gz, .zst) and
a Hugging Face dataset (a local copy, through `datasets`, offline), against
build-nanogpt's rule for the token stream; their bad input, one line each; the
optional `data` extra missing; a dataset name without network."""
import subprocess
import sys
import time

import numpy as np
import pytest

from engine import data as D
from engine.errors import UserInputError
from tests.document_files import (documents, fineweb_shards, jsonl_bytes, write_hf_folder, write_jsonl,
                                  write_parquet)
from tests.helpers import child_env

pytest.importorskip("pyarrow", reason="the data extra (pyarrow) is not installed")

KINDS = ["parquet", "jsonl", "jsonl.gz", "jsonl.zst", "hf"]


def write_source(tmp_path, kind, docs, field="text"):
    """Inputs of `kind` holding `docs`: (positional inputs, keyword settings) for prepare."""
    if kind == "hf":
        return [], {"hf_dataset": str(write_hf_folder(tmp_path / "hf", docs))}
    if kind == "parquet":
        return [write_parquet(tmp_path / "docs.parquet", docs, field)], {}
    return [write_jsonl(tmp_path / f"docs.{kind}", docs, field)], {}


def read_stream(out, tokenizer="gpt2"):
    val = sorted(out.glob(f"{tokenizer}_val_*.bin"))
    train = sorted(out.glob(f"{tokenizer}_train_*.bin"))
    return [np.asarray(D.open_shard(p)) for p in val], [np.asarray(D.open_shard(p)) for p in train]


@pytest.fixture(scope="module")
def hf_offline(tmp_path_factory):
    """The Hub out of reach and a private cache: `datasets` must work from files alone."""
    import datasets.config
    mp = pytest.MonkeyPatch()
    # The switch's name moved between datasets releases (2.19 reads HF_DATASETS_OFFLINE).
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(datasets.config, name):
            mp.setattr(datasets.config, name, True)
    mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    yield
    mp.undo()


@pytest.mark.smoke  # the data extra's floors (pyarrow, zstandard, datasets) are tested by this
@pytest.mark.parametrize("kind", KINDS)
def test_each_source_gives_build_nanogpts_stream(tmp_path, gpt2, kind, request):
    """Many tasks (small chunks), a document longer than a chunk, two workers: the
    token stream is fineweb.py's for the same documents, and with --val-tokens equal
    to --shard-tokens so are the shards themselves."""
    if kind == "hf":
        request.getfixturevalue("hf_offline")
    docs = documents(n=150, long_chars=6000)
    inputs, where = write_source(tmp_path, kind, docs)
    shard = 1200
    s = D.prepare(inputs, tmp_path / "out", workers=2, progress=False, shard_tokens=shard, val_tokens=shard,
                  chunk_bytes=1500, **where)
    expected = fineweb_shards(docs, gpt2._enc, shard)
    val, train = read_stream(tmp_path / "out")
    assert len(val) == 1 and len(train) == len(expected) - 1 > 2
    for (name, want), got in zip(expected, val + train):
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert s["documents"] == len(docs)
    assert s["val_tokens"] == shard and s["train_tokens"] == sum(len(t) for _, t in expected) - shard


@pytest.mark.parametrize("kind", ["parquet", "jsonl.zst"])
def test_val_fraction_and_text_field(tmp_path, gpt2, kind):
    """The default split (the first 10% of the tokens) cuts the shard it falls in
    into two; --text-field picks the column."""
    docs = documents(n=60)
    inputs, _ = write_source(tmp_path, kind, docs, field="content")
    s = D.prepare(inputs, tmp_path / "out", workers=1, progress=False, shard_tokens=700, text_field="content")
    stream = np.concatenate([t for _, t in fineweb_shards(docs, gpt2._enc, 10 ** 9)])
    n_val = int(len(stream) * 0.1)
    val, train = read_stream(tmp_path / "out")
    np.testing.assert_array_equal(np.concatenate(val), stream[:n_val])
    np.testing.assert_array_equal(np.concatenate(train), stream[n_val:])
    assert [len(v) for v in val] == [700] * (n_val // 700) + ([n_val % 700] if n_val % 700 else [])
    assert len(train[0]) == 700 - n_val % 700 and all(len(t) == 700 for t in train[1:-1])
    assert (s["val_tokens"], s["train_tokens"]) == (n_val, len(stream) - n_val)


def test_folders_of_rows_in_order(tmp_path, gpt2):
    """A folder is walked for Parquet and JSON-lines files (its files by name, then
    its subfolders); a README or dataset_info.json beside them is not a document."""
    docs = documents(n=90)
    d = tmp_path / "d"
    (d / "b").mkdir(parents=True)
    write_parquet(d / "a.parquet", docs[:30])
    write_jsonl(d / "b" / "part.jsonl.gz", docs[30:60])
    write_jsonl(d / "c.jsonl", docs[60:])
    (d / "README.md").write_text("# a dataset card\n")
    (d / "dataset_info.json").write_text("{}")
    D.prepare([d], tmp_path / "out", workers=2, progress=False, val_fraction=0.0, chunk_bytes=2000)
    _, train = read_stream(tmp_path / "out")
    in_walk_order = docs[:30] + docs[60:] + docs[30:60]  # a.parquet, c.jsonl, b/part.jsonl.gz
    want = np.concatenate([t for _, t in fineweb_shards(in_walk_order, gpt2._enc, 10 ** 9)])
    np.testing.assert_array_equal(np.concatenate(train), want)


def test_a_long_document_reaches_the_tokenizer_in_pieces(tmp_path, gpt2, monkeypatch):
    """Memory stays bounded whatever a document's size: the tokenizer is handed
    pieces of about chunk_bytes, a batch at a time, and the tokens are the whole
    document's."""
    docs = documents(n=5, long_chars=200_000)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    batches, encode_batch = [], type(gpt2).encode_batch

    def spy(self, texts, num_threads=8):
        batches.append([len(t.encode()) for t in texts])
        return encode_batch(self, texts, num_threads)
    monkeypatch.setattr(type(gpt2), "encode_batch", spy)
    D.prepare([src], tmp_path / "out", workers=1, progress=False, val_fraction=0.0, chunk_bytes=4096)
    assert max(len(b) for b in batches) > 1 and len(batches) > 20
    assert max(max(b) for b in batches) < 4096 + 100  # a piece ends at the first safe cut after chunk_bytes
    assert max(sum(b) for b in batches) < 2 * 4096 + 100
    _, train = read_stream(tmp_path / "out")
    want = np.concatenate([t for _, t in fineweb_shards(docs, gpt2._enc, 10 ** 9)])
    np.testing.assert_array_equal(np.concatenate(train), want)


def test_byte_tokenizer_rows_have_no_separator(tmp_path):
    docs = ["abc", "", "dé\ud83d"]  # JSON can hold a lone surrogate: replaced, as tiktoken does
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl_bytes(docs))
    D.prepare([path], tmp_path / "out", tokenizer="bytes", workers=1, progress=False, val_fraction=0.0)
    _, train = read_stream(tmp_path / "out", "bytes")
    assert bytes(np.concatenate(train).astype(np.uint8)) == "abcdé\ufffd".encode()


# ----------------------------------------------------------------- bad input

def put(path, data: bytes):
    path.write_bytes(data)
    return path


def parquet_with(path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path)
    return path


BAD_INPUTS = {
    "parquet without the field": (
        lambda p: parquet_with(p / "x.parquet", content=["a", "b"], id=[1, 2]),
        r"x.parquet: has no column 'text' \(its columns: content, id\); choose one with --text-field"),
    "parquet field not strings": (
        lambda p: parquet_with(p / "x.parquet", text=[1, 2]), r"x.parquet: column 'text' holds int64, not strings"),
    "parquet null document": (
        lambda p: parquet_with(p / "x.parquet", text=["a", None, "c"]),
        r"x.parquet: row 1 \(counting from 0\): 'text' is null, not a string"),
    "not parquet": (
        lambda p: put(p / "x.parquet", b"PAR1 but not really" * 3),
        r"x.parquet: not a readable Parquet file \("),
    "jsonl not JSON": (
        lambda p: put(p / "x.jsonl", b'{"text": "a"}\n\n{"text": "b",}\n'),
        r"x.jsonl: line 3: not JSON \(Expecting property name enclosed in double quotes at column 14\)"),
    "jsonl field not a string": (
        lambda p: put(p / "x.jsonl", b'{"text": "a"}\n{"text": ["b"]}\n'),
        r"x.jsonl: line 2: 'text' is an array, not a string"),
    "jsonl field missing": (
        lambda p: put(p / "x.jsonl", b'{"body": "a", "id": 1}\n'),
        r"x.jsonl: line 1: has no 'text' field \(its fields: body, id\); choose one with --text-field"),
    "jsonl not an object": (
        lambda p: put(p / "x.jsonl", b'{"text": "a"}\n"just a string"\n'),
        r"x.jsonl: line 2: is a string, not an object with a 'text' field"),
    "jsonl not UTF-8": (
        lambda p: put(p / "x.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n'),
        r"x.jsonl: line 2: not valid UTF-8; save the file as UTF-8"),
    "gz line number": (
        lambda p: put(p / "y.jsonl.gz", gzip_of(jsonl_bytes(["a"] * 3000) + b"{oops}\n")),
        r"y.jsonl.gz: line 3001: not JSON"),
    "gz truncated": (
        lambda p: put(p / "x.jsonl.gz", gzip_of(jsonl_bytes(["word " * 50] * 200))[:-30]),
        r"x.jsonl.gz: damaged or truncated .gz file \(Compressed file ended before the end-of-stream marker"),
    "zst truncated": (
        lambda p: put(p / "x.jsonl.zst", zstd_of(jsonl_bytes(["word " * 50] * 200))[:-30]),
        r"x.jsonl.zst: damaged or truncated .zst file \(the file ends inside a zstd frame\)"),
    "zst garbage": (
        lambda p: put(p / "x.jsonl.zst", b"not zstd at all" * 10),
        r"x.jsonl.zst: damaged .zst file \("),
    "empty dataset": (
        lambda p: put(p / "x.jsonl", b"\n\n"), r"prepare: no documents in .*x.jsonl$"),
}


def gzip_of(data):
    import gzip
    return gzip.compress(data)


def zstd_of(data):
    import zstandard
    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_out_unchanged(tmp_path, case, capsys):
    make, needle = BAD_INPUTS[case]
    src = tmp_path / "src"
    src.mkdir()
    path = make(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    status = D.main(["prepare", str(path), "--out", str(out), "--tokenizer", "bytes", "--workers", "2", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert __import__("re").search(needle, err), err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # no shard, manifest or work folder


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_line_numbers_count_across_tasks(tmp_path, suffix):
    rows = jsonl_bytes([f"row {i}" for i in range(2000)]).splitlines(keepends=True)
    rows[1234] = b'{"text": 5}\n'
    data = b"".join(rows)
    path = put(tmp_path / f"x.{suffix}", gzip_of(data) if suffix.endswith("gz") else
               zstd_of(data) if suffix.endswith("zst") else data)
    with pytest.raises(UserInputError, match=rf"x.{suffix}: line 1235: 'text' is a number, not a string"):
        D.prepare([path], tmp_path / "out", tokenizer="bytes", workers=2, progress=False, chunk_bytes=300)


def test_a_new_out_folder_is_not_left_behind(tmp_path, capsys):
    status = D.main(["prepare", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "new" / "out")])
    assert status == 2 and "missing.parquet: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "new" / "out").exists()


@pytest.mark.parametrize("module,make,needle", [
    ("pyarrow", lambda p: parquet_with(p / "x.parquet", text=["a"]), "x.parquet: reading Parquet needs the pyarrow"),
    ("zstandard", lambda p: write_jsonl(p / "x.jsonl.zst", ["a"]), "x.jsonl.zst: reading .zst files needs the zstandard"),
])
def test_without_the_data_extra_the_error_names_it(tmp_path, monkeypatch, capsys, module, make, needle):
    path = make(tmp_path)
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)  # `import` now raises ImportError
    status = D.main(["prepare", str(path), "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and err == f'error: {tmp_path}/{needle} package; the optional data extra installs it: ' \
                                  f'pip install -e ".[data]"\n'


def test_without_datasets_a_hub_name_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)
    status = D.main(["prepare", "--hf-dataset", "HuggingFaceFW/fineweb-edu", "--out", str(tmp_path / "out"),
                     "--tokenizer", "bytes"])
    assert status == 2
    assert capsys.readouterr().err == ('error: HuggingFaceFW/fineweb-edu: reading a Hugging Face dataset needs the '
                                       'datasets package; the optional data extra installs it: pip install -e ".[data]"\n')


def test_a_dataset_name_without_network_says_what_to_do(tmp_path):
    """In a real process, as users meet it: offline, one line with the way to a
    local copy, at once (HF_HUB_OFFLINE: no retries)."""
    pytest.importorskip("datasets", reason="the data extra (datasets) is not installed")
    env = child_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "engine.data", "prepare", "--hf-dataset", "HuggingFaceFW/fineweb-edu",
                        "--hf-config", "sample-10BT", "--split", "train", "--out", str(tmp_path / "out"),
                        "--tokenizer", "bytes"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(
        "error: HuggingFaceFW/fineweb-edu: cannot reach the Hugging Face Hub (HF_HUB_OFFLINE is set); offline, "
        "download the dataset where there is network (`hf download HuggingFaceFW/fineweb-edu --repo-type dataset "
        "--local-dir DIR`"), r.stderr
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "out").exists()


def test_inputs_and_a_dataset_are_one_or_the_other(tmp_path):
    with pytest.raises(UserInputError, match="give input files or folders, or --hf-dataset, not both"):
        D.prepare([tmp_path], tmp_path / "out", hf_dataset="x/y", progress=False)
    with pytest.raises(UserInputError, match="give input files or folders, or --hf-dataset NAME"):
        D.prepare([], tmp_path / "out", progress=False)
    with pytest.raises(UserInputError, match="--val-tokens must be >= 0"):
        D.prepare([tmp_path], tmp_path / "out", val_tokens=-1, progress=False)
    src = write_jsonl(tmp_path / "x.jsonl", ["tiny"])
    with pytest.raises(UserInputError, match=r"the inputs hold 4 tokens; --val-tokens 4 leaves none for training"):
        D.prepare([src], tmp_path / "out", val_tokens=4, tokenizer="bytes", progress=False)
