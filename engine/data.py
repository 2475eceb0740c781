"""Training data: text or token shards in, (B, T) int64 batches out.

Two sources behind one loader (`TokenLoader`, built by `build_loader`):

- **text**: a UTF-8 text file (or a folder of them) tokenized once in memory,
  served in order like build-nanogpt's DataLoaderLite; the last `val_fraction`
  of the tokens is the val split.
- **shards**: uint16 `.bin` files written by `python -m engine.data prepare`
  (llm.c's format: a 256 x int32 header [magic 20240520, version 1, token count,
  vocab size, 0...] then the tokens), memory-mapped and streamed across shard
  boundaries, shard order shuffled per epoch from a seed.

Both sources are one token stream per epoch. Step i of an epoch reads, on rank
r, the B*T+1 tokens starting at i*B*T*world_size + r*B*T: every rank sees a
disjoint slice, all ranks wrap on the same step, and a loader's state (epoch,
step, shard order) is the same on every rank, so one rank's `state_dict()`
resumes them all with exactly the same batches.

Every problem with the user's files raises `UserInputError` naming the file.
"""
from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.errors import UserInputError
from engine.fileio import atomic_write
from engine.tokenizer import ByteTokenizer, get_tokenizer, load_tokenizer

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.uint16

DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's shard size: 200 MB of uint16
DEFAULT_CHUNK_BYTES = 1 << 20       # text per tokenization task
TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt")

# Files a folder walk treats as text; explicitly named files are read whatever
# their suffix (and rejected if they are not UTF-8).
TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".org", ".adoc",
    ".html", ".htm", ".xml", ".csv", ".tsv"})

_KNOWN_VOCAB = {"gpt2": 50257, "bytes": 256}

# A place to cut text for parallel tokenization without changing the tokens: a
# single newline between two printable ASCII characters. GPT-2's pre-tokenizer
# never joins a newline to a non-space neighbour, and a lone newline is its own
# piece whether or not it ends the text, so cutting right after it is exact.
_SAFE_CUT = re.compile(rb"[\x21-\x7e]\n(?=[\x21-\x7e])")
_SPLIT_TAG = re.compile(r"(?:^|[_-])(train|val)(?=[_.-])")


# --------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------

