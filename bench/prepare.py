"""Data preparation throughput: ours against build-nanogpt's recipe, on the same
Parquet rows with the same number of processes.

build-nanogpt's fineweb.py: a multiprocessing pool maps `tokenize` over the
dataset's rows (`pool.imap(tokenize, rows, chunksize=16)`: every row a dict of all
its columns, each document's `[<|endoftext|>] + encode_ordinary(text)` sent back
as its own uint16 array), and the main process fills 100M-token shards in a
preallocated array, written with np.save. Ours: `engine.data.prepare` of the same
files, the same shard size (without a val split: only the names differ).

Each run is a fresh process (`python -m bench.prepare --run ours|build-nanogpt`)
that loads the tokenizer before its clock starts and reports its tokens and
seconds; meanwhile the parent samples the memory of the run's process tree every
20 ms (PSS summed over the processes: a page shared by n of them counts 1/n in
each, so fork-shared tokenizer tables count once) and keeps the peak. The two
recipes run in pairs, alternating which goes first; before any timing, the token
streams of the first pair must be identical. Reported: tokens/s of each (median
over rounds), ours / build-nanogpt's (median and interquartile range of the
pairs' ratios) and each one's peak memory.

    python -m bench.prepare                       # a FineWeb-like corpus made from CPython's docs
    python -m bench.prepare --parquet F.parquet   # your rows (e.g. FineWeb-Edu's files); repeatable
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RECIPES = ("ours", "build-nanogpt")
SHARD_TOKENS = 100_000_000  # fineweb.py's shard_size
CHUNKSIZE = 16  # fineweb.py's imap chunksize


# ----------------------------------------------------------------- the corpus

def write_corpus(path, megabytes: float, row_group_rows: int = 1024, seed: int = 0) -> Path:
    """A Parquet file of FineWeb-like rows (its columns, documents of a few kB of
    English prose from CPython's pydoc topics, shuffled) of about `megabytes` MB of text."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pydoc_data.topics import topics
    paragraphs = [p for k in sorted(topics) for p in topics[k].split("\n\n") if p.strip()]
    rng = np.random.default_rng(seed)
    docs, size = [], 0
    while size < megabytes * 1e6:
        order = rng.permutation(len(paragraphs))
        k = 0
        while k < len(order) and size < megabytes * 1e6:
            take = int(rng.integers(2, 20))
            doc = "\n\n".join(paragraphs[i] for i in order[k:k + take])
            docs.append(doc)
            size += len(doc.encode())
            k += take
    n = len(docs)
    table = pa.table({"text": docs, "id": [f"<urn:uuid:{i:012d}>" for i in range(n)],
                      "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.org/{i}" for i in range(n)],
                      "language": ["en"] * n, "language_score": rng.uniform(0.9, 1.0, n),
                      "token_count": [len(d) // 4 for d in docs], "score": rng.uniform(2.5, 5.0, n),
                      "int_score": rng.integers(3, 6, n)})
    pq.write_table(table, path, row_group_size=row_group_rows)
    return Path(path)


# ----------------------------------------------------------------- the recipes

def _nanogpt_tokenize(doc):
    # fineweb.py's tokenize(), on a row dict (tiktoken's cached encoding: loaded
    # before the pool forked, as fineweb.py loads it at import).
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    tokens = [enc._special_tokens["<|endoftext|>"]]
    tokens.extend(enc.encode_ordinary(doc["text"]))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2 ** 16).all(), "token dictionary too large for uint16"
    return tokens_np.astype(np.uint16)


def _rows(paths):
    """The rows of the Parquet files in order, as dicts of every column (what
    iterating a datasets.Dataset yields)."""
    import pyarrow.parquet as pq
    for path in paths:
        with pq.ParquetFile(path) as f:
            for batch in f.iter_batches(batch_size=1000):
                yield from batch.to_pylist()


def run_nanogpt(paths, out: Path, workers: int, shard_tokens: int = SHARD_TOKENS) -> int:
    """fineweb.py's loop, writing into `out`; returns the number of tokens."""
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        shard_index, token_count = 0, 0
        all_tokens_np = np.empty((shard_tokens,), dtype=np.uint16)
        for tokens in pool.imap(_nanogpt_tokenize, _rows(paths), chunksize=CHUNKSIZE):
            total += len(tokens)
            if token_count + len(tokens) < shard_tokens:
                all_tokens_np[token_count:token_count + len(tokens)] = tokens
                token_count += len(tokens)
            else:
                split = "val" if shard_index == 0 else "train"
                remainder = shard_tokens - token_count
                all_tokens_np[token_count:token_count + remainder] = tokens[:remainder]
                np.save(out / f"edufineweb_{split}_{shard_index:06d}", all_tokens_np)
                shard_index += 1
                all_tokens_np[0:len(tokens) - remainder] = tokens[remainder:]
                token_count = len(tokens) - remainder
        if token_count != 0:
            split = "val" if shard_index == 0 else "train"
            np.save(out / f"edufineweb_{split}_{shard_index:06d}", all_tokens_np[:token_count])
    return total


def run_ours(paths, out: Path, workers: int, shard_tokens: int = SHARD_TOKENS) -> int:
    from engine.data import prepare
    # No val split: fineweb.py's shard 0 holds everything below 100M tokens, which
    # ours refuses (nothing left to train on); the streams are the same either way.
    s = prepare([str(p) for p in paths], out, workers=workers, progress=False, shard_tokens=shard_tokens,
                val_fraction=0.0)
    return s["train_tokens"] + s["val_tokens"]


RUNNERS = {"ours": run_ours, "build-nanogpt": run_nanogpt}


