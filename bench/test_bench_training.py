"""End-to-end training step of GPT-2 124M, T=1024, bf16 autocast, micro-batch 16
and 32: torch backend eager (baseline), torch backend under torch.compile, and the
triton backend (FusedAdamW and the whole step as a CUDA graph when available).
extra_info: tokens/sec, MFU (6N + 6*L*C*T FLOPs per token against the bf16 matmul
rate measured in this session), peak memory."""
import pytest
import torch

from bench.cases import TRAIN_VARIANTS, training_case
from bench.common import run_benchmark

pytestmark = pytest.mark.gpu


@pytest.mark.benchmark(group="train-step")
@pytest.mark.parametrize("batch_size", [16, 32])
@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
def test_training_step(benchmark, bench_registry, ceilings, batch_size, variant):
    try:
        run_benchmark(benchmark, training_case(batch_size), variant, bench_registry, ceilings,
                      rounds=8)
    finally:
        if variant == "torch-compile":
            torch._dynamo.reset()  # compiled graphs hold the model's memory otherwise
