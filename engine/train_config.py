"""TrainConfig: every hyperparameter of a run, and every value it allows.

Each field carries its help text and, where its default is "auto" (None for
numbers), what auto means; train.py builds its flags and reads TOML files from
these fields (engine.cli), so one name means one thing everywhere. The allowed
values of the choice fields are declared here once (CHOICES) and checked once,
in `__post_init__`; the layers below map the values they receive.

Fields marked resume-safe may differ when a run is resumed; all others are
taken from the checkpoint, and giving a different value is refused.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from engine.config import BACKENDS, PRESETS, RESIDUAL_DTYPES, TRAIN_DTYPES, Fusions
from engine.errors import UserInputError
from engine.tokenizer import TOKENIZER_NAMES

CHOICES = {
    "model": ("auto", *PRESETS),
    "backend": BACKENDS,
    "device": ("auto", "cpu", "cuda", "mps"),
    "dtype": ("auto", *TRAIN_DTYPES),
    "residual_dtype": ("auto", *RESIDUAL_DTYPES),
    "optimizer": ("auto", "triton", "torch"),
    "cuda_graphs": ("auto", "on", "off"),
    "tokenizer": ("auto", *TOKENIZER_NAMES),
    "parallel": ("auto", "ddp", "fsdp"),
}
SAMPLE_PROMPT = "Hello, I'm a language model,"

# What "auto" means, per device kind. CUDA: GPT-2 124M as build-nanogpt trains it
# (0.5M tokens per step, 10B tokens); CPU/MPS: a tiny model whose loss visibly
# falls in about a minute on 2 cores. The CPU schedule was chosen by a sweep over
# seeds on tiny-shakespeare (bench/NOTES.md): with 512 tokens per step, or a peak
# above 1e-3, single steps spike the loss (to above uniform) and the grad norm
# (50-150); 1024 tokens per step at a peak of 8e-4 trained smoothly on every seed,
# with the GPT-2 and the byte tokenizer alike.
AUTO_DEFAULTS = {
    "cpu": dict(model="tiny", batch_size=16, seq_len=64, total_batch_size=None, max_steps=60,
                warmup_steps=10, max_lr=8e-4, eval_interval=20, eval_batches=2,
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


def _f(default, help, auto=None, resume_safe=False):
    """A field with its help text, what auto means, and whether a resume may change it."""
    return field(default=default, metadata={"help": help, "auto": auto, "resume_safe": resume_safe})


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
    backend: str = _f("auto", "op backend: auto | torch | triton", "triton on CUDA with Triton, else torch",
                      resume_safe=True)
    init_from: str = _f("", "start from a Hugging Face GPT-2 checkpoint folder (empty: random init)")
    compile: bool = _f(False, "torch.compile the model (for comparison)", resume_safe=True)
    deterministic: bool = _f(True, "triton backend: attention's backward without atomics, so a "
                             "run and its resume give the same bits; --no-deterministic takes "
                             "the faster atomic backward (Hopper), whose dq varies in its last "
                             "bits", resume_safe=True)
    fusions: str = _f("all", "what the triton backend fuses: all, none, or a comma-separated list of "
                      f"{', '.join(Fusions.names())} (README, Main command: --fusions)", resume_safe=True)
    # --- data
    data: str = _f("", "text file, folder, or token shards (empty: the default corpus)")
    tokenizer: str = _f("auto", "tokenizer: auto | gpt2 | bytes", "gpt2 when its files load, else bytes")
    val_fraction: float = _f(0.1, "fraction of a text corpus held out as the val split")
    # --- batch and schedule
    batch_size: int | None = _f(None, "micro-batch size B (sequences per forward)", _auto_text("batch_size"))
    seq_len: int | None = _f(None, "sequence length T", _auto_text("seq_len"))
    total_batch_size: int | None = _f(None, "tokens per optimizer step (a multiple of B*T*world_size)",
                                      _auto_text("total_batch_size"))
    max_steps: int | None = _f(None, "optimizer steps", _auto_text("max_steps"), resume_safe=True)
    warmup_steps: int | None = _f(None, "linear warm-up steps", _auto_text("warmup_steps"))
    max_lr: float | None = _f(None, "peak learning rate", _auto_text("max_lr"))
    min_lr: float | None = _f(None, "final learning rate of the cosine decay", "max_lr * 0.1")
    lr_decay_steps: int | None = _f(None, "steps the cosine decays over; min_lr after them. A resumed run keeps "
                                    "its value, so steps added by a larger --max-steps run at min_lr; giving it "
                                    "with --resume re-plans the cosine", "max_steps", resume_safe=True)
    weight_decay: float = _f(0.1, "AdamW weight decay (parameters with dim >= 2 only)")
    grad_clip: float = _f(1.0, "clip the global grad norm at this (0: no clipping)")
    betas: tuple = _f((0.9, 0.95), "AdamW betas")
    # --- hardware
    device: str = _f("auto", "auto | cpu | cuda | mps", "cuda > mps > cpu", resume_safe=True)
    dtype: str = _f("auto", "fp32 | bf16 (autocast, fp32 weights) | bf16-params (bf16 weights, fp32 "
                    "optimizer state with the triton optimizer)", "bf16 on CUDA, fp32 elsewhere")
    residual_dtype: str = _f("auto", "fp32 | bf16: the dtype the residual stream is stored in between "
                             "blocks (adds and LayerNorm statistics are fp32 either way)",
                             "bf16 with --dtype bf16 on CUDA, else fp32")
    optimizer: str = _f("auto", "auto | triton | torch",
                        "triton FusedAdamW on CUDA+triton, torch fused AdamW on CUDA, torch AdamW elsewhere",
                        resume_safe=True)
    cuda_graphs: str = _f("auto", "auto | on | off: capture the whole step in a CUDA graph",
                          "on where possible (CUDA, triton backend, no compile, no DDP/FSDP), else off with the "
                          "reason", resume_safe=True)
    parallel: str = _f("auto", "auto | ddp | fsdp: how the processes of torchrun share the model: ddp replicates "
                       "it, fsdp shards weights, gradients and optimizer state over them (FSDP2; sharded "
                       "checkpoints)", "ddp under torchrun, a single process otherwise", resume_safe=True)
    # --- output
    run_dir: str = _f("auto", "folder for checkpoints, metrics.csv, loss.png",
                      "the resumed run's folder, else runs/<date-time>", resume_safe=True)
    log_interval: int = _f(1, "print (and sync for) the log every this many steps", resume_safe=True)
    eval_interval: int | None = _f(None, "val loss every this many steps (0: never)", _auto_text("eval_interval"),
                                   resume_safe=True)
    eval_batches: int | None = _f(None, "val batches per process for each val loss", _auto_text("eval_batches"),
                                  resume_safe=True)
    hellaswag: str = _f("", "HellaSwag jsonl (python -m engine.eval hellaswag's format) scored at every eval "
                        "interval (empty: none)", resume_safe=True)
    sample_interval: int | None = _f(None, "sample text every this many steps (0: never)",
                                     _auto_text("sample_interval"), resume_safe=True)
    checkpoint_interval: int | None = _f(None, "checkpoint every this many steps and at the end (0: never)",
                                         _auto_text("checkpoint_interval"), resume_safe=True)
    keep_checkpoints: int = _f(3, "keep the last K checkpoints (0: all)", resume_safe=True)
    checkpoint_async: bool = _f(False, "with --parallel fsdp: write each checkpoint in the background (a snapshot "
                                "of its step) while training goes on", resume_safe=True)
    overwrite: bool = _f(False, "replace the run already in --run-dir (deletes its checkpoints, metrics.csv, "
                         "config.json, loss.png); without it such a folder is refused", resume_safe=True)
    max_bad_steps: int = _f(3, "a step whose loss or grad norm is NaN/inf is skipped (the weights do not "
                            "change); this many in a row, or one on the last step, stop the run (exit 3)",
                            resume_safe=True)
    ddp_timeout_s: float = _f(600.0, "DDP: seconds a collective waits for the other processes before the "
                              "job stops (exit 5)", resume_safe=True)
    seed: int = _f(1337, "random seed (model init, data order, sampling)")
    resume: str = _f("", "continue from a checkpoint (a file, or a sharded checkpoint folder), or a run "
                     "folder's newest valid checkpoint; auto: --run-dir's newest checkpoint if it has one, else "
                     "start the run there (so torchrun --max-restarts can replay the same command)",
                     resume_safe=True)
    profile: bool = _f(False, "profile a few steps (torch.profiler) and write a trace to the run folder",
                       resume_safe=True)

    def __post_init__(self):
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        for name in ("init_from", "data", "run_dir", "resume", "hellaswag", "fusions", *CHOICES):
            if not isinstance(getattr(self, name), str):
                raise UserInputError(f"{flag(name)} must be a string, got {getattr(self, name)!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserInputError(f"{flag(name)} must be one of {', '.join(allowed)}, "
                                     f"got {getattr(self, name)!r}")
        try:
            Fusions.parse(self.fusions)
        except ValueError as e:
            raise UserInputError(f"{flag('fusions')}: {e}") from None
        positive = ("n_layer", "n_head", "n_embd", "vocab_multiple", "batch_size", "seq_len",
                    "total_batch_size", "max_steps", "lr_decay_steps", "eval_batches", "log_interval",
                    "max_bad_steps")
        non_negative = ("warmup_steps", "eval_interval", "sample_interval", "checkpoint_interval",
                        "keep_checkpoints", "seed")
        for name in positive + non_negative:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserInputError(f"{flag(name)} must be an integer, got {value!r}")
            if name in positive and value < 1:
                raise UserInputError(f"{flag(name)} must be >= 1, got {value}")
            if name in non_negative and value < 0:
                raise UserInputError(f"{flag(name)} must be >= 0, got {value}")
        if self.seed >= 2 ** 63:
            raise UserInputError(f"{flag('seed')} must be < 2**63, got {self.seed}")
        for name in ("max_lr", "min_lr", "weight_decay", "grad_clip", "dropout", "val_fraction",
                     "ddp_timeout_s"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserInputError(f"{flag(name)} must be a finite number, got {value!r}")
            if value < 0:
                raise UserInputError(f"{flag(name)} must be >= 0, got {value}")
        if self.ddp_timeout_s <= 0:
            raise UserInputError(f"{flag('ddp_timeout_s')} must be > 0, got {self.ddp_timeout_s}")
        for name in ("compile", "deterministic", "profile", "overwrite", "checkpoint_async"):
            if not isinstance(getattr(self, name), bool):
                raise UserInputError(f"{flag(name)} must be true or false, got {getattr(self, name)!r}")
        if self.max_lr is not None and self.max_lr <= 0:
            raise UserInputError(f"{flag('max_lr')} must be > 0, got {self.max_lr}")
        if self.min_lr is not None and self.max_lr is not None and self.min_lr > self.max_lr:
            raise UserInputError(f"{flag('min_lr')} ({self.min_lr}) must be <= max_lr ({self.max_lr})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserInputError(f"{flag('dropout')} must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserInputError(f"{flag('val_fraction')} must be in [0, 1), got {self.val_fraction}")
        if (len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                            and 0.0 <= b < 1.0 for b in self.betas)):
            raise UserInputError(f"{flag('betas')} must be two numbers in [0, 1), got {self.betas!r}")
        if (self.warmup_steps is not None and self.max_steps is not None
                and self.warmup_steps > self.max_steps):
            raise UserInputError(f"{flag('warmup_steps')} ({self.warmup_steps}) must be <= max_steps "
                                 f"({self.max_steps})")
        if self.resume == "auto" and self.run_dir == "auto":
            raise UserInputError("--resume auto needs --run-dir: the folder whose newest checkpoint a restarted "
                                 "job continues")
        if (self.warmup_steps is not None and self.lr_decay_steps is not None
                and self.warmup_steps > self.lr_decay_steps):
            raise UserInputError(f"{flag('warmup_steps')} ({self.warmup_steps}) must be <= lr_decay_steps "
                                 f"({self.lr_decay_steps})")
        if self.init_from and self.resume and self.resume != "auto":
            raise UserInputError("--init-from and --resume exclude each other: a resumed run "
                                 "continues from its checkpoint's weights")
        if self.batch_size and self.seq_len and self.total_batch_size:
            accumulation_steps(self.total_batch_size, self.batch_size, self.seq_len, 1)

    def resolved(self, device_type: str, world_size: int = 1) -> "TrainConfig":
        """A copy with every auto number filled in from AUTO_DEFAULTS for this device
        (total_batch_size: one micro-batch per process)."""
        table = AUTO_DEFAULTS["cuda" if device_type == "cuda" else "cpu"]
        values = {name: default for name, default in table.items()
                  if getattr(self, name) in (None, "auto")}
        max_steps = values.get("max_steps", self.max_steps)
        if "warmup_steps" in values and values["warmup_steps"] > max_steps:
            values["warmup_steps"] = max_steps  # a short run warms up over all of it
        cfg = dataclasses.replace(self, **values)
        if cfg.total_batch_size is None:
            cfg.total_batch_size = cfg.batch_size * cfg.seq_len * world_size
        if cfg.min_lr is None:
            cfg.min_lr = cfg.max_lr * 0.1
        if cfg.lr_decay_steps is None:
            cfg.lr_decay_steps = cfg.max_steps
        return dataclasses.replace(cfg)  # runs __post_init__ on the resolved values

    def accumulation(self, world_size: int) -> int:
        """Gradient-accumulation steps of this resolved config on world_size processes;
        a clear error when total_batch_size is not a multiple of B*T*world_size."""
        return accumulation_steps(self.total_batch_size, self.batch_size, self.seq_len, world_size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


def resume_safe_fields() -> list[str]:
    """The fields a resumed run may change; the others come from its checkpoint."""
    return [f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume_safe")]


def flag(name: str) -> str:
    """How a field is named in messages: its key and its flag."""
    return f"{name} (--{name.replace('_', '-')})"


def accumulation_steps(total: int, B: int, T: int, world_size: int) -> int:
    """Gradient-accumulation steps; a clear error when total is not a multiple of B*T*world_size."""
    per_step = B * T * world_size
    if total % per_step != 0:
        raise UserInputError(
            f"total_batch_size (--total-batch-size) {total} is not divisible by batch_size * seq_len * "
            f"world_size = {B} * {T} * {world_size} = {per_step}")
    return total // per_step
