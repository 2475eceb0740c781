"""gpt2_kernels.adamw.FusedAdamW against torch.optim.AdamW."""
import io
import re

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux only)")
from gpt2_kernels.adamw import FusedAdamW

from tests.helpers import AtenRecorder, DEVICE, ON_GPU, assert_bf16_comparable, assert_close, poisoned_allocations

SHAPES = [(1,), (3,), (17, 33), (257,)]
LRS = [1e-2, 5e-3, 2e-2, 1e-3, 1e-2, 3e-3, 1e-2, 8e-3, 2e-3, 1e-2]


def _params(seed, dtype=torch.float32, device=DEVICE, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device, dtype) for s in shapes]


def _grads(seed, n_steps, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(n_steps)]


def _no_grad_at(step, index):
    # Parameter 1 gets no gradient at steps 3 and 7; parameter 3 at step 5.
    return (step in (3, 7) and index == 1) or (step == 5 and index == 3)


def _groups(params, lr=1e-2):
    # A decay group and a no-decay group, like GPT-2's configure_optimizers.
    return [{"params": [params[2], params[3]], "weight_decay": 0.1},
            {"params": [params[0], params[1]], "weight_decay": 0.0}]


def _run(opt, params, grads, steps, lrs=LRS, set_lr=None):
    for s in steps:
        for i, p in enumerate(params):
            p.grad = None if _no_grad_at(s, i) else grads[s][i].to(p.device, p.dtype)
        for group in opt.param_groups:
            group["lr"] = lrs[s]
        with poisoned_allocations():
            opt.step()


def _make(kind, params):
    cls = FusedAdamW if kind == "fused" else torch.optim.AdamW
    return cls(_groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)


def _leaves(seed, device=DEVICE, dtype=torch.float32):
    return [p.requires_grad_() for p in _params(seed, dtype, device)]


def test_matches_torch_adamw_ten_steps():
    ours, ref = _leaves(0), _leaves(0)
    grads = _grads(1, 10)
    opt, ref_opt = _make("fused", ours), _make("torch", ref)
    _run(opt, ours, grads, range(10))
    _run(ref_opt, ref, grads, range(10))
    for i, (p, r) in enumerate(zip(ours, ref)):
        assert_close(p.detach(), r.detach(), 1e-6, f"param {i}")
        st, rst = opt.state[p], ref_opt.state[r]
        assert st["step"].item() == rst["step"].item()
        assert_close(st["exp_avg"], rst["exp_avg"], 1e-6, f"exp_avg {i}")
        assert_close(st["exp_avg_sq"], rst["exp_avg_sq"], 1e-6, f"exp_avg_sq {i}")
    assert opt.state[ours[1]]["step"].item() == 8  # skipped twice


def test_bias_correction_precise_at_first_step():
    # One step with beta2 = 0.999 from zero params, so the params are the update
    # itself: computing 1 - beta2 in float32 would be off by ~1e-5 here.
    ours = [torch.zeros(s, device=DEVICE, requires_grad=True) for s in SHAPES]
    ref = [torch.zeros(s, device=DEVICE, requires_grad=True) for s in SHAPES]
    for p, r, g in zip(ours, ref, _grads(2, 1)[0]):
        p.grad, r.grad = g.to(DEVICE), g.to(DEVICE)
    FusedAdamW(ours, lr=0.1, betas=(0.9, 0.999), weight_decay=0.0).step()
    torch.optim.AdamW(ref, lr=0.1, betas=(0.9, 0.999), weight_decay=0.0).step()
    for i, (p, r) in enumerate(zip(ours, ref)):
        assert_close(p.detach(), r.detach(), 5e-7, f"update {i}")


