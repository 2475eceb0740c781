"""The training loop: build-nanogpt's train_gpt2.py, made into a tool.

`TrainConfig` holds every hyperparameter (train.py builds its command line from
it); `Trainer(cfg).run()` trains. Per step: gradient accumulation over micro-
steps (forward under autocast, loss / accum, backward), the global grad norm
clipped, a linear-warmup + cosine learning rate, AdamW. One log line and one CSV
row per step, the val loss every eval_interval steps, samples every
sample_interval steps, checkpoints every checkpoint_interval steps, a loss-curve
PNG at the end. Under torchrun the model is wrapped in DDP and rank 0 logs and
writes every file. On CUDA with the triton backend the whole step can be
captured in a CUDA graph (engine.cuda_graph).

Fields whose default is "auto" (None for numbers) are resolved at startup from
the device: the tiny preset with a one-minute schedule on CPU/MPS, GPT-2 124M with
build-nanogpt's schedule on CUDA (see AUTO_DEFAULTS).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import pathlib
import time
from dataclasses import dataclass, field

import torch

from engine import checkpoint as ckpt_lib
from engine import distributed as dist_lib
from engine.config import PRESETS, GPTConfig
from engine.cuda_graph import GRAPH_MODES, GraphedTrainStep, graph_decision
from engine.errors import UserInputError
from engine.optim import OPTIMIZERS, configure_optimizer, resolve_optimizer, set_lr

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "bf16-params")
TOKENIZERS = ("auto", "gpt2", "bytes")
SAMPLE_PROMPT = "Hello, I'm a language model,"
CSV_FIELDS = ("step", "loss", "lr", "grad_norm", "dt_ms", "tokens_per_sec", "val_loss")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the run stops and the last checkpoint stays as it was."""


def _f(default, help, auto=None):
    """A dataclass field with its help text (and, for auto fields, what auto means)."""
    return field(default=default, metadata={"help": help, "auto": auto})


# What "auto" means, per device kind. CUDA: GPT-2 124M as build-nanogpt trains it
# (0.5M tokens per step, 10B tokens); CPU/MPS: a tiny model whose loss visibly
# falls in about a minute on 2 cores.
AUTO_DEFAULTS = {
    "cpu": dict(model="tiny", batch_size=8, seq_len=64, total_batch_size=None, max_steps=60,
                warmup_steps=5, max_lr=3e-3, eval_interval=20, eval_batches=2,
                sample_interval=60, checkpoint_interval=60, vocab_multiple=1),
    "cuda": dict(model="gpt2", batch_size=64, seq_len=1024, total_batch_size=524288,
                 max_steps=19073, warmup_steps=715, max_lr=6e-4, eval_interval=250,
                 eval_batches=20, sample_interval=250, checkpoint_interval=5000,
                 vocab_multiple=64),
}


def _auto_text(name: str) -> str:
    cpu, cuda = AUTO_DEFAULTS["cpu"].get(name), AUTO_DEFAULTS["cuda"].get(name)
    if name == "total_batch_size":
        cpu = "batch_size*seq_len*world_size"
    return f"CPU/MPS: {cpu}, CUDA: {cuda}"


