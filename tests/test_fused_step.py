"""The training step's own micro-step (GPT.forward_backward) and what it fuses:
weight gradients added into .grad inside the kernels, the LM head's gradient
taken for the known loss scale, bf16 weight copies kept by the optimizer, a bf16
residual stream; each selectable against the path before it.

On CPU the triton backend runs in Triton's interpreter in fp32 (a bf16 stream
is bf16 storage with fp32 arithmetic there); bf16 autocast end to end runs on a GPU.
"""
import dataclasses

import pytest
import torch

from engine import GPT, GPTConfig
from engine.config import Fusions
from engine.optim import configure_optimizer
from engine.step import autocast_factory, train_step
from engine.weight_copies import WeightCopies
from tests.helpers import DEVICE, rel_err

pytest.importorskip("triton")

CFG = dict(block_size=16, vocab_size=70, n_layer=2, n_head=2, n_embd=32, vocab_multiple=8)


def _model(backend, seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(backend=backend, **{**CFG, **overrides})).to(DEVICE)
    with torch.no_grad():  # non-trivial LayerNorm parameters
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(DEVICE))
    return model


def _batches(accum=2, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randint(0, CFG["vocab_size"], (accum, B, T), generator=g)
    ys = torch.randint(0, CFG["vocab_size"], (accum, B, T), generator=g)
    ys[0, 0, :3] = -100
    return xs.to(DEVICE), ys.to(DEVICE)


def _autograd_grads(model, xs, ys):
    """What a plain autograd user gets: (mean loss, gradients) over the micro-batches."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for x, y in zip(xs, ys):
        _, loss = model(x, y, return_logits=False)
        (loss / len(xs)).backward()
        total += loss.item() / len(xs)
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("fusions", ["all", "none"])
def test_forward_backward_accumulates_what_autograd_would(fusions):
    """Two micro-steps into allocated gradients (the trainer's steady state) give
    the gradients of the mean loss, on the triton backend with its fusions on or
    off, equal to the torch backend's autograd ones."""
    ref = _model("torch")
    xs, ys = _batches()
    ref_loss, ref_grads = _autograd_grads(ref, xs, ys)
    fast = _model("triton", fusions=fusions)
    for p in fast.parameters():
        p.grad = torch.zeros_like(p)
    grads_before = {n: p.grad for n, p in fast.named_parameters()}
    losses = [fast.forward_backward(x, y, grad_scale=0.5) for x, y in zip(xs, ys)]
    assert abs(sum(loss.item() for loss in losses) / 2 - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, p in fast.named_parameters():
        assert p.grad is grads_before[name], f"{name}: the gradient buffer was replaced"
        assert rel_err(p.grad, ref_grads[name]) <= 1e-4, f"{name}: {rel_err(p.grad, ref_grads[name]):.2e}"


def test_the_step_delivers_gradients_without_autograd_adds():
    """With every fusion, a micro-step adds into .grad inside the kernels: no
    gradient reaches a parameter through autograd (whose accumulation would be a
    separate pass); with none, every one does."""
    xs, ys = _batches(accum=1)
    for fusions, expected in (("all", 0), ("none", None)):
        model = _model("triton", fusions=fusions)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        delivered = []

        def seen(grad, name):
            if grad is not None:
                delivered.append(name)
        hooks = [p.register_hook(lambda g, n=n: seen(g, n)) for n, p in model.named_parameters()]
        model.forward_backward(xs[0], ys[0])
        for h in hooks:
            h.remove()
        n_params = len(list(model.parameters()))
        assert len(delivered) == (expected if expected is not None else n_params), (fusions, delivered)


def test_bf16_residual_stream_on_both_backends():
    """residual_dtype bf16: the stream is stored in bf16 (the embeddings and every
    add rounded once, statistics in fp32) on both backends, and they agree; the
    triton kernels' stores round as the GPU does, also under the interpreter."""
    ref, fast = _model("torch", residual_dtype="bf16"), _model("triton", residual_dtype="bf16")
    fp32 = _model("torch")
    xs, ys = _batches(accum=1)
    streams = []
    hook = fast.transformer.h[1].register_forward_pre_hook(lambda m, args: streams.append(args[1]))
    _, loss_fast = fast(xs[0], ys[0], return_logits=False)
    hook.remove()
    assert streams[0].dtype == torch.bfloat16
    _, loss_ref = ref(xs[0], ys[0], return_logits=False)
    _, loss_fp32 = fp32(xs[0], ys[0], return_logits=False)
    assert rel_err(loss_fast, loss_ref) <= 1e-4
    assert loss_fast.item() != loss_fp32.item()  # the rounding is in effect
    loss_fast.backward()
    loss_ref.backward()
    # The stream's gradient is bf16 on both, rounded at other points (the kernel
    # sums dh and the LayerNorm's gradient in fp32 and rounds once, PyTorch's
    # graph rounds each): two bf16 ulps.
    for (name, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        assert rel_err(b.grad, a.grad) <= 1e-2, f"{name}: {rel_err(b.grad, a.grad):.2e}"


@pytest.mark.parametrize("kind", ["triton", "torch"])
def test_weight_copies_follow_the_masters(kind):
    """The optimizer keeps the bf16 copies equal to the masters rounded (FusedAdamW
    in its kernel, torch's AdamW after each step); weights loaded in place are
    copied again before the next use."""
    model = _model("triton")
    opt = configure_optimizer(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, device=DEVICE,
                              kind=kind, weight_copies=True, log=lambda *a: None)
    copies = model.weight_copies
    assert isinstance(copies, WeightCopies) and len(copies) == 1 + 4 * CFG["n_layer"]
    xs, ys = _batches(accum=1)
    for _ in range(2):
        train_step(model, opt, xs, ys, grad_clip=1.0, autocast=autocast_factory("fp32", DEVICE.type))
        for p in model.matmul_weights():
            assert torch.equal(copies.get(p), p.detach().to(torch.bfloat16))
    state = {k: v + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    for p in model.matmul_weights():
        assert torch.equal(copies.get(p), p.detach().to(torch.bfloat16))
    assert copies.get(model.transformer.wpe.weight) is None


def test_train_step_runs_the_models_micro_step_only_for_a_bare_model(monkeypatch):
    model = _model("torch")
    opt = configure_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, device=DEVICE,
                              log=lambda *a: None)
    calls = []
    monkeypatch.setattr(GPT, "forward_backward",
                        lambda self, *a, **k: calls.append(1) or torch.zeros((), device=DEVICE))
    xs, ys = _batches(accum=2)
    train_step(model, opt, xs, ys, grad_clip=1.0, autocast=autocast_factory("fp32", DEVICE.type))
    assert len(calls) == 2

    class Wrapper(torch.nn.Module):  # as DDP or torch.compile wrap a model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **k):
            return self.inner(*a, **k)

    calls.clear()
    train_step(Wrapper(model), opt, xs, ys, grad_clip=1.0, autocast=autocast_factory("fp32", DEVICE.type))
    assert not calls

    # FSDP2 shards the model in place: still a GPT, its gradients reduced by hooks
    # that gradients added inside the kernels would bypass.
    synced = []
    monkeypatch.setattr(GPT, "set_requires_gradient_sync", lambda self, on: synced.append(on), raising=False)
    train_step(model, opt, xs, ys, grad_clip=1.0, autocast=autocast_factory("fp32", DEVICE.type))
    assert not calls and synced == [False, True]


def test_weight_copies_survive_loading_the_optimizer_state():
    """A resume loads FusedAdamW's state into its buffers: the copies it keeps are
    still written by its next steps."""
    model = _model("triton")
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, device=DEVICE, kind="triton",
                  log=lambda *a: None)
    opt = configure_optimizer(model, weight_copies=True, **kwargs)
    xs, ys = _batches(accum=1)
    step = dict(grad_clip=1.0, autocast=autocast_factory("fp32", DEVICE.type))
    train_step(model, opt, xs, ys, **step)
    opt.load_state_dict(opt.state_dict())
    for _ in range(2):
        train_step(model, opt, xs, ys, **step)
        for p in model.matmul_weights():
            assert torch.equal(model.weight_copies.get(p), p.detach().to(torch.bfloat16))


def test_sharded_parameters_get_no_weight_copies():
    """FSDP's sharded FusedAdamW refuses to keep copies, in one line: under FSDP the
    mixed-precision policy makes the bf16 weights."""
    from gpt2_kernels import ShardedFusedAdamW
    p = torch.nn.Parameter(torch.randn(4, 4, device=DEVICE))
    with pytest.raises(TypeError, match="^ShardedFusedAdamW: bf16 weight copies are not kept for sharded"):
        WeightCopies([p], ShardedFusedAdamW([p], lr=1e-3))


def test_fusions_are_named_and_checked():
    assert Fusions.parse("all") == Fusions() and Fusions.parse("all").text() == "all"
    off = Fusions.parse("none")
    assert not any(dataclasses.asdict(off).values()) and off.text() == "none"
    some = Fusions.parse("epilogues, bf16_weights")
    assert some.text() == "epilogues,bf16_weights" and not some.cross_entropy
    with pytest.raises(ValueError, match="^GPTConfig.fusions: 'gelu' is not all, none or a comma-separated list of epilogues"):
        GPTConfig(fusions="gelu")
    with pytest.raises(ValueError, match="^GPTConfig.residual_dtype must be one of"):
        GPTConfig(residual_dtype="fp16")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [dict(fusions="all", residual_dtype="bf16"),
                                     dict(fusions="none", residual_dtype="bf16"),
                                     dict(fusions="all", residual_dtype="fp32")], ids=str)
def test_gpu_bf16_steps_track_the_path_before(variant):
    """Five bf16 training steps of GPT-2-wide layers with the fusions and the bf16
    stream, beside the path before them (no fusions, fp32 stream, autograd): the
    losses agree to bf16 training noise and the copies stay the masters rounded."""
    cfg = dict(n_layer=2, n_head=12, n_embd=768, vocab_size=50257, vocab_multiple=64, block_size=256)
    losses = {}
    for name, kw in (("before", dict(fusions="none", residual_dtype="fp32")), ("variant", variant)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(backend="triton", **cfg, **kw)).to(DEVICE)
        opt = configure_optimizer(model, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, device=DEVICE,
                                  kind="triton", weight_copies=True, log=lambda *a: None)
        g = torch.Generator().manual_seed(1)
        xs = torch.randint(0, 50257, (2, 4, 256), generator=g).to(DEVICE)
        ys = torch.randint(0, 50257, (2, 4, 256), generator=g).to(DEVICE)
        losses[name] = [train_step(model, opt, xs, ys, grad_clip=1.0,
                                   autocast=autocast_factory("bf16", "cuda"))[0].item() for _ in range(5)]
        for p in model.matmul_weights():
            assert torch.equal(model.weight_copies.get(p), p.detach().to(torch.bfloat16))
    for a, b in zip(losses["before"], losses["variant"]):
        assert abs(a - b) <= 2e-2 * abs(a), losses
