import pytest

from engine.config import PRESETS, GPTConfig


def test_presets_build_and_padding():
    for name in PRESETS:
        cfg = GPTConfig.from_preset(name)
        assert cfg.n_embd % cfg.n_head == 0
    cfg = GPTConfig.from_preset("gpt2", vocab_multiple=64)
    assert cfg.vocab_size == 50257 and cfg.padded_vocab_size == 50304
    assert GPTConfig().padded_vocab_size == 50257


@pytest.mark.parametrize("field,value,needle", [
    ("n_embd", 100, "n_embd (100) must be divisible by n_head"),
    ("n_layer", 0, "n_layer must be positive"),
    ("vocab_size", -3, "vocab_size must be positive"),
    ("block_size", 1.5, "block_size must be an int"),
    ("dropout", 1.0, "dropout must be in [0, 1)"),
    ("backend", "cuda", "backend must be one of"),
    ("vocab_multiple", 0, "vocab_multiple must be positive"),
])
def test_bad_values_name_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        GPTConfig(**{field: value})


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown preset 'gpt3'"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="unknown field 'n_embed'"):
        GPTConfig.from_preset("gpt2", n_embed=10)


def test_dict_round_trip():
    cfg = GPTConfig.from_preset("tiny", vocab_multiple=64)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        GPTConfig.from_dict({**cfg.to_dict(), "bogus": 1})