def write_shard(path, tokens, vocab_size: int = 0) -> Path:
    """Write `tokens` (ints < 65536) as a shard; atomic (temp file + rename)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise UserInputError(
            f"{path}: token ids must fit uint16 (0..65535); got range "
            f"{int(tokens.min())}..{int(tokens.max())}")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:4] = (SHARD_MAGIC, SHARD_VERSION, tokens.size, vocab_size)
    def write(f):
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE).tobytes())
    return atomic_write(path, write)


def read_shard_header(path) -> tuple[int, int]:
    """(token count, vocab size or 0) of a shard, after checking its header and size."""
    path = Path(path)
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


def open_shard(path) -> np.ndarray:
    """The tokens of a shard, memory-mapped read-only (uint16)."""
    ntok, _ = read_shard_header(path)
    if ntok == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(ntok,))


# --------------------------------------------------------------------------
# Text files and tokenization
# --------------------------------------------------------------------------

def _utf8_error(path: Path, offset: int, err: UnicodeDecodeError) -> UserInputError:
    # Count lines up to the bad byte by streaming, so huge files cost no memory.
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
    column = offset - last_nl
    return UserInputError(
        f"{path}: not valid UTF-8 at byte offset {offset} (line {line}, byte {column} of "
        f"the line): {err.reason}; save the file as UTF-8")


def _safe_cuts(buf, start: int, end: int, chunk_bytes: int) -> list[int]:
    """Offsets in [start, end] that cut buf[start:end] into ~chunk_bytes pieces
    which tokenize exactly like the whole (see `_SAFE_CUT`)."""
    cuts = [start]
    pos = start
    while end - pos > chunk_bytes:
        m = _SAFE_CUT.search(buf, pos + chunk_bytes - 1, end)
        if m is None:
            break
        pos = m.end()
        cuts.append(pos)
    cuts.append(end)
    return cuts


def _encode_bytes(tokenizer, chunks: list[bytes]) -> np.ndarray:
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
        raise _utf8_error(path, e.start, e) from None
    if tokenizer.vocab_size > 2 ** 16:
        raise UserInputError(
            f"{path}: tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids; uint16 holds 65536")
    cuts = _safe_cuts(data, 0, len(data), chunk_bytes)
    tokens = _encode_bytes(tokenizer, [data[a:b] for a, b in zip(cuts[:-1], cuts[1:])])
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
            found = []
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(names):
                    f = Path(root) / name
                    if not name.startswith(".") and f.is_file() and _looks_like_text(f):
                        found.append(f)
            if not found:
                raise UserInputError(
                    f"{p}: no text files found in this folder (looked for "
                    f"{', '.join(sorted(TEXT_SUFFIXES))} and suffix-less text files)")
            files.extend(found)
        else:
            raise UserInputError(f"{p}: no such file or directory")
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


# --------------------------------------------------------------------------
# prepare: text -> shards, in several processes
# --------------------------------------------------------------------------

def _tokenize_task(task) -> tuple[np.ndarray, int]:
    """Pool worker: tokenize bytes [start, end) of one file."""
    path, start, end, first_of_document, tokenizer_name = task
    tokenizer = get_tokenizer(tokenizer_name)  # tiktoken caches it per process
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(Path(path), start + e.start, e) from None
    tokens = _encode_bytes(tokenizer, [data])
    if first_of_document and tokenizer.eot_token is not None:
        tokens = np.concatenate([np.array([tokenizer.eot_token], dtype=TOKEN_DTYPE), tokens])
    return tokens, end - start


class _Progress:
    """A one-line progress report on stderr (no dependency), redrawn <= 5x/s."""

    def __init__(self, total_bytes: int, enabled: bool, stream=None):
        self.total, self.enabled = total_bytes, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.tokens = 0
        self.drawn = False
        self.t0 = self.last = time.perf_counter()

    def update(self, nbytes: int, ntokens: int, force: bool = False):
        self.done += nbytes
        self.tokens += ntokens
        now = time.perf_counter()
        if self.enabled and (force or now - self.last >= 0.2):
            self.last, self.drawn = now, True
            mb = self.done / 1e6
            rate = mb / max(now - self.t0, 1e-9)
            pct = 100.0 * self.done / max(self.total, 1)
            self.stream.write(f"\rprepare: {mb:,.1f}/{self.total / 1e6:,.1f} MB ({pct:.0f}%), "
                              f"{self.tokens:,} tokens, {rate:.1f} MB/s")
            self.stream.flush()

    def close(self):
        if self.enabled:
            self.update(0, 0, force=True)
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False

    def abort(self):
        # End a half-drawn line so an error message starts on its own line.
        if self.enabled and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
        self.enabled = False


def _plan_tasks(files: list[Path], tokenizer_name: str, chunk_bytes: int, explicit: set):
    tasks, total = [], 0
    for path in files:
        size = path.stat().st_size
        if size == 0:
            if path in explicit:
                raise UserInputError(f"{path}: file is empty")
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cuts = _safe_cuts(buf, 0, size, chunk_bytes)
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            tasks.append((str(path), a, b, i == 0, tokenizer_name))
        total += size
    return tasks, total


def _pool_context():
    # fork starts workers in milliseconds and shares the loaded BPE tables;
    # elsewhere (macOS, Windows) the platform default is the safe choice.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def prepare(inputs, out_dir, *, shard_tokens: int = DEFAULT_SHARD_TOKENS, workers: int | None = None,
            tokenizer: str = "gpt2", val_fraction: float = 0.1, progress: bool = True,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict:
    """Tokenize text files/folders into uint16 shards under `out_dir`.

    Each file is one document, preceded by the eot token (GPT-2). The first
    `val_fraction` of all tokens (in sorted file order) becomes
    `<tokenizer>_val_NNNNNN.bin`, the rest `<tokenizer>_train_NNNNNN.bin`,
    at most `shard_tokens` per shard. Returns a summary dict.
    """
    if shard_tokens < 1:
        raise UserInputError(f"prepare: --shard-tokens must be >= 1, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserInputError(f"prepare: --val-fraction must be in [0, 1), got {val_fraction}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserInputError(f"prepare: --workers must be >= 1, got {workers}")
    tok = get_tokenizer(tokenizer)  # fails early, before any work, when unavailable
    if tok.vocab_size > 2 ** 16:
        raise UserInputError(f"prepare: tokenizer {tok.name} has {tok.vocab_size} ids; uint16 holds 65536")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out}: --out must be a folder, and this is a file")
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.glob("*.bin") if _SPLIT_TAG.search(p.name))
    if stale:
        raise UserInputError(
            f"{out}: already holds shards ({stale[0]}, ...); choose an empty folder or delete them")

    explicit = {Path(i) for i in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)}
    files = find_text_files(inputs)
    tasks, total_bytes = _plan_tasks(files, tok.name, chunk_bytes, explicit)
    if not tasks:
        raise UserInputError(f"prepare: no text to tokenize in {', '.join(map(str, explicit))}")

    # Tokens stream, in order, into one temporary file; the split point is
    # known only once the total is, then the file is cut into shards.
    bar = _Progress(total_bytes, progress)
    fd, tmp_name = tempfile.mkstemp(prefix=".prepare-", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "wb") as raw:
            if workers == 1 or len(tasks) == 1:
                results = map(_tokenize_task, tasks)
                for tokens, nbytes in results:
                    raw.write(tokens.tobytes())
                    bar.update(nbytes, tokens.size)
            else:
                with _pool_context().Pool(min(workers, len(tasks))) as pool:
                    for tokens, nbytes in pool.imap(_tokenize_task, tasks, chunksize=1):
                        raw.write(tokens.tobytes())
                        bar.update(nbytes, tokens.size)
        bar.close()
        n = os.path.getsize(tmp_name) // 2
        n_val = int(n * val_fraction)
        stream = np.memmap(tmp_name, dtype=TOKEN_DTYPE, mode="r") if n else np.zeros(0, TOKEN_DTYPE)
        written = {"val": [], "train": []}
        for split, a, b in (("val", 0, n_val), ("train", n_val, n)):
            for i, s in enumerate(range(a, b, shard_tokens)):
                path = out / f"{tok.name}_{split}_{i:06d}.bin"
                written[split].append(write_shard(path, stream[s:min(s + shard_tokens, b)], tok.vocab_size))
        del stream
    finally:
        bar.abort()
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
    return {"out": out, "tokenizer": tok.name, "files": len(files), "bytes": total_bytes,
            "train": written["train"], "val": written["val"],
            "train_tokens": n - n_val, "val_tokens": n_val}


# --------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------

class TokenLoader:
    """(B, T) int64 batches from a token stream made of named pieces (a text
    split, or shards), rank-aware and resumable.

    One epoch serves `batches_per_epoch` batches per rank; the tokens past the
    last whole global step are skipped that epoch. With `shuffle`, the pieces'
    order is a permutation drawn from (seed, epoch), identical on all ranks.
    """

    def __init__(self, pieces, B: int, T: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = False, seed: int = 0, vocab_size: int | None = None,
                 kind: str = "text", split: str = "train", source: str = "",
                 summary: str = "", pin_memory: bool = False):
        for name, v, lo in (("B", B, 1), ("T", T, 1), ("world_size", world_size, 1)):
            if not isinstance(v, (int, np.integer)) or v < lo:
                raise UserInputError(f"data loader: {name} must be an integer >= {lo}, got {v!r}")
        if not 0 <= rank < world_size:
            raise UserInputError(f"data loader: rank {rank} is outside 0..{world_size - 1}")
        self.B, self.T, self.rank, self.world_size = int(B), int(T), int(rank), int(world_size)
        self.names = [n for n, _ in pieces]
        self._arrays = [a for _, a in pieces]
        self._lengths = np.array([len(a) for a in self._arrays], dtype=np.int64)
        self.num_tokens = int(self._lengths.sum())
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.vocab_size, self.kind, self.split, self.source = vocab_size, kind, split, source
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        step = self.B * self.T * self.world_size
        need = step + 1
        if self.num_tokens < need:
            raise UserInputError(
                f"{source}: the {split} split has {self.num_tokens:,} tokens; one batch needs "
                f"B*T*world_size+1 = {need:,} (B={self.B}, T={self.T}, world_size={self.world_size}); "
                "use a larger corpus or a smaller batch/sequence length")
        self.batches_per_epoch = (self.num_tokens - 1) // step
        self.tokens_per_epoch = self.batches_per_epoch * step  # all ranks together
        self.description = (
            f"{summary}; B={self.B} T={self.T} rank {self.rank}/{self.world_size}: "
            f"{self.batches_per_epoch:,} batches ({self.tokens_per_epoch:,} tokens) per epoch")
        self.reset()

    def reset(self):
        """Back to the first batch of epoch 0 (e.g. before each evaluation)."""
        self.epoch, self.batch = 0, 0
        self._set_order(self._epoch_order(0))

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self._arrays)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self._arrays)).tolist()

    def _set_order(self, order: list[int]):
        self._order = order
        self._starts = np.concatenate([[0], np.cumsum(self._lengths[order])])

    def _read(self, a: int, b: int) -> np.ndarray:
        out = np.empty(b - a, dtype=np.int64)
        k = int(np.searchsorted(self._starts, a, side="right")) - 1
        filled = 0
        while filled < b - a:
            piece = self._order[k]
            lo = a + filled - int(self._starts[k])
            take = min(b - a - filled, int(self._lengths[piece]) - lo)
            chunk = self._arrays[piece][lo:lo + take]
            if self.vocab_size is not None and take and int(chunk.max()) >= self.vocab_size:
                raise UserInputError(
                    f"{self.source}: {self.names[piece]} holds token id {int(chunk.max())}, outside the "
                    f"tokenizer's vocabulary of {self.vocab_size}")
            out[filled:filled + take] = chunk
            filled += take
            k += 1
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): int64 CPU tensors of shape (B, T); y is x shifted by one token."""
        if self.batch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch = 0
            self._set_order(self._epoch_order(self.epoch))
        BT = self.B * self.T
        start = self.batch * BT * self.world_size + self.rank * BT
        buf = torch.from_numpy(self._read(start, start + BT + 1))
        if self.pin_memory:
            buf = buf.pin_memory()
        self.batch += 1
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def state_dict(self) -> dict:
        """Everything needed to continue with the same batches; rank-independent."""
        return {"version": 1, "kind": self.kind, "split": self.split, "B": self.B, "T": self.T,
                "world_size": self.world_size, "num_tokens": self.num_tokens,
                "shuffle": self.shuffle, "seed": self.seed, "epoch": self.epoch,
                "batch": self.batch, "order": [self.names[i] for i in self._order]}

    def load_state_dict(self, state: dict):
        """Continue where `state` (from `state_dict`, any rank) left off. Its seed
        and shuffle setting win, so later epochs repeat the saved run's order."""
        mine = {"kind": self.kind, "B": self.B, "T": self.T, "world_size": self.world_size,
                "num_tokens": self.num_tokens}
        diff = [f"{k}={state.get(k)!r} (now {v!r})" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise UserInputError(
                f"{self.source}: cannot resume the data loader: the checkpoint's loader had "
                + ", ".join(diff) + "; resume with the same data, batch size and world size")
        index = {n: i for i, n in enumerate(self.names)}
        order = state["order"]
        if sorted(order) != sorted(self.names):
            raise UserInputError(
                f"{self.source}: cannot resume the data loader: the checkpoint's shards differ "
                "from the ones found now")
        self.shuffle, self.seed = bool(state["shuffle"]), int(state["seed"])
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._set_order([index[n] for n in order])

    def __repr__(self) -> str:
        return f"TokenLoader({self.description})"


def _vocab_of(tokenizer) -> int | None:
    if isinstance(tokenizer, str):
        return _KNOWN_VOCAB.get(tokenizer)
    return getattr(tokenizer, "vocab_size", None)


def _resolve_tokenizer(tokenizer):
    if isinstance(tokenizer, str):
        return load_tokenizer(tokenizer)[0]
    return tokenizer


def _shard_pieces(paths: list[Path], tokenizer):
    want = _vocab_of(tokenizer)
    pieces, vocab = [], None
    for p in paths:
        ntok, v = read_shard_header(p)
        if v and want and v != want:
            raise UserInputError(
                f"{p}: shard was written by a tokenizer with vocab {v:,}, but this run's "
                f"tokenizer has vocab {want:,}; prepare the data with the same --tokenizer")
        vocab = vocab or v or want
        # Names without their folder, so a resumed run may find the data moved.
        pieces.append((p.name, open_shard(p)))
    return pieces, vocab


def build_loader(data_path, B: int, T: int, split: str = "train", rank: int = 0,
                 world_size: int = 1, tokenizer="gpt2", val_fraction: float = 0.1,
                 seed: int = 0, shuffle: bool | None = None,
                 pin_memory: bool = False) -> TokenLoader:
    """A `TokenLoader` for `split` ("train" or "val") of `data_path`.

    - a folder of `*_train_*.bin` / `*_val_*.bin` shards: those shards, the
      train split shuffled per epoch (`shuffle=None` means: train only);
    - a single `.bin`: named `..._train...` or `..._val...`, it and its sibling
      for the other split; otherwise its tokens split like a text file;
    - a text file, or a folder of text files without shards: tokenized with
      `tokenizer` (a tokenizer object or "gpt2"/"bytes"/"auto"), the last
      `val_fraction` of the tokens being the val split.
    """
    if split not in ("train", "val"):
        raise UserInputError(f"build_loader: split must be 'train' or 'val', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserInputError(f"build_loader: val_fraction must be in [0, 1), got {val_fraction}")
    path = Path(data_path)
    if not path.exists():
        raise UserInputError(f"{path}: no such file or directory")
    shuffle = (split == "train") if shuffle is None else shuffle
    common = dict(B=B, T=T, rank=rank, world_size=world_size, split=split, source=str(path),
                  pin_memory=pin_memory)

    if path.is_dir():
        bins = sorted(p for p in path.iterdir() if p.suffix == ".bin" and p.is_file())
        if bins:
            mine = [p for p in bins if (m := _SPLIT_TAG.search(p.name)) and m.group(1) == split]
            if not mine:
                raise UserInputError(
                    f"{path}: none of its {len(bins)} .bin files is a {split} shard "
                    f"(named *_{split}_*.bin)")
            pieces, vocab = _shard_pieces(mine, tokenizer)
            n = sum(len(a) for _, a in pieces)
            order = f"shuffled per epoch (seed {seed})" if shuffle else "in order"
            return TokenLoader(pieces, shuffle=shuffle, seed=seed, vocab_size=vocab, kind="shards",
                               summary=f"shards {path}: {len(pieces)} {split} shards, {n:,} tokens, {order}",
                               **common)
        try:
            files = find_text_files([path])
        except UserInputError:
            raise UserInputError(
                f"{path}: no token shards (*_train_*.bin, *_val_*.bin) and no text files in "
                "this folder") from None
        tok = _resolve_tokenizer(tokenizer)
        parts = [tokenize_file(f, tok, document_eot=True) for f in files if f.stat().st_size]
        if not parts:
            raise UserInputError(f"{path}: all text files in this folder are empty")
        return _text_loader(np.concatenate(parts), tok, path, f"{len(files)} text files in {path}",
                            val_fraction, common)

    if path.suffix == ".bin":
        tag = _SPLIT_TAG.search(path.name)
        if tag:
            if tag.group(1) != split:
                a, b = tag.span(1)
                sibling = path.with_name(path.name[:a] + split + path.name[b:])
                if not sibling.is_file():
                    raise UserInputError(
                        f"{path}: is a {tag.group(1)} shard; the {split} split needs {sibling.name} "
                        "beside it, which does not exist")
                path = sibling
            pieces, vocab = _shard_pieces([path], tokenizer)
            return TokenLoader(pieces, vocab_size=vocab, kind="shards",
                               summary=f"shard {path}: {len(pieces[0][1]):,} tokens", **common)
        pieces, vocab = _shard_pieces([path], tokenizer)
        return _split_loader(pieces[0][1], path, f"shard {path}", val_fraction, common, vocab)

    tok = _resolve_tokenizer(tokenizer)
    return _text_loader(tokenize_file(path, tok), tok, path, f"text {path}", val_fraction, common)


def _split_loader(tokens, path: Path, what: str, val_fraction: float, common: dict,
                  vocab: int | None, tokenizer_name: str = "") -> TokenLoader:
    n = len(tokens)
    n_val = int(n * val_fraction)
    split = common["split"]
    if split == "val" and n_val == 0:
        raise UserInputError(
            f"{path}: the val split is empty ({n:,} tokens, val_fraction={val_fraction})")
    part = tokens[n - n_val:] if split == "val" else tokens[:n - n_val]
    where = f"last {val_fraction:.0%}" if split == "val" else f"first {1 - val_fraction:.0%}"
    tn = f" {tokenizer_name}" if tokenizer_name else ""
    summary = f"{what}: {n:,}{tn} tokens; {split} split = {where}, {len(part):,} tokens"
    return TokenLoader([(path.name, part)], vocab_size=vocab, kind="text", summary=summary, **common)


def _text_loader(tokens, tok, path: Path, what: str, val_fraction: float, common: dict):
    # Our own tokenizer made these ids, so the per-batch vocabulary check is moot.
    return _split_loader(tokens, path, what, val_fraction, common, None, tok.name)


# --------------------------------------------------------------------------
# The default corpus
# --------------------------------------------------------------------------

def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gpt2-engine"


def _urlopen_fetch(url: str, timeout: float) -> bytes:
    import urllib.request
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def resolve_default_corpus(cache_dir=None, *, cwd=None, fetch=None, url: str = TINY_SHAKESPEARE_URL,
                           timeout: float = 5.0) -> tuple[Path, str]:
    """(path, description) of the text to train on when no --data is given.

    `input.txt` in the current directory if present; else tiny-shakespeare,
    downloaded once into the cache (`$XDG_CACHE_HOME/gpt2-engine` or
    `~/.cache/gpt2-engine`); offline, the English documentation topics that
    ship with CPython (`pydoc_data.topics`), written once into the cache.
    `fetch(url, timeout) -> bytes` is injectable so tests never touch the network.
    """
    local = Path(cwd if cwd is not None else os.getcwd()) / "input.txt"
    if local.is_file():
        return local, f"{local} (input.txt in the current directory)"
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(
            f"{cache}: cannot create the default-corpus cache ({e.strerror or e}); pass --data FILE") from e
    shakespeare = cache / "tinyshakespeare.txt"
    if shakespeare.is_file() and shakespeare.stat().st_size:
        return shakespeare, f"tiny-shakespeare ({shakespeare}, cached)"
    fetch = fetch or _urlopen_fetch
    try:
        data = fetch(url, timeout)
        if not data:
            raise OSError("empty download")
        data.decode("utf-8")
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
        reason = f"{type(e).__name__}: {e}"
    else:
        try:
            atomic_write(shakespeare, lambda f: f.write(data))
        except OSError as e:
            raise UserInputError(f"{shakespeare}: cannot write the downloaded corpus: {e}") from e
        return shakespeare, f"tiny-shakespeare (downloaded from {url} into {shakespeare})"

    from pydoc_data.topics import topics
    fallback = cache / "pydoc_topics.txt"
    if not (fallback.is_file() and fallback.stat().st_size):
        text = "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"
        try:
            atomic_write(fallback, lambda f: f.write(text.encode("utf-8")))
        except OSError as e:
            raise UserInputError(f"{fallback}: cannot write the offline corpus: {e}") from e
    return fallback, (f"CPython's documentation topics from pydoc_data ({len(topics)} topics, "
                      f"{fallback}): tiny-shakespeare could not be downloaded ({reason})")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text files/folders into uint16 .bin shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text files or folders (walked recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}, 200 MB)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="W",
                   help="tokenizing processes (default: one per CPU)")
    p.add_argument("--tokenizer", choices=["gpt2", "bytes"], default="gpt2",
                   help="gpt2 needs tiktoken's BPE files (TIKTOKEN_CACHE_DIR offline)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of the tokens, the first ones, that form the val split (default 0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = ap.parse_args(argv)
    try:
        s = prepare(args.inputs, args.out, shard_tokens=args.shard_tokens, workers=args.workers,
                    tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                    progress=not args.quiet)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s['files']} files, {s['bytes']:,} bytes -> {s['train_tokens']:,} train tokens in "
          f"{len(s['train'])} shards, {s['val_tokens']:,} val tokens in {len(s['val'])} shards "
          f"({s['tokenizer']}) under {s['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
