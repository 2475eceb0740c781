"""gpt2_kernels/linear_cross_entropy.py: linear_cross_entropy against F.cross_entropy on
materialised logits (and float64), on its one-pass path (the log-sum-exp from the
logits matmul's epilogue) and the two-pass one beside it. Small chunks, to cross
chunk boundaries at interpreter sizes, go through the module's private entry
(`chunk_rows`)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux only)")
from gpt2_kernels.linear_cross_entropy import _linear_cross_entropy, linear_cross_entropy
from tests.helpers import (AtenRecorder, DEVICE, ON_GPU, RTOL, TEST_DTYPES, assert_bf16_comparable,
                           assert_close, poisoned_allocations, rel_err)

IGNORE = -100


def _inputs(n, c, v, num_classes, dtype, seed, ignore_frac=0.2, lead=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    w = torch.randn(v, c, generator=g) * (1.5 / c ** 0.5)
    t = torch.randint(0, num_classes, (n,), generator=g)
    drop = torch.rand(n, generator=g) < ignore_frac
    t[drop] = IGNORE
    if lead is not None:
        x = x.view(*lead, c)
        t = t.view(*lead)
    return (x.to(DEVICE, dtype).requires_grad_(), w.to(DEVICE, dtype).requires_grad_(),
            t.to(DEVICE))


def _lce(x, w, t, *, chunk_rows=None, ignore_index=IGNORE, num_classes=None, check_targets=True,
         one_pass=True):
    """The public function, or with `chunk_rows` the module's private entry."""
    if chunk_rows is None:
        return linear_cross_entropy(x, w, t, ignore_index=ignore_index, num_classes=num_classes,
                                    check_targets=check_targets, one_pass=one_pass)
    return _linear_cross_entropy(x, w, t, ignore_index, num_classes or w.shape[0], check_targets,
                                 chunk_rows=chunk_rows, one_pass=one_pass)


def _ours(x, w, t, **kw):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    with poisoned_allocations():
        loss = _lce(x, w, t, **kw)
        loss.backward()
    return loss.detach(), x.grad, w.grad


def _torch(x, w, t, num_classes, dtype=None):
    """The oracle: full logits, sliced to the real classes, softmax in fp32."""
    x = x.detach().clone()
    w = w.detach().clone()
    if dtype is not None:
        x, w = x.to(dtype), w.to(dtype)
    x.requires_grad_()
    w.requires_grad_()
    logits = (x @ w.T)[..., :num_classes]
    loss = F.cross_entropy(logits.reshape(-1, num_classes).float(), t.reshape(-1),
                           ignore_index=IGNORE)
    loss.backward()
    return loss.detach(), x.grad, w.grad


# (N, C, V, num_classes, chunk_rows): odd sizes, padded vocab, chunk boundaries
# that do and do not divide N, one chunk, one row per chunk.
CASES = [
    (1, 16, 64, 64, None),
    (37, 32, 257, 250, 16),
    (64, 24, 257, 257, 64),
    (70, 48, 1000, 1000, 32),
    (13, 16, 300, 129, 1),
]


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("dtype", TEST_DTYPES, ids=str)
@pytest.mark.parametrize("n,c,v,num_classes,chunk", CASES)
def test_matches_torch(n, c, v, num_classes, chunk, dtype, one_pass):
    x, w, t = _inputs(n, c, v, num_classes, dtype, seed=n * 1000 + v)
    loss, dx, dw = _ours(x, w, t, num_classes=num_classes, chunk_rows=chunk, one_pass=one_pass)
    ref_loss, ref_dx, ref_dw = _torch(x, w, t, num_classes)
    f64_loss, f64_dx, f64_dw = _torch(x, w, t, num_classes, dtype=torch.float64)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert dx.dtype == dtype and dw.dtype == dtype
    if dtype == torch.bfloat16:
        for name, ours, ref, f64 in (("loss", loss, ref_loss, f64_loss), ("dx", dx, ref_dx, f64_dx),
                                     ("dweight", dw, ref_dw, f64_dw)):
            assert_bf16_comparable(ours, ref, f64, name=name)
        return
    rtol = RTOL[dtype]
    assert_close(loss, ref_loss, rtol, "loss")
    assert_close(dx, ref_dx, rtol, "dx")
    assert_close(dw, ref_dw, rtol, "dweight")
    # Against float64: no worse than twice PyTorch's own error in this dtype.
    for name, ours, ref, f64 in (("loss", loss, ref_loss, f64_loss), ("dx", dx, ref_dx, f64_dx),
                                 ("dweight", dw, ref_dw, f64_dw)):
        assert rel_err(ours, f64) <= 2 * max(rel_err(ref, f64), 1e-6), name


