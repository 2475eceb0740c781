import math

import pytest
import torch

from engine.config import GPTConfig
from engine.errors import UserInputError
from engine.model import GPT


def tiny(**kw):
    base = dict(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32, backend="torch")
    base.update(kw)
    return GPTConfig(**base)


def test_gpt2_parameter_count_and_tied_weights():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2", backend="torch"))
    assert model.num_parameters() == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight


def test_tied_weights_share_storage():
    model = GPT(tiny())
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=256, vocab_size=5000, n_layer=6, n_head=4, n_embd=256, backend="torch")
    model = GPT(cfg)
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 * (2 * cfg.n_layer) ** -0.5
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0)
    assert torch.all(block.ln_1.weight == 1) and torch.all(block.ln_1.bias == 0)
    # At init the model predicts roughly uniformly: loss near ln(vocab).
    idx = torch.randint(0, cfg.vocab_size, (4, 64))
    tgt = torch.randint(0, cfg.vocab_size, (4, 64))
    _, loss = model(idx, tgt)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1


def test_forward_shapes_and_loss_matches_cross_entropy():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 101, (3, 17))
    tgt = torch.randint(0, 101, (3, 17))
    tgt[0, :5] = -100
    logits, loss = model(idx, tgt)
    assert logits.shape == (3, 17, 101)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 101), tgt.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    logits_only, no_loss = model(idx)
    assert no_loss is None
    torch.testing.assert_close(logits_only, logits)
    none_logits, loss2 = model(idx, tgt, return_logits=False)
    torch.testing.assert_close(loss2, loss)


def test_padded_vocab_is_never_output_nor_counted():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_multiple=64))
    assert model.lm_head.weight.shape[0] == 128
    idx = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        # Make the padded rows dominate: if they leaked into the loss it would explode.
        model.lm_head.weight[101:] = 10.0
    logits, loss = model(idx, idx)
    assert logits.shape[-1] == 101
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 101), idx.reshape(-1))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.all(model.lm_head.weight.grad[101:] == 0)


def test_padded_model_equals_unpadded_on_real_rows():
    torch.manual_seed(0)
    plain = GPT(tiny())
    padded = GPT(tiny(vocab_multiple=64))
    sd = plain.state_dict()
    with torch.no_grad():
        for name, t in padded.state_dict().items():
            if name in ("transformer.wte.weight", "lm_head.weight"):
                t[:101] = sd[name]
            else:
                t.copy_(sd[name])
    idx = torch.randint(0, 101, (2, 12))
    a, la = plain(idx, idx)
    b, lb = padded(idx, idx)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(la, lb)


def test_causality():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 101, (1, 20))
    changed = idx.clone()
    changed[0, 15:] = (changed[0, 15:] + 1) % 101
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("make,needle", [
    (lambda: torch.randint(0, 101, (1, 33)), "exceeds block_size 32"),
    (lambda: torch.zeros(4, dtype=torch.long), "2-D"),
    (lambda: torch.zeros(1, 4), "int64 or int32"),
])
def test_bad_inputs_raise_clear_errors(make, needle):
    model = GPT(tiny())
    with pytest.raises(UserInputError, match=needle):
        model(make())


def test_bad_targets():
    model = GPT(tiny())
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(UserInputError, match="targets shape"):
        model(idx, torch.zeros(1, 3, dtype=torch.long))


def test_backend_resolution_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU resolution of backend='auto'")
    assert GPT(tiny(backend="auto")).backend == "torch"


def test_backend_follows_the_device_on_a_machine_with_a_gpu(monkeypatch):
    """On a CUDA machine, a model on the CPU must not call the kernels: `auto` picks
    by the tensors' device, and an explicit triton backend on a device it cannot run
    on is refused by name."""
    from engine.ops import AutoOps, TorchOps, resolve_backend, triton_unusable_reason
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    triton_available = triton_unusable_reason("cuda") is None
    assert resolve_backend("auto", "cpu") == resolve_backend("auto", "mps") == "torch"
    assert resolve_backend("auto", "cuda") == ("triton" if triton_available else "torch")
    if triton_available:
        assert resolve_backend("triton", "cuda") == "triton"
        for device in ("cpu", "mps"):
            with pytest.raises(RuntimeError, match=f"and this is {device}; use backend 'torch'"):
                resolve_backend("triton", device)
    model = GPT(tiny(backend="auto"))
    assert isinstance(model.ops, AutoOps) and model.backend == "torch"
    assert isinstance(model.ops.for_device(torch.device("cpu")), TorchOps)
    idx = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(0))
    reference = GPT(tiny(backend="torch"))
    reference.load_state_dict(model.state_dict())
    logits, loss = model(idx, idx)
    ref_logits, ref_loss = reference(idx, idx)
    assert torch.equal(logits, ref_logits) and torch.equal(loss, ref_loss)


def test_block_forward_is_the_fused_pre_norm_contract():
    """Block.forward(x, residual) -> (x, residual) computes, with the torch ops,
    exactly nanoGPT's pre-norm block: r = r + x; r = r + attn(ln_1(r)); mlp(ln_2(r))."""
    torch.manual_seed(0)
    block = GPT(tiny()).transformer.h[0]
    x, residual = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    out, new_residual = block(x, residual)
    r = residual + x
    r = r + block.attn(block.ln_1.ops.dropout_add_layer_norm(r, None, block.ln_1.weight, block.ln_1.bias,
                                                             1e-5)[0])
    torch.testing.assert_close(new_residual, r)
    ln2 = torch.nn.functional.layer_norm(r, (32,), block.ln_2.weight, block.ln_2.bias, 1e-5)
    torch.testing.assert_close(out, block.mlp(ln2))
    first, stream = block(x, None)  # the first block: the stream starts at the embeddings
    torch.testing.assert_close(first, block(x, torch.zeros_like(x))[0])
    torch.testing.assert_close(stream, block(x, torch.zeros_like(x))[1])


def test_kv_caches_exist_only_inside_their_context():
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 101, (2, 6))
    full, _ = model(idx)
    with model.kv_caches(batch_size=2):
        first, _ = model(idx[:, :4])
        assert model.cached_length() == 4
        rest = [model(idx[:, t:t + 1])[0] for t in range(4, 6)]
    assert model.cached_length() == 0
    assert all(block.attn.kv_cache is None for block in model.transformer.h)
    torch.testing.assert_close(torch.cat([first] + rest, dim=1), full, rtol=1e-5, atol=1e-5)
