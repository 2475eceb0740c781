"""`python -m engine.data prepare`: text files and folders -> uint16 token shards,
tokenized in several processes.

All or nothing: the shards are written into a private hidden folder inside
--out; at the end the manifest (engine.data.shards) is written and the shards
are moved into --out. An error or an interrupt (Ctrl-C, SIGTERM) removes what
this prepare wrote, so --out is left as it was; a SIGKILL can leave the hidden
folder (which no loader reads, and the next prepare into --out removes) or a
manifest listing missing shards (which the loader refuses). The folder is
locked while a prepare writes into it: a second prepare into it is refused.
Memory stays bounded by the chunk size, also for a file that is one long line
(engine.data.text.safe_cuts).
"""
from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engine.data.shards import MANIFEST_NAME, SPLIT_TAG, TOKEN_DTYPE, write_manifest, write_shard
from engine.data.text import DEFAULT_CHUNK_BYTES, encode_bytes, find_text_files, safe_cuts, utf8_error
from engine.errors import UserInputError
from engine.fileio import fsync_dir
from engine.run_dir import lock_folder
from engine.run_errors import RunAborted, signal_name
from engine.signals import abort_on_sigterm, ignore_stop_signals_in_worker
from engine.tokenizer import TOKENIZER_NAMES, get_tokenizer

WORK_PREFIX = ".prepare-"

DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's shard size: 200 MB of uint16


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
        raise utf8_error(Path(path), start + e.start, e) from None
    tokens = encode_bytes(tokenizer, [data])
    if first_of_document and tokenizer.eot_token is not None:
        tokens = np.concatenate([np.array([tokenizer.eot_token], dtype=TOKEN_DTYPE), tokens])
    return tokens, end - start


class _Progress:
    """A progress report on stderr (no dependency): on a terminal one line redrawn
    <= 5x/s; into a file or pipe (a log) a plain line every 10 s, since a
    carriage return there would run the reports together."""

    def __init__(self, total_bytes: int, enabled: bool, stream=None):
        self.total, self.enabled = total_bytes, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.tokens = 0
        self.drawn = False
        self.redraw = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.redraw else 10.0
        self.t0 = time.perf_counter()
        self.last = self.t0 - self.interval  # the first update reports at once

    def update(self, nbytes: int, ntokens: int, force: bool = False):
        self.done += nbytes
        self.tokens += ntokens
        now = time.perf_counter()
        if self.enabled and (force or now - self.last >= self.interval):
            self.last, self.drawn = now, True
            mb = self.done / 1e6
            rate = mb / max(now - self.t0, 1e-9)
            pct = 100.0 * self.done / max(self.total, 1)
            line = (f"prepare: {mb:,.1f}/{self.total / 1e6:,.1f} MB ({pct:.0f}%), "
                    f"{self.tokens:,} tokens, {rate:.1f} MB/s")
            self.stream.write(f"\r{line}" if self.redraw else f"{line}\n")
            self.stream.flush()

    def close(self):
        if self.enabled:
            self.update(0, 0, force=True)
            if self.redraw:
                self.stream.write("\n")
            self.stream.flush()
            self.enabled = False

    def abort(self):
        # End a half-drawn line so an error message starts on its own line.
        if self.enabled and self.drawn and self.redraw:
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
            cuts = safe_cuts(buf, 0, size, chunk_bytes)
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
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_folder(out)
    except BlockingIOError:
        raise UserInputError(f"{out}: another prepare is writing into this folder; wait for it to end or "
                             "choose another --out") from None
    except OSError as e:
        raise UserInputError(f"{out}: cannot use this folder as --out ({e.strerror or e})") from None
    try:
        if lock is not None:
            _remove_stale_work(out)
        return _prepare_locked(inputs, out, tok, shard_tokens=shard_tokens, workers=workers,
                               progress=progress, val_fraction=val_fraction, chunk_bytes=chunk_bytes)
    finally:
        if lock is not None:
            os.close(lock)


