"""End-to-end training step of GPT-2 124M, T=1024, bf16 autocast, micro-batch 16
and 32, all through engine.step.train_step: ours (the triton backend, FusedAdamW,
the whole step in a CUDA graph) against the PyTorch path (torch backend, torch's
fused AdamW) eager and under torch.compile, each peer in paired rounds with ours.
extra_info: tokens/sec, MFU (6N + 6*L*C*T FLOPs per token against the bf16 matmul
rate measured in this session), peak memory. And the fine-tuning setting, dropout
0.1, at micro-batch 16: ours drops out inside the kernels, the PyTorch path with
nn.functional.dropout and SDPA's dropout."""
import pytest

from bench.cases import TRAIN_VARIANTS, training_case
from bench.harness import run_benchmark

pytestmark = pytest.mark.gpu


@pytest.mark.benchmark(group="train-step")
@pytest.mark.parametrize("batch_size", [16, 32])
@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
def test_training_step(benchmark, bench_registry, ceilings, batch_size, variant):
    run_benchmark(benchmark, training_case(batch_size), variant, bench_registry, ceilings)


@pytest.mark.benchmark(group="train-step-dropout")
@pytest.mark.parametrize("variant", TRAIN_VARIANTS)
def test_training_step_with_dropout(benchmark, bench_registry, ceilings, variant):
    run_benchmark(benchmark, training_case(16, dropout=0.1), variant, bench_registry, ceilings)
