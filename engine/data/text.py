"""Text files to tokens: reading, UTF-8 checks with line numbers, folder walks,
and tokenization that gives exactly `tokenizer.encode(text)` while working on
pieces (cut where GPT-2's pre-tokenizer cannot join across the cut)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from engine.data.shards import TOKEN_DTYPE
from engine.errors import UserInputError
from engine.tokenizer import ByteTokenizer

DEFAULT_CHUNK_BYTES = 1 << 20       # text per tokenization task

# Files a folder walk treats as text; explicitly named files are read whatever
# their suffix (and rejected if they are not UTF-8).
TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc",
    ".html", ".htm", ".xml", ".csv", ".tsv"})

# Places to cut text into pieces that tokenize exactly like the whole (GPT-2's
# pre-tokenizer `'s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` has
# no look-behind, so a cut is exact where no piece of the whole text spans it):
# - right after a single newline between two printable ASCII characters: the
#   newline is a piece of its own whether or not it ends the text;
# - right before a space that follows a printable ASCII character and precedes
#   an ASCII letter: a space is a piece's first character or part of a run of
#   whitespace, and here it is neither inside a run nor at a piece's end, so a
#   piece starts at it (" word") on both sides of the cut.
# The second kind cuts a file that is one long line; bytes of multi-byte UTF-8
# characters never match either pattern.
_SAFE_CUT = re.compile(rb"[\x21-\x7e](?:(\n)(?=[\x21-\x7e])|( )(?=[A-Za-z]))")
_CHUNKS_PER_BATCH = 16  # chunks tokenized at once: bounds memory, keeps the threads busy


def line_and_column(path: Path, offset: int) -> tuple[int, int]:
    """(1-based line, 1-based byte of that line) of byte `offset` in a file, counted
    by streaming, so huge files cost no memory."""
    line, last_nl, done = 1, -1, 0
    with open(path, "rb") as f:
        while done < offset:
            block = f.read(min(1 << 20, offset - done))
            if not block:
                break
            line += block.count(b"\n")
            nl = block.rfind(b"\n")
            if nl >= 0:
                last_nl = done + nl
            done += len(block)
    return line, offset - last_nl


def utf8_error(path: Path, offset: int, err: UnicodeDecodeError) -> UserInputError:
    line, column = line_and_column(path, offset)
    return UserInputError(
        f"{path}: not valid UTF-8 at byte offset {offset} (line {line}, byte {column} of "
        f"the line): {err.reason}; save the file as UTF-8")


def safe_cuts(buf, start: int, end: int, chunk_bytes: int) -> list[int]:
    """Offsets in [start, end] that cut buf[start:end] into ~chunk_bytes pieces
    which tokenize exactly like the whole (see `_SAFE_CUT`)."""
    cuts = [start]
    pos = start
    while end - pos > chunk_bytes:
        m = _SAFE_CUT.search(buf, pos + chunk_bytes - 1, end)
        if m is None:
            break
        pos = m.end() if m.group(1) else m.start(2)
        cuts.append(pos)
    cuts.append(end)
    return cuts


def encode_bytes(tokenizer, chunks: list[bytes]) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(TOKEN_DTYPE)
    ids = tokenizer.encode_batch([c.decode("utf-8") for c in chunks],
                                 num_threads=os.cpu_count() or 1)
    return np.concatenate([np.asarray(i, dtype=np.int64) for i in ids]).astype(TOKEN_DTYPE) \
        if ids else np.zeros(0, dtype=TOKEN_DTYPE)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError as e:
        raise UserInputError(f"{path}: is a directory, expected a text file") from e
    except OSError as e:
        raise UserInputError(f"{path}: cannot read: {e.strerror or e}") from e


def tokenize_file(path, tokenizer, *, document_eot: bool = False,
                  chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> np.ndarray:
    """All tokens of a UTF-8 text file as uint16, identical to
    `tokenizer.encode(text)` (prefixed by the eot token when `document_eot`)."""
    path = Path(path)
    data = _read_bytes(path)
    if not data:
        raise UserInputError(f"{path}: file is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise utf8_error(path, e.start, e) from None
    if tokenizer.vocab_size > 2 ** 16:
        raise UserInputError(
            f"{path}: tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids; uint16 holds 65536")
    cuts = safe_cuts(data, 0, len(data), chunk_bytes)
    spans = list(zip(cuts[:-1], cuts[1:]))
    # A few chunks at a time, each batch packed to uint16 before the next: the
    # tokenizer's lists of Python ints never exist for the whole file at once.
    parts = [encode_bytes(tokenizer, [data[a:b] for a, b in spans[i:i + _CHUNKS_PER_BATCH]])
             for i in range(0, len(spans), _CHUNKS_PER_BATCH)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=TOKEN_DTYPE)
    if document_eot and tokenizer.eot_token is not None:
        tokens = np.concatenate([np.array([tokenizer.eot_token], dtype=TOKEN_DTYPE), tokens])
    return tokens


def _looks_like_text(path: Path) -> bool:
    if path.suffix.lower() in TEXT_SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except OSError:
        return False
    return b"\0" not in head


def walk_files(folder: Path):
    """The files under `folder`, recursively, hidden entries skipped: a folder's
    files (sorted by name) before its subfolders (sorted, each walked alike)."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            f = Path(root) / name
            if not name.startswith(".") and f.is_file():
                yield f


def unique_paths(paths: list[Path]) -> list[Path]:
    """`paths` without repeats of one file (however it is named), in order."""
    seen, unique = set(), []
    for f in paths:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def find_text_files(inputs) -> list[Path]:
    """The text files named by `inputs` (files, or folders walked recursively in
    sorted order, skipping hidden entries), without duplicates."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = [f for f in walk_files(p) if _looks_like_text(f)]
            if not found:
                raise UserInputError(
                    f"{p}: no text files found in this folder (looked for "
                    f"{', '.join(sorted(TEXT_SUFFIXES))} and suffix-less text files)")
            files.extend(found)
        else:
            raise UserInputError(f"{p}: no such file or directory")
    return unique_paths(files)
