"""Training checkpoints: atomic, checksummed writes; the last K kept; safe loading.

A checkpoint is one file `run_dir/ckpt_{step:06d}.pt` (step = training steps
completed): the bytes of `torch.save(state)` followed by a 56-byte trailer

    b"gpt2-engine ckpt" | payload size (uint64, little-endian) | sha256 of the payload

torch.load ignores bytes after the zip archive, so the file stays an ordinary
torch file. The state holds only tensors, dicts, lists, numbers, strings and
None, so it loads with `torch.load(weights_only=True)`: loading never unpickles
arbitrary objects. Loading first checks the trailer and the checksum (a file
with flipped bytes is "damaged"), then the contents (a file without the trailer
or without the entries a training run writes is "not a training checkpoint of
this engine"); both are a CheckpointError naming the file.

A checkpoint belongs to the run folder it sits in: each run has a run id
(random, made when the run starts, kept across resumes) that its config.json
and every checkpoint it writes carry, and a file named ckpt_NNNNNN.pt holds
step NNNNNN. `check_belongs` refuses a checkpoint of another run copied into a
folder, or a renamed one, naming the file, before anything uses it (resume,
sample.py, the evaluation). Files written before run ids existed carry none and
are accepted in a folder whose config.json has none either.

Writes go to a hidden temp file in the same folder (its name carries the
writing process's token), are fsynced and renamed over the final name (atomic
on POSIX): a run killed mid-save leaves the previous checkpoints intact, and a
failed write (a full disk) removes its temp file and raises RunFileError.
Old checkpoints are rotated away only after the new one is complete.

Under FSDP a checkpoint is a folder `run_dir/ckpt_{step:06d}/` of shards with the
same guarantees (engine.sharded_checkpoint); the functions here list, verify,
load and rotate both kinds. `python -m engine.checkpoint export RUN` writes a
sharded checkpoint as one file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import random
import re
import secrets
import shutil
import struct
import sys

import numpy as np
import torch

from engine.errors import UserInputError
from engine.fileio import atomic_write, os_reason
from engine.run_errors import RunFileError

CKPT_RE = re.compile(r"^ckpt_(\d{6,})(\.pt)?$")  # a file ckpt_NNNNNN.pt, or a sharded folder ckpt_NNNNNN
TMP_PREFIX = ".ckpt_"
TMP_SUFFIX = ".tmp"
FORMAT_VERSION = 2  # 1: no checksum trailer
TRAILER_MAGIC = b"gpt2-engine ckpt"
_TRAILER = struct.Struct("<16sQ32s")
# What every training checkpoint holds, and the type of each entry.
REQUIRED = {"version": int, "step": int, "model": dict, "optimizer": dict, "train_loader": dict,
            "val_loader": dict, "rng": dict, "train_config": dict, "model_config": dict}
WEIGHTS = ("model", "optimizer")  # the entries a sharded checkpoint keeps in its shards


class CheckpointError(UserInputError):
    """A checkpoint that cannot be used: `damaged` (its bytes changed since it was
    written) or not one this engine wrote."""

    def __init__(self, path, reason: str, damaged: bool):
        self.path, self.reason, self.damaged = pathlib.Path(path), reason, damaged
        what = "damaged checkpoint" if damaged else "not a training checkpoint of this engine"
        super().__init__(f"{path}: {what} ({reason})")


def checkpoint_name(step: int, sharded: bool = False) -> str:
    return f"ckpt_{step:06d}" if sharded else f"ckpt_{step:06d}.pt"


def checkpoint_step(path) -> int:
    return int(CKPT_RE.match(pathlib.Path(path).name).group(1))


def is_sharded(path) -> bool:
    """Whether `path` names a sharded checkpoint (a folder ckpt_NNNNNN; not yet verified)."""
    path = pathlib.Path(path)
    m = CKPT_RE.match(path.name)
    return bool(m) and not m.group(2) and path.is_dir()


def list_checkpoints(run_dir) -> list[pathlib.Path]:
    """Checkpoints in `run_dir` (files and sharded folders), oldest step first;
    temp files and others ignored."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p.is_file() if m.group(2) else p.is_dir()):
            found.append((int(m.group(1)), p.name, p))
    return [p for _, _, p in sorted(found)]


