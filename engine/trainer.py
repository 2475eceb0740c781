"""The training run: build-nanogpt's train_gpt2.py, made into a tool.

`Trainer(cfg).run()` trains: it wires the device, data, model, optimizer and run
folder from a TrainConfig, then loops. Each step is `engine.step.train_step`
(gradient accumulation, clipping, AdamW; on CUDA with the triton backend the
whole step replayed as a CUDA graph), with build-nanogpt's warm-up + cosine
learning rate. One log line and CSV row per step (engine.run_log), the val loss
every eval_interval steps, samples every sample_interval steps, checkpoints every
checkpoint_interval steps, a loss-curve PNG at the end. Under torchrun the model
is wrapped in DDP and rank 0 logs and writes every file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time

import torch

from engine import checkpoint as ckpt_lib
from engine import distributed as dist_lib
from engine.config import GPTConfig
from engine.cuda_graph import GraphedTrainStep, graph_decision
from engine.errors import UserInputError
from engine.fileio import atomic_write
from engine.optim import configure_optimizer, lr_at, resolve_optimizer, set_lr
from engine.run_log import RunLog
from engine.step import autocast_factory, train_step
from engine.train_config import SAMPLE_PROMPT, TrainConfig, accumulation_steps


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stops and the
    checkpoints on disk stay as they were."""


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
        self._log = log if self.dist.master else (lambda *a, **k: None)
        try:
            self._setup(cfg, device_type)
        except BaseException:
            dist_lib.destroy(self.dist)
            raise

    # ------------------------------------------------------------------ setup
    def _setup(self, cfg: TrainConfig, device_type: str):
        info = self.dist
        self.device = torch.device(dist_lib.process_device(device_type, info))
        self.device_type = self.device.type
        self.cfg = cfg = cfg.resolved(self.device_type, info.world_size)
        self.accum = accumulation_steps(cfg.total_batch_size, cfg.batch_size, cfg.seq_len, info.world_size)
        self.dtype = resolve_dtype(cfg.dtype, self.device_type)
        self.autocast = autocast_factory(self.dtype, self.device_type)
        from engine.ops import resolve_backend
        try:
            self.backend = resolve_backend(cfg.backend, self.device_type)
            self.optimizer_kind = resolve_optimizer(cfg.optimizer, self.device_type, self.backend)
        except RuntimeError as e:
            raise UserInputError(str(e)) from None
        if self.backend == "triton" and cfg.dropout > 0:
            raise UserInputError(f"dropout (--dropout) {cfg.dropout}: the triton backend has no dropout "
                                 "yet; use --dropout 0 or --backend torch")

        resume_path = ckpt_lib.resolve_checkpoint(cfg.resume) if cfg.resume else None
        self.run_dir = pathlib.Path(self._choose_run_dir(cfg, resume_path))
        self._setup_data(cfg)
        ckpt = ckpt_lib.load_checkpoint(resume_path) if resume_path else None
        self.raw_model = self._build_model(cfg, ckpt)
        self.model_config = self.raw_model.config
        if cfg.seq_len > self.model_config.block_size:
            raise UserInputError(f"seq_len (--seq-len) {cfg.seq_len} exceeds the model's block_size "
                                 f"{self.model_config.block_size}")
        if self.tokenizer.vocab_size > self.model_config.vocab_size:
            raise UserInputError(f"the {self.tokenizer.name} tokenizer has {self.tokenizer.vocab_size} ids "
                                 f"but the model's vocabulary has {self.model_config.vocab_size}")

        self.use_graphs, graph_reason = graph_decision(cfg.cuda_graphs, self.device_type, self.backend,
                                                       cfg.compile, info.ddp, self.optimizer_kind,
                                                       profile=cfg.profile)
        optimizer_lines = []  # printed after the header lines below
        self.optimizer = configure_optimizer(self.raw_model, lr=cfg.max_lr, betas=cfg.betas,
                                             weight_decay=cfg.weight_decay, device=self.device,
                                             kind=self.optimizer_kind, capturable=self.use_graphs,
                                             log=optimizer_lines.append)
        model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
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
                                            cfg.grad_clip, log=self._log)

        self._log(f"device: {self.device}{f' (DDP, world size {info.world_size})' if info.ddp else ''}"
                  f" | dtype: {self.dtype} | backend: {self.backend} | optimizer: {self._optimizer_text()}")
        self._log(f"model: {self._model_text()} | {self.raw_model.num_parameters():,} parameters")
        for line in optimizer_lines:
            self._log(line)
        self._log(f"tokenizer: {self.tokenizer.name} ({self.tokenizer_reason})")
        self._log(f"corpus: {self.corpus_note or self.data_path}")
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
        self.run_log = RunLog(self.run_dir, master=info.master, log=self._log)
        self._pending: list[tuple] = []
        self._val_at: dict[int, float] = {}
        if info.master:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            config = {"train": cfg.to_dict(), "model": self.model_config.to_dict()}
            atomic_write(self.run_dir / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
        self.run_log.start(self.step)

    def _setup_data(self, cfg):
        from engine.data import build_loader, resolve_default_corpus
        from engine.tokenizer import load_tokenizer
        self.tokenizer, self.tokenizer_reason = load_tokenizer(cfg.tokenizer)
        self.corpus_note = ""
        data_path = cfg.data
        if not data_path:
            data_path, self.corpus_note = resolve_default_corpus()
        self.data_path = str(data_path)
        common = dict(rank=self.dist.rank, world_size=self.dist.world_size, tokenizer=self.tokenizer,
                      val_fraction=cfg.val_fraction, seed=cfg.seed, pin_memory=self.device_type == "cuda")
        self.train_loader = build_loader(data_path, cfg.batch_size, cfg.seq_len, split="train", **common)
        self.val_loader = build_loader(data_path, cfg.batch_size, cfg.seq_len, split="val", **common)

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
            model = GPT(dataclasses.replace(mc, backend=self.backend))
        elif cfg.init_from:
            model = GPT.from_pretrained(cfg.init_from, backend=self.backend,
                                        vocab_multiple=cfg.vocab_multiple, dropout=cfg.dropout)
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

    def _optimizer_text(self) -> str:
        if self.optimizer_kind == "triton":
            return "triton FusedAdamW"
        fused = any(g.get("fused") for g in self.optimizer.param_groups)
        return "torch AdamW" + (" (fused)" if fused else "")

    def _model_text(self) -> str:
        c = self.model_config
        src = f"from {self.cfg.init_from}" if self.cfg.init_from else f"preset {self.cfg.model}"
        return (f"{src}: n_layer={c.n_layer} n_head={c.n_head} n_embd={c.n_embd} "
                f"block_size={c.block_size} vocab={c.vocab_size} (padded {c.padded_vocab_size})")

    @property
    def history(self) -> list[dict]:
        return self.run_log.history

    # ------------------------------------------------------------------ steps
    def lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, max_lr=c.max_lr, min_lr=c.min_lr, warmup_steps=c.warmup_steps,
                     max_steps=c.max_steps)

    def train_step(self, step: int):
        """One optimizer step; returns (loss, grad norm) as device tensors (no host sync)."""
        set_lr(self.optimizer, self.lr(step))
        with torch.profiler.record_function("data_loading"):
            batches = [self.train_loader.next_batch() for _ in range(self.accum)]
            xs = torch.stack([x for x, _ in batches])
            ys = torch.stack([y for _, y in batches])
        if self.graphed is not None:
            loss, norm = self.graphed.step(xs, ys)
            # the graph's output buffers are overwritten by the next replay
            return loss.clone(), norm.clone()
        self.model.train()
        if self.device_type == "cuda":
            xs, ys = xs.pin_memory(), ys.pin_memory()  # so the copies below are asynchronous
        xs = xs.to(self.device, non_blocking=True)
        ys = ys.to(self.device, non_blocking=True)
        return train_step(self.model, self.optimizer, xs, ys, grad_clip=self.cfg.grad_clip,
                          autocast=self.autocast,
                          all_reduce=lambda t: dist_lib.all_reduce_mean(t, self.dist))

    def _flush(self, keep_newest: bool = False):
        """Read the pending steps' loss and norm (one host sync), log them, and stop
        on a non-finite one. keep_newest leaves the step just queued pending, so the
        host waits on the step before it while the GPU already runs this one."""
        keep = 1 if keep_newest else 0
        if len(self._pending) <= keep:
            return
        pending, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        values = torch.stack([torch.stack([loss.float(), norm.float()]) for _, _, loss, norm in pending]).tolist()
        now = time.perf_counter()
        dt = (now - self._t_mark) / len(pending)
        self._t_mark = now
        for (step, lr, _, _), (loss, norm) in zip(pending, values):
            finite = math.isfinite(loss) and math.isfinite(norm)
            self.run_log.record(dict(step=step, loss=loss, lr=lr, grad_norm=norm, dt_ms=dt * 1000,
                                     tokens_per_sec=self.cfg.total_batch_size / dt if dt > 0 else float("inf"),
                                     val_loss=self._val_at.pop(step, None), skipped=not finite))
            if not finite:
                latest = ckpt_lib.latest_checkpoint(self.run_dir)
                raise TrainingDiverged(
                    f"training diverged: the loss is {loss} and the grad norm {norm} at step {step}; "
                    f"the step was skipped and the run stopped. Last good checkpoint: "
                    f"{latest or 'none written yet'}. Try a lower --max-lr or --grad-clip")

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
            with self.autocast():
                _, loss = model(x.to(self.device), y.to(self.device), return_logits=False)
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
        with self.autocast():
            out = generate(self.raw_model, idx, max_new_tokens=max(0, min(max_new_tokens, limit)),
                           temperature=1.0, top_k=50, seed=self.cfg.seed + step)
        texts = [self.tokenizer.decode(row.tolist()) for row in out]
        for i, t in enumerate(texts):
            self._log(f"sample {i}: {t!r}")
        return texts

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

    # ------------------------------------------------------------------ run
    def run(self) -> list[dict]:
        """Train from self.step to max_steps; returns the history. Tears down DDP."""
        try:
            if self.cfg.profile:
                self._profile()
            else:
                self._loop()
                self.run_log.plot()
            return self.history
        finally:
            dist_lib.destroy(self.dist)

    def _loop(self):
        cfg = self.cfg

        def due(interval, step):
            return interval > 0 and (step % interval == 0 or step == cfg.max_steps - 1)

        self._reset_clock()
        for step in range(self.step, cfg.max_steps):
            last = step == cfg.max_steps - 1
            if due(cfg.eval_interval, step):
                self._flush()
                self._val_at[step] = val = self.evaluate()
                self._log(f"validation loss: {val:.4f}")
                self._reset_clock()
            if step > 0 and due(cfg.sample_interval, step):
                self._flush()
                self.sample(step)
                self._reset_clock()
            lr = self.lr(step)
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
            lr = self.lr(step)
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