def _remove_stale_work(out: Path) -> None:
    # The folder is locked by this process: a work folder or temp file left in it
    # by an earlier prepare belongs to one that was killed.
    for p in out.iterdir():
        if p.name.startswith(WORK_PREFIX):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _prepare_locked(inputs, out: Path, tok, *, shard_tokens, workers, progress, val_fraction, chunk_bytes):
    stale = sorted(p.name for p in out.glob("*.bin") if SPLIT_TAG.search(p.name))
    if (out / MANIFEST_NAME).exists():
        stale.insert(0, MANIFEST_NAME)
    if stale:
        raise UserInputError(
            f"{out}: already holds shards ({stale[0]}, ...); choose an empty folder or delete them")

    explicit = {Path(i) for i in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)}
    files = find_text_files(inputs)
    tasks, total_bytes = _plan_tasks(files, tok.name, chunk_bytes, explicit)
    if not tasks:
        raise UserInputError(f"prepare: no text to tokenize in {', '.join(map(str, explicit))}")

    bar = _Progress(total_bytes, progress)
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=out))
    moved, manifest, done = [], None, False
    try:
        # Tokens stream, in order, into one file; the split point is known only
        # once the total is, then the file is cut into shards.
        stream_path = work / "tokens.u16"
        with open(stream_path, "wb") as raw:
            if workers == 1 or len(tasks) == 1:
                for tokens, nbytes in map(_tokenize_task, tasks):
                    raw.write(tokens.tobytes())
                    bar.update(nbytes, tokens.size)
            else:
                with _pool_context().Pool(min(workers, len(tasks)), initializer=ignore_stop_signals_in_worker) as pool:
                    for tokens, nbytes in pool.imap(_tokenize_task, tasks, chunksize=1):
                        raw.write(tokens.tobytes())
                        bar.update(nbytes, tokens.size)
        bar.close()
        n = os.path.getsize(stream_path) // 2
        n_val = int(n * val_fraction)
        stream = np.memmap(stream_path, dtype=TOKEN_DTYPE, mode="r") if n else np.zeros(0, TOKEN_DTYPE)
        written = {"val": [], "train": []}
        for split, a, b in (("val", 0, n_val), ("train", n_val, n)):
            for i, s in enumerate(range(a, b, shard_tokens)):
                path = work / f"{tok.name}_{split}_{i:06d}.bin"
                written[split].append(write_shard(path, stream[s:min(s + shard_tokens, b)], tok.vocab_size))
        del stream
        # The manifest first: from here on, a shard missing from --out is visible.
        manifest = write_manifest(out, written["val"] + written["train"], tok.name, tok.vocab_size,
                                  tmp_prefix=f"{WORK_PREFIX}manifest.")
        for split in written:
            for i, p in enumerate(written[split]):
                os.replace(p, out / p.name)
                moved.append(out / p.name)
                written[split][i] = out / p.name
        fsync_dir(out)
        done = True
    finally:
        bar.abort()
        shutil.rmtree(work, ignore_errors=True)
        if not done:  # leave --out as it was
            for p in moved:
                p.unlink(missing_ok=True)
            if manifest is not None:
                manifest.unlink(missing_ok=True)
    return {"out": out, "tokenizer": tok.name, "files": len(files), "bytes": total_bytes,
            "train": written["train"], "val": written["val"],
            "train_tokens": n - n_val, "val_tokens": n_val, "manifest": manifest}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.data", description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text files/folders into uint16 .bin shards")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text files or folders (walked recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}, 200 MB)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="W",
                   help="tokenizing processes (default: one per CPU)")
    p.add_argument("--tokenizer", choices=TOKENIZER_NAMES, default="gpt2",
                   help="gpt2 needs tiktoken's BPE files (TIKTOKEN_CACHE_DIR offline)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of the tokens, the first ones, that form the val split (default 0.1)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = ap.parse_args(argv)
    try:
        with abort_on_sigterm():
            s = prepare(args.inputs, args.out, shard_tokens=args.shard_tokens, workers=args.workers,
                        tokenizer=args.tokenizer, val_fraction=args.val_fraction,
                        progress=not args.quiet)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, RunAborted) else 2
        print(f"prepare: interrupted by {signal_name(signum)}; {args.out} is left as it was", file=sys.stderr)
        return 128 + signum
    print(f"{s['files']} files, {s['bytes']:,} bytes -> {s['train_tokens']:,} train tokens in "
          f"{len(s['train'])} shards, {s['val_tokens']:,} val tokens in {len(s['val'])} shards "
          f"({s['tokenizer']}) under {s['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