def test_state_dict_round_trip_equals_uninterrupted():
    grads = _grads(3, 10)
    full = _leaves(4)
    opt = _make("fused", full)
    _run(opt, full, grads, range(10))

    first = _leaves(4)
    opt_a = _make("fused", first)
    _run(opt_a, first, grads, range(5))
    buf = io.BytesIO()
    torch.save({"model": [p.detach() for p in first], "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    second = [p.clone().requires_grad_() for p in ckpt["model"]]
    opt_b = _make("fused", second)
    opt_b.load_state_dict(ckpt["opt"])
    _run(opt_b, second, grads, range(5, 10))
    for i, (p, r) in enumerate(zip(second, full)):
        assert torch.equal(p.detach(), r.detach()), f"param {i} differs after resume"
        assert torch.equal(opt_b.state[p]["exp_avg_sq"], opt.state[r]["exp_avg_sq"])


def test_state_dict_has_torch_format():
    params = _leaves(5)
    opt = _make("fused", params)
    _run(opt, params, _grads(6, 1), range(1))
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.is_tensor(sd["state"][0]["step"]) and sd["state"][0]["step"].dtype == torch.float32
    assert sd["state"][0]["exp_avg"].shape == params[2].shape
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    assert sd["param_groups"][0]["weight_decay"] == 0.1


@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_cross_loading_with_torch_adamw(direction):
    grads = _grads(7, 10)
    ref = _leaves(8)
    ref_opt = _make("torch", ref)
    _run(ref_opt, ref, grads, range(10))

    first_kind, second_kind = ("torch", "fused") if direction == "torch_to_fused" else ("fused", "torch")
    first = _leaves(8)
    opt_a = _make(first_kind, first)
    _run(opt_a, first, grads, range(5))
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    second = [p.detach().clone().requires_grad_() for p in first]
    opt_b = _make(second_kind, second)
    opt_b.load_state_dict(torch.load(buf))
    _run(opt_b, second, grads, range(5, 10))
    for i, (p, r) in enumerate(zip(second, ref)):
        assert_close(p.detach(), r.detach(), 1e-6, f"param {i}")
        assert opt_b.state[p]["step"].item() == ref_opt.state[r]["step"].item()


def test_params_sharing_storage_and_untouched_neighbours():
    # Params are arbitrary addresses: here contiguous slices of one buffer with
    # bytes in between that belong to nobody and must not change.
    big = torch.randn(200, device=DEVICE)
    before = big.clone()
    a = torch.nn.Parameter(big[10:40].view(5, 6))
    b = torch.nn.Parameter(big[100:103])
    a_ref = torch.nn.Parameter(before[10:40].view(5, 6).clone())
    b_ref = torch.nn.Parameter(before[100:103].clone())
    opt = FusedAdamW([b, a], lr=0.05)
    ref_opt = torch.optim.AdamW([b_ref, a_ref], lr=0.05)
    for s in range(3):
        for p, r in ((a, a_ref), (b, b_ref)):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(s))
            p.grad, r.grad = g.to(DEVICE), g.to(DEVICE)
        opt.step()
        ref_opt.step()
    assert_close(a.detach(), a_ref.detach(), 1e-6, "a")
    assert_close(b.detach(), b_ref.detach(), 1e-6, "b")
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[10:40] = False
    untouched[100:103] = False
    assert torch.equal(big[untouched], before[untouched])


def test_param_never_given_grad_is_untouched():
    params = _leaves(9)
    before = [p.detach().clone() for p in params]
    opt = FusedAdamW(params, lr=0.1, weight_decay=0.5)
    for _ in range(2):
        for p in params[1:]:
            p.grad = torch.ones_like(p)
        opt.step()
    assert torch.equal(params[0].detach(), before[0])
    assert opt.state[params[0]]["step"].item() == 0
    assert not torch.equal(params[1].detach(), before[1])
    assert opt.step() is None  # still fine when the set of grads does not change


def test_empty_param_and_zero_lr():
    params = [torch.zeros(0, device=DEVICE, requires_grad=True),
              torch.randn(7, device=DEVICE, requires_grad=True)]
    opt = FusedAdamW(params, lr=0.1, weight_decay=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.set_lr(0.0)
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), before)
    assert opt.param_groups[0]["lr"] == 0.0
    opt.set_lr(0.1)
    opt.step()
    assert not torch.equal(params[1].detach(), before)
    assert opt.state[params[0]]["step"].item() == 2


def test_closure_is_called():
    p = torch.randn(5, device=DEVICE, requires_grad=True)
    opt = FusedAdamW([p])

    def closure():
        opt.zero_grad()
        loss = (p * p).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and p.grad is not None


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": -1.0}, "Invalid learning rate"),
    ({"eps": -1e-8}, "Invalid epsilon"),
    ({"betas": (1.0, 0.999)}, "Invalid beta parameter at index 0"),
    ({"betas": (0.9, -0.1)}, "Invalid beta parameter at index 1"),
    ({"weight_decay": -0.1}, "Invalid weight_decay"),
])
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FusedAdamW([torch.randn(3, device=DEVICE, requires_grad=True)], **kwargs)


