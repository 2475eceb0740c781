"""The model on the triton backend against the torch backend (CPU: Triton's interpreter).

Same weights, same batch: the loss, the logits, every parameter's gradient and a
few optimizer steps must agree, so the kernels are wired in where they belong.
"""
import contextlib

import pytest
import torch

from engine import GPT, GPTConfig, generate
from tests.helpers import DEVICE, rel_err

pytest.importorskip("triton")


def pair(vocab_multiple=64, seed=0):
    cfg = dict(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32, vocab_multiple=vocab_multiple)
    torch.manual_seed(seed)
    ref = GPT(GPTConfig(backend="torch", **cfg)).to(DEVICE)
    fast = GPT(GPTConfig(backend="triton", **cfg)).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():  # non-trivial LayerNorm parameters, so their kernels' grads matter
        for (_, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
            if a.dim() == 1:
                a.add_(torch.randn_like(a) * 0.1)
                b.copy_(a)
    return ref, fast


def batch(B=2, T=16, vocab=101, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    tgt = torch.randint(0, vocab, (B, T), generator=g)
    tgt[0, :3] = -100
    return idx.to(DEVICE), tgt.to(DEVICE)


def test_backend_is_triton():
    _, fast = pair()
    assert fast.backend == "triton"


@pytest.mark.smoke
def test_loss_and_every_gradient_match_torch_backend():
    ref, fast = pair()
    idx, tgt = batch()
    _, loss_ref = ref(idx, tgt, return_logits=False)
    _, loss_fast = fast(idx, tgt, return_logits=False)
    assert rel_err(loss_fast, loss_ref) <= 1e-4
    loss_ref.backward()
    loss_fast.backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        assert b.grad is not None, name
        assert rel_err(b.grad, a.grad) <= 1e-4, f"{name}: grad rel err {rel_err(b.grad, a.grad):.2e}"


def test_logits_match_torch_backend():
    ref, fast = pair()
    idx, _ = batch(T=11)
    with torch.no_grad():
        assert rel_err(fast(idx)[0], ref(idx)[0]) <= 1e-4


def test_five_training_steps_match():
    from gpt2_kernels import FusedAdamW
    ref, fast = pair()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt_fast = FusedAdamW(fast.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(5):
        idx, tgt = batch(seed=step)
        losses = []
        for model, opt in ((ref, opt_ref), (fast, opt_fast)):
            opt.zero_grad(set_to_none=True)
            _, loss = model(idx, tgt, return_logits=False)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        assert abs(losses[1] - losses[0]) <= 1e-4 * abs(losses[0]), f"step {step}: {losses}"
    # Adam divides each gradient by its own running RMS, so rounding-level differences
    # in near-zero gradients reach the weights amplified: a looser bound there.
    for (name, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        assert rel_err(b, a) <= 1e-3, name


def test_cached_generation_matches_torch_backend():
    ref, fast = pair()
    ref.eval()
    fast.eval()
    prompt, _ = batch(B=2, T=5)
    a = generate(ref, prompt, max_new_tokens=6, temperature=0)
    b = generate(fast, prompt, max_new_tokens=6, temperature=0)
    assert torch.equal(a, b)


def test_autocast_dtype_plumbing_matches_torch_backend():
    """Under autocast the triton backend keeps the residual stream in fp32 and feeds
    the kernels in the low dtype, as autocast does for the torch backend. fp16 stands
    in for bf16 here (Triton's interpreter computes bf16 wrongly). Judged by
    comparison: against an fp32 run, the triton backend's error is at most about
    the torch backend's own autocast error."""
    exact, _ = pair()
    ref, fast = pair()
    idx, tgt = batch()
    _, loss_exact = exact(idx, tgt, return_logits=False)
    loss_exact.backward()
    losses = []
    for model in (ref, fast):
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            _, loss = model(idx, tgt, return_logits=False)
        loss.backward()
        losses.append(loss)
    assert rel_err(losses[1], loss_exact) <= 2 * rel_err(losses[0], loss_exact) + 1e-4
    named = zip(exact.named_parameters(), ref.parameters(), fast.parameters())
    for (name, e), r, f in named:
        assert f.grad.dtype == torch.float32, name
        ours, theirs = rel_err(f.grad, e.grad), rel_err(r.grad, e.grad)
        assert ours <= 2 * theirs + 1e-3, f"{name}: triton {ours:.2e}, torch autocast {theirs:.2e}"


def test_layer_norm_writes_the_autocast_dtype_directly():
    from engine.ops import TritonOps
    ops = TritonOps()
    x = torch.randn(3, 16, device=DEVICE)
    r = torch.randn(3, 16, device=DEVICE).half()  # a matmul's output under autocast
    w, b = torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y, h = ops.dropout_add_layer_norm(r, x, w, b, 1e-5)
        y1, stream = ops.dropout_add_layer_norm(x, None, w, b, 1e-5)
    assert h.dtype == stream.dtype == torch.float32 and y.dtype == y1.dtype == torch.float16
    y2, _ = ops.dropout_add_layer_norm(r.float(), x, w, b, 1e-5)
    assert y2.dtype == torch.float32


def test_cached_generation_under_autocast():
    """Sampling during training runs under autocast: the KV cache holds the
    autocast dtype, so the attention kernel sees one dtype for q, k and v."""
    ref, fast = pair()
    prompt, _ = batch(B=2, T=5)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        a = generate(fast, prompt, max_new_tokens=4, temperature=0)
        b = generate(ref, prompt, max_new_tokens=4, temperature=0)
    assert a.shape == b.shape == (2, 9) and torch.equal(a[:, :5], prompt)
    # Each token the triton backend chose is the torch backend's greedy choice on the
    # same prefix, unless the two best logits are within fp16 rounding of each other.
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.float16):
        logits = ref(a[:, :-1])[0][:, 4:].float()
    chosen = logits.gather(-1, a[:, 5:, None])[..., 0]
    assert torch.all(logits.max(-1).values - chosen <= 1e-2), (a, b)


@pytest.mark.parametrize("bad", [101, 127, -1], ids=["vocab_size", "padded row", "negative"])
def test_out_of_range_targets_are_an_error_on_both_backends(bad):
    """A library user calling the model with a target outside the vocabulary gets
    torch's IndexError on either backend, not a finite loss that trains the
    position as class 0 (the padded rows, 101..127 here, are not classes)."""
    ref, fast = pair()
    idx, tgt = batch()
    tgt[1, 5] = bad
    for model in (ref, fast):
        with pytest.raises(IndexError):
            model(idx, tgt, return_logits=False)
        with pytest.raises(IndexError):  # the training step's own micro-step checks alike
            model.forward_backward(idx, tgt)


def test_the_training_step_checks_no_targets_on_the_host():
    """The trainer's loaders checked the ids: its step (and check_targets=False
    in library use) costs no host sync for them, while the default call does."""
    from engine.step import train_step
    from gpt2_kernels import FusedAdamW
    from tests.helpers import AtenRecorder
    _, fast = pair()
    idx, tgt = batch(B=1, T=4)
    syncs = "_local_scalar_dense"
    with AtenRecorder() as rec:
        fast(idx, tgt, return_logits=False)
    assert syncs in rec.names
    with AtenRecorder() as rec:
        fast(idx, tgt, return_logits=False, check_targets=False)
    assert syncs not in rec.names
    opt = FusedAdamW(fast.parameters(), lr=1e-3)
    for p in fast.parameters():
        p.grad = torch.zeros_like(p)
    opt.zero_grad(set_to_none=False)
    opt.step()  # builds the launch table and the flat gradients, on the host, once
    with AtenRecorder() as rec:
        train_step(fast, opt, idx[None], tgt[None], grad_clip=1.0, autocast=contextlib.nullcontext)
    assert syncs not in rec.names, "the training step synchronised with the host"


@pytest.mark.parametrize("deterministic", [True, False])
def test_attention_backward_follows_the_config(monkeypatch, deterministic):
    """GPTConfig.deterministic (the trainer's --deterministic, on by default:
    the README's exact resume needs it) reaches the attention kernel, and the
    gradients agree either way."""
    import gpt2_kernels
    seen = []
    real = gpt2_kernels.flash_attention_qkvpacked

    def spy(*args, **kwargs):
        seen.append(kwargs["deterministic"])
        return real(*args, **kwargs)
    monkeypatch.setattr(gpt2_kernels, "flash_attention_qkvpacked", spy)
    cfg = dict(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32)
    assert GPTConfig(**cfg).deterministic
    torch.manual_seed(0)
    ref = GPT(GPTConfig(backend="torch", **cfg)).to(DEVICE)
    fast = GPT(GPTConfig(backend="triton", deterministic=deterministic, **cfg)).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    idx, tgt = batch(T=16, vocab=64)
    ref(idx, tgt, return_logits=False)[1].backward()
    fast(idx, tgt, return_logits=False)[1].backward()
    assert seen == [deterministic]
    for (name, a), (_, b) in zip(ref.named_parameters(), fast.named_parameters()):
        assert rel_err(b.grad, a.grad) <= 1e-4, name
