"""Where a model comes from: a run folder, a trainer checkpoint file or a Hugging
Face GPT-2 folder; the tokenizer it was trained with; and a model built from a
trainer checkpoint.

- a run folder (`train.py --run-dir`): its newest checkpoint that loads; damaged
  newer ones are skipped and named in the description; one that is not the
  folder's run's (engine.checkpoint.check_belongs) is refused;
- a checkpoint file `ckpt_NNNNNN.pt` written by the trainer: its "model"
  weights, "model_config" and "tokenizer"; or a sharded checkpoint folder
  `ckpt_NNNNNN/` (FSDP runs), whose shards are gathered into the same weights;
- a Hugging Face GPT-2 folder (config.json and model.safetensors or
  pytorch_model.bin), read by `engine.hf`.

The model class is a parameter (`cls`), so this module sits below engine.model,
which dispatches `GPT.from_pretrained` here or to engine.hf.
"""
from __future__ import annotations

import json
import pathlib

import torch

from engine import checkpoint as ckpt_lib
from engine.config import GPTConfig
from engine.errors import UserInputError
from engine.tokenizer import TOKENIZER_OF_VOCAB

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Prefixes a state dict picks up when saved from a wrapped model.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def source_kind(source) -> str:
    """What `source` is: "run" (a run folder with checkpoints), "checkpoint" (a
    file) or "hf" (a Hugging Face folder). Raises UserInputError naming the path
    when it is none of them."""
    path = pathlib.Path(source)
    if not path.exists():
        raise UserInputError(f"{path}: no such file or directory (give a run folder, a checkpoint "
                             "file ckpt_NNNNNN.pt, or a Hugging Face GPT-2 folder)")
    if path.is_file():
        if path.name in HF_WEIGHT_FILES or path.name == "config.json":
            raise UserInputError(f"{path}: part of a Hugging Face GPT-2 folder; give the folder "
                                 f"{path.parent}")
        return "checkpoint"
    if ckpt_lib.is_sharded(path):
        return "checkpoint"
    if ckpt_lib.list_checkpoints(path):
        return "run"
    config = path / "config.json"
    if config.is_file():
        data = _read_json(config)
        if isinstance(data, dict) and "train" in data and "model" in data:
            raise UserInputError(f"{path}: a run folder that holds no checkpoint (ckpt_NNNNNN.pt) yet; "
                                 "the trainer writes one every --checkpoint-interval steps and at the end")
        return "hf"
    raise UserInputError(f"{path}: neither a run folder (no ckpt_NNNNNN.pt) nor a Hugging Face GPT-2 "
                         "folder (no config.json)")


def read_checkpoint(source, weights: bool = True) -> tuple[dict, pathlib.Path, list[str]]:
    """(checkpoint dict, its file, notes) for a checkpoint (file or sharded folder)
    or a run folder. A run folder gives its newest checkpoint that loads; each
    newer one that does not is named in `notes`. A sharded checkpoint's "model"
    is its gathered weights (left out with weights=False)."""
    path = pathlib.Path(source)
    if path.is_file() or ckpt_lib.is_sharded(path):
        found, ckpt, notes = path, ckpt_lib.load_checkpoint(path), []
    else:
        candidates = ckpt_lib.list_checkpoints(path)
        if not candidates:
            raise UserInputError(f"{path}: holds no checkpoint (ckpt_NNNNNN.pt)")
        found, ckpt, skipped = ckpt_lib.load_newest(candidates)
        notes = [f"skipped {p.name}: {e}" for p, e in skipped]
        if found is None:
            raise UserInputError(f"{path}: none of its {len(candidates)} checkpoints loads; newest: {notes[0]}")
    ckpt_lib.check_belongs(found, ckpt)
    if weights and ckpt.get("sharded"):
        from engine.sharded_checkpoint import full_model_state
        ckpt["model"] = full_model_state(found, dict(ckpt["model_config"]))
    return ckpt, found, notes


def checkpoint_tokenizer_name(ckpt: dict) -> str:
    """The tokenizer a checkpoint was trained with (older ones: by vocabulary)."""
    name = ckpt.get("tokenizer")
    if isinstance(name, str) and name:
        return name
    return hf_tokenizer_name(dict(ckpt.get("model_config") or {}).get("vocab_size"))


def hf_tokenizer_name(vocab_size: int) -> str:
    # A Hugging Face GPT-2 folder (and an old checkpoint) carries no tokenizer name:
    # GPT-2 BPE, except for this engine's byte-level models, known by their vocabulary.
    return TOKENIZER_OF_VOCAB.get(vocab_size, "gpt2")


def source_tokenizer_name(source) -> str:
    """The tokenizer the model at `source` was trained with: "gpt2" or "bytes".
    Reads only config.json for a Hugging Face folder."""
    path = pathlib.Path(source)
    if source_kind(path) == "hf":
        data = _read_json(path / "config.json")
        vocab = data.get("vocab_size") if isinstance(data, dict) else None
        return hf_tokenizer_name(vocab)
    ckpt, _, _ = read_checkpoint(path, weights=False)
    return checkpoint_tokenizer_name(ckpt)


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def model_from_checkpoint(cls, ckpt: dict, where: str, **overrides):
    """A `cls` (GPT) built from a trainer checkpoint's model_config with
    `overrides` (GPTConfig fields: backend, vocab_multiple, dropout, ...) and its
    weights. The vocabulary padding may differ from the saved model's: the real
    rows are copied, padded rows keep their init (they are never output)."""
    try:
        config = GPTConfig.from_dict({**dict(ckpt["model_config"]), **overrides})
    except (TypeError, ValueError) as e:
        raise UserInputError(f"{where}: model_config: {e}") from None
    model = cls(config)
    saved = {_strip_wrappers(k): v for k, v in dict(ckpt["model"]).items()}
    ours = model.state_dict()
    vocab = config.vocab_size
    missing = []
    for key, dest in ours.items():
        if key == "lm_head.weight":
            continue  # tied to the token embedding
        src = saved.get(key)
        if not isinstance(src, torch.Tensor):
            missing.append(key)
            continue
        if key == "transformer.wte.weight":
            src, dest = src[:vocab], dest[:vocab]
        if tuple(src.shape) != tuple(dest.shape):
            raise UserInputError(f"{where}: {key} has shape {tuple(src.shape)}, its model_config "
                                 f"implies {tuple(dest.shape)}")
        with torch.no_grad():
            dest.copy_(src)
    unexpected = sorted(set(saved) - set(ours))
    if missing or unexpected:
        what = (f"missing {', '.join(missing[:3])}" if missing else
                f"unexpected {', '.join(unexpected[:3])}")
        raise UserInputError(f"{where}: its weights do not fit its model_config ({what})")
    return model


def load_engine_model(cls, source, **overrides):
    """(model, tokenizer name, description) from a run folder or a checkpoint file."""
    ckpt, path, notes = read_checkpoint(source)
    model = model_from_checkpoint(cls, ckpt, str(path), **overrides)
    step = ckpt.get("step")
    what = f"checkpoint {path}" + (f" (step {step})" if isinstance(step, int) else "")
    if notes:
        what += " [" + "; ".join(notes) + "]"
    return model, checkpoint_tokenizer_name(ckpt), what
