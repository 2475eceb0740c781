import pytest
import torch

from engine import GPT, GPTConfig, generate
from engine.generate import filter_logits
from tests.test_hf import random_hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("hfgen")
    hf = random_hf_model(seed=3)
    hf.save_pretrained(path)
    return GPT.from_pretrained(path, backend="torch").eval(), hf


def test_greedy_equals_transformers(pair):
    ours, hf = pair
    torch.manual_seed(0)
    prompt = torch.randint(0, 210, (2, 7))
    got = generate(ours, prompt, max_new_tokens=25, temperature=0)
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=25,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kw", [dict(), dict(top_k=20), dict(top_p=0.8), dict(top_k=50, top_p=0.9, temperature=0.7)])
def test_cached_and_uncached_sampling_agree(pair, kw):
    ours, _ = pair
    prompt = torch.randint(0, 210, (3, 5))
    a = generate(ours, prompt, max_new_tokens=30, seed=11, use_cache=True, **kw)
    b = generate(ours, prompt, max_new_tokens=30, seed=11, use_cache=False, **kw)
    assert torch.equal(a, b)
    c = generate(ours, prompt, max_new_tokens=30, seed=12, use_cache=True, **kw)
    assert not torch.equal(a, c)


def test_kv_cache_logits_match_full_forward(pair):
    ours, _ = pair
    idx = torch.randint(0, 210, (2, 20))
    full, _ = ours(idx)
    with ours.kv_caches(batch_size=2):
        first, _ = ours(idx[:, :12])
        steps = [ours(idx[:, t:t + 1])[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.cat([first] + steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generation_past_block_size_and_eos(pair):
    ours, _ = pair
    block = ours.config.block_size
    prompt = torch.randint(0, 210, (1, block - 3))
    out = generate(ours, prompt, max_new_tokens=10, seed=0, top_k=5)
    assert out.shape == (1, block + 7)
    greedy = generate(ours, prompt[:, :4], max_new_tokens=1, temperature=0)
    eos = int(greedy[0, -1])
    stopped = generate(ours, prompt[:, :4], max_new_tokens=20, temperature=0, eos_token=eos)
    assert stopped.shape == (1, 5) and stopped[0, -1] == eos


def test_padded_vocab_never_sampled():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=70, n_layer=1, n_head=2, n_embd=16,
                          backend="torch", vocab_multiple=64)).eval()
    with torch.no_grad():
        model.lm_head.weight[70:] = 5.0  # would dominate if it leaked
    out = generate(model, torch.zeros(4, 1, dtype=torch.long), max_new_tokens=12, seed=0)
    assert int(out.max()) < 70


def test_filter_logits():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, 2, None)[0, 2:]).all()
    probs = torch.softmax(logits, -1)  # 0.64, 0.24, 0.09, 0.03
    kept = ~torch.isinf(filter_logits(logits, None, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert (~torch.isinf(filter_logits(logits, None, 0.5))).sum() == 1
    assert probs.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("kw,needle", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=1, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=1, top_k=0), "top_k"),
    (dict(max_new_tokens=1, top_p=1.5), "top_p"),
    (dict(max_new_tokens=1, idx=torch.full((1, 2), 211)), r"token id 211 is outside the vocabulary \[0, 211\)"),
    (dict(max_new_tokens=1, idx=torch.full((1, 2), -1)), "token id -1 is outside the vocabulary"),
])
def test_bad_arguments(pair, kw, needle):
    ours, _ = pair
    kw.setdefault("idx", torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=needle):
        generate(ours, **kw)


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
@pytest.mark.parametrize("kw", [dict(), dict(top_k=20, top_p=0.9)])
def test_a_tiny_temperature_samples_the_greedy_tokens(pair, temperature, kw):
    """logits / 1e-40 overflowed to inf and inf - inf gave a NaN distribution;
    the limit of a vanishing temperature is greedy decoding."""
    ours, _ = pair
    prompt = torch.randint(0, 210, (2, 7), generator=torch.Generator().manual_seed(1))
    greedy = generate(ours, prompt, max_new_tokens=12, temperature=0)
    assert torch.equal(generate(ours, prompt, max_new_tokens=12, temperature=temperature, seed=0, **kw), greedy)
