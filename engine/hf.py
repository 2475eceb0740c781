"""Hugging Face GPT-2 checkpoints: load one into GPT, write one from it.

Weights are read with safetensors or `torch.load(weights_only=True)`: never by
unpickling arbitrary objects. HF's GPT-2 stores its projections as Conv1D,
(in, out), where nn.Linear holds (out, in): those four are transposed.
"""
from __future__ import annotations

import json
import pathlib
import pickle

import torch

from engine.config import GPTConfig
from engine.errors import UserInputError
from engine.fileio import atomic_write

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers, not weights
GELU_TANH_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# GPT2Config switches that change the function the network computes, the value
# GPT-2 (and this engine) has, and what the other value would mean. A checkpoint
# with the other value is refused: it would load and give wrong logits.
# `reorder_and_upcast_attn` is not here: it computes the same attention scores,
# only in fp32 under half-precision autocast (a training-stability switch), and
# this engine's attention already accumulates its scores in fp32.
# `layer_norm_epsilon` is supported (GPTConfig.layer_norm_eps); dropout
# probabilities and the `summary_*` fields of the double-heads model do not
# touch a language model's logits.
MATH_SWITCHES = (
    ("scale_attn_weights", True, "attention scores without the 1/sqrt(head_dim) scale"),
    ("scale_attn_by_inverse_layer_idx", False, "attention scores also scaled by 1/(layer index + 1)"),
    ("add_cross_attention", False, "cross-attention layers (an encoder-decoder variant)"),
)


