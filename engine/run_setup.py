"""The pieces a Trainer is wired from: device and dtype, data, model, run folder,
config.json and the header lines of the log. Each takes what it needs and
returns what it built; engine.trainer puts them together."""
from __future__ import annotations

import dataclasses
import json
import pathlib
from dataclasses import dataclass

import torch

from engine import checkpoint as ckpt_lib
from engine import distributed as dist_lib
from engine.config import GPTConfig
from engine.errors import UserInputError
from engine.fileio import atomic_write, os_reason
from engine.run_dir import RunFolder, create_auto_folder
from engine.run_errors import RunFileError


def resolve_device(name: str) -> str:
    mps_ok = torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("device (--device) cuda: no CUDA GPU is available; use --device cpu")
    if name == "mps" and not mps_ok:
        raise UserInputError("device (--device) mps: MPS is not available; use --device cpu")
    return name


def resolve_dtype(name: str, device_type: str) -> str:
    if name == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return name


def resolve_residual_dtype(name: str, dtype: str, device_type: str) -> str:
    """auto: a bf16 stream where the matmuls run in bf16 on CUDA (bench/NOTES.md
    holds the convergence comparison behind it), fp32 otherwise."""
    if name == "auto":
        return "bf16" if dtype == "bf16" and device_type == "cuda" else "fp32"
    return name


@dataclass
class RunData:
    tokenizer: object
    tokenizer_reason: str
    corpus_note: str  # what the default corpus is, when no --data was given
    data_path: str
    train_loader: object
    val_loader: object


def load_data(cfg, info: dist_lib.DistInfo, device_type: str) -> RunData:
    from engine.data import build_loader, resolve_default_corpus
    from engine.tokenizer import load_tokenizer, tokenizer_for_model
    # A run that continues a trained model takes that model's tokenizer, and fails
    # here, before any training, when it cannot be loaded: "auto" never falls back
    # to bytes for a model trained on GPT-2 BPE.
    if cfg.resume:
        tokenizer, reason = tokenizer_for_model("auto", cfg.tokenizer, f"--resume {cfg.resume}")
    elif cfg.init_from:
        from engine.load import source_tokenizer_name
        tokenizer, reason = tokenizer_for_model(cfg.tokenizer, source_tokenizer_name(cfg.init_from),
                                                f"--init-from {cfg.init_from}")
    else:
        tokenizer, reason = load_tokenizer(cfg.tokenizer)
    note = ""
    data_path = cfg.data
    if not data_path:
        data_path, note = resolve_default_corpus()
    common = dict(rank=info.rank, world_size=info.world_size, tokenizer=tokenizer,
                  val_fraction=cfg.val_fraction, seed=cfg.seed, pin_memory=device_type == "cuda",
                  requested_tokenizer=cfg.tokenizer)
    return RunData(tokenizer, reason, note, str(data_path),
                   build_loader(data_path, cfg.batch_size, cfg.seq_len, split="train", **common),
                   build_loader(data_path, cfg.batch_size, cfg.seq_len, split="val", **common))


def build_model(cfg, state, *, backend: str, vocab_size: int, device, dtype: str):
    """The GPT of a run: the checkpoint's architecture and residual dtype (resume),
    a Hugging Face checkpoint (init_from) or a preset with overrides; seeded by cfg.seed."""
    from engine.model import GPT
    torch.manual_seed(cfg.seed)
    if state is not None:
        try:
            mc = GPTConfig.from_dict(dict(state["model_config"]))
        except (TypeError, ValueError, KeyError) as e:
            raise ckpt_lib.CheckpointError(cfg.resume, f"its model_config is invalid: {e}", damaged=False) from None
        model = GPT(dataclasses.replace(mc, backend=backend, fusions=cfg.fusions))
    elif cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from, backend=backend, vocab_multiple=cfg.vocab_multiple,
                                    dropout=cfg.dropout, residual_dtype=cfg.residual_dtype,
                                    fusions=cfg.fusions)
    else:
        overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k)}
        try:
            mc = GPTConfig.from_preset(cfg.model, vocab_size=vocab_size, vocab_multiple=cfg.vocab_multiple,
                                       dropout=cfg.dropout, backend=backend,
                                       residual_dtype=cfg.residual_dtype, fusions=cfg.fusions,
                                       **overrides)
        except ValueError as e:
            raise UserInputError(f"model: {e}") from None
        model = GPT(mc)
    model.to(device)
    if dtype == "bf16-params":
        model.to(torch.bfloat16)
    return model


