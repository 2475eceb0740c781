"""Parity with Hugging Face's GPT2LMHeadModel, built from a config (no download)."""
import json

import pytest
import torch

from engine import GPT, GPTConfig
from engine.errors import UserInputError
from tests.helpers import rel_err

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def random_hf_model(seed=0, vocab=211, n_positions=64):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=48, n_layer=3, n_head=4, n_positions=n_positions,
                                  vocab_size=vocab, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF inits LayerNorms to (1, 0); randomise so they are really compared
        for name, p in model.named_parameters():
            if "ln_" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model = random_hf_model()
    model.save_pretrained(path)
    return path, model


@pytest.mark.smoke
def test_load_hf_checkpoint_logits_match(hf_dir):
    path, hf = hf_dir
    ours = GPT.from_pretrained(path, backend="torch").eval()
    idx = torch.randint(0, 211, (3, 40))
    with torch.no_grad():
        expected = hf(idx).logits
        got, _ = ours(idx)
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.smoke
def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32,
                         backend="torch", vocab_multiple=64)).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        assert rel_err(hf(idx).logits, ours(idx)[0]) <= 1e-5
    # and back again, through our own loader
    again = GPT.from_pretrained(tmp_path, backend="torch").eval()
    with torch.no_grad():
        assert rel_err(again(idx)[0], ours(idx)[0]) <= 1e-6


def test_both_key_layouts_and_pytorch_bin(tmp_path, hf_dir):
    """The public gpt2 checkpoints have no `transformer.` prefix and carry attn.bias buffers."""
    path, hf = hf_dir
    state = {k[len("transformer."):]: v for k, v in hf.state_dict().items() if k.startswith("transformer.")}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    torch.save(state, tmp_path / "pytorch_model.bin")
    ours = GPT.from_pretrained(tmp_path, backend="torch").eval()
    idx = torch.randint(0, 211, (2, 25))
    with torch.no_grad():
        assert rel_err(ours(idx)[0], hf(idx).logits) <= 1e-5


def test_load_into_padded_vocab(hf_dir):
    path, hf = hf_dir
    ours = GPT.from_pretrained(path, backend="torch", vocab_multiple=64).eval()
    assert ours.lm_head.weight.shape[0] == 256
    idx = torch.randint(0, 211, (2, 25))
    with torch.no_grad():
        assert rel_err(ours(idx)[0], hf(idx).logits) <= 1e-5


