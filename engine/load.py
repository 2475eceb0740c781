"""Load a trained model for use: from a run folder, a checkpoint file, or a
Hugging Face GPT-2 folder.

- a run folder (`train.py --run-dir`): its newest checkpoint that loads; damaged
  newer ones are skipped and named in the description; one that is not the
  folder's run's (engine.checkpoint.check_belongs) is refused;
- a checkpoint file `ckpt_NNNNNN.pt` written by the trainer: its "model"
  weights, "model_config" and "tokenizer"; or a sharded checkpoint folder
  `ckpt_NNNNNN/` (FSDP runs), whose shards are gathered into the same weights;
- a Hugging Face GPT-2 folder (config.json and model.safetensors or
  pytorch_model.bin), through `engine.hf`.

`load_model` is what sample.py and the HellaSwag evaluation use;
`GPT.from_pretrained` reaches the same code for the first two kinds
(`engine.hf.load_pretrained` dispatches here).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import torch

from engine import checkpoint as ckpt_lib
from engine.config import BACKENDS, GPTConfig
from engine.errors import UserInputError

SOURCE_KINDS = ("run", "checkpoint", "hf")
DTYPES = ("fp32", "bf16", "fp16")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Prefixes a state dict picks up when saved from a wrapped model.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def add_model_flags(parser) -> None:
    """--device, --dtype and --backend, as sample.py and the evaluation take them."""
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="autocast dtype over fp32 weights; auto: bf16 on CUDA, fp32 elsewhere")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help="op backend; auto: triton on CUDA, torch elsewhere")


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
    vocab = dict(ckpt.get("model_config") or {}).get("vocab_size")
    return "bytes" if vocab == 256 else "gpt2"


def hf_tokenizer_name(vocab_size: int) -> str:
    # A Hugging Face GPT-2 folder carries no tokenizer name here: GPT-2 BPE,
    # except for this engine's byte-level models exported with save_pretrained.
    return "bytes" if vocab_size == 256 else "gpt2"


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


def resolve_device(name: str) -> torch.device:
    """auto: cuda > mps > cpu. A device that is not there is refused in one line."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserInputError(f"--device {name}: not a device (cpu, cuda, cuda:N, mps, auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {name}: no CUDA GPU is available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserInputError(f"--device {name}: MPS is not available; use --device cpu")
    elif device.type != "cpu":
        raise UserInputError(f"--device {name}: unsupported; use cpu, cuda or mps")
    return device


def resolve_backend_for(name: str, device: torch.device) -> str:
    from engine.ops import resolve_backend
    try:
        return resolve_backend(name, device.type)
    except (RuntimeError, ValueError) as e:
        raise UserInputError(f"--backend {name}: {e}") from None


def autocast_context(dtype: str, device: torch.device):
    """A callable giving a fresh context for the forward passes: `auto` is bf16
    autocast on CUDA and fp32 elsewhere (as in training); bf16 and fp16 autocast
    over fp32 weights."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise UserInputError(f"--dtype {dtype}: choose one of auto, {', '.join(DTYPES)}")
    from engine.step import autocast_factory
    return autocast_factory(dtype, device.type)


def describe(model) -> str:
    c = model.config
    return (f"{c.n_layer} layers, {c.n_head} heads, {c.n_embd} wide, block {c.block_size}, "
            f"vocab {c.vocab_size}, {model.num_parameters():,} parameters")


def load_model(source, *, device="cpu", backend: str = "auto", dtype: str = "fp32"):
    """(model, tokenizer name, description) for a run folder, a checkpoint file or
    a Hugging Face GPT-2 folder, in eval mode on `device`.

    `backend` is auto | torch | triton (auto: triton on CUDA, torch elsewhere),
    checked against the device; `dtype` is the weights' dtype (fp32 | bf16 |
    fp16); for mixed precision keep fp32 and use `autocast_context`.
    Raises UserInputError (one line naming the path) for anything it cannot load.
    """
    from engine.model import GPT
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if dtype not in DTYPES:
        raise UserInputError(f"load_model: dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    resolved = resolve_backend_for(backend, device)
    kind = source_kind(source)

    def build(backend_name):
        if kind == "hf":
            from engine.hf import load_hf_folder
            model = load_hf_folder(GPT, source, backend=backend_name)
            return (model, hf_tokenizer_name(model.config.vocab_size),
                    f"Hugging Face GPT-2 folder {source}")
        return load_engine_model(GPT, source, backend=backend_name)

    model, tokenizer_name, what = build(resolved)
    model = model.to(device=device, dtype=TORCH_DTYPES[dtype]).eval()
    if resolved == "triton":
        problem = _kernels_refuse(model, device)
        if problem and backend != "auto":
            raise UserInputError(f"--backend triton: {problem}; use --backend torch")
        if problem:
            weights = model.state_dict()
            model = GPT(dataclasses.replace(model.config, backend="torch"))
            model.load_state_dict(weights)
            model = model.to(device=device, dtype=TORCH_DTYPES[dtype]).eval()
            what += f" | backend torch: the triton kernels refuse this model ({problem})"
    return model, tokenizer_name, f"{what} | {describe(model)}"


def _kernels_refuse(model, device) -> str | None:
    """The kernels' own refusal of this model's shapes (e.g. a head dim they do
    not support), found by one forward on one token; None when they accept it."""
    try:
        with torch.no_grad():
            model(torch.zeros((1, 1), dtype=torch.long, device=device))
    except (ValueError, TypeError) as e:
        return str(e)
    return None
