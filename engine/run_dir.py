"""The run folder: chosen once, claimed by one process, never shared by accident.

- An automatic folder (`runs/<date-time>`) is created with os.mkdir, which fails
  when the name exists: runs started in the same second get `-2`, `-3`, ...
- A `--run-dir` that already holds a run (checkpoints, metrics.csv, config.json)
  is refused unless this run resumes it or `--overwrite` is given (which deletes
  that run's files: its checkpoints, metrics.csv, config.json, loss.png, trace.json,
  log.txt).
- The folder is claimed with an exclusive lock (`flock` on the folder itself,
  released by the kernel when the process ends, even by SIGKILL): a second
  process that would write into a folder in use is refused.
- Temp files carry the writing process's token. Once the folder is claimed, temp
  files of the engine's kinds left by earlier, dead processes of this folder are
  removed; nothing else is touched.
"""
from __future__ import annotations

import os
import pathlib
import secrets
import time

from engine.checkpoint import TMP_PREFIX, TMP_SUFFIX, list_checkpoints
from engine.errors import UserInputError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the folder checks still apply
    fcntl = None

RUN_FILES = ("metrics.csv", "config.json", "loss.png", "trace.json", "log.txt")


def lock_folder(path: pathlib.Path) -> int | None:
    """An fd holding an exclusive flock on the folder; None where there are no
    advisory locks (Windows). Raises BlockingIOError when another process holds it."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def new_token() -> str:
    """A name no other process uses at the same time: pid plus random bits."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def run_contents(path: pathlib.Path) -> list[str]:
    """The names of the run files in `path` (empty: no run there)."""
    if not path.is_dir():
        return []
    names = [p.name for p in list_checkpoints(path)]
    return names + [n for n in RUN_FILES[:2] if (path / n).is_file()]


def create_auto_folder(root: str | os.PathLike = "runs") -> pathlib.Path:
    """runs/<date-time>, or <date-time>-2, -3, ... when another run took the name."""
    root = pathlib.Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for k in range(1, 10_000):
            path = root / (stamp if k == 1 else f"{stamp}-{k}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise UserInputError(f"run_dir (--run-dir) auto: cannot create a folder under {root} "
                             f"({e.strerror or e}); give --run-dir") from None
    raise UserInputError(f"run_dir (--run-dir) auto: {root} has no free name for {stamp}")


class RunFolder:
    """The folder a run writes into, claimed for this process until `release()`."""

    def __init__(self, path, token: str):
        self.path = pathlib.Path(path)
        self.token = token
        self._lock_fd = None

    def claim(self) -> None:
        """Create the folder if needed and lock it; UserInputError when it is a file,
        cannot be created, or another process holds it."""
        if self.path.exists() and not self.path.is_dir():
            raise UserInputError(f"run_dir (--run-dir) {self.path}: is a file, expected a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_fd = lock_folder(self.path)
        except BlockingIOError:
            raise UserInputError(f"run_dir (--run-dir) {self.path}: in use by another running process; wait "
                                 "for it to end or choose another --run-dir") from None
        except OSError as e:
            raise UserInputError(f"run_dir (--run-dir) {self.path}: cannot use this folder "
                                 f"({e.strerror or e})") from None
        if self._lock_fd is not None:
            self._remove_stale_temps()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    __del__ = release

    def check_free(self, resuming_here: bool, overwrite: bool, log=print) -> None:
        """Refuse a folder holding another run, unless resuming it or overwriting it."""
        found = run_contents(self.path)
        if not found or resuming_here:
            return
        if not overwrite:
            shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise UserInputError(
                f"run_dir (--run-dir) {self.path}: already holds a run ({shown}); resume it with --resume "
                f"{self.path}, choose another --run-dir, or pass --overwrite to replace it")
        for p in list_checkpoints(self.path):
            p.unlink(missing_ok=True)
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        log(f"run folder: --overwrite removed the previous run's files ({', '.join(found)})")

    def _remove_stale_temps(self) -> None:
        # The folder is ours (locked): a temp file of the engine's kinds that is not
        # this process's was left by a killed process of this folder.
        prefixes = (TMP_PREFIX, *(f".{n}." for n in RUN_FILES))
        for p in self.path.iterdir():
            if (p.name.startswith(prefixes) and p.name.endswith(TMP_SUFFIX) and self.token not in p.name
                    and p.is_file()):
                p.unlink(missing_ok=True)