def _read_config(path: pathlib.Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserInputError(f"{config_file}: missing (a Hugging Face GPT-2 directory needs config.json)")
    try:
        data = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserInputError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{config_file}: expected a JSON object of GPT-2 config fields")
    return data


def config_from_hf(hf: dict, source: str, **overrides) -> GPTConfig:
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise UserInputError(f"{source}: model_type is {model_type!r}, expected 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_TANH_NAMES:
        raise UserInputError(f"{source}: activation_function {act!r} is not GPT-2's tanh GELU "
                             f"({', '.join(GELU_TANH_NAMES)}); this model does not implement it")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 768)):
        raise UserInputError(f"{source}: n_inner {hf['n_inner']} is not 4 * n_embd; this model's MLP "
                             "is 4 * n_embd wide")
    for field, gpt2_value, meaning in MATH_SWITCHES:
        value = hf.get(field, gpt2_value)
        if value != gpt2_value:
            raise UserInputError(f"{source}: {field} is {json.dumps(value)} ({meaning}); this model "
                                 f"implements only {json.dumps(gpt2_value)}, GPT-2's")
    try:
        fields = dict(
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            bias=True,
            dropout=0.0,
        )
    except KeyError as e:
        raise UserInputError(f"{source}: missing key {e.args[0]!r}") from None
    fields.update(overrides)
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        raise UserInputError(f"{source}: {e}") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _read_safetensors(file: pathlib.Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise UserInputError(f"{file}: reading it needs the safetensors package "
                             "(pip install safetensors)") from None
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for damaged files
        raise UserInputError(f"{file}: cannot be read, truncated or damaged ({_first_line(e)})") from None


def _read_bin(file: pathlib.Path) -> dict:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises weights_only=False, which would run the
        # file's code: never relay it.
        raise UserInputError(f"{file}: refused as unsafe: it holds Python objects besides tensors, which "
                             "loading would have to execute; use a model.safetensors of this model") from None
    except Exception as e:
        raise UserInputError(f"{file}: cannot be read, truncated or damaged ({_first_line(e)})") from None


def _read_sharded(index: pathlib.Path, read) -> dict:
    """A state dict split over several files, as save_pretrained(max_shard_size=...)
    writes it: the index's weight_map names each tensor's file in the folder."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserInputError(f"{index}: not a readable index of weight files ({_first_line(e)})") from None
    state = {}
    for name in files:
        file = index.parent / str(name)
        if pathlib.Path(str(name)).name != name or not file.is_file():
            raise UserInputError(f"{index}: lists {name!r}, which is not a file in {index.parent}")
        state.update(read(file))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise UserInputError(f"{index}: {missing[0]} is not in the file it lists ({weight_map[missing[0]]})")
    return state


def _load_state_dict(path: pathlib.Path) -> tuple[dict, pathlib.Path]:
    """The folder's weights and the file they came from: model.safetensors,
    pytorch_model.bin, or either sharded behind its .index.json."""
    for name, read in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_bin)):
        if (path / name).is_file():
            return read(path / name), path / name
        index = path / f"{name}.index.json"
        if index.is_file():
            return _read_sharded(index, read), index
    raise UserInputError(f"{path}: no model.safetensors or pytorch_model.bin (nor a sharded one with its "
                         ".index.json)")


def _check_lm_head(hf_state: dict, hf_config: dict, weights_file) -> None:
    """This model ties the LM head to the token embedding: an lm_head.weight that
    differs from wte (an untied head) is refused, and so is a config that says the
    head is untied without providing one."""
    heads = [k for k in hf_state if k.endswith("lm_head.weight")]
    wtes = [k for k in hf_state if k.endswith("wte.weight")]
    tied = hf_config.get("tie_word_embeddings", True)
    if not heads:
        if tied is False:
            raise UserInputError(f"{weights_file}: tie_word_embeddings is false in config.json but there "
                                 "is no lm_head.weight; this model ties the LM head to wte")
        return
    head = hf_state[heads[0]]
    wte = hf_state[wtes[0]] if wtes else None
    if wte is None or head.shape != wte.shape or not torch.equal(head, wte):
        raise UserInputError(f"{weights_file}: lm_head.weight differs from wte.weight (an untied LM "
                             f"head, tie_word_embeddings={json.dumps(tied)}); this model ties them")


def load_hf_folder(cls, path, **overrides):
    """A `cls` (GPT) from a Hugging Face GPT-2 folder; variants the model does not
    implement are refused, naming the config field or weight."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise UserInputError(f"{path}: not a directory (expected a Hugging Face GPT-2 checkpoint)")
    hf_config = _read_config(path)
    config = config_from_hf(hf_config, str(path / "config.json"), **overrides)
    hf_state, weights_file = _load_state_dict(path)
    _check_lm_head(hf_state, hf_config, weights_file)

    model = cls(config)
    ours = model.state_dict()
    loaded = set()
    for key, tensor in hf_state.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight":
            continue  # equal to wte (checked above), which is loaded
        target = f"transformer.{name}"
        if target not in ours:
            raise UserInputError(f"{weights_file}: unexpected key {key!r} for a GPT-2 model")
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        dest = ours[target]
        if name == "wte.weight":
            dest = dest[: config.vocab_size]  # padded rows stay at their init
        if tuple(tensor.shape) != tuple(dest.shape):
            raise UserInputError(f"{weights_file}: {key!r} has shape {tuple(tensor.shape)}, the config "
                                 f"in config.json implies {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(tensor)
        loaded.add(target)
    missing = sorted(set(ours) - loaded - {"lm_head.weight"})
    if missing:
        raise UserInputError(f"{weights_file}: missing weights {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}")
    return model


def hf_config_dict(config: GPTConfig) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_head": config.n_head,
        "n_layer": config.n_layer,
        "n_inner": None,
        "vocab_size": config.vocab_size,
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "initializer_range": 0.02,
        # GPT-2's <|endoftext|> is the last id of its 50257-token vocabulary.
        "bos_token_id": 50256 if config.vocab_size == 50257 else None,
        "eos_token_id": 50256 if config.vocab_size == 50257 else None,
        "tie_word_embeddings": True,
    }


def save_pretrained(model, path) -> None:
    if not model.config.bias:
        raise ValueError("save_pretrained: Hugging Face GPT-2 has biases; this model has bias=False")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: HF rebuilds it from wte
        tensor = tensor.detach().to("cpu", torch.float32)
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        if name == "transformer.wte.weight":
            tensor = tensor[: config.vocab_size]
        state[name] = tensor.contiguous().clone()

    try:
        from safetensors.torch import save as safetensors_bytes
    except ImportError:
        atomic_write(path / "pytorch_model.bin", lambda f: torch.save(state, f))
    else:
        atomic_write(path / "model.safetensors",
                     lambda f: f.write(safetensors_bytes(state, metadata={"format": "pt"})))
    atomic_write(path / "config.json",
                 lambda f: f.write(json.dumps(hf_config_dict(config), indent=2).encode()))