def test_invalid_group_hyperparameter():
    p = torch.randn(3, device=DEVICE, requires_grad=True)
    q = torch.randn(3, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        FusedAdamW([{"params": [p]}, {"params": [q], "lr": -1.0}])


def test_sparse_grad_rejected():
    p = torch.randn(4, 3, device=DEVICE, requires_grad=True)
    opt = FusedAdamW([p])
    p.grad = torch.randn(4, 3, device=DEVICE).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_bad_param_groups_rejected():
    a = torch.randn(3, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="^FusedAdamW: parameter 1 is on meta but parameter 0 is on "
                                         ".*; all tensors must be on one device$"):
        FusedAdamW([a, torch.randn(3, device="meta", requires_grad=True)])
    with pytest.raises(TypeError, match="dtype"):
        FusedAdamW([a, torch.randn(3, device=DEVICE, dtype=torch.float64, requires_grad=True)])
    with pytest.raises(TypeError, match="supported: float32, bfloat16"):
        FusedAdamW([torch.randn(3, device=DEVICE, dtype=torch.float16, requires_grad=True)])
    with pytest.raises(ValueError, match="not contiguous"):
        FusedAdamW([torch.randn(4, 5, device=DEVICE).t().requires_grad_()])


@pytest.mark.skipif(ON_GPU, reason="checks the CPU-without-interpreter message")
def test_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="^FusedAdamW: parameter 0 is on cpu; a CUDA tensor is needed"):
        FusedAdamW([torch.randn(3, requires_grad=True)])


def test_load_rejects_amsgrad_and_mismatched_groups():
    params = _leaves(10)
    ref_opt = torch.optim.AdamW(params, amsgrad=True)
    opt = FusedAdamW(params)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(ref_opt.state_dict())
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict(_make("torch", _leaves(10)).state_dict())


@pytest.mark.gpu
def test_gpu_bf16_params():
    """bf16 params, fp32 moments, no master copy: no worse than twice torch's own
    bf16 AdamW error against a float64 run."""
    grads = _grads(11, 10)
    ours = _leaves(12, "cuda", torch.bfloat16)
    ref_bf16 = _leaves(12, "cuda", torch.bfloat16)
    ref64 = _leaves(12, "cuda", torch.float64)
    _run(_make("fused", ours), ours, grads, range(10), lrs=[2e-2] * 10)
    _run(_make("torch", ref_bf16), ref_bf16, grads, range(10), lrs=[2e-2] * 10)
    _run(_make("torch", ref64), ref64, grads, range(10), lrs=[2e-2] * 10)
    for i, (p, r, r64) in enumerate(zip(ours, ref_bf16, ref64)):
        assert p.dtype == torch.bfloat16
        assert_bf16_comparable(p.detach(), r.detach(), r64.detach(), name=f"param {i}")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_matches_eager():
    grads = _grads(13, 8)
    static = _leaves(14, "cuda")
    eager = _leaves(14, "cuda")
    for p in static:
        p.grad = torch.zeros_like(p)
    opt_g = FusedAdamW(_groups(static), lr=1e-2, betas=(0.9, 0.95))
    opt_e = FusedAdamW(_groups(eager), lr=1e-2, betas=(0.9, 0.95))

    def load_grads(s):
        for p, g in zip(static, grads[s]):
            p.grad.copy_(g)

    # Warm up on a side stream (compiles the kernel, builds the table), as
    # CUDA graphs require; step 0 is this eager warm-up.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        load_grads(0)
        opt_g.set_lr(LRS[0])
        opt_g.step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for s in range(1, 8):
        load_grads(s)
        opt_g.set_lr(LRS[s])
        graph.replay()

    for s in range(8):
        for p, g in zip(eager, grads[s]):
            p.grad = g.to("cuda")
        opt_e.set_lr(LRS[s])
        opt_e.step()
    torch.cuda.synchronize()
    for i, (p, e) in enumerate(zip(static, eager)):
        assert torch.equal(p.detach(), e.detach()), f"param {i}: graph replay != eager"
        assert opt_g.state[p]["step"].item() == 8


def test_loads_a_state_dict_with_a_tensor_lr():
    """torch's capturable AdamW (the CUDA-graph path of `--optimizer torch`) saves its lr
    as a tensor; resuming such a checkpoint with FusedAdamW must work."""
    params = _leaves(9)
    opt = _make("torch", params)
    _run(opt, params, _grads(10, 2), range(2))
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        g["lr"] = torch.tensor(g["lr"])
    again = [p.detach().clone().requires_grad_() for p in params]
    fused = _make("fused", again)
    fused.load_state_dict(sd)
    assert all(isinstance(g["lr"], float) for g in fused.param_groups)
    _run(fused, again, _grads(10, 3), range(2, 3))


# --- Vectorized path: the launch table's alignment logic and misaligned params ---

def _rows(opt, group=0):
    from gpt2_kernels.adamw import _TABLE_W
    buffers = opt._group_buffers[group]
    return buffers.table.cpu().view(-1, _TABLE_W).tolist(), buffers.base_slot


