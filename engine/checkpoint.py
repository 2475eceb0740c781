"""Training checkpoints: atomic writes, the last K kept, safe loading.

A checkpoint is one file `run_dir/ckpt_{step:06d}.pt` (step = training steps
completed) holding only tensors, dicts, lists, numbers, strings and None, so it
loads with `torch.load(weights_only=True)`: loading never unpickles arbitrary
objects. It is written to a hidden temp file in the same folder, flushed and
fsynced, renamed over the final name (atomic on POSIX) and the folder fsynced:
a run killed mid-save leaves the previous checkpoints intact, and the temp file
(which never matches the checkpoint name pattern) is ignored and later removed.
"""
from __future__ import annotations

import pathlib
import random
import re

import numpy as np
import torch

from engine.errors import UserInputError
from engine.fileio import atomic_write

CKPT_RE = re.compile(r"^ckpt_(\d{6,})\.pt$")
TMP_PREFIX = ".ckpt_"
TMP_SUFFIX = ".tmp"


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:06d}.pt"


def list_checkpoints(run_dir) -> list[pathlib.Path]:
    """Checkpoints in `run_dir`, oldest step first; temp files and others ignored."""
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> pathlib.Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path) -> pathlib.Path:
    """A checkpoint file, or a run folder -> its latest checkpoint."""
    path = pathlib.Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise UserInputError(f"resume: {path} holds no checkpoint (ckpt_NNNNNN.pt)")
        return latest
    if not path.exists():
        raise UserInputError(f"resume: {path} does not exist (give a checkpoint file or a run folder)")
    return path


def _remove_stale_temps(run_dir: pathlib.Path) -> None:
    for p in run_dir.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.name.endswith(TMP_SUFFIX):
            try:
                p.unlink()
            except OSError:
                pass


def save_checkpoint(run_dir, step: int, state: dict, keep: int = 0) -> pathlib.Path:
    """Write `state` atomically as run_dir/ckpt_{step:06d}.pt; keep the last `keep`
    checkpoints (0 keeps all). Returns the path written."""
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(run_dir)  # left by a run killed mid-save
    dest = atomic_write(run_dir / checkpoint_name(step), lambda f: torch.save(state, f),
                        tmp_prefix=f"{TMP_PREFIX}{step:06d}.", tmp_suffix=TMP_SUFFIX)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink()
    return dest


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by save_checkpoint (weights_only: no arbitrary unpickling)."""
    path = resolve_checkpoint(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated file raises RuntimeError/EOFError/pickle errors
        raise UserInputError(f"resume: {path} cannot be loaded, truncated or damaged ({e})") from None


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
