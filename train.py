"""Train GPT-2: `python train.py [--flag value ...] [--config FILE.toml]`.

Every TrainConfig field (engine/train_config.py) is a flag with the same name
(`batch_size` -> `--batch-size`) and a key of the same name in the TOML file;
flags override the file. With no arguments it trains: the tiny preset with a
one-minute schedule on CPU, GPT-2 124M with build-nanogpt's schedule on CUDA.
Multi-GPU: `torchrun --nproc_per_node=8 train.py ...`.

Exit status: 0 done, 2 bad input (one `error: ...` line, no traceback),
3 the loss diverged.
"""
from __future__ import annotations

import sys

from engine.cli import config_from_args
from engine.errors import UserInputError
from engine.trainer import TrainingDiverged, train


def main(argv=None) -> int:
    try:
        train(config_from_args(argv))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
