"""Small document collections written in each format `prepare` reads, and
build-nanogpt's rule for the tokens of a FineWeb-Edu prepare, reimplemented from
its fineweb.py as the oracle."""
import gzip
import json

import numpy as np

# What fineweb-edu's parquet files hold beside `text` (the worker must not care).
FINEWEB_COLUMNS = ("id", "dump", "url", "language", "language_score", "token_count", "score", "int_score")


def documents(n: int = 120, long_chars: int = 0) -> list[str]:
    """English prose (CPython's pydoc topics) cut into documents, with the cases a
    tokenizer can get wrong: an empty document, the literal text <|endoftext|>,
    non-ASCII, CRLF, leading/trailing spaces; one of `long_chars` characters if given."""
    from pydoc_data.topics import topics
    paragraphs = [p for t in sorted(topics) for p in topics[t].split("\n\n") if p.strip()]
    docs = paragraphs[:n]
    docs[3:3] = ["", "text with <|endoftext|> inside it", "naïve café — 😀 ünïcödé\r\nsecond line",
                 "   spaces around   ", "\n\n\n"]
    if long_chars:
        words = " ".join(paragraphs).split()
        long, size = [], 0
        while size < long_chars:
            long.append(words[len(long) % len(words)])
            size += len(long[-1]) + 1
        docs.insert(7, " ".join(long))  # one line: cut only at spaces before words
    return docs


def write_parquet(path, docs, field: str = "text", row_group_size: int = 16):
    import pyarrow as pa
    import pyarrow.parquet as pq
    n = len(docs)
    columns = {field: docs, "id": [f"<urn:uuid:{i:08d}>" for i in range(n)], "dump": ["CC-MAIN-2024-10"] * n,
               "url": [f"https://example.com/{i}" for i in range(n)], "language": ["en"] * n,
               "language_score": [0.97] * n, "token_count": list(range(n)), "score": [3.1] * n,
               "int_score": [3] * n}
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def jsonl_bytes(docs, field: str = "text") -> bytes:
    return "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()


def write_jsonl(path, docs, field: str = "text"):
    """JSON lines; compressed by the name's suffix (.gz, .zst; .zst in two frames,
    as concatenated files are)."""
    data = jsonl_bytes(docs, field)
    name = str(path)
    if name.endswith(".gz"):
        data = gzip.compress(data)
    elif name.endswith(".zst"):
        import zstandard
        half = data.rfind(b"\n", 0, len(data) // 2) + 1
        c = zstandard.ZstdCompressor()
        data = c.compress(data[:half]) + c.compress(data[half:])
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_hf_folder(folder, docs, files: int = 3):
    """A local copy of a dataset as `hf download` leaves one: data/train-*.parquet."""
    (folder / "data").mkdir(parents=True)
    bounds = [len(docs) * i // files for i in range(files + 1)]
    for k in range(files):
        write_parquet(folder / "data" / f"train-{k:05d}-of-{files:05d}.parquet", docs[bounds[k]:bounds[k + 1]])
    return folder


def fineweb_shards(docs, enc, shard_size: int) -> list[tuple[str, np.ndarray]]:
    """build-nanogpt's fineweb.py: each document is [<|endoftext|>] + encode_ordinary(text)
    as uint16; documents fill shards of shard_size tokens in order (one that does not
    fit is split, its rest starting the next shard); shard 0 is val, the others
    train, named by their index; the last shard holds the remainder."""
    eot = enc._special_tokens["<|endoftext|>"]
    shards, buf = [], []
    for doc in docs:
        buf.extend([eot] + enc.encode_ordinary(doc))
        while len(buf) >= shard_size:
            shards.append(buf[:shard_size])
            buf = buf[shard_size:]
    if buf:
        shards.append(buf)
    return [(f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}", np.array(s, dtype=np.uint16))
            for i, s in enumerate(shards)]
