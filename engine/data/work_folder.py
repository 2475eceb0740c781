"""The work folder of a prepare: what makes it resumable, and all or nothing.

`OUT/.prepare-work/` holds:
- `plan.json`: the inputs (paths, sizes, modification times; or the dataset's
  name) and the settings that decide the output. A prepare that finds a work
  folder continues it only when its own plan is the same; otherwise it is
  refused, saying what differs.
- `stream_NNNNNN.bin`: the token stream cut into consecutive shards of
  `shard_tokens` tokens, each written as the tokens arrive and renamed into
  place once complete (engine.data.shards format).
- `progress.json`, rewritten atomically after each finished shard: how many
  are done, and where the next token comes from (input, task, that input's
  state before the task, and how many of the task's tokens are already in
  finished shards), with the documents and input bytes done so far.

Killed at any moment, the folder is consistent: a half-written shard is a
`.partial` file, and a shard finished but not yet in progress.json is written
again, identically. Once the inputs are done, the stream shards become the val
shards (the first `n_val` tokens) and the train shards (the one that straddles
the split point is cut in two, the others are renamed); then the manifest is
written into OUT, the shards move there and the work folder goes. Every step of
that is idempotent, so a kill there is finished by running the prepare again.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from engine.data.shards import TOKEN_DTYPE, check_manifest, open_shard, shard_header, write_manifest, write_shard
from engine.errors import UserInputError
from engine.fileio import atomic_write, fsync_dir

WORK_NAME = ".prepare-work"
PLAN_NAME = "plan.json"
PROGRESS_NAME = "progress.json"
PARTIAL_SUFFIX = ".partial"


def _stream_name(i: int) -> str:
    return f"stream_{i:06d}.bin"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _first_difference(old: dict, new: dict) -> str:
    for key, value in new["settings"].items():
        if old.get("settings", {}).get(key) != value:
            flag = "--" + key.replace("_", "-")
            return f"{flag} was {old.get('settings', {}).get(key)!r}, now {value!r}"
    before, now = old.get("inputs", []), new["inputs"]
    for a, b in zip(before, now):
        if a != b:
            what = b.get("path") or b.get("name")
            return f"{what} changed since" if a.get("path", a.get("name")) == what else f"{what} is not {a.get('path')}"
    return f"{len(before)} inputs then, {len(now)} now"


class WorkFolder:
    def __init__(self, out: Path):
        self.out = out
        self.path = out / WORK_NAME

    def existing_progress(self, plan: dict) -> dict | None:
        """The progress of a resumable prepare of `plan` in this folder; None when
        there is none. A work folder of another plan is refused in one line."""
        old = _read_json(self.path / PLAN_NAME)
        if old is None:
            return None  # killed before its plan was written: nothing to keep
        if old != plan:
            raise UserInputError(
                f"{self.out}: holds an unfinished prepare of other inputs or settings ({_first_difference(old, plan)}); "
                f"run that prepare again to finish it, or delete {self.path} to start this one")
        return _read_json(self.path / PROGRESS_NAME) or {"shards": 0}

    def start(self, plan: dict, progress: dict | None) -> dict:
        """Create the folder for `plan`, or tidy it for resuming from `progress`."""
        if progress is None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir()
            text = json.dumps(plan, indent=1).encode()
            atomic_write(self.path / PLAN_NAME, lambda f: f.write(text))
            return {"shards": 0}
        if not progress.get("finished"):
            done = progress["shards"]
            for p in self.path.iterdir():
                # temp files of atomic writes, half-written shards, shards not yet in progress.json
                if p.name.startswith(".") or p.name.endswith(PARTIAL_SUFFIX) or (
                        p.name.startswith("stream_") and int(p.stem.split("_")[1]) >= done):
                    p.unlink()
        return progress

    def save_progress(self, progress: dict) -> None:
        text = json.dumps(progress).encode()
        atomic_write(self.path / PROGRESS_NAME, lambda f: f.write(text))

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def finish(self, n_tokens: int, n_val: int, shard_tokens: int, tokenizer: str, vocab_size: int):
        """Stream shards -> val and train shards -> OUT, with the manifest first.
        Returns (manifest path, {"val": [...], "train": [...]} paths in OUT)."""
        names = {"val": [], "train": []}
        for i, a in enumerate(range(0, n_tokens, shard_tokens)):
            b = min(a + shard_tokens, n_tokens)
            parts = [(split, lo, hi) for split, lo, hi in (("val", a, min(b, n_val)), ("train", max(a, n_val), b))
                     if hi > lo]
            stream = self.path / _stream_name(i)
            for split, lo, hi in parts:
                names[split].append(f"{tokenizer}_{split}_{len(names[split]):06d}.bin")
            if not stream.exists():
                continue  # done by the prepare that was stopped here
            if len(parts) == 1:
                os.replace(stream, self.path / names[parts[0][0]][-1])
            else:
                tokens = open_shard(stream)
                for (split, lo, hi), name in zip(parts, (names["val"][-1], names["train"][-1])):
                    write_shard(self.path / name, tokens[lo - a:hi - a], vocab_size)
                del tokens
                stream.unlink()
        fsync_dir(self.path)
        ordered = names["val"] + names["train"]
        where = [self.path / n if (self.path / n).exists() else self.out / n for n in ordered]
        missing = [p.name for p in where if not p.exists()]
        if missing:
            raise UserInputError(f"{self.path}: {missing[0]} is missing; the work folder was changed by hand: "
                                 "delete it and prepare again")
        progress = _read_json(self.path / PROGRESS_NAME) or {}
        self.save_progress({**progress, "moving": True})
        # The manifest first: from here on a shard missing from OUT is visible to
        # the loader, which refuses the folder until a rerun has moved them all.
        manifest = write_manifest(self.out, where, tokenizer, vocab_size, tmp_prefix=f"{WORK_NAME}-manifest.")
        for p in where:
            if p.parent == self.path:
                os.replace(p, self.out / p.name)
        fsync_dir(self.out)
        check_manifest(self.out)
        self.discard()
        return manifest, {split: [self.out / n for n in names[split]] for split in names}


class StreamShards:
    """Writes a token stream into consecutive shards of `shard_tokens` tokens in
    the work folder, each file renamed into place once complete."""

    def __init__(self, folder: Path, shard_tokens: int, vocab_size: int, done: int):
        self.folder, self.shard_tokens, self.vocab_size = folder, shard_tokens, vocab_size
        self.index, self.fill, self.file = done, 0, None

    def write(self, tokens) -> list[int]:
        """Append `tokens`; returns the offsets into `tokens` at which a shard ended
        (after the last of them, `index` shards are complete)."""
        ended, pos = [], 0
        while pos < len(tokens):
            if self.file is None:
                self.file = open(self._partial(), "wb")
                self.file.write(shard_header(0, self.vocab_size))
            take = min(self.shard_tokens - self.fill, len(tokens) - pos)
            self.file.write(tokens[pos:pos + take].astype(TOKEN_DTYPE, copy=False).tobytes())
            self.fill, pos = self.fill + take, pos + take
            if self.fill == self.shard_tokens:
                self._complete()
                ended.append(pos)
        return ended

    def close(self) -> None:
        """Complete the last, shorter shard (if any tokens are in it)."""
        if self.file is not None:
            self._complete()

    def abandon(self) -> None:
        """Drop the shard being written (a resumed prepare writes it again)."""
        if self.file is not None:
            self.file.close()
            self.file = None
            self._partial().unlink(missing_ok=True)

    def _partial(self) -> Path:
        return self.folder / (_stream_name(self.index) + PARTIAL_SUFFIX)

    def _complete(self) -> None:
        f = self.file
        f.seek(0)
        f.write(shard_header(self.fill, self.vocab_size))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self.file = None
        os.replace(self._partial(), self.folder / _stream_name(self.index))
        fsync_dir(self.folder)
        self.index, self.fill = self.index + 1, 0