def claim_run_dir(cfg, resume_path, info: dist_lib.DistInfo, token: str, log=print):
    """(folder path, RunFolder held by rank 0 or None): rank 0 chooses, creates and
    locks the folder (engine.run_dir); every rank gets the same folder, or the
    same error."""
    path = error = folder = None
    if info.master:
        try:
            if cfg.run_dir != "auto":
                path = pathlib.Path(cfg.run_dir)
            elif resume_path is not None:
                path = resume_path.parent
            else:
                path = create_auto_folder()
            folder = RunFolder(path, token)
            folder.claim()
            here = resume_path is not None and resume_path.parent.resolve() == path.resolve()
            folder.check_free(resuming_here=here, overwrite=cfg.overwrite, log=log)
        except UserInputError as e:
            error = str(e)
            if folder is not None:
                folder.release()
    path, error = dist_lib.broadcast_object((str(path), error), info)
    if error:
        raise UserInputError(error)
    return pathlib.Path(path), folder


def write_config_json(run_dir: pathlib.Path, cfg, model_config, token: str) -> None:
    config = json.dumps({"train": cfg.to_dict(), "model": model_config.to_dict()}, indent=2)
    try:
        atomic_write(run_dir / "config.json", lambda f: f.write(config.encode()), tmp_prefix=f".config.json.{token}.")
    except OSError as e:
        raise RunFileError(f"{run_dir / 'config.json'}: could not write ({os_reason(e)})") from None


def header_lines(t, graph_reason: str, optimizer_lines: list[str], resume_path) -> list[str]:
    """The log's first lines: what this run uses, and why where it was chosen."""
    info, cfg, c = t.dist, t.cfg, t.model_config
    if t.optimizer_kind == "triton":
        optimizer = "triton FusedAdamW"
    else:
        optimizer = "torch AdamW" + (" (fused)" if any(g.get("fused") for g in t.optimizer.param_groups) else "")
    source = (f"from {resume_path}" if resume_path else f"from {cfg.init_from}" if cfg.init_from
              else f"preset {cfg.model}")
    lines = [
        f"device: {t.device}{f' (DDP, world size {info.world_size})' if info.ddp else ''} | dtype: {t.dtype} "
        f"(residual stream {c.residual_dtype}) | "
        f"backend: {t.backend} | optimizer: {optimizer}",
        f"model: {source}: n_layer={c.n_layer} n_head={c.n_head} n_embd={c.n_embd} block_size={c.block_size} "
        f"vocab={c.vocab_size} (padded {c.padded_vocab_size}) | {t.raw_model.num_parameters():,} parameters",
        *optimizer_lines,
        f"tokenizer: {t.tokenizer.name} ({t.data.tokenizer_reason})",
        f"corpus: {t.data.corpus_note or t.data.data_path}",
        f"train data: {t.train_loader.description}",
        f"val data: {t.val_loader.description}",
        f"total batch: {cfg.total_batch_size:,} tokens = {cfg.batch_size} x {cfg.seq_len} x "
        f"{info.world_size} process(es) x {t.accum} accumulation step(s)",
        f"cuda graphs: {'on' if t.use_graphs else 'off'} ({graph_reason})",
    ]
    if t.dtype == "bf16-params" and t.optimizer_kind == "torch":
        lines.append("note: with bf16-params, torch's AdamW keeps its moments in bf16 (the parameters' dtype); "
                     "--optimizer triton keeps them in fp32")
    lines.append(f"run folder: {t.run_dir}" + (f" | resumed from {resume_path} at step {t.step}" if resume_path
                                              else ""))
    return lines