def remove_checkpoint(path) -> None:
    path = pathlib.Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def rotate(run_dir, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0: all)."""
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            remove_checkpoint(old)


def latest_checkpoint(run_dir) -> pathlib.Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path) -> pathlib.Path:
    """A checkpoint (file or sharded folder), or a run folder -> its latest
    checkpoint (not yet verified)."""
    path = pathlib.Path(path)
    if path.is_dir() and not is_sharded(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise UserInputError(f"resume: {path} holds no checkpoint (ckpt_NNNNNN.pt)")
        return latest
    if not path.exists():
        raise UserInputError(f"resume: {path} does not exist (give a checkpoint file or a run folder)")
    return path


class _HashingWriter:
    """A write-only file for torch.save that hashes what passes through and keeps
    the OSError of a failed write (torch re-raises it as an opaque RuntimeError)."""

    def __init__(self, f):
        self.f, self.sha, self.size, self.error = f, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.sha.update(data)
        self.size += len(data)
        return n

    def flush(self):
        self.f.flush()


def _write_checkpoint(f, state: dict) -> None:
    out = _HashingWriter(f)
    try:
        torch.save(state, out)
    except RuntimeError:
        if out.error is not None:
            raise out.error from None
        raise
    f.write(_TRAILER.pack(TRAILER_MAGIC, out.size, out.sha.digest()))


def write_state_file(dest, state: dict, tmp_prefix: str | None = None) -> None:
    """Write `state` atomically as `dest` with its checksum trailer (OSError or
    RuntimeError when it cannot)."""
    atomic_write(dest, lambda f: _write_checkpoint(f, state), tmp_prefix=tmp_prefix, tmp_suffix=TMP_SUFFIX)


def save_checkpoint(run_dir, step: int, state: dict, keep: int = 0, token: str = "") -> pathlib.Path:
    """Write `state` atomically as run_dir/ckpt_{step:06d}.pt with its checksum
    trailer; then keep the last `keep` checkpoints (0 keeps all). `token` names
    the temp file as this process's. A failed write raises RunFileError."""
    run_dir = pathlib.Path(run_dir)
    dest = run_dir / checkpoint_name(step)
    prefix = f"{TMP_PREFIX}{step:06d}.{token + '.' if token else ''}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_state_file(dest, state, tmp_prefix=prefix)
    except (OSError, RuntimeError) as e:
        latest = latest_checkpoint(run_dir)
        raise RunFileError(f"checkpoint: could not write {dest} ({os_reason(e)}); the earlier checkpoints "
                           f"are intact (latest: {latest or 'none'})") from None
    rotate(run_dir, keep)
    return dest


def verify_checksum(path) -> None:
    """Raise CheckpointError unless the file ends in a trailer whose checksum and
    size match the bytes before it (a sharded folder: unless every file matches
    its manifest)."""
    path = pathlib.Path(path)
    if is_sharded(path):
        from engine.sharded_checkpoint import verify
        verify(path)
        return
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < _TRAILER.size:
                raise CheckpointError(path, f"{size} bytes, no checksum trailer", damaged=False)
            f.seek(size - _TRAILER.size)
            magic, payload, digest = _TRAILER.unpack(f.read(_TRAILER.size))
            if magic != TRAILER_MAGIC:
                raise CheckpointError(path, "no checksum trailer: truncated, or not written by this engine",
                                      damaged=False)
            if payload != size - _TRAILER.size:
                raise CheckpointError(path, f"{size:,} bytes, but {payload + _TRAILER.size:,} were written "
                                      "(truncated or extended)", damaged=True)
            f.seek(0)
            sha, left = hashlib.sha256(), payload
            while left:
                block = f.read(min(left, 1 << 24))
                if not block:
                    raise CheckpointError(path, "shorter than its trailer says", damaged=True)
                sha.update(block)
                left -= len(block)
    except OSError as e:
        raise UserInputError(f"{path}: cannot read the checkpoint ({os_reason(e)})") from None
    if sha.digest() != digest:
        raise CheckpointError(path, "sha256 mismatch: its bytes changed after it was written", damaged=True)


