"""Causal attention, bf16: ours against SDPA with each backend (flash, cuDNN,
memory-efficient; one this build or GPU lacks is skipped with the reason), each
backend timed in paired rounds with ours. GPT-2's B=16 H=12 T=1024 D=64 for fwd,
bwd and fwd+bwd, and FlashAttention's sweep (16k tokens, width 2048) over T for
D=64 and 128; and fwd+bwd at GPT-2's shape with dropout 0.1 (ours and SDPA both
dropping attention probabilities, each checked for being unbiased). TFLOP/s as
FlashAttention counts. At GPT-2's shape our other kernel paths run too
(ours-deterministic: the two-kernel backward without atomics; ours-pointer:
the kernels of pointer loads, forward and backward), so one run says which of
our forwards and backwards wins."""
import pytest

from bench.cases import (ATTN_MAIN, ATTN_SWEEP_D, ATTN_SWEEP_T, ATTN_SWEEP_VARIANTS, ATTN_VARIANTS,
                         attention_case, attention_sweep_shape)
from bench.harness import run_benchmark

pytestmark = pytest.mark.gpu


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("kind", ["fwd", "bwd", "fwdbwd"])
@pytest.mark.parametrize("variant", ATTN_VARIANTS)
def test_attention_gpt2(benchmark, bench_registry, ceilings, kind, variant):
    case = attention_case(kind, **ATTN_MAIN)
    if variant not in case.variants:
        pytest.skip(f"attention-{kind} {variant}: the same kernels as ours")
    run_benchmark(benchmark, case, variant, bench_registry, ceilings)


@pytest.mark.benchmark(group="attention-sweep")
@pytest.mark.parametrize("kind", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("D", ATTN_SWEEP_D)
@pytest.mark.parametrize("T", ATTN_SWEEP_T)
@pytest.mark.parametrize("variant", ATTN_SWEEP_VARIANTS)
def test_attention_sweep(benchmark, bench_registry, ceilings, kind, D, T, variant):
    case = attention_case(kind, **attention_sweep_shape(T, D), own_paths=False)
    run_benchmark(benchmark, case, variant, bench_registry, ceilings)


@pytest.mark.benchmark(group="attention-dropout")
@pytest.mark.parametrize("variant", ATTN_VARIANTS)
def test_attention_dropout(benchmark, bench_registry, ceilings, variant):
    case = attention_case("fwdbwd", **ATTN_MAIN, dropout_p=0.1)
    run_benchmark(benchmark, case, variant, bench_registry, ceilings)
