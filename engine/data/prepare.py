"""`python -m engine.data prepare`: documents -> uint16 token shards, tokenized in
several processes, resumable.

Inputs (engine.data.documents): text files and folders (each file one
document); Parquet and JSON-lines files (plain, .gz, .zst), each row one
document (its `--text-field`); or a Hugging Face dataset (`--hf-dataset NAME
--hf-config CONFIG --split SPLIT`, streamed, or a local copy of one). Every
document starts with the tokenizer's end-of-text token, as build-nanogpt's
fineweb.py does, so a FineWeb-Edu prepare holds the token stream its shards hold.

The main process reads the inputs in order and hands tasks (slices of
documents) to worker processes, which tokenize them in batches
(`encode_ordinary_batch`). At most two tasks per worker are in flight and each
task's tokens go straight into the shard being written, so memory stays bounded
however large the dataset or any document.

Resumable and all or nothing (engine.data.work_folder): the shards are written
into OUT/.prepare-work and move into OUT, after the manifest, once all are done.
An interrupted or killed prepare keeps its finished shards there, and the same
command continues from them to exactly the shards an uninterrupted run writes.
OUT is locked while a prepare writes into it: a second prepare into it is refused.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.documents import find_inputs
from engine.data.hub import HubDataset
from engine.data.shards import MANIFEST_NAME, SPLIT_TAG, TOKEN_DTYPE
from engine.data.text import DEFAULT_CHUNK_BYTES
from engine.data.work_folder import PROGRESS_NAME, WORK_NAME, StreamShards, WorkFolder
from engine.errors import UserInputError
from engine.run_dir import lock_folder
from engine.run_errors import RunAborted, signal_name
from engine.signals import abort_on_sigterm, ignore_stop_signals_in_worker
from engine.tokenizer import TOKENIZER_NAMES, get_tokenizer

WORK_PREFIX = ".prepare-"
DEFAULT_SHARD_TOKENS = 100_000_000  # build-nanogpt's and llm.c's shard size: 200 MB of uint16
IN_FLIGHT_PER_WORKER = 2


@dataclass(frozen=True)
class PrepareSettings:
    """What decides a prepare's output, recorded in its work folder: a prepare
    resumes only with the same. (The number of workers does not change the
    output, so a resumed prepare may use another.)"""
    tokenizer: str = "gpt2"
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    val_fraction: float = 0.1      # the first fraction of all tokens is the val split...
    val_tokens: int | None = None  # ...or the first val_tokens tokens
    text_field: str = "text"       # the document of a Parquet / JSON-lines / dataset row
    hf_dataset: str | None = None  # a Hugging Face dataset (Hub name or local folder) instead of inputs
    hf_config: str | None = None
    split: str = "train"           # the dataset's split to read
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # text per tokenizing batch

    def __post_init__(self):
        if self.tokenizer not in TOKENIZER_NAMES:
            raise UserInputError(f"prepare: --tokenizer must be one of {', '.join(TOKENIZER_NAMES)}, "
                                 f"got {self.tokenizer!r}")
        if self.shard_tokens < 1:
            raise UserInputError(f"prepare: --shard-tokens must be >= 1, got {self.shard_tokens}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserInputError(f"prepare: --val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_tokens is not None and self.val_tokens < 0:
            raise UserInputError(f"prepare: --val-tokens must be >= 0, got {self.val_tokens}")
        if not self.text_field:
            raise UserInputError("prepare: --text-field must name a field")
        if self.chunk_bytes < 1:
            raise UserInputError(f"prepare: chunk_bytes must be >= 1, got {self.chunk_bytes}")

    def val_size(self, n_tokens: int) -> int:
        if self.val_tokens is None:
            return int(n_tokens * self.val_fraction)
        if self.val_tokens >= n_tokens:
            raise UserInputError(f"prepare: the inputs hold {n_tokens:,} tokens; --val-tokens {self.val_tokens:,} "
                                 "leaves none for training")
        return self.val_tokens


# ----------------------------------------------------------------- workers

def tokenize_task(task, tokenizer_name: str, chunk_bytes: int, threads: int) -> tuple[np.ndarray, int]:
    """A worker's job: (uint16 tokens, documents started) of one task, the
    end-of-text token before each document's first piece."""
    tok = get_tokenizer(tokenizer_name)  # tiktoken caches it per process
    parts, documents, texts, starts, size = [], 0, [], [], 0
    for text, first in task.pieces(chunk_bytes):
        texts.append(text)
        starts.append(first)
        documents += first
        size += len(text)
        if size >= chunk_bytes:
            parts.append(_encode(tok, texts, starts, threads))
            texts, starts, size = [], [], 0
    if texts:
        parts.append(_encode(tok, texts, starts, threads))
    if len(parts) == 1:
        return parts[0], documents
    return (np.concatenate(parts) if parts else np.zeros(0, TOKEN_DTYPE)), documents


