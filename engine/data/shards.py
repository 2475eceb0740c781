"""Token shards: llm.c's format, written atomically and checked on read; and
build-nanogpt's `.npy` shards, read.

A shard is a 256 x int32 header [magic 20240520, version 1, token count, vocab
size, 0...] followed by the tokens as uint16. `python -m engine.data prepare`
writes them; the loader memory-maps them. build-nanogpt's fineweb.py writes
`np.save` of a one-dimensional uint16 array instead (`edufineweb_train_000001.npy`);
`read_shard_header` and `open_shard` take either, by suffix, with the same checks.

A folder written by prepare also holds `manifest.json`, listing every shard
with its split, token count and size. prepare writes it before it moves the
shards into the folder, so a folder whose manifest lists a missing or
mis-sized shard is an interrupted prepare and the loader refuses it. Folders
of shards from elsewhere (llm.c's scripts) have no manifest and load as they are.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from engine.errors import UserInputError
from engine.fileio import atomic_write

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "gpt2-engine token shards"

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16
NPY_SUFFIX = ".npy"
SHARD_SUFFIXES = (".bin", NPY_SUFFIX)

# The split a shard belongs to, from its name: gpt2_train_000001.bin, val-0.bin, ...
SPLIT_TAG = re.compile(r"(?:^|[_-])(train|val)(?=[_.-])")


def write_shard(path, tokens, vocab_size: int = 0) -> Path:
    """Write `tokens` (ints < 65536) as a shard; atomic (temp file + rename)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise UserInputError(
            f"{path}: token ids must fit uint16 (0..65535); got range "
            f"{int(tokens.min())}..{int(tokens.max())}")
    def write(f):
        f.write(shard_header(tokens.size, vocab_size))
        f.write(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes())
    return atomic_write(path, write)


