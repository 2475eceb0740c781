"""LM head + cross-entropy at B*T=16384, C=768, V=50304 (50257 classes), bf16:
linear_cross_entropy against logits then F.cross_entropy on fp32 logits. Time and
peak memory (extra_info peak_mem_MB / extra_mem_MB): the fused op never holds the
(16384, 50304) logits."""
import pytest

from bench.cases import cross_entropy_case
from bench.common import run_benchmark

pytestmark = pytest.mark.gpu


@pytest.mark.benchmark(group="linear_cross_entropy")
@pytest.mark.parametrize("kind", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("variant", ["torch", "ours"])
def test_linear_cross_entropy(benchmark, bench_registry, ceilings, kind, variant):
    run_benchmark(benchmark, cross_entropy_case(kind), variant, bench_registry, ceilings)
