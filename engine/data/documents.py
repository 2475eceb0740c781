"""What `prepare` reads, and how each input is cut into tasks for the tokenizing
processes.

Inputs: text files (each file one document), Parquet files (FineWeb's format)
and JSON-lines files (plain, `.gz` or `.zst`), one document per row; a
Hugging Face dataset, streamed, is in engine.data.hub.

An input plans *tasks*: small picklable slices of its documents, in order (a
byte range of a text or JSON-lines file, a row range of a Parquet row group,
or the documents themselves where the input can only be read from its start:
compressed files, streamed datasets). A task's `pieces(chunk_bytes)` yields
`(text, starts_document)`; a long document comes in pieces cut where GPT-2's
pre-tokenizer cannot join across the cut (engine.data.text.safe_cuts), so the
tokens equal the whole document's and memory stays bounded whatever its size.

An input numbers its tasks from 0, and `tasks(first, state)` starts at task
`first` given the `state` it recorded before that task (None for inputs read at
any offset; the uncompressed offset and line of a compressed file; a streamed
dataset's `state_dict()`): that is where an interrupted prepare resumes.

pyarrow (Parquet), zstandard (`.zst`) and datasets (the Hub) come with the
optional `data` extra; without them the error says so in one line.
"""
from __future__ import annotations

import gzip
import importlib
import json
import math
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from engine.data.text import find_text_files, line_and_column, safe_cuts, unique_paths, utf8_error, walk_files
from engine.errors import UserInputError

DATA_EXTRA = 'the optional data extra installs it: pip install -e ".[data]"'
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSED_SUFFIXES = (".gz", ".zst")
# A Parquet row group is read whole by each task that takes rows from it, so a
# task takes up to this many chunks' worth of text.
PARQUET_TASK_CHUNKS = 8
_READ_BYTES = 1 << 20


def optional_module(name: str, what: str, where) -> object:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserInputError(f"{where}: {what} needs the {name.split('.')[0]} package; {DATA_EXTRA}") from None