def test_padded_rows_get_zero_gradient():
    num_classes = 200
    x, w, t = _inputs(20, 16, 256, num_classes, torch.float32, seed=1)
    _, _, dw = _ours(x, w, t, num_classes=num_classes, chunk_rows=8)
    assert torch.all(dw[num_classes:] == 0)
    assert dw[:num_classes].abs().sum() > 0


def test_leading_dims_and_int32_targets():
    x, w, t = _inputs(2 * 9, 16, 130, 130, torch.float32, seed=2, lead=(2, 9))
    loss, dx, dw = _ours(x, w, t.to(torch.int32), chunk_rows=7)
    ref_loss, ref_dx, ref_dw = _torch(x, w, t, 130)
    assert dx.shape == x.shape
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(dx, ref_dx, 1e-5, "dx")
    assert_close(dw, ref_dw, 1e-5, "dweight")


def test_nonzero_ignore_index_inside_class_range():
    # ignore_index may be a real class id: rows with it must not count.
    x, w, t = _inputs(24, 16, 64, 64, torch.float32, seed=3, ignore_frac=0.0)
    t[::3] = 5
    x_, w_ = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with poisoned_allocations():
        loss = _lce(x_, w_, t, ignore_index=5, chunk_rows=10)
        loss.backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = F.cross_entropy((xr @ wr.T).float(), t, ignore_index=5)
    ref.backward()
    assert_close(loss, ref.detach(), 1e-5, "loss")
    assert_close(x_.grad, xr.grad, 1e-5, "dx")
    assert_close(w_.grad, wr.grad, 1e-5, "dweight")


def test_all_ignored_gives_zero_loss_and_grads():
    x, w, t = _inputs(10, 16, 64, 64, torch.float32, seed=4)
    t[:] = IGNORE
    loss, dx, dw = _ours(x, w, t, chunk_rows=4)
    assert loss.item() == 0.0
    assert torch.all(dx == 0) and torch.all(dw == 0)


def test_empty_input():
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w = torch.randn(32, 16, device=DEVICE, requires_grad=True)
    t = torch.empty(0, dtype=torch.int64, device=DEVICE)
    loss = linear_cross_entropy(x, w, t)
    loss.backward()
    assert loss.item() == 0.0
    assert x.grad.shape == x.shape and torch.all(w.grad == 0)


def test_grad_output_scaling_and_retained_graph():
    x, w, t = _inputs(19, 16, 100, 90, torch.float32, seed=5)
    _, ref_dx, ref_dw = _torch(x, w, t, 90)
    with poisoned_allocations():
        loss = _lce(x, w, t, num_classes=90, chunk_rows=8)
        (3.0 * loss).backward(retain_graph=True)
        dx1, dw1 = x.grad.clone(), w.grad.clone()
        x.grad = w.grad = None
        (-0.5 * loss).backward()  # the saved gradients must not have been scaled in place
    assert_close(dx1, 3.0 * ref_dx, 1e-5, "dx*3")
    assert_close(dw1, 3.0 * ref_dw, 1e-5, "dweight*3")
    assert_close(x.grad, -0.5 * ref_dx, 1e-5, "dx*-0.5")
    assert_close(w.grad, -0.5 * ref_dw, 1e-5, "dweight*-0.5")