def load_checkpoint(path, map_location="cpu", weights: bool = True) -> dict:
    """Load and check a checkpoint written by save_checkpoint; a run folder means its
    latest checkpoint. Raises CheckpointError (a UserInputError) naming the file.

    A sharded checkpoint gives its state without "model" and "optimizer" (see
    engine.sharded_checkpoint.read_train_state); weights=False checks a file
    for everything but those two."""
    path = resolve_checkpoint(path)
    if is_sharded(path):
        from engine.sharded_checkpoint import read_train_state
        return read_train_state(path)
    verify_checksum(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever the unpickler says, the file is unusable.
        # The message of a refused global suggests weights_only=False: never repeat it.
        raise CheckpointError(path, f"its contents cannot be loaded safely: {type(e).__name__}",
                              damaged=False) from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"it holds a {type(state).__name__}, not a dict", damaged=False)
    problems = [k for k, kind in REQUIRED.items() if (weights or k not in WEIGHTS)
                and (not isinstance(state.get(k), kind) or isinstance(state.get(k), bool))]
    if problems:
        raise CheckpointError(path, f"missing or malformed: {', '.join(problems)}", damaged=False)
    if not isinstance(state.get("run_id", ""), (str, type(None))):
        raise CheckpointError(path, "malformed: run_id", damaged=False)
    if state["version"] != FORMAT_VERSION or state["step"] < 0:
        raise CheckpointError(path, f"format version {state['version']}, step {state['step']}; this engine "
                              f"writes version {FORMAT_VERSION}", damaged=False)
    return state


def new_run_id() -> str:
    return secrets.token_hex(8)


