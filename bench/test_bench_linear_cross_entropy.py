"""LM head + cross-entropy at B*T=16384, C=768, V=50304 (50257 classes), bf16:
linear_cross_entropy against logits then F.cross_entropy on fp32 logits (what the
torch backend does) and against Liger-Kernel's fused linear cross-entropy (skipped
with the reason where liger-kernel is not installed). Time and peak memory
(extra_info peak_mem_MB / extra_mem_MB): the fused ops never hold the (16384, 50304)
logits."""
import pytest

from bench.cases import CE_VARIANTS, cross_entropy_case
from bench.harness import run_benchmark

pytestmark = pytest.mark.gpu


@pytest.mark.benchmark(group="linear_cross_entropy")
@pytest.mark.parametrize("kind", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("variant", CE_VARIANTS)
def test_linear_cross_entropy(benchmark, bench_registry, ceilings, kind, variant):
    run_benchmark(benchmark, cross_entropy_case(kind), variant, bench_registry, ceilings)