def test_only_requested_grads_and_no_grad():
    x, w, t = _inputs(12, 16, 64, 64, torch.float32, seed=6)
    ref_loss, ref_dx, _ = _torch(x, w, t, 64)
    w_frozen = w.detach()
    with poisoned_allocations():
        loss = _lce(x, w_frozen, t, chunk_rows=5)
        loss.backward()
    assert w_frozen.grad is None
    assert_close(x.grad, ref_dx, 1e-5, "dx")
    with torch.no_grad(), poisoned_allocations():
        loss2 = _lce(x, w, t, chunk_rows=5)
    assert not loss2.requires_grad
    assert_close(loss2, ref_loss, 1e-5, "loss (no_grad)")


def test_inputs_not_modified():
    x, w, t = _inputs(16, 16, 64, 60, torch.float32, seed=7)
    x0, w0, t0 = x.detach().clone(), w.detach().clone(), t.clone()
    _ours(x, w, t, num_classes=60, chunk_rows=6)
    assert torch.equal(x.detach(), x0) and torch.equal(w.detach(), w0) and torch.equal(t, t0)


def _bad_args():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(16, 8, device=DEVICE)
    t = torch.randint(0, 16, (4,), device=DEVICE)
    return [
        ((x.double(), w.double(), t), {}, TypeError,
         "x has dtype float64; supported: float32, float16, bfloat16$"),
        ((x, w.double(), t), {}, TypeError, "weight has dtype float64"),
        ((x, w, t.float()), {}, TypeError, "targets has dtype float32; supported: int64, int32$"),
        ((x, w[0], t), {}, ValueError, r"weight has shape \(8,\); expected 2-d \(V, C\)$"),
        ((x, w[:, :7], t), {}, ValueError, r"x has 8 features but weight has 7 \(weight is \(V, C\)\)$"),
        ((x, w, t[:3]), {}, ValueError, r"targets has shape \(3,\); expected"),
        ((x, w, t), {"num_classes": 0}, ValueError, "num_classes is 0; expected an int >= 1 and <= 16$"),
        ((x, w, t), {"num_classes": 17}, ValueError, "num_classes is 17"),
        ((x, w, torch.tensor([0, 1, 16, 2], device=DEVICE)), {}, IndexError, "targets contains 16"),
        ((x, w, torch.tensor([0, 1, 12, 2], device=DEVICE)), {"num_classes": 12}, IndexError,
         "targets contains 12"),
        ((x, w, torch.tensor([0, -1, 3, 2], device=DEVICE)), {}, IndexError, "targets contains -1"),
        ((x, w, t), {"ignore_index": 1.5}, TypeError, "ignore_index must be an int, got float$"),
        ((x.numpy() if not ON_GPU else None, w, t), {}, TypeError, "x must be a torch.Tensor"),
        ((x, w[:0], t), {}, ValueError, r"weight has shape \(0, 8\); V and C must be positive$"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_bad_inputs(case):
    args, kwargs, exc, msg = _bad_args()[case]
    with pytest.raises(exc, match=f"^linear_cross_entropy: {msg}"):
        linear_cross_entropy(*args, **kwargs)


def test_mixed_devices_rejected():
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(16, 8, device="meta")
    t = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="^linear_cross_entropy: weight is on meta"):
        linear_cross_entropy(x, w, t)


def test_check_targets_off_still_correct_for_valid_targets():
    x, w, t = _inputs(9, 16, 64, 64, torch.float32, seed=8)
    x_ = x.detach().clone().requires_grad_()
    with poisoned_allocations():
        loss = _lce(x_, w.detach(), t, check_targets=False, chunk_rows=4)
    ref_loss, _, _ = _torch(x, w, t, 64)
    assert_close(loss.detach(), ref_loss, 1e-5, "loss")


@pytest.mark.parametrize("bad", [64, 1000, -5])
def test_check_targets_off_lets_an_out_of_range_target_through(bad):
    """check_targets=False really skips the check (and its host sync): the call that
    the check refuses returns, and the kernel's clamped read keeps the loss finite."""
    x, w, t = _inputs(9, 16, 64, 64, torch.float32, seed=8)
    t = t.clone()
    t[3] = bad
    with pytest.raises(IndexError, match=f"targets contains {bad}, outside"):
        _lce(x.detach(), w.detach(), t)
    loss = _lce(x.detach(), w.detach(), t, check_targets=False)
    assert torch.isfinite(loss)


@pytest.mark.gpu
def test_gpu_gpt2_size_memory_and_values():
    """N=16384 rows of GPT-2's padded vocab in bf16: >= 4x less peak memory than
    materialised logits + F.cross_entropy, with comparable accuracy."""
    n, c, v, num_classes = 16384, 768, 50304, 50257
    torch.manual_seed(0)
    x = torch.randn(n, c, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(v, c, device="cuda") * 0.02).to(torch.bfloat16)
    t = torch.randint(0, num_classes, (n,), device="cuda")
    t[::17] = IGNORE

    def peak(fn):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn(xg, wg)
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, loss.detach(), xg.grad, wg.grad

    def reference(xg, wg):
        logits = (xg @ wg.T)[:, :num_classes]
        return F.cross_entropy(logits.float(), t, ignore_index=IGNORE)

    ours_peak, loss, dx, dw = peak(lambda xg, wg: linear_cross_entropy(xg, wg, t, num_classes=num_classes))
    ref_peak, ref_loss, ref_dx, ref_dw = peak(reference)
    assert ours_peak * 4 <= ref_peak, f"peak {ours_peak / 2**30:.2f} GiB vs reference {ref_peak / 2**30:.2f} GiB"
    # A float64 reference on a slice of rows keeps this affordable.
    rows = slice(0, 512)
    xs = x[rows].double().requires_grad_()
    ws = w.double().requires_grad_()
    lr = F.cross_entropy((xs @ ws.T)[:, :num_classes], t[rows], ignore_index=IGNORE, reduction="sum")
    lr.backward()
    f64_dx = xs.grad / (t != IGNORE).sum()
    assert_bf16_comparable(dx[rows], ref_dx[rows], f64_dx, name="dx")
    assert abs(loss.item() - ref_loss.item()) <= 2e-2 * abs(ref_loss.item())
    assert rel_err(dw, ref_dw) <= 2e-2
    assert torch.all(dw[num_classes:] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_rows", [None, 128])
def test_gpu_bf16_x_with_fp32_master_weight(chunk_rows):
    """Autocast's case: bf16 hidden states and the fp32 master weight. Logits in
    bf16, dW accumulated in fp32 (cuBLAS's fp32-output GEMM) and returned in fp32."""
    x, w, t = _inputs(300, 64, 1000, 1000, torch.float32, seed=9)
    x16 = x.detach().to(torch.bfloat16)
    loss, dx, dw = _ours(x16, w, t, chunk_rows=chunk_rows)
    ref_loss, ref_dx, ref_dw = _torch(x16, w, t, 1000, dtype=torch.bfloat16)
    f64_loss, f64_dx, f64_dw = _torch(x16, w, t, 1000, dtype=torch.float64)
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert_bf16_comparable(loss, ref_loss, f64_loss, name="loss")
    assert_bf16_comparable(dx, ref_dx, f64_dx, name="dx")
    assert_bf16_comparable(dw, ref_dw, f64_dw, name="dweight")
    assert not torch.equal(dw, dw.to(torch.bfloat16).float()), "dW was rounded to bf16"


def test_autocast_does_not_change_the_matmul_dtype():
    """The matmuls run in x's dtype: under autocast fp32 inputs stay fp32."""
    x, w, t = _inputs(12, 16, 64, 64, torch.float32, seed=10)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss, dx, dw = _ours(x, w, t)
    ref_loss, ref_dx, ref_dw = _torch(x, w, t, 64)
    assert dx.dtype == dw.dtype == torch.float32
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(dx, ref_dx, 1e-5, "dx")
    assert_close(dw, ref_dw, 1e-5, "dweight")


# ----------------------------------------------------------------------------- dtypes and passes


@pytest.mark.parametrize("chunk_rows", [None, 7], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float16], ids=str)
def test_16_bit_x_with_a_weight_in_its_own_dtype(w_dtype, chunk_rows):
    """fp16 x (bf16 on a GPU) with an fp32 master weight or an fp16 one: the logits
    in x's dtype, dx in x's dtype, dweight in the weight's dtype, summed over the
    chunks in fp32: within twice PyTorch's own error (autograd through
    weight.to(x.dtype)) of float64."""
    x, w, t = _inputs(30, 32, 200, 190, torch.float32, seed=11)
    x16, w_own = x.detach().half(), w.detach().to(w_dtype)
    loss, dx, dw = _ours(x16, w_own, t, num_classes=190, chunk_rows=chunk_rows)
    ref_loss, ref_dx, ref_dw = _torch(x16, w_own.half(), t, 190)
    f64_loss, f64_dx, f64_dw = _torch(x16, w_own, t, 190, dtype=torch.float64)
    assert loss.dtype == torch.float32 and dx.dtype == torch.float16 and dw.dtype == w_dtype
    for name, ours, ref, f64 in (("loss", loss, ref_loss, f64_loss), ("dx", dx, ref_dx, f64_dx),
                                 ("dweight", dw, ref_dw, f64_dw)):
        assert rel_err(ours, f64) <= 2 * max(rel_err(ref, f64), 1e-6), name
    if w_dtype == torch.float32:
        assert not torch.equal(dw, dw.half().float()), "an fp32 weight's gradient was rounded to fp16"


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
def test_dweight_accumulates_inside_the_gemm(one_pass):
    """Over several chunks dW grows by one GEMM each (addmm, beta = 1): no separate
    add over a vocab-sized buffer, no cast of it, no copy. One-pass, the logits come
    from the Triton matmul (no aten mm for them)."""
    x, w, t = _inputs(20, 16, 96, 90, torch.float32, seed=12)
    x_, w_ = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with AtenRecorder() as rec:
        loss = _lce(x_, w_, t, num_classes=90, chunk_rows=6, check_targets=False, one_pass=one_pass)
    names = [name for name, _ in rec.ops]
    # 4 chunks: a logits GEMM (two-pass) and a dx GEMM each; dW's first GEMM, then 3 accumulating.
    assert names.count("mm") == (0 if one_pass else 4) + 4 + 1 and names.count("addmm_") == 3, names
    vocab_sized = w.numel()
    gemms_and_views = {"mm", "addmm_", "empty", "t", "view", "slice", "detach", "alias"}
    passes = [(name, n) for name, n in rec.ops if n >= vocab_sized and name not in gemms_and_views]
    assert not passes, f"passes over a vocabulary-sized buffer besides the GEMMs: {passes}"
    ref_loss, ref_dx, ref_dw = _torch(x, w, t, 90)
    loss.backward()
    assert_close(w_.grad, ref_dw, 1e-5, "dweight")


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
def test_grad_output_known_in_advance_and_accumulated_into_grad(one_pass):
    """grad_output: the gradients are taken for it in the forward and the backward
    scales nothing; accumulate_grad adds dweight into the existing .grad during
    the forward (fp32, in the dW GEMMs) and hands autograd nothing."""
    x, w, t = _inputs(20, 16, 96, 90, torch.float16, seed=14)
    w32 = w.detach().float().requires_grad_()
    scale = 0.125
    _, ref_dx, ref_dw = _torch(x, w32.half(), t, 90)
    x_ = x.detach().clone().requires_grad_()
    w32.grad = torch.ones_like(w32)
    grad = w32.grad
    with poisoned_allocations():
        loss = _linear_cross_entropy(x_, w32, t, IGNORE, 90, False, chunk_rows=6, compute_weight=w32.half(),
                                     grad_output=scale, accumulate_grad=True, one_pass=one_pass)
        assert_close(w32.grad, 1.0 + scale * ref_dw.double(), 2e-3, "dweight added during the forward")
        after_forward = w32.grad.clone()
        loss.backward(torch.tensor(scale, device=DEVICE))
    assert w32.grad is grad and torch.equal(w32.grad, after_forward), "the backward changed .grad"
    assert_close(x_.grad, scale * ref_dx.double(), RTOL[torch.float16], "dx for grad_output")


def test_accumulate_grad_needs_grad_output():
    x, w, t = _inputs(4, 16, 32, 32, torch.float32, seed=15)
    with pytest.raises(ValueError, match="^linear_cross_entropy: accumulate_grad needs grad_output"):
        linear_cross_entropy(x, w, t, accumulate_grad=True)


@pytest.mark.parametrize("loss", ["linear", "quadratic"])
def test_double_backward_is_refused(loss):
    """Asking for a graph of the gradients raises, also when the objective is
    linear in the loss (a gradient penalty on the loss itself), where torch's
    once_differentiable would return the gradient with its second-order term
    (softmax's curvature) silently missing."""
    x, w, t = _inputs(6, 16, 64, 64, torch.float32, seed=13)
    for inputs in ([x], [w], [x, w]):
        out = linear_cross_entropy(x, w, t)
        objective = out if loss == "linear" else out * out
        with pytest.raises(RuntimeError, match="^linear_cross_entropy: cannot differentiate twice"):
            torch.autograd.grad(objective, inputs, create_graph=True)


def _f64_loss(x, w, t, num_classes, ignore_index):
    logits = x.detach().double() @ w.detach().double().T
    return F.cross_entropy(logits[:, :num_classes], t, ignore_index=ignore_index)


def test_numpy_integers_are_taken_as_ints():
    """num_classes and ignore_index as numpy integers (what array code hands
    over) work as the Python ints they equal, instead of failing inside Triton."""
    np = pytest.importorskip("numpy")
    x, w, t = _inputs(8, 16, 24, 20, torch.float32, seed=14)
    t = t.clone()
    t[t == IGNORE] = 7  # 7 is the ignored class here
    for num_classes, ignore_index in [(np.int64(20), np.int64(7)), (np.int32(20), np.int16(7))]:
        loss = linear_cross_entropy(x, w, t, ignore_index=ignore_index, num_classes=num_classes)
        ref = _f64_loss(x, w, t, 20, 7)
        assert_close(loss, ref, RTOL[torch.float32], f"{type(num_classes).__name__} loss")


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"ignore_index": -2 ** 63 - 1}, ValueError,
     r"ignore_index is -9223372036854775809; expected an int >= -9223372036854775808 and <= 9223372036854775807$"),
    ({"ignore_index": 2 ** 63}, ValueError, "ignore_index is 9223372036854775808; expected an int"),
    ({"check_targets": "yes"}, TypeError, "check_targets must be a bool, got str 'yes'$"),
    ({"check_targets": 1}, TypeError, "check_targets must be a bool, got int 1$"),
])
def test_arguments_a_launch_cannot_take_are_refused(kwargs, exc, msg):
    x, w, t = _inputs(4, 8, 16, 16, torch.float32, seed=15)
    with pytest.raises(exc, match=f"^linear_cross_entropy: {msg}"):
        linear_cross_entropy(x, w, t, **kwargs)


def test_the_int64_extremes_are_usable_ignore_indices():
    x, w, t = _inputs(6, 8, 16, 16, torch.float32, seed=16, ignore_frac=0.0)
    t = t.clone()
    for ignore_index in (-2 ** 63, 2 ** 63 - 1):
        t[0] = ignore_index
        loss = linear_cross_entropy(x, w, t, ignore_index=ignore_index)
        assert_close(loss, _f64_loss(x, w, t, 16, ignore_index), RTOL[torch.float32], str(ignore_index))


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-without-interpreter message")
def test_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, t = torch.randn(4, 8), torch.randn(16, 8), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="^linear_cross_entropy: x is on cpu; a CUDA tensor is needed"):
        linear_cross_entropy(x, w, t)
