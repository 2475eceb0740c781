"""Load a trained model for use: from a run folder, a checkpoint file, or a
Hugging Face GPT-2 folder (engine.sources says which, and reads it).

`load_model` is what sample.py and the HellaSwag evaluation use; it adds the
device, the dtype and the backend check to `GPT.from_pretrained`.
"""
from __future__ import annotations

import dataclasses

import torch

from engine.config import INFERENCE_DTYPES
from engine.errors import UserInputError
from engine.hf import load_hf_folder
from engine.model import GPT
from engine.sources import hf_tokenizer_name, load_engine_model, source_kind
from engine.step import TORCH_DTYPES, autocast_factory


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
    if dtype not in INFERENCE_DTYPES:
        raise UserInputError(f"--dtype {dtype}: choose one of auto, {', '.join(INFERENCE_DTYPES)}")
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
    device = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if dtype not in INFERENCE_DTYPES:
        raise UserInputError(f"load_model: dtype {dtype!r}; choose one of {', '.join(INFERENCE_DTYPES)}")
    resolved = resolve_backend_for(backend, device)
    kind = source_kind(source)

    def build(backend_name):
        if kind == "hf":
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
