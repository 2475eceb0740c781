"""The pieces a Trainer is wired from: device and dtype, data, model, run folder,
config.json and the header lines of the log. Each takes what it needs and
returns what it built; engine.trainer puts them together."""
from __future__ import annotations

import dataclasses
import json
import os
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
    data_hash: str  # engine.data.fingerprint: lets a resumed run find its data at a new path
    train_loader: object
    val_loader: object


def load_data(cfg, info: dist_lib.DistInfo, device_type: str) -> RunData:
    from engine.data import build_loader, resolve_default_corpus
    from engine.data.fingerprint import content_hash
    from engine.tokenizer import load_tokenizer, tokenizer_for_model
    # A run that continues a trained model takes that model's tokenizer, and fails
    # here, before any training, when it cannot be loaded: "auto" never falls back
    # to bytes for a model trained on GPT-2 BPE.
    if cfg.resume:
        tokenizer, reason = tokenizer_for_model("auto", cfg.tokenizer, f"--resume {cfg.resume}")
    elif cfg.init_from:
        from engine.sources import source_tokenizer_name
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
    train = build_loader(data_path, cfg.batch_size, cfg.seq_len, split="train", **common)
    val = build_loader(data_path, cfg.batch_size, cfg.seq_len, split="val", **common)
    try:
        data_hash = content_hash(data_path)
    except OSError as e:
        raise UserInputError(f"{data_path}: cannot read it ({e.strerror or e})") from None
    return RunData(tokenizer, reason, note, str(data_path), data_hash, train, val)


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
        model = GPT(dataclasses.replace(mc, backend=backend, fusions=cfg.fusions,
                                        deterministic=cfg.deterministic))
    elif cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from, backend=backend, vocab_multiple=cfg.vocab_multiple,
                                    dropout=cfg.dropout, residual_dtype=cfg.residual_dtype,
                                    fusions=cfg.fusions, deterministic=cfg.deterministic)
    else:
        overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k)}
        try:
            mc = GPTConfig.from_preset(cfg.model, vocab_size=vocab_size, vocab_multiple=cfg.vocab_multiple,
                                       dropout=cfg.dropout, backend=backend,
                                       residual_dtype=cfg.residual_dtype, fusions=cfg.fusions,
                                       deterministic=cfg.deterministic, **overrides)
        except ValueError as e:
            raise UserInputError(f"model: {e}") from None
        model = GPT(mc)
    model.to(device)
    if dtype == "bf16-params":
        model.to(torch.bfloat16)
    return model


def claim_run_dir(cfg, resume_path, info: dist_lib.DistInfo, token: str):
    """(folder path, RunFolder held by rank 0 or None): rank 0 chooses, creates and
    locks the folder (engine.run_dir); every rank gets the same folder, or the
    same error. Nothing in it changes yet (RunFolder.start_writing does that)."""
    path = error = folder = None
    if info.master:
        try:
            made = []
            if cfg.run_dir != "auto":
                path = pathlib.Path(cfg.run_dir)
            elif resume_path is not None:
                path = resume_path.parent
            else:
                path, made = create_auto_folder()
            folder = RunFolder(path, token, created=made)
            folder.claim()
            here = resume_path is not None and resume_path.parent.resolve() == path.resolve()
            folder.check_free(resuming_here=here, overwrite=cfg.overwrite)
        except UserInputError as e:
            error = str(e)
            if folder is not None:
                folder.release(remove_if_unused=True)
    path, error = dist_lib.broadcast_object((str(path), error), info)
    if error:
        raise UserInputError(error)
    return pathlib.Path(path), folder


def write_config_json(run_dir: pathlib.Path, cfg, model_config, token: str, run_id: str | None) -> None:
    """The run's configuration, and its run id: what makes the folder's checkpoints
    recognisably its own (engine.checkpoint.check_belongs)."""
    config = json.dumps({"run_id": run_id, "train": cfg.to_dict(), "model": model_config.to_dict()}, indent=2)
    try:
        atomic_write(run_dir / "config.json", lambda f: f.write(config.encode()), tmp_prefix=f".config.json.{token}.")
    except OSError as e:
        raise RunFileError(f"{run_dir / 'config.json'}: could not write ({os_reason(e)})") from None


def describe_optimizer(kind: str, optimizer, parallel: str = "none") -> str:
    if kind == "triton":
        return "triton FusedAdamW" + (" on each process's shards" if parallel == "fsdp" else "")
    return "torch AdamW" + (" (fused)" if any(g.get("fused") for g in optimizer.param_groups) else "")


def thread_line(device_type: str) -> str:
    """How many threads torch's CPU ops use, and why it matters on a shared machine."""
    threads, cores = torch.get_num_threads(), os.cpu_count()
    omp = os.environ.get("OMP_NUM_THREADS")
    line = f"cpu threads: {threads} of {cores} cores" + (f" (OMP_NUM_THREADS={omp})" if omp else "")
    if device_type == "cpu" and threads > 1:
        # torch's threads wait for each other: on a machine busy with other work one
        # thread can be several times faster.
        line += "; on a busy machine OMP_NUM_THREADS=1 is often faster"
    return line


def header_lines(cfg, info: dist_lib.DistInfo, *, device, dtype: str, backend: str, optimizer: str,
                 optimizer_lines: list[str], model, source: str, data: RunData, accum: int,
                 graphs: tuple[bool, str], run_dir, resumed) -> list[str]:
    """The log's first lines: what this run uses, and why where it was chosen.
    `resumed` is (checkpoint path, step) for a resumed run, else None."""
    c = model.config
    parallel = f" ({info.parallel.upper()}, world size {info.world_size})" if info.parallel != "none" else ""
    lines = [
        f"device: {device}{parallel} | dtype: {dtype} (residual stream {c.residual_dtype}) | "
        f"backend: {backend} | optimizer: {optimizer}",
        thread_line(torch.device(device).type),
        f"model: {source}: n_layer={c.n_layer} n_head={c.n_head} n_embd={c.n_embd} block_size={c.block_size} "
        f"vocab={c.vocab_size} (padded {c.padded_vocab_size}) | {model.num_parameters():,} parameters",
        *optimizer_lines,
        f"tokenizer: {data.tokenizer.name} ({data.tokenizer_reason})",
        f"corpus: {data.corpus_note or data.data_path}",
        f"train data: {data.train_loader.description}",
        f"val data: {data.val_loader.description}",
        f"total batch: {cfg.total_batch_size:,} tokens = {cfg.batch_size} x {cfg.seq_len} x "
        f"{info.world_size} process(es) x {accum} accumulation step(s)",
        f"cuda graphs: {'on' if graphs[0] else 'off'} ({graphs[1]})",
    ]
    if dtype == "bf16-params" and optimizer.startswith("torch"):
        lines.append("note: with bf16-params, torch's AdamW keeps its moments in bf16 (the parameters' dtype); "
                     "--optimizer triton keeps them in fp32")
    lines.append(f"run folder: {run_dir}" + (f" | resumed from {resumed[0]} at step {resumed[1]}" if resumed
                                            else ""))
    return lines