def _encode(tok, texts: list[str], starts: list[bool], threads: int) -> np.ndarray:
    ids = tok.encode_batch(texts, num_threads=threads)
    seq = []
    for piece, first in zip(ids, starts):
        if first and tok.eot_token is not None:
            seq.append((tok.eot_token,))
        seq.append(piece)
    return np.fromiter(itertools.chain.from_iterable(seq), dtype=TOKEN_DTYPE, count=sum(map(len, seq)))


def _pool_context():
    # fork starts workers in milliseconds and shares the loaded BPE tables;
    # elsewhere (macOS, Windows) the platform default is the safe choice.
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


@contextlib.contextmanager
def ordered_results(workers: int, *args):
    """`run(items)`: (item, tokenize_task(item's task, *args)) in order, computed
    by `workers` processes with at most IN_FLIGHT_PER_WORKER tasks each in
    flight (items are (task index, state, task))."""
    if workers == 1:
        yield lambda items: ((item, tokenize_task(item[2], *args)) for item in items)
        return
    # Forked workers share the parent's pages until they write to them, and the
    # garbage collector writes to every object it scans: frozen, the objects of
    # the parent's imports (torch's among them) stay shared.
    gc.freeze()
    pool = ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=ignore_stop_signals_in_worker,
                               initargs=(os.getpid(),))

    def run(items):
        window = deque()
        for item in items:
            window.append((item, pool.submit(tokenize_task, item[2], *args)))
            if len(window) >= IN_FLIGHT_PER_WORKER * workers:
                item, future = window.popleft()
                yield item, future.result()
        while window:
            item, future = window.popleft()
            yield item, future.result()

    try:
        yield run
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        gc.unfreeze()


# ----------------------------------------------------------------- progress

def _amount(n: float, unit: str) -> str:
    if unit != "bytes":
        return f"{n:,.0f} {unit}"
    for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:,.1f} {name}"
    return f"{n:,.0f} bytes"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
    """Progress on stderr: input done (of its total, when known), documents,
    tokens, tokens/s and the time left. On a terminal one line redrawn <= 5x/s;
    into a file or pipe (a log) a plain line every 10 s, since a carriage return
    there would run the reports together."""

    def __init__(self, total: int, unit: str, enabled: bool, done: dict, stream=None, clock=time.perf_counter):
        self.total, self.unit, self.enabled = total, unit, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.units, self.documents, self.tokens = done.get("units", 0), done.get("documents", 0), done.get("tokens", 0)
        self.start_units, self.start_tokens = self.units, self.tokens
        self.drawn = False
        self.redraw = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.redraw else 10.0
        self.t0 = clock()
        self.last = self.t0 - self.interval  # the first update reports at once

    def update(self, units: int, documents: int, tokens: int, force: bool = False):
        self.units += units
        self.documents += documents
        self.tokens += tokens
        now = self.clock()
        if not (self.enabled and (force or now - self.last >= self.interval)):
            return
        self.last, self.drawn = now, True
        elapsed = max(now - self.t0, 1e-9)
        line = "prepare: "
        if self.total:
            line += f"{100.0 * min(self.units / self.total, 1.0):.0f}% of {_amount(self.total, self.unit)}, "
        line += (f"{self.documents:,} documents, {self.tokens:,} tokens, "
                 f"{(self.tokens - self.start_tokens) / elapsed:,.0f} tokens/s")
        speed = (self.units - self.start_units) / elapsed
        if self.total and speed > 0 and self.units < self.total:
            line += f", ETA {_duration((self.total - self.units) / speed)}"
        self.stream.write("\r" + line + "\033[K" if self.redraw else line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.update(0, 0, 0, force=True)
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


# ----------------------------------------------------------------- prepare

def prepare(inputs, out_dir, *, workers: int | None = None, progress: bool = True, **settings) -> dict:
    """Tokenize documents (files and folders in `inputs`, or `hf_dataset=`) into
    uint16 shards under `out_dir`; `settings` are PrepareSettings' fields.

    The first `val_fraction` of all tokens (or the first `val_tokens`) becomes
    `<tokenizer>_val_NNNNNN.bin`, the rest `<tokenizer>_train_NNNNNN.bin`, the
    stream cut into shards of `shard_tokens` (the shard at the split point in
    two). Returns a summary dict.
    """
    cfg = PrepareSettings(**settings)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UserInputError(f"prepare: --workers must be >= 1, got {workers}")
    named = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs or [])
    if bool(named) == bool(cfg.hf_dataset):
        raise UserInputError("prepare: give input files or folders, or --hf-dataset, not both"
                             if named else "prepare: give input files or folders, or --hf-dataset NAME")
    tok = get_tokenizer(cfg.tokenizer)  # fails early, before any work, when unavailable
    if tok.vocab_size > 2 ** 16:
        raise UserInputError(f"prepare: tokenizer {tok.name} has {tok.vocab_size} ids; uint16 holds 65536")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{out}: --out must be a folder, and this is a file")
    created = not out.exists()
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
            _remove_stale_temp_files(out)
        return _prepare_locked(named, out, tok, cfg, workers=workers, progress=progress)
    except BaseException:
        if created:  # leave no trace but a work folder worth resuming
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    finally:
        if lock is not None:
            os.close(lock)