def token_stream(out: Path) -> np.ndarray:
    """All tokens of a run's shards, val first, in order (ours .bin or fineweb.py's .npy)."""
    from engine.data.shards import open_shard
    files = sorted(out.glob("*_val_*")) + sorted(out.glob("*_train_*"))
    return np.concatenate([np.asarray(open_shard(p)) for p in files])


# ----------------------------------------------------------------- measuring

def _tree_memory_kb(pid: int) -> int:
    """PSS (or RSS where the kernel has no smaps_rollup) summed over `pid` and its descendants, in kB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            try:
                with open(f"/proc/{p}/status") as f:
                    total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            except OSError:
                continue
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return total


def measure(recipe: str, paths, out: Path, workers: int, shard_tokens: int) -> dict:
    """One run of `recipe` in a fresh process: tokens, seconds, tokens/s, peak memory (MB)."""
    cmd = [sys.executable, "-m", "bench.prepare", "--run", recipe, "--out", str(out), "--workers", str(workers),
           "--shard-tokens", str(shard_tokens)] + [a for p in paths for a in ("--parquet", str(p))]
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_memory_kb(proc.pid))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe} failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    r["tokens_per_s"] = r["tokens"] / r["seconds"]
    r["peak_mb"] = peak[0] / 1e3 if sys.platform.startswith("linux") else None
    return r


def compare(paths, workers: int, rounds: int = 3, shard_tokens: int = SHARD_TOKENS, log=print) -> dict:
    """Both recipes in `rounds` alternating pairs; the token streams checked first."""
    runs = {r: [] for r in RECIPES}
    ratios = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        for k in range(rounds):
            order = RECIPES if k % 2 == 0 else RECIPES[::-1]
            pair = {}
            for recipe in order:
                out = Path(tmp) / f"{recipe}-{k}"
                pair[recipe] = measure(recipe, paths, out, workers, shard_tokens)
                runs[recipe].append(pair[recipe])
                log(f"round {k + 1}/{rounds} {recipe}: {pair[recipe]['tokens']:,} tokens in "
                    f"{pair[recipe]['seconds']:.2f} s, {pair[recipe]['tokens_per_s']:,.0f} tokens/s, "
                    f"peak {_mb(pair[recipe]['peak_mb'])}")
            if k == 0:
                ours, theirs = (token_stream(Path(tmp) / f"{r}-0") for r in RECIPES)
                if not np.array_equal(ours, theirs):
                    raise AssertionError("the token streams of ours and build-nanogpt's recipe differ")
            ratios.append(pair["ours"]["tokens_per_s"] / pair["build-nanogpt"]["tokens_per_s"])
            for recipe in RECIPES:
                shutil.rmtree(Path(tmp) / f"{recipe}-{k}")
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "workers": workers, "rounds": rounds, "tokens": runs["ours"][0]["tokens"],
        "ratio": statistics.median(ratios), "ratio_iqr": [q[0], q[2]],
        **{f"{r}_tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs[r]) for r in RECIPES},
        **{f"{r}_peak_mb": max((x["peak_mb"] or 0) for x in runs[r]) or None for r in RECIPES},
        **{f"{r}_start_mb": max(x["start_mb"] for x in runs[r]) for r in RECIPES},
    }


def _mb(v) -> str:
    return f"{v:,.0f} MB" if v else "n/a"


def summary_lines(r: dict) -> list[str]:
    lines = [f"{r['tokens']:,} tokens, {r['workers']} processes each, {r['rounds']} alternating pairs; memory: "
             "peak PSS of the process tree (at the start: the interpreter and its imports)"]
    for recipe in RECIPES:
        lines.append(f"{recipe:<14} {r[f'{recipe}_tokens_per_s']:>12,.0f} tokens/s   peak {_mb(r[f'{recipe}_peak_mb'])} "
                     f"(at the start {_mb(r[f'{recipe}_start_mb'])})")
    lines.append(f"ours / build-nanogpt: {r['ratio']:.2f}x [{r['ratio_iqr'][0]:.2f}, {r['ratio_iqr'][1]:.2f}] "
                 "(tokens/s, median [interquartile range] of the pairs)")
    return lines


# ----------------------------------------------------------------- command line

def _child(args) -> int:
    """One timed run (the tokenizer loaded first, as fineweb.py loads it at import);
    prints tokens, seconds and this process's memory when its clock started."""
    import tiktoken
    tiktoken.get_encoding("gpt2")
    if args.run == "ours":
        import engine.data  # noqa: F401 - imported (with torch, as the command line does) before the clock
    start_kb = _tree_memory_kb(os.getpid())
    t0 = time.perf_counter()
    tokens = RUNNERS[args.run](args.parquet, Path(args.out), args.workers, args.shard_tokens)
    seconds = time.perf_counter() - t0
    print(json.dumps({"tokens": tokens, "seconds": seconds, "start_mb": start_kb / 1e3}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--parquet", action="append", metavar="FILE", help="rows to prepare (default: a corpus "
                    "made from CPython's docs, --megabytes of text)")
    ap.add_argument("--megabytes", type=float, default=32.0, help="size of the made corpus (default 32)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes of each recipe "
                    "(default: one per CPU)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating pairs (default 3)")
    ap.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help=argparse.SUPPRESS)
    ap.add_argument("--run", choices=RECIPES, help=argparse.SUPPRESS)  # one timed child run
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run:
        return _child(args)
    with tempfile.TemporaryDirectory(prefix="bench-prepare-corpus-") as tmp:
        paths = args.parquet or [write_corpus(Path(tmp) / "corpus.parquet", args.megabytes)]
        print(f"prepare benchmark: {', '.join(map(str, paths))}; {os.cpu_count()} CPUs", flush=True)
        r = compare(paths, args.workers, args.rounds, args.shard_tokens)
    print("\n".join(summary_lines(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
