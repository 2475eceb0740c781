"""Why a run ended early, and the exit status train.py gives for each reason.

Every class carries one line that says what happened and what to do; train.py
prints it (no traceback) and exits with `exit_status`:

    0    done, or a resumed run that was already finished (RunFinished)
    2    bad input: a flag, a file, a checkpoint (engine.errors.UserInputError)
    3    the loss or gradient norm stayed non-finite (TrainingDiverged)
    4    a run file could not be written: disk full, permissions (RunFileError)
    5    DDP: another process stalled past --ddp-timeout-s, crashed or was killed (PeerLost)
    130  SIGINT (Ctrl-C), 143 SIGTERM: stopped after a step, checkpoint written (Interrupted),
         or during set-up with nothing written, or aborted at once by a second signal (RunAborted)
"""
from __future__ import annotations

import signal


class RunStopped(Exception):
    """A run stopped for a reason the user must be told in one line."""

    exit_status = 1


class TrainingDiverged(RunStopped):
    """The loss or the gradient norm was NaN or infinite for max_bad_steps steps in
    a row (or on the last step). No such step reached the weights or a checkpoint."""

    exit_status = 3

    @classmethod
    def at_step(cls, step, loss, norm, streak: int, max_bad_steps: int, on_last_step: bool, last_good: str):
        why = "the last step" if on_last_step else f"--max-bad-steps {max_bad_steps}"
        return cls(f"training diverged: step {step} has loss {loss} and grad norm {norm}, {streak} non-finite "
                   f"step(s) in a row ({why}); none of them changed the weights. Last good checkpoint: "
                   f"{last_good}. A lower --max-lr or --grad-clip (in a new run) may help")


class RunFileError(RunStopped):
    """A checkpoint or another run file could not be written; the earlier
    checkpoints are intact and no temp file is left."""

    exit_status = 4


class PeerLost(RunStopped):
    """A DDP collective failed or timed out: another process stalled, crashed or was killed."""

    exit_status = 5

    @classmethod
    def after(cls, rank: int, reason: str, timeout_s: float, last_good: str):
        return cls(f"DDP rank {rank}: a collective failed ({reason}): another process stalled longer than "
                   f"--ddp-timeout-s {timeout_s:g}, crashed or was killed. Last checkpoint: {last_good}")


class RunFinished(RunStopped):
    """`--resume` of a run that has already trained its max_steps: nothing to do."""

    exit_status = 0


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(RunStopped):
    """SIGINT or SIGTERM: the run stopped between steps (a checkpoint written)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum


    @classmethod
    def during_setup(cls, signum: int, resumable: str, replaced: list[str]):
        """A signal before the first step. A new run has written nothing (set-up
        removes what it wrote); `resumable` is the --resume a resumed run can be
        continued with; `replaced`, the files --overwrite had already deleted."""
        if resumable:
            where = f"the run can continue: python train.py --resume {resumable}"
        elif replaced:
            where = f"--overwrite had removed the previous run's files ({', '.join(replaced)}); nothing else written"
        else:
            where = "nothing was written"
        return cls(signum, f"interrupted by {signal_name(signum)} during set-up, before the first step: {where}")


class RunAborted(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: stop at once, without a checkpoint. A
    KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum
        self.exit_status = 128 + signum
