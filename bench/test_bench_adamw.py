"""One AdamW step over GPT-2 124M's parameters (fp32, decay on matrices only):
FusedAdamW against torch's fused AdamW (the peer to beat) and foreach AdamW.
Memory-bound: 28 bytes/param."""
import pytest

from bench.cases import ADAMW_VARIANTS, adamw_case
from bench.harness import run_benchmark

pytestmark = pytest.mark.gpu


@pytest.mark.benchmark(group="adamw")
@pytest.mark.parametrize("variant", ADAMW_VARIANTS)
def test_adamw_step(benchmark, bench_registry, ceilings, variant):
    run_benchmark(benchmark, adamw_case(), variant, bench_registry, ceilings)