def folder_run_id(folder) -> str | None:
    """The run id in `folder`'s config.json; None where there is none (no config.json,
    an older run, or a file that is not a run's config)."""
    try:
        data = json.loads((pathlib.Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    return run_id if isinstance(run_id, str) else None


def check_belongs(path, state: dict) -> None:
    """Refuse a checkpoint that is not where its run wrote it: a file named
    ckpt_NNNNNN.pt must hold step NNNNNN, and a checkpoint in a folder whose
    config.json names a run must be of that run. UserInputError naming the file."""
    path = pathlib.Path(path)
    match = CKPT_RE.match(path.name)
    if match and int(match.group(1)) != state["step"]:
        raise UserInputError(f"{path}: its name says step {int(match.group(1))} but it holds step "
                             f"{state['step']}: renamed or copied; refused (move it out of {path.parent})")
    folder_id = folder_run_id(path.parent)
    if folder_id is not None and state.get("run_id") != folder_id:
        theirs = f"run {state['run_id']}" if state.get("run_id") else "no run id"
        raise UserInputError(f"{path}: a checkpoint of another run ({theirs}; this folder's config.json is "
                             f"run {folder_id}): refused; move it out of {path.parent}")


def load_newest(ckpts) -> tuple[pathlib.Path | None, dict | None, list[tuple[pathlib.Path, UserInputError]]]:
    """The newest of `ckpts` (oldest first, as list_checkpoints gives them) that loads:
    (path, state, [(newer path, why it did not load)...]); (None, None, all of them)
    when none does."""
    skipped = []
    for candidate in reversed(ckpts):
        try:
            return candidate, load_checkpoint(candidate), skipped
        except UserInputError as e:
            skipped.append((candidate, e))
    return None, None, skipped


def load_for_resume(path, log=print) -> tuple[pathlib.Path, dict]:
    """(checkpoint path, state) to resume from `path`: a checkpoint file, or a run
    folder's newest valid checkpoint. A damaged or foreign latest checkpoint in a
    folder is skipped with a log line (the trainer sets it aside with the other
    abandoned ones); a damaged file named explicitly is refused, naming the
    newest valid one beside it."""
    given = pathlib.Path(path)
    if given.is_dir() and not is_sharded(given):
        ckpts = list_checkpoints(given)
        if not ckpts:
            raise UserInputError(f"resume: {given} holds no checkpoint (ckpt_NNNNNN.pt)")
        candidate, state, skipped = load_newest(ckpts)
        if candidate is None:
            raise UserInputError(f"resume: no valid checkpoint in {given}: {skipped[0][1]}"
                                 + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
        _refuse_foreign(candidate, state)
        for _, e in skipped:
            log(f"resume: skipping {e}")
        if skipped:
            log(f"resume: using the newest valid checkpoint, {candidate}")
        return candidate, state
    file = resolve_checkpoint(given)
    try:
        state = load_checkpoint(file)
    except CheckpointError as e:
        valid = newest_valid_checkpoint(file.parent, exclude=file)
        hint = f"; the newest valid checkpoint beside it is {valid}: --resume {valid}" if valid else ""
        raise UserInputError(f"resume: {e}{hint}") from None
    _refuse_foreign(file, state)
    return file, state


def _refuse_foreign(path, state) -> None:
    try:
        check_belongs(path, state)
    except UserInputError as e:
        raise UserInputError(f"resume: {e}") from None


def newest_valid_checkpoint(run_dir, exclude=None) -> pathlib.Path | None:
    for p in reversed(list_checkpoints(run_dir)):
        if exclude is not None and p == pathlib.Path(exclude):
            continue
        try:
            verify_checksum(p)
        except UserInputError:
            continue
        return p
    return None


# RNG states as plain containers, so weights_only loading accepts them.

def _to_lists(x):
    if isinstance(x, (tuple, list)):
        return [_to_lists(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_to_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def export(source, out=None) -> pathlib.Path:
    """Write a sharded checkpoint (a run folder's newest valid one, or the folder
    given) as one checkpoint file, weights and optimizer state whole: sample.py,
    the evaluation and any world size resume from it. `out` defaults to
    RUN/exported/ckpt_NNNNNN.pt."""
    from engine.config import GPTConfig
    from engine.model import GPT
    from engine.optim import param_groups
    from engine.sharded_checkpoint import restore_tensors
    source = pathlib.Path(source)
    if source.is_dir() and not is_sharded(source):
        found, state, skipped = load_newest(list_checkpoints(source))
        if found is None:
            raise UserInputError(f"export: {source} holds no valid checkpoint"
                                 + (f": {skipped[0][1]}" if skipped else ""))
    else:
        found, state = source, load_checkpoint(source)
    if not state.get("sharded"):
        raise UserInputError(f"export: {found} is a single-file checkpoint already")
    train_config = state["train_config"]
    model = GPT(GPTConfig.from_dict({**dict(state["model_config"]), "backend": "torch"}))
    optimizer = torch.optim.AdamW(param_groups(model, float(train_config["weight_decay"])),
                                  lr=float(train_config["max_lr"]), betas=tuple(train_config["betas"]), eps=1e-8)
    restore_tensors(found, model, optimizer, state["sharded_files"])
    whole = {k: v for k, v in state.items() if k not in ("sharded", "sharded_files")}
    whole.update(model=model.state_dict(), optimizer=optimizer.state_dict())
    dest = pathlib.Path(out) if out else found.parent / "exported" / checkpoint_name(checkpoint_step(found))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_state_file(dest, whole)
    except (OSError, RuntimeError) as e:
        raise RunFileError(f"export: could not write {dest} ({os_reason(e)})") from None
    return dest


def main(argv=None) -> int:
    """python -m engine.checkpoint export RUN [--out FILE]"""
    parser = argparse.ArgumentParser(prog="python -m engine.checkpoint", allow_abbrev=False,
                                     description="Work with training checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = sub.add_parser("export", allow_abbrev=False,
                             help="write a sharded checkpoint (an FSDP run's) as one checkpoint file")
    command.add_argument("source", metavar="SOURCE",
                         help="a run folder (its newest valid checkpoint) or a sharded checkpoint folder ckpt_NNNNNN")
    command.add_argument("--out", metavar="FILE", help="the file to write (default: RUN/exported/ckpt_NNNNNN.pt)")
    args = parser.parse_args(argv)
    try:
        path = export(args.source, args.out)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return RunFileError.exit_status
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