def _remove_stale_temp_files(out: Path) -> None:
    # The folder is locked by this process: a temp file (or an old-style work
    # folder) left in it by an earlier prepare belongs to one that was killed.
    for p in out.iterdir():
        if p.name.startswith(WORK_PREFIX) and p.name != WORK_NAME:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _open_inputs(named, cfg: PrepareSettings):
    if cfg.hf_dataset:
        return [HubDataset(cfg.hf_dataset, cfg.hf_config, cfg.split, cfg.text_field, cfg.chunk_bytes)]
    return find_inputs(named, cfg.text_field, cfg.chunk_bytes)


def _prepare_locked(named, out: Path, tok, cfg: PrepareSettings, *, workers: int, progress: bool) -> dict:
    sources = _open_inputs(named, cfg)
    plan = {"version": 1, "settings": dataclasses.asdict(cfg), "inputs": [s.fingerprint() for s in sources]}
    work = WorkFolder(out)
    done = work.existing_progress(plan)
    if not (done and done.get("moving")):
        stale = sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".npy") and SPLIT_TAG.search(p.name))
        if (out / MANIFEST_NAME).exists():
            stale.insert(0, MANIFEST_NAME)
        if stale:
            raise UserInputError(
                f"{out}: already holds shards ({stale[0]}, ...); choose an empty folder or delete them")
    done = work.start(plan, done)
    if done.get("finished"):
        done = {**done, "resumed_tokens": done["tokens"]}
    try:
        if not done.get("finished"):
            done = _tokenize(sources, work, tok, cfg, done, workers=workers, progress=progress)
        n_tokens = done["tokens"]
        if n_tokens == 0:
            what = cfg.hf_dataset or ", ".join(map(str, named))
            raise UserInputError(f"prepare: no documents in {what}")
        n_val = cfg.val_size(n_tokens)
        manifest, shards = work.finish(n_tokens, n_val, cfg.shard_tokens, tok.name, tok.vocab_size)
    except UserInputError:
        work.discard()  # the inputs must change before this prepare can succeed
        raise
    return {"out": out, "tokenizer": tok.name, "inputs": len(sources), "documents": done["documents"],
            "train": shards["train"], "val": shards["val"], "train_tokens": n_tokens - n_val, "val_tokens": n_val,
            "manifest": manifest, "resumed_tokens": done.get("resumed_tokens", 0)}


