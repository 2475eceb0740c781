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
- Nothing in the folder changes until every input of the run has been checked:
  the trainer calls `start_writing()` then, which is when `--overwrite` deletes
  and stale temp files go. A run refused before that leaves the folder as it
  was (one this process created, still empty, is removed again on release).
- Temp files carry the writing process's token. Temp files of the engine's
  kinds left by earlier, dead processes of this folder are removed when this
  process starts writing; nothing else is touched.
"""
from __future__ import annotations

import os
import pathlib
import secrets
import time

from engine.checkpoint import TMP_PREFIX, TMP_SUFFIX, list_checkpoints, remove_checkpoint
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


def _missing_folders(path: pathlib.Path) -> list[pathlib.Path]:
    """The folders from `path` up that do not exist yet (deepest first)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def create_auto_folder(root: str | os.PathLike = "runs") -> tuple[pathlib.Path, list[pathlib.Path]]:
    """runs/<date-time>, or <date-time>-2, -3, ... when another run took the name;
    and the folders this created (deepest first)."""
    root = pathlib.Path(root)
    try:
        made = _missing_folders(root)
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for k in range(1, 10_000):
            path = root / (stamp if k == 1 else f"{stamp}-{k}")
            try:
                path.mkdir()
                return path, [path, *made]
            except FileExistsError:
                continue
    except OSError as e:
        raise UserInputError(f"run_dir (--run-dir) auto: cannot create a folder under {root} "
                             f"({e.strerror or e}); give --run-dir") from None
    raise UserInputError(f"run_dir (--run-dir) auto: {root} has no free name for {stamp}")


class RunFolder:
    """The folder a run writes into, claimed for this process until `release()`."""

    def __init__(self, path, token: str, created: list[pathlib.Path] | None = None):
        self.path = pathlib.Path(path)
        self.token = token
        self.created = list(created or [])  # folders this process made (deepest first)
        self.replaces: list[str] = []  # the previous run's files --overwrite will delete
        self._lock_fd = None

    def claim(self) -> None:
        """Create the folder if needed and lock it; UserInputError when it is a file,
        cannot be created, or another process holds it."""
        if self.path.exists() and not self.path.is_dir():
            raise UserInputError(f"run_dir (--run-dir) {self.path}: is a file, expected a folder")
        try:
            missing = _missing_folders(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            self.created += missing
            self._lock_fd = lock_folder(self.path)
        except BlockingIOError:
            raise UserInputError(f"run_dir (--run-dir) {self.path}: in use by another running process; wait "
                                 "for it to end or choose another --run-dir") from None
        except OSError as e:
            raise UserInputError(f"run_dir (--run-dir) {self.path}: cannot use this folder "
                                 f"({e.strerror or e})") from None

    def release(self, remove_if_unused: bool = False) -> None:
        """Unlock the folder; with remove_if_unused, also remove it when this
        process created it and it is still empty (a run refused at set-up)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        if remove_if_unused:
            for folder in self.created:
                try:
                    folder.rmdir()  # only an empty folder goes
                except OSError:
                    break
            self.created = []

    def __del__(self):
        self.release()

    def check_free(self, resuming_here: bool, overwrite: bool) -> None:
        """Refuse a folder holding another run, unless resuming it or overwriting it
        (then its files are deleted by `start_writing`, not now)."""
        found = run_contents(self.path)
        if not found or resuming_here:
            return
        if not overwrite:
            shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise UserInputError(
                f"run_dir (--run-dir) {self.path}: already holds a run ({shown}); resume it with --resume "
                f"{self.path}, choose another --run-dir, or pass --overwrite to replace it")
        self.replaces = found

    def start_writing(self, log=print) -> None:
        """Called once every input of the run has been checked: the previous run's
        files go (--overwrite), and so do dead processes' temp files."""
        if self.replaces:
            for p in list_checkpoints(self.path):
                remove_checkpoint(p)
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            log(f"run folder: --overwrite removed the previous run's files ({', '.join(self.replaces)})")
            self.replaces = []
        if self._lock_fd is not None:
            self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        # The folder is ours (locked): a temp file of the engine's kinds that is not
        # this process's was left by a killed process of this folder (a temp folder:
        # by a sharded checkpoint's save that did not finish).
        prefixes = (TMP_PREFIX, *(f".{n}." for n in RUN_FILES))
        for p in self.path.iterdir():
            if p.name.startswith(prefixes) and p.name.endswith(TMP_SUFFIX) and self.token not in p.name:
                remove_checkpoint(p)