def shard_header(ntok: int, vocab_size: int = 0) -> bytes:
    """The 1024-byte header of a shard of `ntok` tokens."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:4] = (SHARD_MAGIC, SHARD_VERSION, ntok, vocab_size)
    return header.tobytes()


def read_shard_header(path) -> tuple[int, int]:
    """(token count, vocab size or 0) of a shard (`.bin` or `.npy`), after checking
    its header and size."""
    path = Path(path)
    if path.suffix == NPY_SUFFIX:
        ntok, _ = _read_npy_header(path)
        return ntok, 0  # np.save records no vocabulary: ids are checked per batch
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise UserInputError(f"{path}: cannot read shard: {e.strerror or e}") from e
    if len(raw) < HEADER_BYTES:
        raise UserInputError(
            f"{path}: truncated shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype=np.int32)
    magic, version, ntok, vocab = (int(v) for v in header[:4])
    if magic != SHARD_MAGIC:
        raise UserInputError(
            f"{path}: not a token shard: header magic is {magic}, expected {SHARD_MAGIC} "
            "(write shards with `python -m engine.data prepare`)")
    if version != SHARD_VERSION:
        raise UserInputError(
            f"{path}: unsupported shard version {version}; this loader reads version "
            f"{SHARD_VERSION} (uint16 tokens)")
    expected = HEADER_BYTES + 2 * ntok
    if ntok < 0 or size != expected:
        raise UserInputError(
            f"{path}: truncated or corrupt shard: header says {ntok:,} tokens "
            f"({expected:,} bytes) but the file has {size:,} bytes")
    return ntok, vocab


def _read_npy_header(path: Path) -> tuple[int, int]:
    """(token count, byte offset of the data) of an `.npy` token shard: one
    dimension of little-endian uint16, and exactly as many bytes as its header says."""
    fmt = np.lib.format
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            try:
                version = fmt.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = fmt.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = fmt.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            except (ValueError, EOFError) as e:
                raise UserInputError(f"{path}: not a readable .npy file ({e})") from None
            offset = f.tell()
    except OSError as e:
        raise UserInputError(f"{path}: cannot read shard: {e.strerror or e}") from e
    if dtype != np.dtype("<u2"):
        raise UserInputError(
            f"{path}: holds {dtype.str} ({dtype.name}) values; token shards are uint16 "
            "(build-nanogpt's np.save of a uint16 array)")
    if len(shape) != 1:
        raise UserInputError(
            f"{path}: is {len(shape)}-dimensional (shape {tuple(shape)}); token shards are one-dimensional")
    ntok = int(shape[0])
    expected = offset + 2 * ntok
    if size != expected:
        raise UserInputError(
            f"{path}: truncated or corrupt .npy shard: its header says {ntok:,} tokens "
            f"({expected:,} bytes) but the file has {size:,} bytes")
    return ntok, offset


def open_shard(path) -> np.ndarray:
    """The tokens of a shard (`.bin` or `.npy`), memory-mapped read-only (uint16)."""
    path = Path(path)
    if path.suffix == NPY_SUFFIX:
        ntok, offset = _read_npy_header(path)
    else:
        (ntok, _), offset = read_shard_header(path), HEADER_BYTES
    if ntok == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=offset, shape=(ntok,))


def list_shards(folder) -> list[Path]:
    """The shard files of a folder, sorted: every `.bin`, and the `.npy` files named
    as shards (`*_train_*.npy`, `*_val_*.npy`; other arrays are not tokens). A
    folder that holds both kinds is refused: they would be two datasets."""
    folder = Path(folder)
    found = sorted(p for p in folder.iterdir() if p.is_file() and (
        p.suffix == ".bin" or (p.suffix == NPY_SUFFIX and SPLIT_TAG.search(p.name))))
    kinds = {p.suffix for p in found if SPLIT_TAG.search(p.name)}
    if len(kinds) > 1:
        first = {k: next(p.name for p in found if p.suffix == k) for k in sorted(kinds)}
        raise UserInputError(
            f"{folder}: holds both .bin shards ({first['.bin']}, ...) and .npy shards ({first['.npy']}, ...); "
            "keep one dataset per folder")
    return found


def write_manifest(folder, shards: list[Path], tokenizer: str, vocab_size: int, tmp_prefix=None) -> Path:
    """folder/manifest.json listing `shards` (already written, anywhere) by name."""
    entries = []
    for p in shards:
        ntok, _ = read_shard_header(p)
        entries.append({"name": p.name, "split": SPLIT_TAG.search(p.name).group(1), "tokens": ntok,
                        "bytes": p.stat().st_size})
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "tokenizer": tokenizer, "vocab_size": vocab_size,
                "shards": entries}
    text = json.dumps(manifest, indent=1).encode()
    return atomic_write(Path(folder) / MANIFEST_NAME, lambda f: f.write(text), tmp_prefix=tmp_prefix)


def check_manifest(folder) -> dict | None:
    """The folder's manifest after checking that every shard it lists is there with
    its size, and that it lists every shard there; None when there is no manifest."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = {e["name"]: int(e["bytes"]) for e in manifest["shards"]}
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"{path}: not a readable shard manifest ({e})") from None
    missing = [n for n, size in entries.items()
               if not (folder / n).is_file() or (folder / n).stat().st_size != size]
    if missing:
        raise UserInputError(
            f"{folder}: incomplete: {MANIFEST_NAME} lists {len(entries)} shards and {len(missing)} are missing "
            f"or of the wrong size ({missing[0]}, ...): an interrupted prepare; run the same prepare command "
            f"again to finish it, or delete the folder's shards and {MANIFEST_NAME} and prepare again")
    extra = sorted(p.name for p in folder.glob("*.bin") if SPLIT_TAG.search(p.name) and p.name not in entries)
    if extra:
        raise UserInputError(f"{folder}: {extra[0]} is a shard that {MANIFEST_NAME} does not list; "
                             "the folder mixes datasets (move it elsewhere)")
    return manifest
