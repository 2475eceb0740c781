"""Tests for gpt2_kernels/embedding.py: embedding == (F.embedding(idx, wte) +
F.embedding(positions, wpe)).to(out_dtype), with a deterministic backward that
writes only the rows the batch used (and can add into .grad)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux only)")
from gpt2_kernels import embedding  # noqa: E402
from tests.helpers import DEVICE, ON_GPU, assert_close, poisoned_allocations  # noqa: E402

V, P, C = 37, 24, 40


def _make(B, T, seed, table_dtype=torch.float32, repeats=True):
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    if repeats and idx.numel() > 3:
        idx.view(-1)[::3] = 5  # one id many times, across rows and sequences
    wte = torch.randn(V, C, generator=g).to(DEVICE, table_dtype)
    wpe = torch.randn(P, C, generator=g).to(DEVICE, table_dtype)
    return idx.to(DEVICE), wte, wpe


def _reference(idx, wte, wpe, start, dx):
    wte64, wpe64 = (t.double().requires_grad_() for t in (wte, wpe))
    pos = torch.arange(start, start + idx.shape[1], device=idx.device)
    y = F.embedding(idx, wte64) + F.embedding(pos, wpe64)
    y.backward(dx.double())
    return y.detach(), wte64.grad, wpe64.grad


@pytest.mark.parametrize("B,T,start", [(1, 1, 0), (3, 7, 2), (4, 24, 0)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_torch(B, T, start, out_dtype):
    idx, wte, wpe = _make(B, T, seed=B * 10 + T)
    wte_l, wpe_l = (t.clone().requires_grad_() for t in (wte, wpe))
    with poisoned_allocations():
        y = embedding(idx, wte_l, wpe_l, start, out_dtype=out_dtype)
    dx = torch.randn(B, T, C, device=DEVICE).to(out_dtype)
    with poisoned_allocations():
        y.backward(dx)
    ref_y, ref_wte, ref_wpe = _reference(idx, wte, wpe, start, dx)
    assert y.dtype == out_dtype and y.shape == (B, T, C)
    # One rounding of the fp32 sum to out_dtype: within half an ulp (the
    # interpreter may round a bf16 tie the other way: one ulp there).
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    assert_close(y, ref_y, tol, "x")
    assert wte_l.grad.dtype == torch.float32 and wpe_l.grad.dtype == torch.float32
    assert_close(wte_l.grad, ref_wte, 1e-6, "dwte")
    assert_close(wpe_l.grad, ref_wpe, 1e-6, "dwpe")


def test_accumulate_grad_touches_only_the_rows_used():
    idx, wte, wpe = _make(2, 9, seed=1)
    dx = torch.randn(2, 9, C, device=DEVICE)
    _, ref_wte, ref_wpe = _reference(idx, wte, wpe, 3, dx)
    wte_l, wpe_l = (t.clone().requires_grad_() for t in (wte, wpe))
    wte_l.grad, wpe_l.grad = torch.randn_like(wte), torch.randn_like(wpe)
    before = wte_l.grad.clone(), wpe_l.grad.clone()
    grads = wte_l.grad, wpe_l.grad
    with poisoned_allocations():
        embedding(idx, wte_l, wpe_l, 3, accumulate_grad=True).backward(dx)
    assert wte_l.grad is grads[0] and wpe_l.grad is grads[1], ".grad was replaced"
    assert_close(wte_l.grad, before[0].double() + ref_wte, 1e-6, "dwte added into .grad")
    assert_close(wpe_l.grad, before[1].double() + ref_wpe, 1e-6, "dwpe added into .grad")
    unused = torch.ones(V, dtype=torch.bool, device=DEVICE)
    unused[idx.reshape(-1)] = False
    assert torch.equal(wte_l.grad[unused], before[0][unused]), "rows no token used were written"


def test_backward_is_deterministic():
    """Many repeats of one id sum in a fixed order: bit-identical every time."""
    idx, wte, wpe = _make(8, 24, seed=2)
    dx = torch.randn(8, 24, C, device=DEVICE)
    grads = []
    for _ in range(3):
        wte_l = wte.clone().requires_grad_()
        embedding(idx, wte_l, wpe, 0).backward(dx)
        grads.append(wte_l.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_out_of_range_ids_read_zeros_and_get_no_gradient():
    idx, wte, wpe = _make(1, 4, seed=3, repeats=False)
    idx[0, 1], idx[0, 2] = -1, V
    wte_l = wte.clone().requires_grad_()
    y = embedding(idx, wte_l, wpe, 0)
    assert torch.equal(y[0, 1], wpe[1]) and torch.equal(y[0, 2], wpe[2])
    y.backward(torch.ones_like(y))
    assert torch.count_nonzero(wte_l.grad.sum(1)) == 2  # the two valid ids only


@pytest.mark.parametrize("case,exc,pattern", [
    ("positions", ValueError, r"^embedding: positions 20 \.\. 26 need 27 rows of wpe; it has 24$"),
    ("idx_1d", ValueError, r"^embedding: idx has shape \(7,\); expected 2-d \(B, T\)$"),
    ("idx_float", TypeError, r"^embedding: idx has dtype float32; supported: int64, int32$"),
    ("wpe_width", ValueError, r"^embedding: wpe has shape \(24, 39\); expected \(\*, 40\)"),
])
def test_bad_inputs(case, exc, pattern):
    idx, wte, wpe = _make(1, 7, seed=0)
    start = 0
    if case == "positions":
        start = 20
    elif case == "idx_1d":
        idx = idx[0]
    elif case == "idx_float":
        idx = idx.float()
    elif case == "wpe_width":
        wpe = wpe[:, :39]
    with pytest.raises(exc, match=pattern):
        embedding(idx, wte, wpe, start)


@pytest.mark.gpu
def test_gpu_gpt2_size_deterministic():
    """GPT-2's tables at B16 T1024: equal to PyTorch's embedding backward (fp32
    sums in another order: close, not equal) and bit-identical run to run."""
    assert ON_GPU
    g = torch.Generator(device="cpu").manual_seed(4)
    idx = torch.randint(0, 50257, (16, 1024), generator=g).to(DEVICE)
    wte = torch.randn(50304, 768, device=DEVICE) * 0.02
    wpe = torch.randn(1024, 768, device=DEVICE) * 0.02
    dx = torch.randn(16, 1024, 768, device=DEVICE, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        wte_l, wpe_l = (t.clone().requires_grad_() for t in (wte, wpe))
        y = embedding(idx, wte_l, wpe_l, 0, out_dtype=torch.bfloat16)
        y.backward(dx)
        runs.append((y, wte_l.grad, wpe_l.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref_y, ref_wte, ref_wpe = _reference(idx, wte, wpe, 0, dx)
    assert_close(runs[0][0], ref_y, 8e-3, "x")
    assert_close(runs[0][1], ref_wte, 1e-5, "dwte")
    assert_close(runs[0][2], ref_wpe, 1e-5, "dwpe")