def _check_rows(rows, params, base_slot):
    """What the kernel's hints claim, for every row flagged aligned."""
    base = params[base_slot]
    esize = base.element_size()
    vec = 16 // esize
    for p_off, g_off, p_addr, g_addr, numel, state_off, _, slot, vec_numel, _copy in rows:
        p = params[slot]
        assert (p_addr, g_addr, numel) == (p.data_ptr(), p.grad.data_ptr(), p.numel())
        assert state_off % 16 == 0
        aligned = p_addr % 16 == 0 and g_addr % 16 == 0 and base.data_ptr() % 16 == 0
        assert vec_numel == (numel // vec * vec if aligned else 0)
        if vec_numel:
            assert base.data_ptr() + p_off * esize == p_addr and p_off % (16 // esize) == 0
            assert base.data_ptr() + g_off * esize == g_addr and g_off % (16 // esize) == 0


def test_table_rows_alignment_logic():
    """Host-side rules on synthetic addresses: base = first aligned non-empty param;
    a row is aligned only if its param and grad are 16-byte aligned; offsets are
    exact element counts and may be negative or huge (separate allocations)."""
    from gpt2_kernels.adamw import _table_rows
    for dtype, esize in ((torch.float32, 4), (torch.bfloat16, 2)):
        params = [torch.zeros(n, dtype=dtype) for n in (5, 0, 300, 40, 7, 9)]
        offsets = [0, 16, 16, 320, 368, 384]
        key = ((0, 1000 + esize, 5000),  # misaligned param: not the base, scalar path
               (1, 0, 0),  # empty, null address: never the base
               (2, 1 << 40, (1 << 40) + 4096),  # the base
               (3, 4096, 8192),  # below the base: negative offsets
               (4, (1 << 41) + 32, (1 << 41) + 16 + esize),  # misaligned grad
               (5, (1 << 45), 64))
        rows, base_slot = _table_rows(key, params, offsets, [0, 1, 1, 4, 5, 6])
        assert base_slot == 2
        vec = 16 // esize
        # vec_numel: numel rounded down to a multiple of 16 bytes where aligned, else 0.
        assert [r[8] for r in rows] == [0, 0, 300 // vec * vec, 40, 0, 8]
        base = 1 << 40
        for (slot, p_addr, g_addr), row in zip(key, rows):
            assert row[2:4] == [p_addr, g_addr] and row[4] == params[slot].numel()
            assert row[5] == offsets[slot] and row[7] == slot
            if row[8]:
                assert base + row[0] * esize == p_addr and base + row[1] * esize == g_addr
                assert row[0] % (16 // esize) == 0 and row[1] % (16 // esize) == 0
            else:
                assert row[0] == row[1] == 0
        assert rows[3][0] < 0 and rows[5][1] < 0
    # No aligned param at all: every row takes the scalar path.
    params = [torch.zeros(8), torch.zeros(8)]
    rows, base_slot = _table_rows(((0, 4, 64), (1, 36, 128)), params, [0, 16], [0, 1])
    assert [r[0:2] for r in rows] == [[0, 0], [0, 0]]
    assert base_slot == 0 and [r[8] for r in rows] == [0, 0]


def test_state_offsets_padded_to_16_elements():
    params = [torch.zeros(n, device=DEVICE, requires_grad=True) for n in (3, 17, 16, 1)]
    opt = FusedAdamW(params)
    buffers = opt._group_buffers[0]
    assert buffers.offsets == [0, 16, 48, 64]
    for p in params:
        assert opt.state[p]["exp_avg"].shape == p.shape
        assert opt.state[p]["exp_avg"].data_ptr() % 64 == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_views_and_separate_allocations(dtype):
    """Params and grads at odd element offsets (scalar path), 16-byte aligned ones
    in separate allocations, some below the base (negative element offsets), all
    several blocks long with a partial tail; bytes around the views stay intact."""
    big = torch.randn(4000, device=DEVICE).to(dtype)
    before = big.clone()
    gbig = torch.empty(4000, device=DEVICE, dtype=dtype)
    views = [(1, 300), (1001, 257), (2000, 512), (3003, 129)]  # element offset, numel
    separate = [torch.randn(n, device=DEVICE).to(dtype) for n in (384, 203, 1001)]
    # The base is the first 16-byte aligned param: put the highest address first
    # so that the other aligned params lie below it.
    separate.sort(key=lambda t: -t.data_ptr())
    params = [torch.nn.Parameter(big[o:o + n]) for o, n in views[:2]]
    params += [torch.nn.Parameter(t) for t in separate]
    params += [torch.nn.Parameter(big[o:o + n]) for o, n in views[2:]]
    ref = [torch.nn.Parameter(p.detach().float().clone()) for p in params]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]  # own, aligned allocations
    opt = FusedAdamW(params, lr=0.05, weight_decay=0.1)
    plain_opt = FusedAdamW(plain, lr=0.05, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=0.05, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for s in range(3):
        for i, (p, q, r) in enumerate(zip(params, plain, ref)):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            q.grad = g.to(DEVICE)
            if i in (0, 5):  # misaligned grads, one of an aligned param (big[2000:])
                o = 3 + 1100 * (i // 5)  # disjoint slices
                p.grad = gbig[o:o + p.numel()]
                p.grad.copy_(g)
            else:
                p.grad = g.to(DEVICE)
            r.grad = g.float().to(DEVICE)
        opt.step()
        plain_opt.step()
        ref_opt.step()
        if dtype == torch.bfloat16:  # no master copy: the reference rounds too
            with torch.no_grad():
                for r in ref:
                    r.copy_(r.bfloat16().float())
    rows, base_slot = _rows(opt)
    _check_rows(rows, params, base_slot)
    assert any(r[8] == 0 for r in rows), "no row on the scalar path only"
    assert any(0 < r[8] < r[4] for r in rows), "no row split between the paths"
    assert any(r[8] == r[4] for r in rows), "no row on the vector path only"
    assert any(r[8] and r[0] < 0 for r in rows), "no negative element offset"
    assert all(r[8] for r in _rows(plain_opt)[0] if r[4] >= 8)
    # The vector and scalar paths do the same arithmetic: the layout changes no bit.
    # Against torch, bf16 is loose: the interpreter's float32 -> bfloat16 cast
    # does not round to nearest (the GPU's does).
    tol = 1e-6 if dtype == torch.float32 else 5e-2
    for i, (p, q, r) in enumerate(zip(params, plain, ref)):
        assert p.dtype == dtype
        assert torch.equal(p.detach(), q.detach()), f"param {i}: layout changed the result"
        assert torch.equal(opt.state[p]["exp_avg_sq"], plain_opt.state[q]["exp_avg_sq"])
        assert_close(p.detach().float(), r.detach(), tol, f"param {i}")
        assert_close(opt.state[p]["exp_avg"], ref_opt.state[r]["exp_avg"], tol, f"exp_avg {i}")
    untouched = torch.ones(4000, dtype=torch.bool)
    for o, n in views:
        untouched[o:o + n] = False
    assert torch.equal(big[untouched], before[untouched])


# --- Parameters listed twice, or changed after the state was built ------------------

def test_a_parameter_listed_twice_is_refused():
    a, b, c = (torch.randn(n, device=DEVICE, requires_grad=True) for n in (3, 4, 5))
    with pytest.raises(ValueError, match=r"^FusedAdamW: parameter 2 of group 0 is listed twice "
                                         r"\(it is also parameter 0 of this group\); list each parameter once$"):
        FusedAdamW([a, b, a])
    with pytest.raises(ValueError, match=r"^FusedAdamW: parameter 1 of group 1 is listed twice "
                                         r"\(it is also parameter 1 of group 0\)"):
        FusedAdamW([{"params": [a, b]}, {"params": [c, b]}])
    opt = FusedAdamW([a])
    with pytest.raises(ValueError, match="listed twice"):
        opt.add_param_group({"params": (p for p in [c, a])})  # a generator is read once
    assert len(opt.param_groups) == 1


def test_parameters_sharing_memory_are_refused():
    big = torch.randn(100, device=DEVICE)
    first, overlapping = big[0:40], big[30:60]
    with pytest.raises(ValueError, match="^FusedAdamW: parameter 0 of group 0 and parameter 0 of "
                                         "group 1 share memory"):
        FusedAdamW([{"params": [torch.nn.Parameter(first)]},
                    {"params": [torch.nn.Parameter(overlapping)]}])
    # Adjacent, not overlapping: fine.
    FusedAdamW([torch.nn.Parameter(big[0:40]), torch.nn.Parameter(big[40:60])])


@pytest.mark.parametrize("change", ["size", "shape", "dtype",
                                    # a CPU machine has no second device to move it to
                                    pytest.param("device", marks=pytest.mark.gpu)])
def test_a_parameter_changed_after_the_state_was_built_is_refused(change):
    """Today's state is sized for the parameter it was built for: a parameter
    resized (or recast, or moved) afterwards must not be updated through it."""
    params = [torch.nn.Parameter(torch.randn(6, 4, device=DEVICE)),
              torch.nn.Parameter(torch.randn(10, device=DEVICE))]
    opt = FusedAdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    p = params[0]
    with torch.no_grad():
        if change == "size":
            p.data = torch.randn(60, 4, device=DEVICE)
        elif change == "shape":
            p.data = p.data.reshape(4, 6)
        elif change == "dtype":
            p.data = p.data.double()
        else:
            p.data = p.data.to("cpu")
    p.grad = None
    p.grad = torch.ones_like(p)
    expected = {"size": "(60, 4) float32", "shape": "(4, 6) float32", "dtype": "(6, 4) float64",
                "device": "(6, 4) float32 on cpu"}[change]
    before = params[1].detach().clone()
    for call in (opt.step, lambda: opt.zero_grad(set_to_none=False)):
        with pytest.raises(RuntimeError, match=rf"^FusedAdamW: parameter 0 of group 0 is now "
                                               rf"{re.escape(expected)}.*, but the optimizer's state "
                                               rf"was built for \(6, 4\) float32 on .*; build a new optimizer"):
            call()
    assert torch.equal(params[1].detach(), before), "the other parameter was updated anyway"


# --- zero_grad: one launch, addresses kept -----------------------------------------

_WRITES = {"zero_", "fill_", "copy_", "_foreach_zero_", "mul_", "zeros", "zeros_like"}


def test_zero_grad_is_one_launch_and_keeps_addresses():
    """Gradients of both groups zeroed by one write over one flat buffer; their
    addresses stay put across steps (a CUDA graph replays on them)."""
    params = _leaves(20)
    opt = _make("fused", params)
    grads = _grads(21, 3)
    opt.zero_grad(set_to_none=False)  # no gradients yet: they stay None, as in torch
    assert all(p.grad is None for p in params)
    for p, g in zip(params, grads[0]):
        p.grad = g.to(DEVICE)
    opt.zero_grad(set_to_none=False)  # from here on, views of one buffer
    addresses = [p.grad.data_ptr() for p in params]
    for step in range(1, 3):
        for p, g in zip(params, grads[step]):
            (p * g.to(DEVICE)).sum().backward()  # autograd accumulates into the view
        opt.step()
        with AtenRecorder() as rec:
            opt.zero_grad(set_to_none=False)
        assert [op for op in rec.names if op in _WRITES] == ["zero_"], rec.names
        assert [p.grad.data_ptr() for p in params] == addresses
        assert all(torch.all(p.grad == 0) for p in params)


def test_zero_grad_without_set_to_none_matches_torch():
    """Accumulated micro-batches, zero_grad(set_to_none=False) between steps, a
    gradient replaced by the user: the same trajectory as torch.optim.AdamW."""
    ours, ref = _leaves(22), _leaves(22)
    opt, ref_opt = _make("fused", ours), _make("torch", ref)
    grads = _grads(23, 8)
    for step in range(4):
        for params, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=False)
            for micro in (2 * step, 2 * step + 1):
                for p, g in zip(params, grads[micro]):
                    (p * g.to(DEVICE)).sum().backward()
            if step == 2:
                params[1].grad = torch.full_like(params[1], 0.5)  # a foreign tensor
            o.step()
    for i, (p, r) in enumerate(zip(ours, ref)):
        assert_close(p.detach(), r.detach(), 1e-6, f"param {i}")


def test_zero_grad_set_to_none_drops_the_gradients():
    params = _leaves(24)
    opt = _make("fused", params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.zero_grad(set_to_none=False)
    opt.zero_grad()
    assert all(p.grad is None for p in params) and opt._flat_grads is None


def test_found_inf_skips_the_step_on_the_device_as_torch_fused_adamw_does():
    """A nonzero found_inf leaves weights, moments and step counts untouched (the
    training step sets it for a non-finite loss or norm); zero steps as usual. The
    same sequence through torch's fused AdamW with the same flags agrees."""
    ours, ref = _leaves(0), _leaves(0)
    grads = _grads(1, 4)
    opt = FusedAdamW(_groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for s, skip in enumerate([0.0, 1.0, 0.0, 1.0]):
        for params, optimizer in ((ours, opt), (ref, ref_opt)):
            for p, g in zip(params, grads[s]):
                p.grad = g.to(p.device)
            before = [p.detach().clone() for p in params]
            optimizer.found_inf = torch.tensor(skip, device=params[0].device)
            optimizer.step()
            del optimizer.found_inf
            if skip:
                assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert opt.supports_found_inf
    for i, (p, r) in enumerate(zip(ours, ref)):
        assert_close(p.detach(), r.detach(), 1e-6, f"param {i}")
        assert opt.state[p]["step"].item() == ref_opt.state[r]["step"].item() == 2
        assert_close(opt.state[p]["exp_avg"], ref_opt.state[r]["exp_avg"], 1e-6, f"exp_avg {i}")


# ----------------------------------------------------------------------------- bf16 copies

def test_bf16_copies_equal_the_masters_rounded_after_every_step():
    """The update kernel writes each copied parameter's new value rounded to bf16,
    bit for bit what .to(torch.bfloat16) gives (ties to even, NaN to the quiet NaN),
    also under the interpreter; a parameter without a gradient, or a step skipped
    by found_inf, leaves its copy as it was, equal to the unchanged master."""
    params = _leaves(0)
    grads = _grads(1, 10)
    opt = FusedAdamW(_groups(params), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    copied = [params[2], params[0], params[3]]  # both groups; not params[1]
    copies = opt.bf16_copies(copied)
    assert [c.dtype for c in copies] == [torch.bfloat16] * 3
    assert all(torch.equal(c, p.detach().to(torch.bfloat16)) for c, p in zip(copies, copied))
    for s in range(8):
        _run(opt, params, grads, [s])
        if s == 4:
            before = [c.clone() for c in copies]
            opt.found_inf = torch.ones((), device=DEVICE)
            opt.step()
            del opt.found_inf
            assert all(torch.equal(c, b) for c, b in zip(copies, before))
        for i, (c, p) in enumerate(zip(copies, copied)):
            assert torch.equal(c, p.detach().to(torch.bfloat16)), f"copy {i} after step {s}"
    # Ties (exactly half a bf16 ulp) round to even; NaN stays NaN.
    special = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), float("nan"), 3e38],
                           device=DEVICE)
    p = torch.nn.Parameter(special.clone())
    p.grad = torch.zeros_like(p)
    opt = FusedAdamW([p], lr=0.0, weight_decay=0.0)
    (copy,) = opt.bf16_copies([p])
    copy.zero_()
    opt.step()
    ref = special.to(torch.bfloat16)
    assert torch.equal(copy[:3], ref[:3]) and torch.isnan(copy[3]) and torch.equal(copy[4:], ref[4:])


def test_bf16_copies_are_refused_for_what_the_optimizer_does_not_own():
    params = _leaves(0)
    opt = FusedAdamW(_groups(params), lr=1e-2)
    with pytest.raises(ValueError, match="^FusedAdamW.bf16_copies: a parameter is not one this optimizer"):
        opt.bf16_copies([torch.nn.Parameter(torch.zeros(3, device=DEVICE))])
    bf16 = [p.detach().to(torch.bfloat16).requires_grad_() for p in _leaves(0)]
    opt = FusedAdamW(_groups(bf16), lr=1e-2)
    with pytest.raises(TypeError, match="copies are of float32 parameters$"):
        opt.bf16_copies([bf16[0]])


# --- Contracts a torch.optim user relies on ---

@pytest.mark.parametrize("flag", [2.0, -1.0, float("nan"), float("inf"), 1e-30, 1.0, True],
                         ids=lambda f: repr(f))
@pytest.mark.parametrize("as_tensor", [True, False], ids=["tensor", "python"])
def test_any_nonzero_found_inf_skips_and_leaves_the_count(flag, as_tensor):
    """Only an exact 0 runs the step: 2 must not set the count to -1, -1 must not
    advance it by 2, NaN must not make it NaN; a Python number works as a tensor does."""
    params = _leaves(30)
    opt = _make("fused", params)
    grads = _grads(31, 2)
    for p, g in zip(params, grads[0]):
        p.grad = g.to(DEVICE)
    opt.step()
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    for p, g in zip(params, grads[1]):
        p.grad = g.to(DEVICE)
    opt.found_inf = torch.tensor(float(flag), device=DEVICE) if as_tensor else flag
    opt.step()
    for i, p in enumerate(params):
        assert opt.state[p]["step"].item() == 1, f"param {i}: step {opt.state[p]['step'].item()}"
        assert torch.equal(p.detach(), before[i]) and torch.equal(opt.state[p]["exp_avg"], moments[i])
    opt.found_inf = 0.0 if not as_tensor else torch.zeros((), device=DEVICE)
    opt.step()
    assert all(opt.state[p]["step"].item() == 2 for p in params)
    assert not any(torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("flag,exc,match", [
    (torch.zeros(2), ValueError, r"^FusedAdamW: found_inf must hold one value, got \(2,\)"),
    ("yes", TypeError, "^FusedAdamW: found_inf must be a one-element tensor or a number, got str$"),
])
def test_a_malformed_found_inf_is_one_clear_error(flag, exc, match):
    p = torch.randn(3, device=DEVICE, requires_grad=True)
    opt = FusedAdamW([p])
    p.grad = torch.ones(3, device=DEVICE)
    opt.found_inf = flag
    with pytest.raises(exc, match=match):
        opt.step()


@pytest.mark.parametrize("replace", ["data", "assign", "hook"])
def test_a_replaced_gradient_is_used_then_zeroed(replace):
    """After zero_grad(set_to_none=False) the gradients are views of one buffer; a
    gradient replaced since (p.grad.data = t, p.grad = t, a hook assigning a new
    tensor) is what the next step uses, and the next zero_grad clears it too --
    as torch.optim.AdamW does -- instead of leaving a stale value behind."""
    ours, ref = _leaves(32), _leaves(32)
    opt, ref_opt = _make("fused", ours), _make("torch", ref)
    grads = _grads(33, 3)
    for params, o in ((ours, opt), (ref, ref_opt)):
        if replace == "hook":  # swaps in a new tensor after each accumulation
            params[2].register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", p.grad * 2.0))
        for step in range(3):
            o.zero_grad(set_to_none=False)
            for p, g in zip(params, grads[step]):
                (p * g.to(DEVICE)).sum().backward()
            if replace == "data":
                params[1].grad.data = torch.full_like(params[1], 2.0)
            elif replace == "assign":
                params[1].grad = torch.full_like(params[1], 2.0)
            o.step()
        o.zero_grad(set_to_none=False)
        assert all(torch.count_nonzero(p.grad) == 0 for p in params), replace
    for i, (p, r) in enumerate(zip(ours, ref)):
        assert_close(p.detach(), r.detach(), 1e-6, f"param {i}")
    flat = opt._flat_grads.buffers[0]
    ends = (flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size())
    assert all(ends[0] <= p.grad.data_ptr() < ends[1] for p in ours), "a gradient left the flat buffer"


def test_a_tensor_lr_is_reread_at_every_step():
    """A one-element tensor lr, as torch.optim.AdamW takes it, changed in place
    (fill_, as schedulers do with tensor learning rates) between steps."""
    ours, ref = _leaves(34), _leaves(34)
    grads = _grads(35, 4)
    opt = FusedAdamW(ours, lr=torch.tensor(1e-3), betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW(ref, lr=torch.tensor(1e-3), betas=(0.9, 0.95))
    for s, lr in enumerate([1e-3, 0.5, 1.0, 2e-2]):
        for params, o in ((ours, opt), (ref, ref_opt)):
            o.param_groups[0]["lr"].fill_(lr)
            for p, g in zip(params, grads[s]):
                p.grad = g.to(DEVICE)
            o.step()
    for i, (p, r) in enumerate(zip(ours, ref)):
        assert_close(p.detach(), r.detach(), 1e-6, f"param {i}")


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"betas": (torch.tensor(0.9), torch.tensor(0.99))}, TypeError,
     r"^FusedAdamW: betas\[0\] must be a real number, got Tensor"),
    ({"eps": torch.tensor(1e-8)}, TypeError, "^FusedAdamW: eps must be a real number, got Tensor"),
    ({"weight_decay": "0.1"}, TypeError, "^FusedAdamW: weight_decay must be a real number, got str"),
    ({"lr": torch.tensor([1e-3, 1e-3])}, ValueError, "^FusedAdamW: a Tensor lr must hold one floating"),
    ({"lr": "1e-3"}, TypeError, "^FusedAdamW: lr must be a number or a one-element Tensor, got str$"),
])
def test_hyperparameters_the_launch_cannot_take_are_refused_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FusedAdamW([torch.randn(3, device=DEVICE, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_steps_like_the_original(how):
    """copy.deepcopy (and a pickle round trip) of a model and its optimizer
    together: the copy continues exactly as the original does, on its own state."""
    import copy
    import pickle
    params = _leaves(36)
    opt = _make("fused", params)
    grads = _grads(37, 3)
    _run(opt, params, grads, range(2))
    twin_params, twin = (copy.deepcopy((params, opt)) if how == "deepcopy"
                         else pickle.loads(pickle.dumps((params, opt))))
    assert twin.param_groups[0]["params"][0] is twin_params[2]
    _run(opt, params, grads, range(2, 3))
    _run(twin, twin_params, grads, range(2, 3))
    for i, (p, q) in enumerate(zip(params, twin_params)):
        assert torch.equal(p.detach(), q.detach()), f"param {i}"
        assert torch.equal(opt.state[p]["exp_avg_sq"], twin.state[q]["exp_avg_sq"])
        assert opt.state[p]["step"].item() == twin.state[q]["step"].item()
    assert twin._group_buffers[0].exp_avg.data_ptr() != opt._group_buffers[0].exp_avg.data_ptr()
