"""The content hash of a run's data: what lets a resumed run find its corpus at a
new path (moved, copied, behind a symlink) and know it is the same data.

`content_hash(path)` is a sha256 over every file the loader reads from `path`:
for a folder, each file's path inside it (shard names define the shard order a
checkpoint's loader state refers to), then, for every file, its size and its
bytes. A file up to 64 MiB is hashed whole; a larger one (a token shard is 200
MB, a FineWeb-Edu folder holds a hundred) by 16 blocks of 64 KiB spread evenly
over it, the first and the last included. A folder of 100 shards thus costs
about 100 MB of reads, not 20 GB, and what makes another corpus (other sizes,
other names, other tokens: a re-tokenised or different text differs in every
block) is seen; an edit inside a large file that changes neither its size nor a
sampled block is not, which the loader's own token-count check backs up.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from engine.data.shards import SHARD_SUFFIXES, SPLIT_TAG, list_shards
from engine.data.text import find_text_files

WHOLE_FILE_BYTES = 64 * 2**20
SAMPLE_BLOCKS = 16
SAMPLE_BYTES = 64 * 2**10


def data_files(path) -> list[tuple[str, Path]]:
    """(name the hash uses, file) for each file the loader reads from `path`: a
    folder's shards (else its text files) named by their place in it; a split
    shard and its sibling by file name; any other single file by no name (its
    bytes are what it is)."""
    path = Path(path)
    if path.is_dir():
        shards = [p for p in list_shards(path) if SPLIT_TAG.search(p.name)]
        files = shards or find_text_files([path])
        return [(p.relative_to(path).as_posix(), p) for p in files]
    tag = SPLIT_TAG.search(path.name) if path.suffix in SHARD_SUFFIXES else None
    if tag:
        a, b = tag.span(1)
        pair = [path.with_name(path.name[:a] + split + path.name[b:]) for split in ("train", "val")]
        return [(p.name, p) for p in pair if p.is_file()]
    return [("", path)]


def _file_digest(path: Path, sha) -> None:
    size = path.stat().st_size
    sha.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            while block := f.read(1 << 20):
                sha.update(block)
            return
        last = size - SAMPLE_BYTES
        for i in range(SAMPLE_BLOCKS):
            f.seek(last * i // (SAMPLE_BLOCKS - 1))
            sha.update(f.read(SAMPLE_BYTES))


def content_hash(path) -> str:
    """The hex sha256 that identifies the data at `path` (see the module docstring)."""
    sha = hashlib.sha256()
    for name, file in data_files(path):
        encoded = name.encode()
        sha.update(len(encoded).to_bytes(8, "little") + encoded)
        _file_digest(file, sha)
    return sha.hexdigest()
