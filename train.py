"""Train GPT-2: `python train.py [--flag value ...] [--config FILE.toml]`.

Every TrainConfig field (engine/train_config.py) is a flag with the same name
(`batch_size` -> `--batch-size`) and a key of the same name in the TOML file;
flags override the file. With no arguments it trains: the tiny preset with a
one-minute schedule on CPU, GPT-2 124M with build-nanogpt's schedule on CUDA.
`python train.py --resume RUN_DIR` continues a run as it was configured.
Multi-GPU: `torchrun --nproc_per_node=8 train.py ...`.

Exit status (engine/run_errors.py), always with one line and no traceback:
0 done (or the resumed run was already finished), 2 bad input, 3 the loss
diverged, 4 a run file could not be written, 5 a DDP process stalled or died,
130/143 stopped by SIGINT/SIGTERM (a checkpoint written; a second signal aborts
at once).
"""
from __future__ import annotations

import sys

from engine.cli import parse_train_args
from engine.errors import UserInputError
from engine.run_errors import Interrupted, RunAborted, RunFinished, RunStopped, signal_name


def main(argv=None) -> int:
    # One log line per step must reach a file or pipe as it is printed, not at exit.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        cfg, explicit = parse_train_args(argv)  # before torch is imported: --help and bad flags answer at once
        from engine.trainer import train
        train(cfg, explicit=explicit)
    except RunFinished as e:
        print(e)
        return 0
    except Interrupted as e:
        print(e, file=sys.stderr)
        return e.exit_status
    except RunStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunAborted as e:
        print(f"aborted by a second {signal_name(e.signum)}: stopped at once; the checkpoints on disk are "
              "intact, the steps since the last one are lost", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:  # before the run's set-up began (reading flags, loading a checkpoint)
        print("interrupted before training started: nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