def test_errors_name_the_file(tmp_path, hf_dir):
    path, _ = hf_dir
    with pytest.raises(UserInputError, match="nope: no such file or directory"):
        GPT.from_pretrained(tmp_path / "nope")
    with pytest.raises(UserInputError, match="neither a run folder .* nor a Hugging Face GPT-2 folder"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(UserInputError, match="no model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(tmp_path)
    blob = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserInputError, match="model.safetensors: cannot be read, truncated or damaged"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(blob)
    cfg = json.loads((path / "config.json").read_text())
    cfg["n_embd"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserInputError, match=r"model.safetensors: .* has shape .* the config"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserInputError, match="config.json: not valid JSON"):
        GPT.from_pretrained(tmp_path)
    del cfg["n_layer"]
    cfg["n_embd"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserInputError, match="config.json: missing key 'n_layer'"):
        GPT.from_pretrained(tmp_path)


def test_truncated_pytorch_bin(tmp_path, hf_dir):
    path, hf = hf_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    blob = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(blob[:1000])
    with pytest.raises(UserInputError, match="pytorch_model.bin: cannot be read"):
        GPT.from_pretrained(tmp_path)


def test_refuses_pickled_objects_as_unsafe(tmp_path, hf_dir):
    """weights_only loading: a .bin holding a pickled object is refused as unsafe,
    in one line that never relays torch's advice to load with weights_only=False."""
    import pathlib
    path, hf = hf_dir
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    torch.save({**hf.state_dict(), "payload": pathlib.PurePosixPath("x")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserInputError) as info:
        GPT.from_pretrained(tmp_path)
    message = str(info.value)
    assert message == (f"{tmp_path / 'pytorch_model.bin'}: refused as unsafe: it holds Python objects besides "
                       "tensors, which loading would have to execute; use a model.safetensors of this model")


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_a_sharded_folder_loads(tmp_path, hf_dir, safe):
    """save_pretrained(max_shard_size=...) splits the weights over several files
    behind an .index.json: they load as one, equal to the unsharded model."""
    path, hf = hf_dir
    if safe:
        hf.save_pretrained(tmp_path, max_shard_size="100KB")
        index = tmp_path / "model.safetensors.index.json"
    else:  # transformers 5 writes only safetensors: the older .bin layout by hand
        (tmp_path / "config.json").write_text((path / "config.json").read_text())
        state = hf.state_dict()
        names = sorted(state)
        weight_map = {}
        for i in range(3):
            part = {k: state[k].clone() for k in names[i::3]}
            torch.save(part, tmp_path / f"pytorch_model-0000{i + 1}-of-00003.bin")
            weight_map.update({k: f"pytorch_model-0000{i + 1}-of-00003.bin" for k in part})
        index = tmp_path / "pytorch_model.bin.index.json"
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert index.is_file() and len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    idx = torch.randint(0, 211, (2, 20))
    with torch.no_grad():
        assert rel_err(GPT.from_pretrained(tmp_path, backend="torch").eval()(idx)[0], hf(idx).logits) <= 1e-5
    weight_map = json.loads(index.read_text())["weight_map"]
    first = sorted(set(weight_map.values()))[0]
    (tmp_path / first).unlink()
    with pytest.raises(UserInputError, match=f"^{index}: lists '{first}', which is not a file in"):
        GPT.from_pretrained(tmp_path)


def save_variant(path, **fields):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=97,
                                  bos_token_id=96, eos_token_id=96, **fields)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    return model


# Each GPT2Config variant the model does not implement, and the words its refusal must hold.
REFUSED_VARIANTS = [
    (dict(scale_attn_by_inverse_layer_idx=True), "config.json: scale_attn_by_inverse_layer_idx is true"),
    (dict(scale_attn_weights=False), "config.json: scale_attn_weights is false"),
    (dict(add_cross_attention=True), "config.json: add_cross_attention is true"),
    (dict(n_inner=100), "config.json: n_inner 100 is not 4 * n_embd"),
    (dict(activation_function="gelu"), "config.json: activation_function 'gelu' is not GPT-2's tanh GELU"),
    (dict(activation_function="relu"), "config.json: activation_function 'relu'"),
    (dict(tie_word_embeddings=False), "lm_head.weight differs from wte.weight (an untied LM head, "
                                      "tie_word_embeddings=false)"),
]


@pytest.mark.parametrize("fields,needle", REFUSED_VARIANTS, ids=lambda v: str(v)[:40])
def test_unsupported_variant_is_refused(tmp_path, fields, needle):
    save_variant(tmp_path, **fields)
    with pytest.raises(UserInputError) as info:
        GPT.from_pretrained(tmp_path, backend="torch")
    assert needle in str(info.value)


@pytest.mark.parametrize("fields", [dict(reorder_and_upcast_attn=True), dict(layer_norm_epsilon=1e-3),
                                    dict(activation_function="gelu_pytorch_tanh"), dict(n_inner=128)],
                         ids=lambda v: str(v))
def test_supported_variant_matches_transformers(tmp_path, fields):
    """reorder_and_upcast_attn only changes the precision of the scores under
    half-precision autocast: in fp32 the function, and the logits, are GPT-2's."""
    hf = save_variant(tmp_path, **fields)
    ours = GPT.from_pretrained(tmp_path, backend="torch").eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        assert rel_err(ours(idx)[0], hf(idx).logits) <= 1e-5


def test_untied_flag_with_equal_head_loads_and_missing_head_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    save_variant(tmp_path, tie_word_embeddings=False)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["lm_head.weight"] = weights["transformer.wte.weight"].clone()
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    GPT.from_pretrained(tmp_path, backend="torch")  # equal to wte: tying them is exact
    del weights["lm_head.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserInputError, match="tie_word_embeddings is false in config.json but there is "
                                             "no lm_head.weight"):
        GPT.from_pretrained(tmp_path, backend="torch")