def _tokenize(sources, work: WorkFolder, tok, cfg: PrepareSettings, done: dict, *, workers: int,
              progress: bool) -> dict:
    """Every task after `done`'s position, in order, into stream shards; returns
    the finished progress record."""
    at = done.get("position") or {"input": 0, "task": 0, "state": None, "skip": 0}
    counts = {"documents": done.get("documents", 0), "units": done.get("units", 0),
              "tokens": done["shards"] * cfg.shard_tokens}
    resumed_tokens = counts["tokens"]
    unit = sources[0].unit
    bar = _Progress(sum(s.total_units for s in sources), unit, progress, counts)
    writer = StreamShards(work.path, cfg.shard_tokens, tok.vocab_size, done["shards"])
    threads = max(1, (os.cpu_count() or 1) // workers)
    try:
        with ordered_results(workers, tok.name, cfg.chunk_bytes, threads) as run:
            for i in range(at["input"], len(sources)):
                resume_here = i == at["input"]
                items = sources[i].tasks(at["task"], at["state"]) if resume_here else sources[i].tasks()
                for (j, state, task), (tokens, documents) in run(items):
                    skip = at["skip"] if resume_here and j == at["task"] else 0
                    ends = writer.write(tokens[skip:])
                    if ends:  # where the last shard finished here ends in the task's tokens
                        work.save_progress({"shards": writer.index, "documents": counts["documents"],
                                            "units": counts["units"],
                                            "position": {"input": i, "task": j, "state": state,
                                                         "skip": skip + ends[-1]}})
                    counts["documents"] += documents
                    counts["units"] += task.units
                    counts["tokens"] += len(tokens) - skip
                    bar.update(task.units, documents, len(tokens) - skip)
        writer.close()
        bar.close()
    finally:
        writer.abandon()
        bar.abort()
    finished = {"finished": True, "shards": writer.index, "tokens": counts["tokens"],
                "documents": counts["documents"], "units": counts["units"]}
    work.save_progress(finished)
    return {**finished, "resumed_tokens": resumed_tokens}


# ----------------------------------------------------------------- command line

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m engine.data", description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize documents into uint16 .bin shards (resumable)")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="text, Parquet or JSON-lines (.jsonl, .gz, .zst) files, or folders of them (walked "
                        "recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the shards")
    p.add_argument("--hf-dataset", metavar="NAME", help="a Hugging Face dataset to stream instead of INPUTs "
                   "(e.g. HuggingFaceFW/fineweb-edu), or a local folder holding one")
    p.add_argument("--hf-config", metavar="CONFIG", help="the dataset's configuration (e.g. sample-10BT)")
    p.add_argument("--split", default="train", help="the dataset's split to read (default train)")
    p.add_argument("--text-field", default="text", metavar="FIELD",
                   help="the column / field holding each document (default text)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}, 200 MB)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                     help="fraction of the tokens, the first ones, that form the val split (default 0.1)")
    val.add_argument("--val-tokens", type=int, metavar="N",
                     help="the first N tokens form the val split (build-nanogpt: 100000000, its first shard)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="W",
                   help="tokenizing processes (default: one per CPU)")
    p.add_argument("--tokenizer", choices=TOKENIZER_NAMES, default="gpt2",
                   help="gpt2 needs tiktoken's BPE files (TIKTOKEN_CACHE_DIR offline)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    args = ap.parse_args(argv)
    work = Path(args.out) / WORK_NAME
    try:
        with abort_on_sigterm():
            s = prepare(args.inputs, args.out, workers=args.workers, progress=not args.quiet,
                        tokenizer=args.tokenizer, shard_tokens=args.shard_tokens, val_fraction=args.val_fraction,
                        val_tokens=args.val_tokens, text_field=args.text_field, hf_dataset=args.hf_dataset,
                        hf_config=args.hf_config, split=args.split)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, RunAborted) else 2
        print(f"prepare: interrupted by {signal_name(signum)}; {args.out} is left as it was{_kept(work)}",
              file=sys.stderr)
        return 128 + signum
    except OSError as e:
        print(f"error: {e.filename or args.out}: {e.strerror or e}; {args.out} is left as it was{_kept(work)}",
              file=sys.stderr)
        return 1
    resumed = f"; resumed after {s['resumed_tokens']:,} tokens" if s["resumed_tokens"] else ""
    print(f"{s['documents']:,} documents -> {s['train_tokens']:,} train tokens in {len(s['train'])} shards, "
          f"{s['val_tokens']:,} val tokens in {len(s['val'])} shards ({s['tokenizer']}) under {s['out']}{resumed}")
    return 0


def _kept(work: Path) -> str:
    if not work.is_dir():
        return ""
    try:
        shards = json.loads((work / PROGRESS_NAME).read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        shards = 0
    return f"; {shards} finished shards are kept in {work}: run the same command again to continue"


if __name__ == "__main__":
    sys.exit(main())