def input_kind(path: Path, named: bool) -> str | None:
    """'parquet', 'jsonl' or None (not a row file) from the name. A plain `.json`
    counts only when named: in a folder it is more often metadata than rows."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    last = suffixes[-1] if suffixes else ""
    if last == ".parquet":
        return "parquet"
    if last in JSONL_SUFFIXES and (named or last != ".json"):
        return "jsonl"
    if last in COMPRESSED_SUFFIXES and len(suffixes) == 2 and suffixes[0] in JSONL_SUFFIXES:
        return "jsonl"
    return None


# ----------------------------------------------------------------- documents

def document_pieces(text: str, chunk_bytes: int):
    """(piece, starts_document) of one document; more than one piece only when it
    is longer than `chunk_bytes`."""
    if 4 * len(text) <= chunk_bytes:  # UTF-8 takes at most 4 bytes per character
        yield text, True
        return
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: what tiktoken itself does with them
        data = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")
    cuts = safe_cuts(data, 0, len(data), chunk_bytes)
    for a, b in zip(cuts[:-1], cuts[1:]):
        yield data[a:b].decode("utf-8"), a == 0


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), type(value).__name__)


def row_text(row, field: str, where) -> str:
    """The document of a row (a dict), or a one-line error naming `where()`."""
    if not isinstance(row, dict):
        raise UserInputError(f"{where()}: is {_json_type(row)}, not an object with a {field!r} field")
    if field not in row:
        names = ", ".join(map(str, list(row)[:8])) or "none"
        raise UserInputError(f"{where()}: has no {field!r} field (its fields: {names}); choose one with --text-field")
    text = row[field]
    if not isinstance(text, str):
        raise UserInputError(f"{where()}: {field!r} is {_json_type(text)}, not a string")
    return text


# ----------------------------------------------------------------- tasks

@dataclass(frozen=True)
class TextChunk:
    """Bytes [start, end) of a UTF-8 text file; its first chunk starts the document."""
    path: str
    start: int
    end: int

    @property
    def units(self) -> int:
        return self.end - self.start

    def pieces(self, chunk_bytes: int):
        with open(self.path, "rb") as f:
            f.seek(self.start)
            data = f.read(self.end - self.start)
        try:
            yield data.decode("utf-8"), self.start == 0
        except UnicodeDecodeError as e:
            raise utf8_error(Path(self.path), self.start + e.start, e) from None


@dataclass(frozen=True)
class JsonLines:
    """Lines of a JSON-lines file, one document each: bytes [start, end) of a
    plain file, or `data` read from a compressed one (its first line numbered
    `first_line`)."""
    path: str
    field: str
    units: int
    start: int = 0
    end: int = 0
    data: bytes | None = None
    first_line: int = 1

    def pieces(self, chunk_bytes: int):
        data = self.data
        if data is None:
            with open(self.path, "rb") as f:
                f.seek(self.start)
                data = f.read(self.end - self.start)
        pos = 0
        for k, line in enumerate(data.split(b"\n")):
            if line.strip():
                where = self._where(k, pos)
                try:
                    row = json.loads(line)
                except UnicodeDecodeError:
                    raise UserInputError(f"{where()}: not valid UTF-8; save the file as UTF-8") from None
                except json.JSONDecodeError as e:
                    raise UserInputError(f"{where()}: not JSON ({e.msg} at column {e.colno})") from None
                yield from document_pieces(row_text(row, self.field, where), chunk_bytes)
            pos += len(line) + 1

    def _where(self, k: int, pos: int):
        if self.data is not None:
            return lambda: f"{self.path}: line {self.first_line + k}"
        return lambda: f"{self.path}: line {line_and_column(Path(self.path), self.start + pos)[0]}"


@dataclass(frozen=True)
class ParquetRows:
    """Rows [start, stop) of one row group of a Parquet file (`first_row`: the
    group's first row in the file)."""
    path: str
    field: str
    row_group: int
    start: int
    stop: int
    first_row: int
    units: int

    def pieces(self, chunk_bytes: int):
        pq = optional_module("pyarrow.parquet", "reading Parquet", self.path)
        row = 0
        # use_threads=False: these run in forked processes, where pyarrow's
        # thread pool (started in the parent) must not be used.
        with pq.ParquetFile(self.path) as f:
            for batch in f.iter_batches(batch_size=min(self.stop - self.start, 4096), row_groups=[self.row_group],
                                        columns=[self.field], use_threads=False):
                lo, hi = max(self.start - row, 0), min(self.stop - row, batch.num_rows)
                if lo < hi:
                    texts = batch.column(0).slice(lo, hi - lo).to_pylist()
                    for k, text in enumerate(texts):
                        if text is None:
                            raise UserInputError(f"{self.path}: row {self.first_row + row + lo + k} (counting from 0): "
                                                 f"{self.field!r} is null, not a string")
                        yield from document_pieces(text, chunk_bytes)
                row += batch.num_rows
                if row >= self.stop:
                    break


# ----------------------------------------------------------------- inputs

class FileInput:
    """One input file: its tasks are planned when it is opened."""
    unit = "bytes"

    def __init__(self, path: Path):
        self.path = path
        self.name = str(path)
        self.plan: list = []
        self.total_units = 0

    def fingerprint(self) -> dict:
        st = self.path.stat()
        return {"kind": type(self).__name__, "path": str(self.path.resolve()), "bytes": st.st_size,
                "mtime_ns": st.st_mtime_ns}

    def tasks(self, first: int = 0, state=None):
        for j in range(first, len(self.plan)):
            yield j, None, self.plan[j]


class TextFile(FileInput):
    def __init__(self, path: Path, chunk_bytes: int, named: bool):
        super().__init__(path)
        size = path.stat().st_size
        if size == 0 and named:
            raise UserInputError(f"{path}: file is empty")
        if size:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                cuts = safe_cuts(buf, 0, size, chunk_bytes)
            self.plan = [TextChunk(str(path), a, b) for a, b in zip(cuts[:-1], cuts[1:])]
        self.total_units = size


class ParquetFile(FileInput):
    def __init__(self, path: Path, field: str, chunk_bytes: int):
        super().__init__(path)
        pa = optional_module("pyarrow", "reading Parquet", path)
        pq = optional_module("pyarrow.parquet", "reading Parquet", path)
        try:
            with pq.ParquetFile(path) as f:
                schema, meta = f.schema_arrow, f.metadata
        except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
            raise UserInputError(f"{path}: not a readable Parquet file ({e})") from None
        if field not in schema.names:
            raise UserInputError(f"{path}: has no column {field!r} (its columns: {', '.join(schema.names[:8])}); "
                                 "choose one with --text-field")
        kind = schema.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
            raise UserInputError(f"{path}: column {field!r} holds {kind}, not strings")
        column = next(i for i in range(meta.num_columns) if meta.schema.column(i).path == field)
        first_row = 0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            rows, chunk = group.num_rows, group.column(column)
            parts = max(1, min(rows, math.ceil(chunk.total_uncompressed_size / (PARQUET_TASK_CHUNKS * chunk_bytes))))
            bounds = [rows * i // parts for i in range(parts + 1)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                if b > a:
                    units = chunk.total_compressed_size * (b - a) // rows
                    self.plan.append(ParquetRows(str(path), field, g, a, b, first_row, units))
            first_row += rows
        self.total_units = sum(t.units for t in self.plan)


class JsonLinesFile(FileInput):
    """A plain file is cut at line ends into byte ranges (any can be read at
    once); a compressed one is read from its start, in the main process."""

    def __init__(self, path: Path, field: str, chunk_bytes: int):
        super().__init__(path)
        self.field, self.chunk_bytes = field, chunk_bytes
        self.compression = path.suffix.lower() if path.suffix.lower() in COMPRESSED_SUFFIXES else None
        size = path.stat().st_size
        self.total_units = size
        if self.compression == ".zst":
            optional_module("zstandard", "reading .zst files", path)
        if self.compression or size == 0:
            return
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            start = 0
            while start < size:
                nl = buf.find(b"\n", min(start + chunk_bytes, size) - 1)
                end = size if nl < 0 else nl + 1
                self.plan.append(JsonLines(str(path), field, end - start, start=start, end=end))
                start = end

    def tasks(self, first: int = 0, state=None):
        if not self.compression:
            yield from super().tasks(first)
            return
        offset, line = (state["offset"], state["line"]) if state else (0, 1)
        skip, pending, scanned, read_before, j = offset, bytearray(), 0, 0, first
        for block, read in self._blocks():
            if skip:  # resuming: the lines before `offset` are done
                cut = min(skip, len(block))
                block, skip = block[cut:], skip - cut
            pending += block
            # A task ends at the first line end at or after chunk_bytes: the same
            # cuts whatever the sizes of the decompressed blocks.
            while (nl := pending.find(b"\n", max(self.chunk_bytes - 1, scanned))) >= 0:
                data = bytes(pending[:nl + 1])
                del pending[:nl + 1]
                scanned = 0
                yield j, {"offset": offset, "line": line}, JsonLines(
                    self.name, self.field, read - read_before, data=data, first_line=line)
                j, offset, line, read_before = j + 1, offset + len(data), line + data.count(b"\n"), read
            scanned = len(pending)  # a long line: search only what comes next
        if pending:
            yield j, {"offset": offset, "line": line}, JsonLines(
                self.name, self.field, self.total_units - read_before, data=bytes(pending), first_line=line)

    def _blocks(self):
        """(decompressed block, compressed bytes read so far); a damaged or
        truncated file is named as such."""
        try:
            with open(self.path, "rb") as raw:
                if self.compression == ".gz":
                    with gzip.GzipFile(fileobj=raw, mode="rb") as g:
                        while block := g.read(_READ_BYTES):
                            yield block, raw.tell()
                    return
                zstd = optional_module("zstandard", "reading .zst files", self.path)
                dctx = zstd.ZstdDecompressor()
                frame, mid_frame = dctx.decompressobj(), False
                while data := raw.read(_READ_BYTES):
                    while data:
                        block, mid_frame = frame.decompress(data), True
                        if block:
                            yield block, raw.tell()
                        data = b""
                        if frame.eof:  # the next frame, if any, starts in unused_data
                            data, frame, mid_frame = frame.unused_data, dctx.decompressobj(), False
                if mid_frame:
                    raise EOFError("the file ends inside a zstd frame")
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise UserInputError(f"{self.path}: damaged or truncated {self.compression} file ({e})") from None
        except Exception as e:
            if type(e).__name__ == "ZstdError":
                raise UserInputError(f"{self.path}: damaged .zst file ({e})") from None
            raise


def find_inputs(inputs, field: str, chunk_bytes: int) -> list[FileInput]:
    """The inputs named by `inputs`, planned, in order. A folder is walked
    (sorted, hidden entries skipped) for Parquet and JSON-lines files; only when
    it holds neither, for text files. A named file is read by its suffix:
    Parquet, JSON lines, else text."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found, named = [], set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            rows = [f for f in walk_files(p) if input_kind(f, named=False)]
            found += rows or find_text_files([p])
        elif p.is_file():
            found.append(p)
            named.add(p)
        else:
            raise UserInputError(f"{p}: no such file or directory")
    opened = []
    for path in unique_paths(found):
        kind = input_kind(path, named=path in named)
        if kind == "parquet":
            opened.append(ParquetFile(path, field, chunk_bytes))
        elif kind == "jsonl":
            opened.append(JsonLinesFile(path, field, chunk_bytes))
        else:
            opened.append(TextFile(path, chunk_bytes, named=path in named))
    return opened
