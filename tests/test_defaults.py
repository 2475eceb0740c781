"""The first run a user makes: `python train.py` on a CPU, with every default.

The CPU schedule (engine/train_config.py AUTO_DEFAULTS) was picked by a sweep over
seeds (bench/NOTES.md); this checks, on the real corpus, that the default run
trains smoothly: the loss falls well below where it started and no step spikes it.
A spike is what the old defaults (512 tokens per step, peak lr 3e-3) gave: single
steps taking the loss from ~4 to above uniform, with grad norms of 50-150.
"""
import math

import pytest

from engine.train_config import TrainConfig
from engine.trainer import train


def _default_run(data, tmp_path, tokenizer, seed):
    cfg = TrainConfig(data=str(data), device="cpu", tokenizer=tokenizer, seed=seed, run_dir=str(tmp_path),
                      eval_interval=0, sample_interval=0, checkpoint_interval=0)
    return [(h["loss"], h["grad_norm"]) for h in train(cfg, log=lambda *a: None).history]


def _assert_smooth(history, fall):
    losses = [loss for loss, _ in history]
    assert all(math.isfinite(x) for x in losses)
    first, last = losses[0], sum(losses[-5:]) / 5
    assert last < first - fall, f"the loss fell from {first:.3f} to only {last:.3f}"
    lowest = losses[0]
    for step, loss in enumerate(losses):
        # Batch-to-batch noise moves the loss by a few tenths; a spike by more.
        assert loss <= lowest + 1.0, f"step {step}: loss {loss:.3f} spiked above the lowest so far {lowest:.3f}"
        lowest = min(lowest, loss)
    warm = TrainConfig().resolved("cpu").warmup_steps
    norms = [norm for _, norm in history[warm:]]
    assert max(norms) < 25.0, f"grad norm spiked to {max(norms):.1f} after warm-up"


@pytest.mark.parametrize("seed", [1337, 1])
def test_default_cpu_run_trains_smoothly_with_bytes(tinyshakespeare, tmp_path, seed):
    _assert_smooth(_default_run(tinyshakespeare, tmp_path, "bytes", seed), fall=2.0)


def test_default_cpu_run_trains_smoothly_with_gpt2_tokens(tinyshakespeare, gpt2, tmp_path):
    _assert_smooth(_default_run(tinyshakespeare, tmp_path, "gpt2", 1337), fall=3.0)