@dataclass
class TrainConfig:
    # --- model
    model: str = _f("auto", f"model preset: {', '.join(PRESETS)}", _auto_text("model"))
    n_layer: int | None = _f(None, "override the preset's number of layers", "the preset's")
    n_head: int | None = _f(None, "override the preset's number of heads", "the preset's")
    n_embd: int | None = _f(None, "override the preset's embedding width", "the preset's")
    vocab_multiple: int | None = _f(None, "pad the vocabulary to a multiple of this",
                                    _auto_text("vocab_multiple"))
    dropout: float = _f(0.0, "dropout probability (0 for pretraining)")
    backend: str = _f("auto", "op backend: auto | torch | triton", "triton on CUDA with Triton, else torch")
    init_from: str = _f("", "start from a Hugging Face GPT-2 checkpoint folder (empty: random init)")
    compile: bool = _f(False, "torch.compile the model (for comparison)")
    # --- data
    data: str = _f("", "text file, folder, or token shards (empty: the default corpus)")
    tokenizer: str = _f("auto", "tokenizer: auto | gpt2 | bytes", "gpt2 when its files load, else bytes")
    val_fraction: float = _f(0.1, "fraction of a text corpus held out as the val split")
    # --- batch and schedule
    batch_size: int | None = _f(None, "micro-batch size B (sequences per forward)", _auto_text("batch_size"))
    seq_len: int | None = _f(None, "sequence length T", _auto_text("seq_len"))
    total_batch_size: int | None = _f(None, "tokens per optimizer step (a multiple of B*T*world_size)",
                                      _auto_text("total_batch_size"))
    max_steps: int | None = _f(None, "optimizer steps", _auto_text("max_steps"))
    warmup_steps: int | None = _f(None, "linear warm-up steps", _auto_text("warmup_steps"))
    max_lr: float | None = _f(None, "peak learning rate", _auto_text("max_lr"))
    min_lr: float | None = _f(None, "final learning rate of the cosine decay", "max_lr * 0.1")
    weight_decay: float = _f(0.1, "AdamW weight decay (parameters with dim >= 2 only)")
    grad_clip: float = _f(1.0, "clip the global grad norm at this (0: no clipping)")
    betas: tuple = _f((0.9, 0.95), "AdamW betas")
    # --- hardware
    device: str = _f("auto", "auto | cpu | cuda | mps", "cuda > mps > cpu")
    dtype: str = _f("auto", "fp32 | bf16 (autocast, fp32 weights) | bf16-params (bf16 weights, fp32 "
                    "optimizer state with the triton optimizer)", "bf16 on CUDA, fp32 elsewhere")
    optimizer: str = _f("auto", "auto | triton | torch",
                        "triton FusedAdamW on CUDA+triton, torch fused AdamW on CUDA, torch AdamW elsewhere")
    cuda_graphs: str = _f("auto", "auto | on | off: capture the whole step in a CUDA graph",
                          "on where possible (CUDA, triton backend, no compile, no DDP), else off with the reason")
    # --- output
    run_dir: str = _f("auto", "folder for checkpoints, metrics.csv, loss.png",
                      "the resumed run's folder, else runs/<date-time>")
    log_interval: int = _f(1, "print (and sync for) the log every this many steps")
    eval_interval: int | None = _f(None, "val loss every this many steps (0: never)", _auto_text("eval_interval"))
    eval_batches: int | None = _f(None, "val batches per process for each val loss", _auto_text("eval_batches"))
    sample_interval: int | None = _f(None, "sample text every this many steps (0: never)",
                                     _auto_text("sample_interval"))
    checkpoint_interval: int | None = _f(None, "checkpoint every this many steps and at the end (0: never)",
                                         _auto_text("checkpoint_interval"))
    keep_checkpoints: int = _f(3, "keep the last K checkpoints (0: all)")
    seed: int = _f(1337, "random seed (model init, sampling)")
    resume: str = _f("", "continue from a checkpoint file, or a run folder's latest checkpoint")
    profile: bool = _f(False, "profile a few steps (torch.profiler) and write a trace to the run folder")

    def __post_init__(self):
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        choices = {"device": DEVICES, "dtype": DTYPES, "backend": ("auto", "torch", "triton"),
                   "optimizer": OPTIMIZERS, "cuda_graphs": GRAPH_MODES, "tokenizer": TOKENIZERS}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise UserInputError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {value!r}")
        if self.model != "auto" and self.model not in PRESETS:
            raise UserInputError(f"{_flag('model')} must be auto or one of {', '.join(PRESETS)}, "
                                 f"got {self.model!r}")
        positive = ("n_layer", "n_head", "n_embd", "vocab_multiple", "batch_size", "seq_len",
                    "total_batch_size", "max_steps", "eval_batches", "log_interval")
        non_negative = ("warmup_steps", "eval_interval", "sample_interval", "checkpoint_interval",
                        "keep_checkpoints")
        for name in positive + non_negative + ("seed",):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserInputError(f"{_flag(name)} must be an integer, got {value!r}")
            if name in positive and value < 1:
                raise UserInputError(f"{_flag(name)} must be >= 1, got {value}")
            if name in non_negative and value < 0:
                raise UserInputError(f"{_flag(name)} must be >= 0, got {value}")
        for name in ("max_lr", "min_lr", "weight_decay", "grad_clip", "dropout", "val_fraction"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserInputError(f"{_flag(name)} must be a finite number, got {value!r}")
            if value < 0:
                raise UserInputError(f"{_flag(name)} must be >= 0, got {value}")
        if self.max_lr is not None and self.max_lr <= 0:
            raise UserInputError(f"{_flag('max_lr')} must be > 0, got {self.max_lr}")
        if self.min_lr is not None and self.max_lr is not None and self.min_lr > self.max_lr:
            raise UserInputError(f"{_flag('min_lr')} ({self.min_lr}) must be <= max_lr ({self.max_lr})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserInputError(f"{_flag('dropout')} must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserInputError(f"{_flag('val_fraction')} must be in [0, 1), got {self.val_fraction}")
        if (len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0
                                            for b in self.betas)):
            raise UserInputError(f"{_flag('betas')} must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("model", "backend", "init_from", "data", "run_dir", "resume"):
            if not isinstance(getattr(self, name), str):
                raise UserInputError(f"{_flag(name)} must be a string, got {getattr(self, name)!r}")
        if (self.warmup_steps is not None and self.max_steps is not None
                and self.warmup_steps > self.max_steps):
            raise UserInputError(f"{_flag('warmup_steps')} ({self.warmup_steps}) must be <= max_steps "
                                 f"({self.max_steps})")
        if self.init_from and self.resume:
            raise UserInputError("--init-from and --resume exclude each other: a resumed run "
                                 "continues from its checkpoint's weights")
        if self.batch_size and self.seq_len and self.total_batch_size:
            check_total_batch(self.total_batch_size, self.batch_size, self.seq_len, 1)

    def resolved(self, device_type: str, world_size: int = 1) -> "TrainConfig":
        """A copy with every auto number filled in from AUTO_DEFAULTS for this device,
        after checking that total_batch_size divides by batch_size*seq_len*world_size."""
        table = AUTO_DEFAULTS["cuda" if device_type == "cuda" else "cpu"]
        values = {}
        for name, default in table.items():
            current = getattr(self, name)
            if current is None or current == "auto":
                values[name] = default
        max_steps = values.get("max_steps", self.max_steps)
        if "warmup_steps" in values and values["warmup_steps"] > max_steps:
            values["warmup_steps"] = max_steps  # a short run warms up over all of it
        cfg = dataclasses.replace(self, **values)
        if cfg.total_batch_size is None:
            cfg.total_batch_size = cfg.batch_size * cfg.seq_len * world_size
        if cfg.min_lr is None:
            cfg.min_lr = cfg.max_lr * 0.1
        check_total_batch(cfg.total_batch_size, cfg.batch_size, cfg.seq_len, world_size)
        return dataclasses.replace(cfg)  # runs __post_init__ on the resolved values

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def check_total_batch(total: int, B: int, T: int, world_size: int) -> int:
    """Gradient-accumulation steps; a clear error when total is not a multiple."""
    per_step = B * T * world_size
    if total % per_step != 0:
        raise UserInputError(
            f"total_batch_size (--total-batch-size) {total} is not divisible by batch_size * seq_len * "
            f"world_size = {B} * {T} * {world_size} = {per_step}")
    return total // per_step


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to max_lr over warmup_steps, then cosine decay to min_lr at
    max_steps; min_lr from then on (build-nanogpt's schedule)."""
    max_lr, min_lr = cfg.max_lr, cfg.min_lr if cfg.min_lr is not None else cfg.max_lr * 0.1
    if step < cfg.warmup_steps:
        return max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    span = cfg.max_steps - cfg.warmup_steps
    ratio = (step - cfg.warmup_steps) / span if span > 0 else 1.0
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (max_lr - min_lr)


def resolve_device(name: str) -> str:
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if (mps is not None and mps.is_available()) else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("device (--device) cuda: no CUDA GPU is available; use --device cpu")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserInputError("device (--device) mps: MPS is not available; use --device cpu")
    return name


def resolve_dtype(name: str, device_type: str) -> str:
    if name == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return name


def autocast_factory(dtype: str, device_type: str, cache_enabled: bool = True):
    """A callable giving a fresh autocast context (a no-op outside bf16 autocast mode).
    A captured CUDA graph needs cache_enabled=False: autocast's cache of cast weights
    would hold tensors of the capture that replays never refresh."""
    if dtype == "bf16":
        return lambda: torch.autocast(device_type=device_type, dtype=torch.bfloat16,
                                      cache_enabled=cache_enabled)
    return contextlib.nullcontext


def micro_step(model, x, y, accum: int, autocast_ctx) -> torch.Tensor:
    """Forward and backward of one micro-batch with the loss scaled by 1/accum, so the
    gradients accumulated over `accum` micro-steps are those of the mean loss.
    Returns the scaled loss, detached, in fp32."""
    with torch.profiler.record_function("forward"), autocast_ctx():
        _, loss = model(x, y, return_logits=False)
    loss = loss / accum
    with torch.profiler.record_function("backward"):
        loss.backward()
    return loss.detach().float()


def _record(name):
    return torch.profiler.record_function(name)


class Trainer:
    """Everything a run needs, set up from a TrainConfig; `run()` trains.

    `log` receives each line (rank 0 only). After `run()`, `history` holds one dict
    per step (step, loss, lr, grad_norm, dt_ms, tokens_per_sec, val_loss or None).
    """

    def __init__(self, cfg: TrainConfig, log=print):
        device_type = resolve_device(cfg.device)
        if device_type == "cuda":
            # As build-nanogpt: fp32 matmuls (--dtype fp32, and those autocast leaves
            # in fp32) on TF32 tensor cores. Process-wide, as torch's switch is.
            torch.set_float32_matmul_precision("high")
        self.dist = dist_lib.init_distributed(device_type)
        try:
            self._setup(cfg, device_type, log)
        except BaseException:
            dist_lib.destroy(self.dist)
            raise

    # ------------------------------------------------------------------ setup
    def _setup(self, cfg: TrainConfig, device_type: str, log):
        info = self.dist
        self._log = log if info.master else (lambda *a, **k: None)
        self.device = torch.device(dist_lib.process_device(device_type, info))
        self.device_type = self.device.type
        cfg = cfg.resolved(self.device_type, info.world_size)
        self.cfg = cfg
        self.accum = check_total_batch(cfg.total_batch_size, cfg.batch_size, cfg.seq_len, info.world_size)
        self.dtype = resolve_dtype(cfg.dtype, self.device_type)
        self.autocast_ctx = autocast_factory(self.dtype, self.device_type)
        from engine.ops import resolve_backend
        try:
            self.backend = resolve_backend(cfg.backend, self.device_type)
        except RuntimeError as e:
            raise UserInputError(f"backend (--backend): {e}") from None
        if self.backend == "triton" and cfg.dropout > 0:
            raise UserInputError(f"dropout (--dropout) {cfg.dropout}: the triton backend's attention "
                                 "has no dropout; use --dropout 0 or --backend torch")

        resume_path = ckpt_lib.resolve_checkpoint(cfg.resume) if cfg.resume else None
        self.run_dir = pathlib.Path(self._choose_run_dir(cfg, resume_path))

        from engine.tokenizer import load_tokenizer
        self.tokenizer, tok_reason = load_tokenizer(cfg.tokenizer)
        corpus_note = ""
        data_path = cfg.data
        if not data_path:
            from engine.data import resolve_default_corpus
            data_path, corpus_note = resolve_default_corpus()
        self.data_path = str(data_path)
        from engine.data import build_loader
        common = dict(rank=info.rank, world_size=info.world_size, tokenizer=self.tokenizer,
                      val_fraction=cfg.val_fraction, seed=cfg.seed)
        self.train_loader = build_loader(data_path, cfg.batch_size, cfg.seq_len, split="train",
                                         pin_memory=self.device_type == "cuda", **common)
        self.val_loader = build_loader(data_path, cfg.batch_size, cfg.seq_len, split="val",
                                       pin_memory=self.device_type == "cuda", **common)

        ckpt = ckpt_lib.load_checkpoint(resume_path) if resume_path else None
        self.raw_model = self._build_model(cfg, ckpt)
        self.model_config = self.raw_model.config
        if cfg.seq_len > self.model_config.block_size:
            raise UserInputError(f"seq_len (--seq-len) {cfg.seq_len} exceeds the model's block_size "
                                 f"{self.model_config.block_size}")
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise UserInputError(f"the {self.tokenizer.name} tokenizer has {self.tokenizer.vocab_size} ids "
                                 f"but the model's vocabulary has {self.model_config.vocab_size}")

        self.optimizer_kind = resolve_optimizer(cfg.optimizer, self.device_type, self.backend)
        self.use_graphs, graph_reason = graph_decision(cfg.cuda_graphs, self.device_type, self.backend,
                                                       cfg.compile, info.ddp, self.optimizer_kind,
                                                       profile=cfg.profile)
        optimizer_lines = []  # printed after the header lines below
        self.optimizer = configure_optimizer(self.raw_model, cfg, self.device, self.optimizer_kind,
                                             capturable=self.use_graphs, log=optimizer_lines.append)
        model = self.raw_model
        if cfg.compile:
            model = torch.compile(model)
        self.model = dist_lib.wrap_model(model, info, self.device)

        self.step = 0
        if ckpt is not None:
            self._restore(ckpt, resume_path)
            if info.master:
                self._set_aside_later_checkpoints()
        self.graphed = None
        if self.use_graphs:
            self.graphed = GraphedTrainStep(self.model, self.optimizer, self.accum, cfg.batch_size,
                                            cfg.seq_len, self.device,
                                            autocast_factory(self.dtype, self.device_type, False),
                                            cfg.grad_clip,
                                            log=self._log)

        n_params = self.raw_model.num_parameters()
        self._log(f"device: {self.device}{f' (DDP, world size {info.world_size})' if info.ddp else ''}"
                  f" | dtype: {self.dtype} | backend: {self.backend} | optimizer: {self._optimizer_text()}")
        self._log(f"model: {self._model_text()} | {n_params:,} parameters")
        for line in optimizer_lines:
            self._log(line)
        self._log(f"tokenizer: {self.tokenizer.name} ({tok_reason})")
        self._log(f"corpus: {corpus_note or self.data_path}")
        self._log(f"train data: {self.train_loader.description}")
        self._log(f"val data: {self.val_loader.description}")
        self._log(f"total batch: {cfg.total_batch_size:,} tokens = {cfg.batch_size} x {cfg.seq_len} x "
                  f"{info.world_size} process(es) x {self.accum} accumulation step(s)")
        self._log(f"cuda graphs: {'on' if self.use_graphs else 'off'} ({graph_reason})")
        if self.dtype == "bf16-params" and self.optimizer_kind == "torch":
            self._log("note: with bf16-params, torch's AdamW keeps its moments in bf16 (the parameters' "
                      "dtype); --optimizer triton keeps them in fp32")
        self._log(f"run folder: {self.run_dir}" + (f" | resumed from {resume_path} at step {self.step}"
                                                      if resume_path else ""))
        self.history: list[dict] = []
        self._pending: list[tuple] = []
        self._val_at: dict[int, float] = {}
        if info.master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "config.json", "w") as f:
                json.dump({"train": cfg.to_dict(), "model": self.model_config.to_dict()}, f, indent=2)
            self._init_csv()

    def _set_aside_later_checkpoints(self):
        """Resuming from an earlier checkpoint abandons the steps after it: their
        checkpoints move to superseded/ (kept, never deleted), so that `--resume
        RUN_DIR` keeps meaning this run's latest step."""
        later = [p for p in ckpt_lib.list_checkpoints(self.run_dir)
                 if int(ckpt_lib.CKPT_RE.match(p.name).group(1)) > self.step]
        if not later:
            return
        aside = self.run_dir / "superseded" / time.strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for p in later:
            os.replace(p, aside / p.name)
        self._log(f"resume: moved {len(later)} later checkpoint(s) of the abandoned steps to {aside}")

    def _choose_run_dir(self, cfg, resume_path) -> str:
        if cfg.run_dir != "auto":
            return cfg.run_dir
        if resume_path is not None:
            return str(resume_path.parent)
        name = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        return dist_lib.broadcast_object(name, self.dist)  # every rank names the same folder

    def _build_model(self, cfg, ckpt):
        from engine.model import GPT
        torch.manual_seed(cfg.seed)
        if ckpt is not None:
            mc = GPTConfig.from_dict(dict(ckpt["model_config"]))
            mc = dataclasses.replace(mc, backend=self.backend)
            model = GPT(mc)
        elif cfg.init_from:
            overrides = dict(backend=self.backend, vocab_multiple=cfg.vocab_multiple, dropout=cfg.dropout)
            model = GPT.from_pretrained(cfg.init_from, **overrides)
        else:
            overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k)}
            try:
                mc = GPTConfig.from_preset(cfg.model, vocab_size=self.tokenizer.vocab_size,
                                           vocab_multiple=cfg.vocab_multiple, dropout=cfg.dropout,
                                           backend=self.backend, **overrides)
            except ValueError as e:
                raise UserInputError(f"model: {e}") from None
            model = GPT(mc)
        model.to(self.device)
        # The loaders only yield ids of the tokenizer, whose vocabulary is checked
        # against the model's below: no per-step host sync to re-check them.
        model.validate_token_ids = False
        if self.dtype == "bf16-params":
            model.to(torch.bfloat16)
        return model

    def _restore(self, ckpt, path):
        missing = [k for k in ("model", "optimizer", "step", "train_loader", "val_loader", "rng")
                   if k not in ckpt]
        if missing:
            raise UserInputError(f"resume: {path} is not a training checkpoint (missing {', '.join(missing)})")
        if ckpt.get("tokenizer") not in (None, self.tokenizer.name):
            raise UserInputError(f"resume: {path} was trained with the {ckpt['tokenizer']} tokenizer, "
                                 f"this run uses {self.tokenizer.name} (set --tokenizer)")
        self.raw_model.load_state_dict(ckpt["model"])
        # Keep this run's learning-rate objects (device tensors when capturable):
        # load_state_dict would replace them with the saved ones.
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        self.train_loader.load_state_dict(ckpt["train_loader"])
        self.val_loader.load_state_dict(ckpt["val_loader"])
        ckpt_lib.set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])

    def _optimizer_text(self) -> str:
        if self.optimizer_kind == "triton":
            return "triton FusedAdamW"
        fused = any(g.get("fused") for g in self.optimizer.param_groups)
        return "torch AdamW" + (" (fused)" if fused else "")

    def _model_text(self) -> str:
        c = self.model_config
        src = (f"from {self.cfg.init_from}" if self.cfg.init_from else f"preset {self.cfg.model}")
        return (f"{src}: n_layer={c.n_layer} n_head={c.n_head} n_embd={c.n_embd} "
                f"block_size={c.block_size} vocab={c.vocab_size} (padded {c.padded_vocab_size})")

    # ------------------------------------------------------------------ files
    @property
    def csv_path(self) -> pathlib.Path:
        return self.run_dir / "metrics.csv"

    def _init_csv(self):
        kept = []
        if self.step > 0 and self.csv_path.is_file():
            with open(self.csv_path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()
                        and int(r["step"]) < self.step]
        with open(self.csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(kept)

    def _append_csv(self, row: dict):
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow(
                {k: ("" if row.get(k) is None else row[k]) for k in CSV_FIELDS})

    def save_checkpoint(self, step: int) -> pathlib.Path | None:
        """Write ckpt_{step:06d}.pt (step = steps completed); rank 0 only."""
        self._flush()  # a diverged step raises here, so it is never saved
        if not self.dist.master:
            return None
        state = {
            "version": 1,
            "step": step,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "train_loader": self.train_loader.state_dict(),
            "val_loader": self.val_loader.state_dict(),
            "rng": ckpt_lib.rng_state(),
            "train_config": self.cfg.to_dict(),
            "model_config": self.model_config.to_dict(),
            "tokenizer": self.tokenizer.name,
            "world_size": self.dist.world_size,
        }
        path = ckpt_lib.save_checkpoint(self.run_dir, step, state, keep=self.cfg.keep_checkpoints)
        self._log(f"checkpoint: {path}")
        return path

    def plot(self) -> pathlib.Path | None:
        """loss.png: train loss per step and val loss where evaluated."""
        if not self.dist.master or not self.history:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self._log("note: matplotlib is not installed, so no loss curve (pip install matplotlib); "
                      f"the numbers are in {self.csv_path}")
            return None
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.plot([h["step"] for h in self.history], [h["loss"] for h in self.history], label="train")
        val = [(h["step"], h["val_loss"]) for h in self.history if h["val_loss"] is not None]
        if val:
            ax.plot(*zip(*val), "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        path = self.run_dir / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self._log(f"loss curve: {path}")
        return path

    # ------------------------------------------------------------------ steps
    def _next_batches(self):
        with _record("data_loading"):
            return [self.train_loader.next_batch() for _ in range(self.accum)]

    def train_step(self, step: int):
        """One optimizer step; returns (loss, grad norm) as device tensors (no host sync)."""
        cfg = self.cfg
        set_lr(self.optimizer, get_lr(step, cfg))
        if self.graphed is not None:
            batches = self._next_batches()
            xs = torch.stack([b[0] for b in batches])
            ys = torch.stack([b[1] for b in batches])
            loss, norm = self.graphed.step(xs, ys)
            # the graph's output buffers are overwritten by the next replay
            return loss.clone(), norm.clone()
        self.model.train()
        # FusedAdamW caches a launch table keyed by the gradients' addresses: keep them.
        self.optimizer.zero_grad(set_to_none=self.optimizer_kind != "triton")
        loss_accum = torch.zeros((), dtype=torch.float32, device=self.device)
        for m in range(self.accum):
            with _record("data_loading"):
                x, y = self.train_loader.next_batch()
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
            if self.dist.ddp:
                # all-reduce the gradients only after the last micro-step's backward
                self.model.require_backward_grad_sync = m == self.accum - 1
            loss_accum += micro_step(self.model, x, y, self.accum, self.autocast_ctx)
        dist_lib.all_reduce_mean(loss_accum, self.dist)
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.raw_model.parameters()
                                                  if p.grad is not None])
        with _record("optimizer_step"):
            self.optimizer.step()
        return loss_accum, norm

    def _flush(self, keep_newest: bool = False):
        """Read the pending steps' loss and norm (one host sync), log them, and stop
        on a non-finite loss. keep_newest leaves the step just queued pending, so
        the host waits on the step before it while the GPU already runs this one."""
        keep = 1 if keep_newest else 0
        if len(self._pending) <= keep:
            return
        pending = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep:]
        values = torch.stack([torch.stack([l.float(), n.float()]) for _, _, l, n in pending]).tolist()
        now = time.perf_counter()
        dt = (now - self._t_mark) / len(pending)
        self._t_mark = now
        tokens = self.cfg.total_batch_size
        for (step, lr, _, _), (loss, norm) in zip(pending, values):
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"training diverged: the loss is {loss} at step {step}; stopping without saving "
                    f"(the last checkpoint in {self.run_dir} is untouched). Try a lower --max-lr "
                    f"or --grad-clip")
            row = dict(step=step, loss=loss, lr=lr, grad_norm=norm, dt_ms=dt * 1000,
                       tokens_per_sec=tokens / dt if dt > 0 else float("inf"),
                       val_loss=self._val_at.pop(step, None))
            self.history.append(row)
            if self.dist.master:
                self._log(f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
                          f"dt {dt * 1000:.2f}ms | tok/sec {row['tokens_per_sec']:.2f}")
                self._append_csv(row)

    def _reset_clock(self):
        if self.device_type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t_mark = time.perf_counter()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean val loss over eval_batches batches, always the same ones (loader reset)."""
        model = self.raw_model
        model.eval()
        self.val_loader.reset()
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for _ in range(self.cfg.eval_batches):
            x, y = self.val_loader.next_batch()
            x, y = x.to(self.device), y.to(self.device)
            with self.autocast_ctx():
                _, loss = model(x, y, return_logits=False)
            total += loss.float()
        total /= self.cfg.eval_batches
        dist_lib.all_reduce_mean(total, self.dist)
        model.train()
        return float(total.item())

    def sample(self, step: int, num_samples: int = 2, max_new_tokens: int = 32) -> list[str]:
        """A few continuations of a fixed prompt (top-k 50), logged; rank 0 only."""
        if not self.dist.master:
            return []
        from engine.generate import generate
        ids = self.tokenizer.encode(SAMPLE_PROMPT)
        idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=self.device)
        limit = self.model_config.block_size - idx.size(1)
        with self.autocast_ctx():
            out = generate(self.raw_model, idx, max_new_tokens=max(0, min(max_new_tokens, limit)),
                           temperature=1.0, top_k=50, seed=self.cfg.seed + step)
        texts = [self.tokenizer.decode(row.tolist()) for row in out]
        for i, t in enumerate(texts):
            self._log(f"sample {i}: {t!r}")
        return texts

    # ------------------------------------------------------------------ run
    def _due(self, interval: int, step: int) -> bool:
        return interval > 0 and step % interval == 0

    def run(self) -> list[dict]:
        """Train from self.step to max_steps; returns the history. Tears down DDP."""
        try:
            if self.cfg.profile:
                self._profile()
            else:
                self._loop()
                self.plot()
            return self.history
        finally:
            dist_lib.destroy(self.dist)

    def _loop(self):
        cfg = self.cfg
        self._reset_clock()
        for step in range(self.step, cfg.max_steps):
            last = step == cfg.max_steps - 1
            if cfg.eval_interval > 0 and (self._due(cfg.eval_interval, step) or last):
                self._flush()
                val = self.evaluate()
                self._val_at[step] = val
                self._log(f"validation loss: {val:.4f}")
                self._reset_clock()
            if cfg.sample_interval > 0 and step > 0 and (self._due(cfg.sample_interval, step) or last):
                self._flush()
                self.sample(step)
                self._reset_clock()
            lr = get_lr(step, cfg)
            loss, norm = self.train_step(step)
            self._pending.append((step, lr, loss, norm))
            self.step = step + 1
            if (step + 1) % cfg.log_interval == 0 or last:
                # On CUDA a step's line is printed once the next step is queued, so
                # reading the loss never leaves the GPU idle.
                self._flush(keep_newest=self.device_type == "cuda" and not last)
            if cfg.checkpoint_interval > 0 and ((step + 1) % cfg.checkpoint_interval == 0 or last):
                self.save_checkpoint(step + 1)
                self._reset_clock()
        self._flush()

    def _profile(self):
        from engine.profiling import profile_training

        def run_step(i):
            step = min(self.step, self.cfg.max_steps - 1)
            lr = get_lr(step, self.cfg)
            loss, norm = self.train_step(step)
            self._pending.append((step, lr, loss, norm))
            self.step += 1
            self._flush()

        self._reset_clock()
        out_dir = self.run_dir if self.dist.master else self.run_dir / f"profile_rank{self.dist.rank}"
        trace = profile_training(run_step, str(out_dir), self.device_type, log=self._log)
        self._log(f"profile trace: {trace}")


def train(cfg: TrainConfig, log=print) -> Trainer:
    """Set up and run; returns the Trainer (its history, run_dir, model)."""
    trainer = Trainer(cfg, log=log)
    trainer.run()
    return trainer
