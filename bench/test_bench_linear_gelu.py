"""linear_gelu (the MLP's first matmul with bias and tanh-GELU fused) at GPT-2's
16384x768->3072, bf16, against F.gelu(F.linear(...)). Compute-bound: TFLOP/s."""
import pytest

from bench.cases import linear_gelu_case
from bench.harness import run_benchmark

pytestmark = pytest.mark.gpu


@pytest.mark.benchmark(group="linear_gelu")
@pytest.mark.parametrize("kind", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("variant", ["ours", "torch"])
def test_linear_gelu(benchmark, bench_registry, ceilings, kind, variant):
    run_benchmark(benchmark, linear_gelu_case(kind), variant, bench_registry, ceilings)
