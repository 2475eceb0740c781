"""Interrupts: Ctrl-C and SIGTERM stop a run between steps, never inside one.

`StopSignals` installs handlers for SIGINT and SIGTERM that only record the
signal; the training loop checks `requested` between steps, so a signal never
lands inside a CUDA-graph replay or half-way through an optimizer step. The loop
then writes a checkpoint and exits 130/143. A second signal raises RunAborted
at once (the user insists): a checkpoint write in progress is abandoned and
its temp file removed (engine.fileio), the earlier checkpoints stay intact.

`abort_on_sigterm` is for work that has nothing to save (data preparation):
SIGTERM raises RunAborted like Ctrl-C raises KeyboardInterrupt, so the clean-up
in `finally` blocks runs either way.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from engine.run_errors import RunAborted, signal_name

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """A context manager: while active, the first SIGINT/SIGTERM sets `requested`
    (the signal number) and prints `notice` on stderr; the next one raises
    RunAborted. Outside the main thread (where Python cannot install handlers)
    it does nothing."""

    def __init__(self, notice: str | None = None):
        self.requested: int | None = None
        self.notice = notice
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise RunAborted(signum)
        self.requested = signum
        if self.notice:
            # os.write, not print: a handler may interrupt a print in progress.
            os.write(2, f"\n{signal_name(signum)}: {self.notice}\n".encode())

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
        return False


@contextlib.contextmanager
def abort_on_sigterm():
    """SIGTERM raises RunAborted (as SIGINT raises KeyboardInterrupt) while active."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise RunAborted(signum)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_stop_signals_in_worker(parent_pid: int | None = None):
    """Pool initializer: workers leave SIGINT/SIGTERM to their parent, which
    stops them and cleans up. Given the parent's pid, on Linux a worker is also
    killed when its parent dies, so a SIGKILLed parent leaves no orphans."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if parent_pid is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
