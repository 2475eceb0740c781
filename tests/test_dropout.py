"""Dropout on the triton backend, at the model and run level (the kernels' own
masks, statistics and exact gradients are tested in test_attention.py and
test_layernorm.py): eval mode is the torch backend's model, the same seed draws
the same masks and another seed others, training with dropout on learns, a
resumed run continues bit-exactly, and a captured CUDA graph draws fresh masks."""
import pytest
import torch

from engine import GPT, GPTConfig
from tests.helpers import DEVICE, rel_err
from tests.test_trainer import quiet, tiny_cfg

pytest.importorskip("triton")

# Head dim 16: the smallest the attention kernels take.
CONFIG = dict(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32, dropout=0.2)


def pair():
    torch.manual_seed(0)
    ref = GPT(GPTConfig(backend="torch", **CONFIG)).to(DEVICE)
    fast = GPT(GPTConfig(backend="triton", **CONFIG)).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def batch(seed=0, B=2, T=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 101, (B, T), generator=g).to(DEVICE),
            torch.randint(0, 101, (B, T), generator=g).to(DEVICE))


def test_eval_mode_turns_dropout_off_and_equals_the_torch_backend():
    ref, fast = pair()
    idx, tgt = batch()
    ref.eval()
    fast.eval()
    with torch.no_grad():
        (a, la), (b, lb) = ref(idx, tgt), fast(idx, tgt)
    assert rel_err(b, a) <= 1e-4 and rel_err(lb, la) <= 1e-4
    fast.train()  # and in training mode dropout changes the result
    with torch.no_grad():
        assert rel_err(fast(idx)[0], b) > 1e-2


def _loss_and_grads(model, seed):
    idx, tgt = batch()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    _, loss = model(idx, tgt)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_the_same_seed_draws_the_same_masks_another_seed_others():
    _, fast = pair()
    fast.train()
    loss_a, grads_a = _loss_and_grads(fast, 7)
    loss_b, grads_b = _loss_and_grads(fast, 7)
    loss_c, _ = _loss_and_grads(fast, 8)
    assert loss_a == loss_b and all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))
    assert loss_c != loss_a


def test_each_layer_and_each_call_draws_its_own_mask():
    """Every dropout call draws a seed from the generator, so two calls (two layers,
    or two steps) never share a mask: the generator advances by one draw per call."""
    _, fast = pair()
    fast.train()
    idx, tgt = batch()
    torch.manual_seed(3)
    fast(idx, tgt)
    after_one = torch.randint(2**62, (1,), device=DEVICE)
    torch.manual_seed(3)
    seeds = [torch.randint(0, 2**63 - 1, (1,), device=DEVICE) for _ in range(7)]
    # 2 layers x (LN dropout, attention dropout, LN dropout) + ln_f's dropout = 7 draws.
    assert len({int(s) for s in seeds}) == 7
    torch.manual_seed(3)
    for _ in range(7):
        torch.randint(0, 2**63 - 1, (1,), device=DEVICE)
    assert torch.equal(torch.randint(2**62, (1,), device=DEVICE), after_one)


def test_training_with_dropout_on_the_triton_backend(corpus, tmp_path):
    kw = dict(backend="triton", dropout=0.1, n_layer=1, n_embd=32, n_head=2, batch_size=2, seq_len=16,
              max_steps=8, warmup_steps=2, max_lr=3e-3)
    from engine.trainer import train
    trainer = train(tiny_cfg(corpus, tmp_path / "run", **kw), log=quiet)
    losses = [h["loss"] for h in trainer.history]
    assert trainer.backend == "triton" and len(losses) == 8
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses


def test_resume_with_dropout_is_bit_exact(corpus, tmp_path):
    """The checkpoint carries the RNG states the masks are drawn from."""
    from engine.trainer import train
    kw = dict(backend="triton", dropout=0.1, n_layer=1, n_embd=32, n_head=2, batch_size=2, seq_len=16,
              max_steps=4, warmup_steps=1, checkpoint_interval=2, keep_checkpoints=0)
    full = train(tiny_cfg(corpus, tmp_path / "a", **kw), log=quiet)
    resumed = train(tiny_cfg(corpus, tmp_path / "b", resume=str(tmp_path / "a" / "ckpt_000002.pt"), **kw),
                    log=quiet)
    a = [h["loss"] for h in full.history if h["step"] >= 2]
    b = [h["loss"] for h in resumed.history if h["step"] >= 2]
    assert len(a) == 2 and a == b
    for p, q in zip(full.raw_model.parameters(), resumed.raw_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.gpu
def test_gpu_graph_replays_draw_fresh_masks(corpus, tmp_path):
    """Captured with dropout, each replay draws new masks (the seeds come from the
    CUDA generator, which a graph advances on every replay): the same batch twice
    gives two losses, and the run trains."""
    from engine.trainer import Trainer
    trainer = Trainer(tiny_cfg(corpus, tmp_path / "run", device="cuda", backend="triton", dropout=0.1,
                               cuda_graphs="on", dtype="bf16", n_embd=128, n_head=2, seq_len=64,
                               batch_size=4, max_steps=8, max_lr=1e-12), log=quiet)
    for step in range(4):
        trainer.take_step(step)
    assert trainer.graphed.captured
    x, y = trainer.train_loader.next_batch()
    xs, ys = x[None], y[None]
    first = trainer.graphed.step(xs, ys)[0].item()
    second = trainer.graphed.step(xs, ys)[0].item()
    assert first != second  # lr ~0: the weights barely move, the masks do
    trainer.close()
